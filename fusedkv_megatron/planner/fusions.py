"""Megatron's fused kernels as the planner sees them: which ones change what a layer saves for
backward, and how a run's flags select them.

The flags are Megatron-LM's opt-outs (`--no-bias-swiglu-fusion`, ...). On a GPU each fusion is
on unless its flag says no; on CPU the trainer turns them off by itself. A planner run plans a
GPU run, so the planner reads the opt-outs only (`Fusions.from_args`). What each fusion saves,
from the kernels' autograd functions:

- SwiGLU (`bias_activation_fusion`, Megatron's `bias_swiglu_impl`): the fused function keeps
  its input, the FC1 output (2f wide); unfused, `silu(x1) * (x2 + 0)` keeps the FC1 output
  (SiLU's input is a view of it), SiLU's output and the offset gate input, f wide each:
  5 S f e unfused against 3 S f e fused, counting FC2's input in both.
- RoPE (`apply_rope_fusion`, Transformer Engine's fused RoPE): keeps the fp32 frequency tensor
  the rotary embedding made once per forward ([s, 1, 1, d], shared by every layer); unfused,
  each rotated tensor keeps its cos and sin in the compute dtype, 2 s d e.
- Gradient accumulation (`gradient_accumulation_fusion`): the weight gradient is accumulated
  into the fp32 main gradient in the GEMM; unfused, a bf16 weight gradient is made first and
  added (one weight-sized transient during backward).
- Masked softmax, persistent LayerNorm, bias-dropout-add: no effect on this model's memory
  (flash-style attention never forms the softmax; RMSNorm; no biases, dropout 0 saves no mask).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

# (field, Megatron TransformerConfig / argparse dest, opt-out flag)
FLAGS = (
    ("swiglu", "bias_swiglu_fusion", "--no-bias-swiglu-fusion"),
    ("rope", "apply_rope_fusion", "--no-rope-fusion"),
    ("gradient_accumulation", "gradient_accumulation_fusion", "--no-gradient-accumulation-fusion"),
    ("masked_softmax", "masked_softmax_fusion", "--no-masked-softmax-fusion"),
    ("persist_layer_norm", "persist_layer_norm", "--no-persist-layer-norm"),
    ("bias_dropout", "bias_dropout_fusion", "--no-bias-dropout-fusion"),
)


@dataclass(frozen=True)
class Fusions:
    """Which fused kernels the run uses. The default is what this library builds without
    flags on CPU (every fusion off); `on()` is a GPU run without opt-outs."""

    swiglu: bool = False
    rope: bool = False
    gradient_accumulation: bool = False
    masked_softmax: bool = False
    persist_layer_norm: bool = False
    bias_dropout: bool = False

    @classmethod
    def on(cls) -> Fusions:
        return cls(**{f.name: True for f in fields(cls)})

    @classmethod
    def from_args(cls, args, parser=None) -> Fusions:
        """A GPU run's fusions from parsed flags: on unless the opt-out was given (an absent or
        None attribute means "the default", which is on). With `parser`, each flag's
        destination is the parser's own (whichever module defined the flag)."""
        actions = getattr(parser, "_option_string_actions", {})
        fields_ = {}
        for name, dest, flag in FLAGS:
            action = actions.get(flag)
            if action is None:
                fields_[name] = getattr(args, dest, None) is not False
            else:  # the opt-out was given when its destination holds the flag's constant
                # (store_true into a `no_...` destination, or store_false into the fusion's own)
                fields_[name] = getattr(args, action.dest, action.default) != action.const
        return cls(**fields_)

    @classmethod
    def from_config(cls, config) -> Fusions:
        """The fusions a built Megatron TransformerConfig uses."""
        return cls(
            swiglu=bool(config.bias_activation_fusion),
            rope=bool(config.apply_rope_fusion),
            gradient_accumulation=bool(config.gradient_accumulation_fusion),
            masked_softmax=bool(config.masked_softmax_fusion),
            persist_layer_norm=bool(config.persist_layer_norm),
            bias_dropout=bool(config.bias_dropout_fusion),
        )

    def describe(self) -> str:
        on = [name for name, _, _ in FLAGS if getattr(self, name)]
        return ", ".join(on) if on else "none"


def add_fusion_flags(parser) -> None:
    """The opt-out flags, for a parser that does not have them yet (the trainer's parser gets
    them from its own flag module; the planner accepts them either way)."""
    have = set(getattr(parser, "_option_string_actions", {}))
    missing = [(name, dest, flag) for name, dest, flag in FLAGS if flag not in have]
    if not missing:
        return
    group = parser.add_argument_group("fusions (GPU; on unless opted out)")
    for name, dest, flag in missing:
        group.add_argument(
            flag, dest=dest, action="store_false", default=None,
            help=f"plan without Megatron's {name.replace('_', ' ')} fusion",
        )  # fmt: skip


__all__ = ["FLAGS", "Fusions", "add_fusion_flags"]
