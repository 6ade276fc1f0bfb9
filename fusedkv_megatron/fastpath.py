"""Megatron's fused operations for this model: which are on, and why any is off.

Megatron-LM turns every fusion on unless an opt-out flag says otherwise; so does
`fusedkv-pretrain`, where the fused op can run (`resolve_fusions`). Each entry of `FUSIONS`
is one TransformerConfig field, Megatron-LM's opt-out flag for it, and what the fused op
needs:

| flag                               | TransformerConfig field        | needs                      |
|------------------------------------|--------------------------------|----------------------------|
| --no-bias-swiglu-fusion            | bias_activation_fusion         | CUDA (jit-fused SwiGLU)    |
| --no-bias-dropout-fusion           | bias_dropout_fusion            | CUDA (jit-fused residual)  |
| --no-rope-fusion                   | apply_rope_fusion              | CUDA + Transformer Engine  |
| --no-gradient-accumulation-fusion  | gradient_accumulation_fusion   | CUDA + apex's fused wgrad  |
| --no-masked-softmax-fusion         | masked_softmax_fusion          | never used by this model   |
| --no-persist-layer-norm            | persist_layer_norm             | never used by this model   |

The jit-fused SwiGLU and residual add also run on the CPU (torch.compile), where they are
off by default: compiling them costs more than they save there, and the CPU is where the
exactness tests run (tests/unit/test_fusions.py shows fused == unfused on the CPU, loss and
every gradient). The last two fields belong to modules this model does not build: the
softmax fusion to Megatron's own DotProductAttention (this model uses SDPA or Transformer
Engine's attention, which fuse the softmax themselves), the persistent norm to apex's
LayerNorm (this model's norms are RMSNorm from torch or Transformer Engine); they stay off
and the flags are accepted so that Megatron-LM command lines work unchanged.

`qwen3_config` keeps every field off (a portable, exact default for library use); pass
`**fusion_fields(resolve_fusions(...))` to it to get what the trainer uses.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True)
class Fusion:
    field: str  # TransformerConfig field
    flag: str  # Megatron-LM's opt-out flag
    name: str  # short name in the start-up report


@dataclass(frozen=True)
class FusionState:
    fusion: Fusion
    on: bool
    why: str  # why it is on or off


FUSIONS: tuple[Fusion, ...] = (
    Fusion("bias_activation_fusion", "--no-bias-swiglu-fusion", "swiglu"),
    Fusion("bias_dropout_fusion", "--no-bias-dropout-fusion", "bias-dropout-add"),
    Fusion("apply_rope_fusion", "--no-rope-fusion", "rope"),
    Fusion("gradient_accumulation_fusion", "--no-gradient-accumulation-fusion", "wgrad-accum"),
    Fusion("masked_softmax_fusion", "--no-masked-softmax-fusion", "masked-softmax"),
    Fusion("persist_layer_norm", "--no-persist-layer-norm", "persist-layer-norm"),
)
NOT_USED = {
    "masked_softmax_fusion": "not used: attention is SDPA or TE's, which fuse the softmax",
    "persist_layer_norm": "not used: apex's LayerNorm only; this model's norms are RMSNorm",
}


def opt_out_dest(fusion: Fusion) -> str:
    """The argparse destination of the fusion's opt-out flag."""
    return fusion.flag[2:].replace("-", "_")


def apex_wgrad_available() -> bool:
    """Whether apex's `fused_weight_gradient_mlp_cuda` (the fused weight-gradient
    accumulation Megatron's linear layers call) is installed."""
    return importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None


def te_fused_rope_error(rotary_interleaved: bool) -> str | None:
    """None if Transformer Engine provides the fused RoPE Megatron calls, else why not."""
    from .spec import transformer_engine_import_error

    error = transformer_engine_import_error()
    if error is not None:
        return f"Transformer Engine does not import ({error.split(':')[0]})"
    from megatron.core.models.common.embeddings import rope_utils

    if rope_utils.fused_apply_rotary_pos_emb is None:
        return "this Transformer Engine has no fused RoPE (needs TE >= 1.4)"
    if rotary_interleaved:
        from megatron.core.utils import is_te_min_version

        if not is_te_min_version("2.3.0"):
            return "interleaved RoPE needs TE >= 2.3 for the fused kernel"
    return None


def resolve_fusions(
    cuda: bool,
    disabled: set[str] | frozenset[str] = frozenset(),
    *,
    rotary_interleaved: bool = False,
    te_rope_error=None,
    apex_wgrad=None,
) -> list[FusionState]:
    """Each fusion's state: on where the fused op can run, unless its field is in `disabled`
    (the fields whose opt-out flag was given). `te_rope_error` and `apex_wgrad` are the probes
    (default te_fused_rope_error and apex_wgrad_available; replaceable in tests)."""
    te_rope_error = te_rope_error or te_fused_rope_error
    apex_wgrad = apex_wgrad or apex_wgrad_available
    states = []
    for f in FUSIONS:
        if f.field in NOT_USED:
            on, why = False, NOT_USED[f.field]
        elif f.field in disabled:
            on, why = False, f"{f.flag}"
        elif not cuda:
            on, why = False, "no CUDA device"
        elif f.field == "apply_rope_fusion":
            error = te_rope_error(rotary_interleaved)
            on, why = error is None, error or "Transformer Engine's fused RoPE"
        elif f.field == "gradient_accumulation_fusion":
            on = apex_wgrad()
            why = (
                "apex's fused_weight_gradient_mlp_cuda"
                if on
                else (
                    "apex's fused_weight_gradient_mlp_cuda is not installed (the output layer "
                    "needs it even with Transformer Engine)"
                )
            )
        else:
            on, why = True, "jit-fused"
        states.append(FusionState(f, on, why))
    return states


def fusion_fields(states: list[FusionState]) -> dict[str, bool]:
    """The TransformerConfig fields of `states` (for qwen3_config's overrides)."""
    return {s.fusion.field: s.on for s in states}


def describe_fusions(states: list[FusionState]) -> str:
    """One start-up line: each fusion on or off, with why."""
    on = [f"{s.fusion.name} ({s.why})" for s in states if s.on]
    off = [f"{s.fusion.name} ({s.why})" for s in states if not s.on]
    return f"> fusions on: {', '.join(on) or 'none'}; off: {', '.join(off) or 'none'}"
