"""Megatron layer specs for every KV-sharing variant, through Megatron's backend providers.

`get_fusedkv_decoder_block_spec(config, kv_sharing)` returns the TransformerBlockSubmodules of
the current pipeline stage (sliced like Megatron's own `get_gpt_decoder_block_spec`). The
Transformer Engine backend is used when asked for (`use_transformer_engine=True`, the
trainer's `--transformer-impl transformer_engine`) or, by default, when TE imports and CUDA is
present; the local (torch) backend otherwise. Both go through the same `BackendSpecProvider`
calls. `describe_attention` says which attention path each kind of layer takes, and why.
"""

from __future__ import annotations

import functools
import importlib.util

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
from .core_attention import SDPAAttention
from .fusion import LayerPlan, layer_plans, live_sources
from .pipeline import mark_stage_edges


@functools.cache
def transformer_engine_import_error() -> str | None:
    """None if `transformer_engine.pytorch` imports, else the error it raised (type: message)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as err:  # a broken install raises more than ImportError
        return f"{type(err).__name__}: {err}"
    return None


def transformer_engine_installed() -> bool:
    """Whether a `transformer_engine` package is on the path (it may still fail to import)."""
    return importlib.util.find_spec("transformer_engine") is not None


def transformer_engine_available() -> bool:
    """TE is usable only if `transformer_engine.pytorch` really imports and CUDA is present."""
    return torch.cuda.is_available() and transformer_engine_import_error() is None


def resolve_transformer_engine(use_transformer_engine: bool | None) -> bool:
    """Whether to build with TE. None (auto): TE where CUDA is present and TE imports; a TE
    that is installed but fails to import is an error, not a silent fallback. True: TE, or an
    error naming why it cannot be used."""
    if use_transformer_engine is False:
        return False
    cuda = torch.cuda.is_available()
    if use_transformer_engine is None and not (cuda and transformer_engine_installed()):
        return False
    error = transformer_engine_import_error()
    if error is None and cuda:
        return True
    why = "; ".join(
        ([] if cuda else ["no CUDA device (Transformer Engine needs one)"])
        + ([] if error is None else [f"'import transformer_engine.pytorch' fails: {error}"])
    )
    raise RuntimeError(
        f"Transformer Engine cannot be used: {why}. Install a working Transformer Engine "
        "(pip install -e '.[te]' on a GPU machine) or build with the local backend "
        "(--transformer-impl local, use_transformer_engine=False)"
    )


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
    """Megatron's TE or local spec provider (see `resolve_transformer_engine`)."""
    if resolve_transformer_engine(use_transformer_engine):
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


def _span(layers: list[int]) -> str:
    """1,2,3,4 -> "1-4"; 2,4,6,8 -> "2,4,...,8"; else the list."""
    if len(layers) > 2 and all(b - a == 1 for a, b in zip(layers, layers[1:], strict=False)):
        return f"{layers[0]}-{layers[-1]}"
    if len(layers) > 3 and len({b - a for a, b in zip(layers, layers[1:], strict=False)}) == 1:
        return f"{layers[0]},{layers[1]},...,{layers[-1]}"
    return ",".join(map(str, layers))


def _fused_path(config: TransformerConfig, plan: LayerPlan, cuda: bool, backend: str | None):
    """(uses the Triton kernel, why) for a reconstruction layer while training, as
    `attention_policy.fused_attention_applies` decides at run time with q in the config's
    dtype."""
    from . import kernels
    from .attention_policy import fused_kernel_blockers

    choice = kernels.requested_backend(backend)
    if choice == "torch":
        return False, f"{kernels.BACKEND_ENV}=torch"
    if not cuda:
        return False, "no CUDA device: the Triton kernels run on GPUs"
    if not kernels.triton_available():
        return False, "triton does not import"
    head_dim = config.kv_channels
    blockers = fused_kernel_blockers(config, head_dim, plan)
    if blockers:
        raise_note = " (forced triton would raise)" if choice == "triton" else ""
        return False, "; ".join(blockers) + raise_note
    dtype = "bf16" if config.bf16 else "fp16" if config.fp16 else "fp32"
    if dtype == "fp32" and choice != "triton":
        return False, "fp32 -> materialised (the kernel's dots would run in TF32)"
    from .kernels.triton_common import padded_head_dim

    tiles = padded_head_dim(head_dim)
    width = f"head dim {head_dim} ok" + (f" ({tiles}-wide tiles)" if tiles != head_dim else "")
    return True, f"{width}, {dtype}, CUDA"


def describe_attention(
    config: TransformerConfig,
    kv_sharing: KVSharingConfig,
    use_transformer_engine: bool,
    cuda: bool,
    backend: str | None = None,
    packed_documents: bool = False,
) -> list[str]:
    """Start-up lines: the backend, and for each kind of layer its attention path (Triton
    fused, TE, SDPA, materialised) and why. `backend` is the kernels' backend choice (default:
    the FUSEDKV_ATTENTION_BACKEND environment variable); `packed_documents`: batches carry a
    document mask, which the fused kernel cannot apply."""
    core = "TE DotProductAttention" if use_transformer_engine else "SDPA"
    if config.context_parallel_size > 1:
        how = (
            f"TE cp_comm_type {config.cp_comm_type or 'p2p'}"
            if use_transformer_engine
            else "K/V all-gathered over the CP group"
        )
        core += f" with CP {config.context_parallel_size} ({how})"
    if use_transformer_engine:
        why = "Transformer Engine: TE linears, norms and core attention"
    elif cuda:
        why = "local: torch modules, SDPA core attention (--transformer-impl local)"
    else:
        why = "local: torch modules, SDPA core attention (no CUDA device; TE needs one)"
    lines = [f"> backend: {why}"]
    plans = layer_plans(kv_sharing, config.num_layers)
    own = [p.layer_number for p in plans if not p.is_reconstruction]
    if own:
        lines.append(f"> attention, layers {_span(own)} (own K/V): {core}")
    recon = [p for p in plans if p.is_reconstruction]
    if recon:
        fused, why = _fused_path(config, recon[0], cuda, backend)
        if fused and packed_documents:
            from .attention_policy import PACKED_DOCUMENTS

            fused, why = False, PACKED_DOCUMENTS
        sources = sorted({s for p in recon for s in p.reads})
        names = ", ".join(f"{kind.upper()}{layer}" for layer, kind in sources)
        path = "Triton fused" if fused else f"materialised K/V, then {core}"
        lines.append(
            f"> attention, layers {_span([p.layer_number for p in recon])} (K/V from sources "
            f"{names}): {path} ({why})"
        )
    return lines
