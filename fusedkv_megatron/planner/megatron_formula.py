"""Megatron-LM's theoretical memory formula next to this planner, and the difference between
the two explained term by term.

Megatron-LM prints `theoretical_memory_usage` at start-up (megatron/training/
theoretical_memory_usage.py). Its derivation, restated here (not its code): parameters of a GPT
layer 2h(1.5 f + 1) + 2h^2 (1 + G/H) q/h for SwiGLU and RMSNorm (q/k-norm weights are not
counted), the embedding once when tied, the final norm h; the most loaded shard is the first
stage's layers plus the embedding, over TP; 6 bytes per parameter (bf16 weight, fp32 gradient)
plus 12 (Adam's fp32 copy and moments) over DP with the distributed optimizer, 18 without.
Activations of the first stage come from Korthikanti et al. 2022, Table 2, with flash attention
(no s^2 terms): per layer s b h (10 + 24/t) bytes in the branch Megatron-LM uses unless SP runs
with selective recompute; 10 = both LayerNorm inputs (4), the QKV and MLP inputs (2 + 2), two
1-byte dropout masks; 24/t = Q, K (4), V (2), the output projection input (2) and a 4h GeLU MLP
(GeLU input 8, FC2 input 8), so it ignores `ffn_hidden_size` and SwiGLU. Then 8 s b for the
token ids, s b h for the embedding dropout mask, and with PP = 1 the logits and final LayerNorm
output at 2 bytes each: 2 s b (V/t + h). The activations are multiplied by 1.05 ("optimizer and
miscellaneous temporaries").

`explain` lists why this planner differs, each term a closed formula, for a vanilla GPT-shaped
job without pipelining or recompute (the presets' layouts); their sum equals the difference of
the two totals (a test checks it for every preset).
"""

from __future__ import annotations

from dataclasses import dataclass

from .layout import Job, Layout, PlanError, chunks
from .memory import chunk_parameters, memory_per_rank


@dataclass(frozen=True)
class Formula:
    weights_and_optimizer: float  # bytes
    activations: float

    @property
    def total(self) -> float:
        return self.weights_and_optimizer + self.activations


def megatron_parameters(job: Job, layout: Layout) -> float:
    """Parameters on the most loaded rank as Megatron-LM's formula counts them."""
    s = job.padded_shape(layout)
    h, q = s.hidden_size, s.num_attention_heads * s.kv_channels
    attention = 2 * h * h * (1 + s.num_query_groups / s.num_attention_heads) * (q / h)
    layer = 2 * h * (s.ffn_hidden_size * 1.5 + 1) + attention
    block = layer * s.num_layers + h
    embedding = h * s.vocab_size
    shard = (block / layout.pp + embedding) / layout.tp
    if not s.share_embeddings_and_output_weights and layout.pp == 1:
        shard += embedding / layout.tp
    return shard


def megatron_formula(job: Job, layout: Layout) -> Formula:
    """Megatron-LM's theoretical memory of the most loaded rank, bytes."""
    per_param = 6 + 12 / layout.dp if layout.distributed_optimizer else 18
    weights = megatron_parameters(job, layout) * per_param
    s = job.padded_shape(layout)
    h, t, pp, vpp = s.hidden_size, layout.tp, layout.pp, layout.vpp
    sb = job.seq_length * layout.micro_batch_size
    sp_branch = layout.sequence_parallel and layout.recompute == "selective"
    per_layer = sb * h * ((18 + 4 * s.ffn_hidden_size / h) / t if sp_branch else 10 + 24 / t)
    act = per_layer * s.num_layers + 8 * sb * pp + sb * h * pp
    if vpp is not None:
        act *= 1 + (pp - 1) / (pp * vpp)
    elif pp > 1:
        act *= min(1, layout.num_microbatches / pp)
    if sp_branch:
        if pp == 1:
            act += sb * h * 4 * (1 + s.vocab_size / h)
        act /= t
    else:
        if pp == 1:
            act += (sb * s.vocab_size / t + sb * h) * 2
        act *= 1.05
    return Formula(weights, act)


@dataclass(frozen=True)
class Term:
    name: str
    bytes: float  # planner minus Megatron's formula


