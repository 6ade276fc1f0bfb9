"""Measurements the planner is checked against: parameters a rank stores and the bytes autograd
saves for backward in one forward pass of a small bf16 model (shared by the single-process
tests and the torchrun worker)."""

from __future__ import annotations

import torch

from fusedkv_megatron import KVSharingConfig, build_model, count_parameters, qwen3_config
from fusedkv_megatron.planner import Job, Layout
from fusedkv_megatron.training.model_size import ModelShape

# A model where every width differs, so a term counted with the wrong width shows.
LAYERS, HIDDEN, FFN, HEADS, HEAD_DIM, VOCAB, SEQ, MBS = 8, 64, 96, 4, 24, 256, 32, 2
RECOMPUTE = {
    "none": {},
    "selective": {"recompute_granularity": "selective"},
    "full-uniform-1": dict(
        recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
    ),
    "full-uniform-3": dict(
        recompute_granularity="full", recompute_method="uniform", recompute_num_layers=3
    ),
    "full-block-2": dict(
        recompute_granularity="full", recompute_method="block", recompute_num_layers=2
    ),
}


def groups(variant: str) -> int:
    return HEADS // 2 if variant == "gqa" else HEADS


def kv_config(variant: str, weights_per_head: bool = True) -> KVSharingConfig:
    return KVSharingConfig(variant, weights_per_head=weights_per_head)


def planner_job(variant: str, tied: bool = True, weights_per_head: bool = True) -> Job:
    shape = ModelShape(LAYERS, HIDDEN, FFN, HEADS, groups(variant), HEAD_DIM, VOCAB, tied)
    return Job(shape, kv_config(variant, weights_per_head), SEQ, "bf16", 1)


def planner_layout(recompute: str, tp: int = 1, pp: int = 1, sp: bool = False) -> Layout:
    fields = RECOMPUTE[recompute]
    return Layout(
        tp=tp,
        pp=pp,
        sequence_parallel=sp,
        micro_batch_size=MBS,
        recompute=fields.get("recompute_granularity", "none"),
        recompute_method=fields.get("recompute_method", "uniform"),
        recompute_num_layers=fields.get("recompute_num_layers", 1),
    )


def build(variant, *, tp=1, pp=1, sp=False, recompute="none", tied=True, per_head=True):
    """This rank's bf16 stage model (Megatron's parallel state must match tp/pp)."""
    config = qwen3_config(
        LAYERS,
        HIDDEN,
        HEADS,
        groups(variant),
        ffn_hidden_size=FFN,
        kv_channels=HEAD_DIM,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sp,
        use_cpu_initialization=True,
        params_dtype=torch.bfloat16,
        pipeline_dtype=torch.bfloat16,
        bf16=True,
        **RECOMPUTE[recompute],
    )
    model = build_model(
        config,
        kv_config(variant, per_head),
        VOCAB,
        SEQ,
        share_embeddings_and_output_weights=tied,
    )
    return model, config


def parameters(model) -> int:
    return count_parameters(model)


def stage_input(config, variant: str) -> torch.Tensor:
    """What the first pipeline stage sends the second: hidden + live sources, bf16."""
    from fusedkv_megatron.pipeline import boundary_bytes

    rows = SEQ // (config.tensor_model_parallel_size if config.sequence_parallel else 1)
    sent = boundary_bytes(config, kv_config(variant), MBS, SEQ)[0].total_bytes
    width = sent // (rows * MBS * 2)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(rows, MBS, width, generator=gen).to(torch.bfloat16)
    return x.requires_grad_()


def saved_bytes(model, config, input_tensor: torch.Tensor | None = None) -> int:
    """Bytes of distinct storages autograd saves in one training forward (parameters
    excluded): views of one tensor count once, at the size of their storage. A later pipeline
    stage gets `input_tensor` as what the previous stage sent."""
    from megatron.core.transformer.module import Float16Module

    wrapped = Float16Module(config, model).train()
    if input_tensor is not None:
        wrapped.set_input_tensor(input_tensor)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (MBS, SEQ), generator=gen)
    positions = torch.arange(SEQ).expand(MBS, SEQ)
    labels = tokens if model.post_process else None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = wrapped(tokens, positions, None, labels=labels)
    out.float().sum().backward()  # releases what the recompute checkpoints hold
    return sum(storages.values())
