"""Activation memory: the bytes a pipeline chunk keeps for backward per microbatch, per rank.

The method is Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models", arXiv 2205.05198): list every tensor an operator saves for its backward pass, in
units of s*b*h, and see which of them sequence parallelism divides by t and which recompute
removes. Our inventory is for this project's layers (Qwen3 style: RMSNorm, q/k-norm, RoPE,
SwiGLU, no dropout, no biases) on Megatron-Core with flash-style attention (torch SDPA or
Transformer Engine), which saves Q, K, V, the output and a log-sum-exp row instead of the
s x s scores (Dao et al. 2022), so Korthikanti's 5*a*s^2*b term is gone.

Per layer, with S = s*b tokens, S' = S/t under sequence parallelism (S otherwise), width per
TP rank q = heads*d/t, k = groups*d/t, f = ffn/t, e = bytes per element (2 in bf16):
  input norm + QKV input     norm(S', h) + S'*h*e
  Q/K norms                  norm(S, q) + norm(S, k)       (rstd per head)
  RoPE cos/sin               2 per rotated tensor, s*d*e each
  storage attention          mixed QKV S*(q+2k)*e (V is a view of it), rotated Q and K,
                             output S*q*e, log-sum-exp b*(heads/t)*s*4 (not with selective)
  reconstruction attention   rotated Q, output, log-sum-exp; fused K/V S*k*e when weighted,
                             nothing when a source is used as is; the source stack (below)
  MLP                        norm(S', h) + S'*h*e + FC1 output S*2f*e + SiLU output, gate
                             input, FC2 input 3*S*f*e
norm(rows, width) is rows*width*e + rows*4 for a fused norm (TE, CUDA RMSNorm: input and rstd)
and rows*width*8 + rows*4 for torch's composite RMSNorm (what runs on CPU: fp32 input and fp32
normalised output).

The FusedKV source stack `[n, s, b, k]` (sources are full-sequence under SP) is stored once
per chunk where a reconstruction layer reads it; a chunk that receives sources from the
previous pipeline stage holds the received tensor (hidden + sources, `pipeline.boundary_bytes`)
for each microbatch in flight. Full recompute keeps each recompute group's input and the
stacks passed into groups; one group is rebuilt at a time during backward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..fusion import LayerPlan
from .comm import payload_bytes
from .layout import Chunk, Job, Layout, live, plans

NORM_IMPLS = ("fused", "composite")


@dataclass
class ChunkActivations:
    """Bytes of one chunk for one microbatch, by part (`saved` is what autograd keeps;
    `payload_in` is the received pipeline tensor the schedule keeps)."""

    parts: dict[str, int] = field(default_factory=dict)
    payload_in: int = 0
    recompute_group: int = 0  # rebuilt during backward, one group at a time (full recompute)
    largest_layer: int = 0  # one layer's saved bytes: the backward working set
    # Autograd also keeps the received tensor (counted once, in payload_in): a full-recompute
    # checkpoint takes it as input, or the sources unpacked from it are views (no SP).
    keeps_received: bool = False

    def add(self, name: str, nbytes: int) -> None:
        self.parts[name] = self.parts.get(name, 0) + int(nbytes)

    @property
    def saved(self) -> int:
        return sum(self.parts.values())

    @property
    def held(self) -> int:
        return self.saved + self.payload_in


class _Dims:
    """Per-rank sizes of one microbatch."""

    def __init__(self, job: Job, layout: Layout, norm_impl: str):
        if norm_impl not in NORM_IMPLS:
            raise ValueError(f"norm_impl={norm_impl!r}: choose one of {NORM_IMPLS}")
        sh, t = job.shape, layout.tp
        self.e = job.bytes_per_element
        self.s, self.b = job.seq_length, layout.micro_batch_size
        self.tokens = self.s * self.b
        self.rows = self.tokens // (t if layout.sequence_parallel else 1)
        self.h, self.d = sh.hidden_size, sh.kv_channels
        self.heads, self.groups = sh.num_attention_heads // t, sh.num_query_groups // t
        self.q, self.k, self.f = self.heads * self.d, self.groups * self.d, sh.ffn_hidden_size // t
        self.vocab = job.padded_shape(layout).vocab_size // t
        self.composite = norm_impl == "composite"
        self.fused_rope, self.fused_swiglu = job.fusions.rope, job.fusions.swiglu

    def norm(self, rows: int, width: int, stats_per_row: int = 1) -> int:
        per_element = 8 if self.composite else self.e
        return rows * width * per_element + rows * stats_per_row * 4

    def stack(self, n: int) -> int:
        return n * self.tokens * self.k * self.e


def _layer_bytes(x: _Dims, plan: LayerPlan, kv, selective: bool) -> int:
    """Saved bytes of one layer run without full recompute (its source stack excluded)."""
    t, e = x.tokens, x.e
    total = x.norm(x.rows, x.h) + x.rows * x.h * e  # input norm, QKV/Q projection input
    total += x.norm(t, x.q, x.heads)  # q-norm
    total += t * x.q * e  # rotated query
    total += t * x.q * e  # attention output (= output projection input)
    # log-sum-exp; a checkpointed core attention keeps a 4-byte tensor instead
    total += 4 if selective else x.b * x.heads * x.s * 4
    if plan.is_reconstruction:
        total += 0 if x.fused_rope else 2 * x.s * x.d * e  # RoPE cos/sin of the query
        total += 0 if x.composite else t * x.q * e  # Q projection output (fused q-norm input)
        for terms in (plan.key, plan.value):
            if len(terms) > 1 or terms[0].weighted:
                total += t * x.k * e  # a fused K or V
        groups = x.groups if kv.weights_per_head else 1
        total += sum(groups * x.d * e for term in plan.key if term.weighted)  # expanded weights
    else:
        total += x.norm(t, x.k, x.groups)  # k-norm
        total += 0 if x.fused_rope else 4 * x.s * x.d * e  # RoPE cos/sin of query and key
        total += t * (x.q + 2 * x.k) * e  # mixed QKV (V is a view of it)
        total += t * x.k * e  # rotated key
    total += x.norm(x.rows, x.h) + x.rows * x.h * e  # pre-MLP norm, FC1 input
    total += t * 2 * x.f * e  # FC1 output
    # unfused SwiGLU also keeps SiLU's output and the gate input; FC2's input in both
    total += t * x.f * e * (1 if x.fused_swiglu else 3)
    return total


def _recompute_groups(chunk: Chunk, layout: Layout) -> list[range]:
    """Layer index ranges (0-based, global) checkpointed together under full recompute."""
    n = layout.recompute_num_layers
    layers = range(chunk.start, chunk.stop)
    if layout.recompute_method == "uniform":
        return [layers[i : i + n] for i in range(0, len(layers), n)]
    return [layers[i : i + 1] for i in range(min(n, len(layers)))]  # block: first n layers


def chunk_activations(
    job: Job, layout: Layout, chunk: Chunk, norm_impl: str = "fused"
) -> ChunkActivations:
    """Bytes one microbatch keeps on this chunk's rank until its backward pass."""
    x = _Dims(job, layout, norm_impl)
    kv, layers = job.kv, job.shape.num_layers
    layer_plan = plans(kv, layers)
    out = ChunkActivations()
    selective = layout.recompute == "selective"
    groups = _recompute_groups(chunk, layout) if layout.recompute == "full" else []
    checkpointed = {i for g in groups for i in g}
    group_starts = {g[0] for g in groups}

    if chunk.first:
        # token ids (int64) for the embedding backward; with TP > 1 also the mask of ids
        # outside this rank's vocabulary shard
        out.add("embedding", x.tokens * (8 + (1 if layout.tp > 1 else 0)))
    else:
        out.payload_in = payload_bytes(job, layout, chunk)

    # The live-source stack entering each layer: (id, n, is a view of the received tensor).
    saved_stacks: dict[int, int] = {}
    context: tuple[int, int, bool] | None = None
    if not chunk.first:
        n_in = len(live(kv, layers, chunk.start))
        # Unpacked from the received tensor: a view of it, or a copy when SP folds the sequence
        context = (chunk.start, n_in, not layout.sequence_parallel) if n_in else None

    def keep(stack: tuple[int, int, bool]) -> None:
        if stack[2]:
            out.keeps_received = True
        else:
            saved_stacks[stack[0]] = x.stack(stack[1])

    for i in range(chunk.start, chunk.stop):
        plan = layer_plan[i]
        if i in group_starts:
            # A checkpoint saves its inputs: the hidden state (the received tensor at a chunk
            # start, already held) and the stack passed to it as `context`.
            if i == chunk.start and not chunk.first:
                out.keeps_received = True  # the checkpoint's input is the received tensor
            else:
                out.add("recompute inputs", x.rows * x.h * x.e)
                if context is not None:
                    keep(context)
        layer = _layer_bytes(x, plan, kv, selective)
        out.largest_layer = max(out.largest_layer, layer)
        if i not in checkpointed:
            out.add("layers", layer)
            if plan.is_reconstruction and context is not None:
                keep(context)
        before, after = live(kv, layers, i), live(kv, layers, i + 1)
        if after != before:
            context = (i + 1, len(after), False) if after else None
    if groups or x.fused_rope:
        # RoPE frequencies (fp32 [s, 1, 1, d], one tensor per forward): a checkpoint's input,
        # or what the fused RoPE keeps
        out.add("rope frequencies", job.seq_length * x.d * 4)
    if groups:
        out.recompute_group = max(
            sum(_layer_bytes(x, layer_plan[i], kv, False) for i in g) for g in groups
        )
    out.add("source stack", sum(saved_stacks.values()))
    if chunk.last:
        out.add("final norm + output layer input", x.norm(x.rows, x.h) + x.rows * x.h * x.e)
        # Megatron's vocab-parallel cross entropy keeps the fp32 softmax, a mask, the targets.
        out.add("cross entropy", x.tokens * (x.vocab * 4 + 1 + 8))
    return out


def logits_transient(job: Job, layout: Layout) -> int:
    """The last chunk's short-lived loss buffers: the logits and their gradient in the compute
    dtype (the fp32 softmax is counted in `chunk_activations`)."""
    x = _Dims(job, layout, "fused")
    return 2 * x.tokens * x.vocab * x.e


__all__ = ["NORM_IMPLS", "ChunkActivations", "chunk_activations", "logits_transient"]