def explain(job: Job, layout: Layout, norm_impl: str = "fused") -> list[Term]:
    """The planner's peak minus Megatron-LM's formula, term by term (vanilla GPT, PP = 1,
    no recompute, fused norms)."""
    if job.kv.shares_kv or layout.pp != 1 or layout.recompute != "none":
        raise PlanError(
            "the comparison with Megatron-LM's formula is for a vanilla model without "
            "pipelining or recompute (--kv-sharing vanilla, PP=1, no recompute)"
        )
    if norm_impl != "fused":
        raise PlanError("the comparison with Megatron-LM's formula assumes fused norms")
    s = job.padded_shape(layout)
    e, t, L = job.bytes_per_element, layout.tp, s.num_layers  # noqa: N806
    h, d, f = s.hidden_size, s.kv_channels, s.ffn_hidden_size // t
    heads, groups = s.num_attention_heads // t, s.num_query_groups // t
    q, k, v = heads * d, groups * d, s.vocab_size // t
    sq, b = job.seq_length, layout.micro_batch_size
    S = sq * b  # noqa: N806
    rows = S // t if layout.sequence_parallel else S
    fu = job.fusions
    formula = megatron_formula(job, layout)
    raw = formula.activations / 1.05  # the no-SP branch (the presets')
    megatron_layer_attention = 8 * S * h / t
    ours_attention = S * (q + 2 * k) * e + S * k * e + 2 * S * q * e + b * heads * sq * 4
    ranks = memory_per_rank(job, layout, norm_impl)
    r = ranks[0]
    chunk = chunks(s.num_layers, layout)[0]
    params = chunk_parameters(job, layout, chunk)
    per_param = 6 + 12 / layout.dp if layout.distributed_optimizer else 18
    terms = [
        Term(
            "MLP: SwiGLU over ffn (FC1 output 2f, FC2 input f"
            + ("" if fu.swiglu else ", unfused SiLU output and gate input 2f")
            + ") instead of a 4h GeLU (16 s b h / t)",
            L * (S * 2 * f * e + S * f * e * (1 if fu.swiglu else 3) - 16 * S * h / t),
        ),
        Term(
            "attention: mixed QKV, rotated Q and K, output, log-sum-exp instead of Q, K, V and "
            "the output projection input (8 s b h / t)",
            L * (ours_attention - megatron_layer_attention),
        ),
        Term(
            "norm inputs and the QKV/FC1 inputs"
            + (
                " split by SP (the formula's no-SP branch does not)"
                if layout.sequence_parallel
                else ""
            )
            + ", plus an fp32 rstd per row",
            L * (4 * rows * h * e + 2 * rows * 4 - 8 * S * h),
        ),  # fmt: skip
        Term(
            "q/k-norm (not in a GPT layer)",
            L * (S * q * e + S * heads * 4 + S * k * e + S * groups * 4),
        ),  # fmt: skip
        Term(
            "RoPE: " + ("fp32 frequencies, once" if fu.rope else "cos and sin per rotated tensor"),
            (sq * d * 4) if fu.rope else L * 4 * sq * d * e,
        ),
        Term("dropout masks (dropout is 0 here)", -(2 * L * S * h + S * h)),
        Term("token ids (+ the vocabulary shard mask with TP)", S if t > 1 else 0),
        Term(
            "output layer and loss: fp32 softmax, mask and targets, final norm and output-layer "
            "input, instead of 2-byte logits and the final norm output",
            S * (v * 4 + 1 + 8) + rows * h * e + rows * 4 + rows * h * e - 2 * (S * v + S * h),
        ),
        Term("Megatron's 5% allowance on activations", -0.05 * raw),
        Term(
            "transient: a layer's backward working set, bf16 logits and their gradient"
            + ("" if fu.gradient_accumulation else ", an unfused weight gradient"),
            r.transient,
        ),
        Term(
            "parameters: q/k-norm weights, norms not split over TP",
            (params - megatron_parameters(job, layout)) * per_param,
        ),
        Term("optimizer shard rounding", r.static - params * per_param),
    ]
    return terms


__all__ = ["Formula", "Term", "explain", "megatron_formula", "megatron_parameters"]
