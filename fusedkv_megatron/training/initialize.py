"""Start-up: process groups, seeds, tokenizer, model chunks (DDP), optimizer and LR schedule.

Everything is a Megatron-Core component: parallel_state for TP/PP/DP (+ virtual pipeline),
GPTModel chunks from `fusedkv_megatron.build_model`, `DistributedDataParallel`, the Megatron
optimizer (AdamW; distributed optimizer with --use-distributed-optimizer) and
`OptimizerParamScheduler`. Without CUDA it runs on the CPU under gloo (compat/cpu.py).
"""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import (
    OptimizerConfig,
    ParamKey,
    get_megatron_optimizer,
    get_standard_config_overrides,
)
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler, ParamGroupOverride
from megatron.core.transformer.module import Float16Module

from .. import KVSharingConfig, build_model, qwen3_config
from ..compat import optimizer_fixes
from ..data.tokenizer import build_tokenizer
from ..fastpath import fusion_fields, resolve_fusions
from ..fusion import FUSION_WEIGHT_GLOBS
from ..pipeline import check_layout
from .arguments import ArgumentError
from .flags_fastpath import check_gpus_usable, disabled_fusions
from .model_size import padded_vocab  # one padding rule for the trainer and the planner
from .schedule import build_scheduler

# Fusion weights get no weight decay (our choice, docs/model.md); norms and biases neither.
NO_DECAY_NAMES = FUSION_WEIGHT_GLOBS


@dataclass
class Runtime:
    """What the loop needs, built once."""

    args: object
    kv: KVSharingConfig
    config: object  # TransformerConfig
    tokenizer: object
    padded_vocab_size: int
    model: list  # DDP-wrapped chunks
    optimizer: object
    scheduler: OptimizerParamScheduler
    device: torch.device


def init_distributed(backend: str | None, timeout_minutes: int) -> None:
    """torch.distributed from torchrun's environment, or a one-process group without it."""
    if torch.distributed.is_initialized():
        return
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if "RANK" not in os.environ:  # plain `python -m fusedkv_megatron.pretrain`: no rendezvous
        torch.distributed.init_process_group(
            backend, store=torch.distributed.HashStore(), rank=0, world_size=1, timeout=timeout
        )
        return
    torch.distributed.init_process_group(backend, timeout=timeout)


def init_model_parallel(args) -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        distributed_timeout_minutes=args.distributed_timeout_minutes,
    )


def set_seeds(seed: int) -> None:
    """Like Megatron-LM: a different seed per pipeline stage; TP ranks forked by the tracker."""
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def kv_sharing_config(args) -> KVSharingConfig:
    kv = KVSharingConfig(
        variant=args.kv_sharing,
        source_layers=tuple(args.kv_source_layers) if args.kv_source_layers else None,
        weights_per_head=not args.shared_fusion_weights,
        fusion_init=args.fusion_init,
    )
    kv.validate(
        args.num_layers,
        args.num_attention_heads,
        args.num_query_groups,
        args.tensor_model_parallel_size,
    )
    return kv


def fusion_states(args) -> list:
    """Megatron's fusions for this run: on where they can run, less the opt-out flags
    (fastpath.resolve_fusions owns the rules)."""
    return resolve_fusions(
        torch.cuda.is_available(),
        disabled_fusions(args),
        rotary_interleaved=args.rotary_interleaved,
    )


def transformer_config(args, kv=None):
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    overrides = dict(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        num_layers_in_first_pipeline_stage=args.num_layers_in_first_pipeline_stage,
        num_layers_in_last_pipeline_stage=args.num_layers_in_last_pipeline_stage,
        sequence_parallel=args.sequence_parallel,
        context_parallel_size=args.context_parallel_size,
        cp_comm_type=args.cp_comm_type if args.context_parallel_size > 1 else None,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=args.bf16,
        fp16=args.fp16,
        use_cpu_initialization=not torch.cuda.is_available(),
        init_method_std=args.init_method_std,
        layernorm_epsilon=args.norm_epsilon,
        rotary_interleaved=args.rotary_interleaved,
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        deallocate_pipeline_outputs=True,
    )
    if args.fp8_format is not None:
        overrides.update(fp8=args.fp8_format, fp8_recipe=args.fp8_recipe)
    overrides.update(fusion_fields(fusion_states(args)))
    return qwen3_config(
        args.num_layers,
        args.hidden_size,
        args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        ffn_hidden_size=args.ffn_hidden_size,
        kv_channels=args.kv_channels,
        kv_sharing=kv if kv is not None else kv_sharing_config(args),
        **overrides,
    )


