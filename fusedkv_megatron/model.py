"""Build a Qwen3-style FusedKV GPTModel for the current pipeline stage in one call."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from . import compat
from .config import KVSharingConfig
from .pipeline import check_pipeline_config, pipeline_p2p_fields
from .spec import get_fusedkv_decoder_block_spec


def qwen3_config(
    num_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    num_query_groups: int | None = None,
    ffn_hidden_size: int | None = None,
    kv_channels: int | None = None,
    *,
    kv_sharing: KVSharingConfig | None = None,
    **overrides,
) -> TransformerConfig:
    """A TransformerConfig with Qwen3's choices: RMSNorm pre-norm, q/k RMSNorm, SwiGLU, no
    biases, no dropout. Any TransformerConfig field can be overridden (parallel sizes, dtype,
    recompute, ...).

    It also sets what `build_model` checks for: per-layer checkpoint keys
    (`hetereogenous_dist_checkpoint=True`: top layers differ in shape from bottom layers) and,
    for an interleaved pipeline, the p2p fields of `pipeline.pipeline_p2p_fields(..., kv_sharing)`.
    An override of those fields stands, and `build_model` then says what is wrong with it.
    """
    fields = dict(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        num_query_groups=num_query_groups or num_attention_heads,
        ffn_hidden_size=ffn_hidden_size or 3 * hidden_size,
        kv_channels=kv_channels or hidden_size // num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=1e-6,
        qk_layernorm=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        hetereogenous_dist_checkpoint=True,
    )
    p2p = pipeline_p2p_fields(
        overrides.get("pipeline_model_parallel_size", 1),
        overrides.get("virtual_pipeline_model_parallel_size"),
        kv_sharing,
    )
    if p2p.get("variable_seq_lengths"):
        # TransformerConfig refuses variable_seq_lengths with its default MoE token dispatcher
        # ("allgather") even in a model without experts; a dense model never reads the field.
        p2p["moe_token_dispatcher_type"] = "alltoall"
    fields.update(p2p)
    fields.update(overrides)
    return TransformerConfig(**fields)


def check_model_config(
    config: TransformerConfig, kv_sharing: KVSharingConfig, *, rotary_percent: float = 1.0
) -> None:
    """What `build_model` needs of its config: the variant's rules (KVSharingConfig.validate),
    per-layer checkpoint keys, and the pipeline layout with its p2p fields
    (pipeline.check_pipeline_config). Raises ValueError (PipelineConfigError for the layout)
    naming the field and the fix."""
    kv_sharing.validate(
        config.num_layers,
        config.num_attention_heads,
        config.num_query_groups,
        config.tensor_model_parallel_size,
        rotary_percent=rotary_percent,
    )
    if not config.hetereogenous_dist_checkpoint:
        # Top layers differ in shape from bottom layers, so checkpoints need per-layer keys
        # ("decoder.layers.<global index>.…") rather than keys stacked over layers.
        raise ValueError(
            "build_model needs TransformerConfig.hetereogenous_dist_checkpoint=True (got False): "
            "KV-sharing top layers differ in shape from the layers below, so checkpoints keep "
            "one key per layer; build the config with qwen3_config (which sets it) or set it"
        )
    check_pipeline_config(config, kv_sharing)


def build_model(
    config: TransformerConfig,
    kv_sharing: KVSharingConfig,
    vocab_size: int,
    max_sequence_length: int,
    *,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    vp_stage: int | None = None,
    rotary_base: float = 1_000_000.0,
    rotary_percent: float = 1.0,
    share_embeddings_and_output_weights: bool = False,
    use_transformer_engine: bool | None = None,
    init_seed: int | None = None,
) -> GPTModel:
    """The GPTModel of this pipeline stage (and virtual stage `vp_stage`) with FusedKV layers.

    Needs megatron's parallel_state initialised (a single process with TP=PP=1 is fine).
    With `init_seed`, every parameter is redrawn so that the same seed gives the same weights
    at any TP/PP/VPP layout (`initialization.reset_parameters`); without it Megatron's own
    initialisation stands, which depends on the layout.
    Applies the Megatron patches (`fusedkv_megatron.compat.apply()`) if no entry point has.
    Checks `config` (`check_model_config`) and never changes it: build it with `qwen3_config`.
    """
    compat.apply()
    check_model_config(config, kv_sharing, rotary_percent=rotary_percent)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(
            ignore_virtual=False, vp_stage=vp_stage
        )
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(
            ignore_virtual=False, vp_stage=vp_stage
        )
    spec = get_fusedkv_decoder_block_spec(
        config,
        kv_sharing,
        use_transformer_engine=use_transformer_engine,
        vp_stage=vp_stage,
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=share_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=rotary_base,
        rotary_percent=rotary_percent,
        vp_stage=vp_stage,
    )
    model.kv_sharing = kv_sharing
    if init_seed is not None:
        from .initialization import reset_parameters

        reset_parameters(model, init_seed)
    return model


def count_parameters(model: torch.nn.Module, with_embeddings: bool = True) -> int:
    """Parameters of this rank's model (shards counted as stored)."""
    total = 0
    for name, p in model.named_parameters():
        if not with_embeddings and ("embedding" in name or "output_layer" in name):
            continue
        total += p.numel()
    return total
