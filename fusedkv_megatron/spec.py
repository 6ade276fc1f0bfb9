"""Megatron layer specs for every KV-sharing variant, through Megatron's backend providers.

`get_fusedkv_decoder_block_spec(config, kv_sharing)` returns the TransformerBlockSubmodules of
the current pipeline stage (sliced like Megatron's own `get_gpt_decoder_block_spec`). The
Transformer Engine backend is used when TE imports and CUDA is present, the local (torch)
backend otherwise; both go through the same `BackendSpecProvider` calls.
"""

from __future__ import annotations

import functools

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from .attention import (
    KVSharingTransformerLayer,
    ReconstructionAttention,
    ReconstructionAttentionSubmodules,
    StorageAttention,
)
from .config import KVSharingConfig
from .fusion import LayerPlan, layer_plans, live_sources
from .kernels.core_attention import SDPAAttention
from .pipeline import mark_stage_edges


@functools.cache
def transformer_engine_available() -> bool:
    """TE is used only if `transformer_engine.pytorch` really imports and CUDA is present."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


class TorchNorm:
    """The local backend's norm (RMSNorm or LayerNorm per config), sequence-parallel aware.

    Megatron's torch norm refuses sequence parallelism; the math needs nothing special, only
    the weight grads summed over TP ranks, which finalize_model_grads does for parameters
    marked `sequence_parallel` (q/k norms are summed by name there).
    """

    def __new__(
        cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, for_qk: bool = False
    ) -> torch.nn.Module:
        norm_cls = torch.nn.RMSNorm if config.normalization == "RMSNorm" else torch.nn.LayerNorm
        norm = norm_cls(hidden_size, eps=eps, dtype=config.params_dtype)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel and not for_qk
        return norm


def get_backend(use_transformer_engine: bool | None = None) -> BackendSpecProvider:
    if use_transformer_engine is None:
        use_transformer_engine = transformer_engine_available()
    if use_transformer_engine:
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    return LocalSpecProvider()


def _core_attention(backend: BackendSpecProvider):
    """TE's fused attention; on the local backend torch SDPA (flash on CUDA) instead of
    Megatron's DotProductAttention, which materializes the full score matrix."""
    if isinstance(backend, LocalSpecProvider):
        return SDPAAttention
    return backend.core_attention()


def _norms(backend: BackendSpecProvider, config: TransformerConfig):
    if isinstance(backend, LocalSpecProvider):
        return TorchNorm, functools.partial(TorchNorm, for_qk=True)
    rms = config.normalization == "RMSNorm"
    return backend.layer_norm(rms_norm=rms), backend.layer_norm(rms_norm=rms, for_qk=True)


def _layer_spec(
    backend: BackendSpecProvider,
    config: TransformerConfig,
    kv: KVSharingConfig,
    plan: LayerPlan,
    plans: list[LayerPlan],
) -> ModuleSpec:
    layer_norm, qk_norm = _norms(backend, config)
    fused_ln = backend.fuse_layernorm_and_linear()
    qkv_linear = backend.column_parallel_layer_norm_linear() if fused_ln else None
    qkv_linear = qkv_linear or backend.column_parallel_linear()
    q_norm = qk_norm if config.qk_layernorm else IdentityOp
    input_ln = IdentityOp if fused_ln else layer_norm
    mlp = get_mlp_module_spec_for_backend(backend=backend)
    proj_name = "linear_q" if plan.is_reconstruction else "linear_qkv"
    keys_map = (
        {
            "input_layernorm.": f"self_attention.{proj_name}.layer_norm_",
            "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
        }
        if not fused_ln
        else {}
    )
    if plan.is_reconstruction:
        attention = ModuleSpec(
            module=ReconstructionAttention,
            params={"attn_mask_type": AttnMaskType.causal, "plan": plan, "kv_sharing": kv},
            submodules=ReconstructionAttentionSubmodules(
                linear_q=qkv_linear,
                core_attention=_core_attention(backend),
                linear_proj=backend.row_parallel_linear(),
                q_layernorm=q_norm,
            ),
        )
    else:
        attention = ModuleSpec(
            module=StorageAttention if kv.shares_kv else SelfAttention,
            params={"attn_mask_type": AttnMaskType.causal}
            | ({"plan": plan} if kv.shares_kv else {}),
            submodules=SelfAttentionSubmodules(
                linear_qkv=qkv_linear,
                core_attention=_core_attention(backend),
                linear_proj=backend.row_parallel_linear(),
                q_layernorm=q_norm,
                k_layernorm=q_norm,
            ),
        )
    submodules = TransformerLayerSubmodules(
        input_layernorm=input_ln,
        self_attention=attention,
        self_attn_bda=get_bias_dropout_add,
        pre_mlp_layernorm=IdentityOp if fused_ln else layer_norm,
        mlp=mlp,
        mlp_bda=get_bias_dropout_add,
        sharded_state_dict_keys_map=keys_map,
    )
    if not kv.shares_kv:
        return ModuleSpec(module=TransformerLayer, submodules=submodules)
    i = plan.layer_number
    return ModuleSpec(
        module=KVSharingTransformerLayer,
        params={
            "in_sources": live_sources(plans, i - 1),
            "out_sources": live_sources(plans, i),
        },
        submodules=submodules,
    )


def get_fusedkv_decoder_layer_specs(
    config: TransformerConfig,
    kv_sharing: KVSharingConfig,
    use_transformer_engine: bool | None = None,
) -> list[ModuleSpec]:
    """One spec per global layer 1..L."""
    tp = config.tensor_model_parallel_size
    kv_sharing.validate(
        config.num_layers,
        config.num_attention_heads,
        config.num_query_groups,
        tp,
    )
    backend = get_backend(use_transformer_engine)
    plans = layer_plans(kv_sharing, config.num_layers)
    return [_layer_spec(backend, config, kv_sharing, p, plans) for p in plans]


def local_layer_range(
    config: TransformerConfig, vp_stage: int | None = None, pp_rank: int | None = None
) -> range:
    """0-based global indices of the layers built on this pipeline stage (and VPP chunk)."""
    if config.pipeline_model_parallel_layout is not None:
        raise NotImplementedError(
            "pipeline_model_parallel_layout is not supported with KV sharing; use "
            "num_layers_in_first/last_pipeline_stage for uneven stages"
        )
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return range(
        offset, offset + get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    )


def get_fusedkv_decoder_block_spec(
    config: TransformerConfig,
    kv_sharing: KVSharingConfig,
    use_transformer_engine: bool | None = None,
    vp_stage: int | None = None,
    pp_rank: int | None = None,
) -> TransformerBlockSubmodules:
    """The block spec of this pipeline stage for any KV-sharing variant (vanilla included)."""
    specs = get_fusedkv_decoder_layer_specs(config, kv_sharing, use_transformer_engine)
    local = mark_stage_edges([specs[i] for i in local_layer_range(config, vp_stage, pp_rank)])
    backend = get_backend(use_transformer_engine)
    final_norm, _ = _norms(backend, config)
    return TransformerBlockSubmodules(layer_specs=local, layer_norm=final_norm)