def build_model_chunks(args, config, kv, vocab_size: int) -> list:
    """The DDP-wrapped model chunks of this rank (several with a virtual pipeline)."""
    vpp = args.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp) if vpp else [None]:
        chunk = build_model(
            config,
            kv,
            vocab_size,
            args.max_position_embeddings,
            vp_stage=vp_stage,
            rotary_base=args.rotary_base,
            share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
            use_transformer_engine=args.transformer_impl == "transformer_engine",
            init_seed=args.seed,  # the same weights at any TP/PP/VPP layout
        )
        if torch.cuda.is_available():
            chunk.cuda(torch.cuda.current_device())
        if args.bf16 or args.fp16:
            chunk = Float16Module(config, chunk)
        chunks.append(chunk)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=args.bf16 or args.fp16,
        overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather,
        align_param_gather=args.align_param_gather,
        bucket_size=args.ddp_bucket_size,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    return [
        DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]


def build_optimizer(args, model):
    optimizer_fixes.apply()
    config = OptimizerConfig(
        optimizer="adam",
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        clip_grad=args.clip_grad,
        bf16=args.bf16,
        fp16=args.fp16,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32,
        use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_param_gather=args.overlap_param_gather,
        loss_scale=args.loss_scale,
        initial_loss_scale=args.initial_loss_scale,
        min_loss_scale=args.min_loss_scale,
        loss_scale_window=args.loss_scale_window,
        hysteresis=args.hysteresis,
    )
    overrides = get_standard_config_overrides(config)
    overrides[ParamKey(name=NO_DECAY_NAMES)] = ParamGroupOverride(wd_mult=0.0)
    optimizer = get_megatron_optimizer(config, model, config_overrides=overrides)
    return optimizer, build_scheduler(args, optimizer)


def connect_schedule_hooks(
    config, model, optimizer, overlap_grad_reduce: bool, align_param_gather: bool = False
) -> None:
    """What Megatron's schedules call around forward/backward (as Megatron-LM's trainer sets)."""
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    if overlap_grad_reduce:
        no_sync = [m.no_sync for m in model]
        grad_sync = [m.start_grad_sync for m in model]
        config.no_sync_func = no_sync[0] if len(model) == 1 else no_sync
        config.grad_sync_func = grad_sync[0] if len(model) == 1 else grad_sync
    if align_param_gather:  # the schedule launches each chunk's parameter all-gather
        param_sync = [m.start_param_sync for m in model]
        config.param_sync_func = param_sync[0] if len(model) == 1 else param_sync


def setup(args) -> Runtime:
    """Everything up to (not including) checkpoint loading and data."""
    check_gpus_usable(args)
    init_model_parallel(args)
    set_seeds(args.seed)
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size)
    vocab = padded_vocab(
        tokenizer.vocab_size, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size
    )
    kv = kv_sharing_config(args)
    try:
        config = transformer_config(args, kv)
    except ValueError as e:  # Megatron's TransformerConfig checks, e.g. head counts vs TP
        raise ArgumentError(f"the model configuration is invalid: {e}") from None
    # The layout's rules, before anything is built (the library owns them).
    check_layout(config, kv, seq_length=args.seq_length, num_microbatches=args.num_microbatches)
    model = build_model_chunks(args, config, kv, vocab)
    optimizer, scheduler = build_optimizer(args, model)
    connect_schedule_hooks(
        config, model, optimizer, args.overlap_grad_reduce, args.align_param_gather
    )
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    return Runtime(args, kv, config, tokenizer, vocab, model, optimizer, scheduler, device)
