"""Step time and throughput of a layout: compute from GEMM sizes, communication from the bytes
each collective moves, the pipeline bubble, and the optimizer step.

Model FLOPs are Megatron-LM's accounting (`training/model_size.py`): 2 per multiply-add, the
attention over the full sequence, backward twice the forward (Narayanan et al. 2021, appendix).
Compute time is each GEMM's FLOPs at the efficiency its size reaches (efficiency.py), attention
at its own rate, recomputation as one more forward of what is recomputed. Communication
(comm.py for the bytes) takes a ring's time on the network of network.py: an all-reduce of B
bytes over n ranks 2 (n-1)/n B / W + 2 (n-1) latency, an all-gather or reduce-scatter half of
that, a send B / W + latency; W is the inside-node or the across-node bandwidth, whichever the
group spans (Megatron's rank order puts TP innermost, then DP, then PP).

What adds to the step: TP communication entirely (Megatron issues it between the GEMMs that
need it); the pipeline bubble, (PP - 1) / VPP microbatch-times of the slowest stage (Narayanan
et al. 2021); pipeline sends, two per microbatch and chunk plus the fill and drain; the DP
gradient reduce after the last backward, all of it, or with --overlap-grad-reduce what the
last microbatch's backward cannot hide (at least the last bucket); the parameter all-gather of
the distributed optimizer after the step, all of it, or with --overlap-param-gather what the
first forward cannot hide (at least the first bucket); the tied-embedding all-reduce between
the first and last stage; the Adam step, 30 bytes of memory traffic per parameter of the
rank's shard at the GPU's memory bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..training.model_size import flops_per_token, forward_flops_per_token
from .comm import Transfer, chunk_parameter_tensors, step_transfers
from .efficiency import Efficiency
from .layout import Chunk, Job, Layout, Machine, chunks, plans

TERMS = ("compute", "recompute", "tp", "dp", "pp", "bubble", "optimizer")
TERM_NAMES = {
    "compute": "compute",
    "recompute": "recompute",
    "tp": "TP comm",
    "dp": "DP comm",
    "pp": "PP p2p",
    "bubble": "bubble",
    "optimizer": "optimizer",
}
ADAM_BYTES_PER_PARAMETER = 30  # fp32 grad read, fp32 weight/m/v read+write, bf16 weight write


@dataclass(frozen=True)
class Throughput:
    model_flops_per_step: float
    mfu: float  # predicted model-FLOPs utilisation of the whole step
    step_time_s: float
    tokens_per_s: float
    bubble: float  # fraction of the step spent in the pipeline bubble
    recompute: float  # fraction of the model FLOPs computed again
    terms: dict[str, float] = field(default_factory=dict)  # seconds per step, by TERMS

    @property
    def dominant(self) -> str:
        """The largest term of the step."""
        return max(self.terms, key=self.terms.get)

    @property
    def largest_overhead(self) -> str:
        """The largest term besides compute and recompute."""
        rest = {k: v for k, v in self.terms.items() if k not in ("compute", "recompute")}
        return max(rest, key=rest.get)


def recompute_fraction(job: Job, layout: Layout) -> float:
    """Extra FLOPs of recomputation, as a fraction of the step's model FLOPs."""
    if layout.recompute == "none":
        return 0.0
    shape = job.padded_shape(layout)
    fwd = forward_flops_per_token(shape, job.kv, job.seq_length)
    if layout.recompute == "selective":
        extra = fwd.attention
    else:
        per_chunk = shape.num_layers // (layout.pp * (layout.vpp or 1))
        share = 1.0
        if layout.recompute_method == "block":
            share = min(layout.recompute_num_layers, per_chunk) / per_chunk
        extra = share * (fwd.layer_matmuls + fwd.attention)
    return extra / (3.0 * fwd.total)


def _layer_gemms(job: Job, plan, tp: int) -> list[tuple[int, int]]:
    """(k, n) of one layer's GEMMs on one TP rank."""
    s, d = job.shape, job.shape.kv_channels
    h, f = s.hidden_size, s.ffn_hidden_size // tp
    q, kv = s.num_attention_heads * d // tp, s.num_query_groups * d // tp
    qkv = q if plan.is_reconstruction else q + 2 * kv
    return [(h, qkv), (q, h), (h, 2 * f), (f, h)]


def _chunk_compute(job: Job, layout: Layout, chunk: Chunk, eff: Efficiency, peak: float):
    """(forward+backward seconds, recompute seconds) of one microbatch of a chunk."""
    m = job.seq_length * layout.micro_batch_size
    s = job.padded_shape(layout)
    heads = s.num_attention_heads // layout.tp
    attention = 2 * 2 * job.seq_length * heads * s.kv_channels * m / (peak * eff.attention)
    layer_plan = plans(job.kv, s.num_layers)
    fwd = []
    for i in range(chunk.start, chunk.stop):
        gemm = sum(2 * m * k * n / (peak * eff.gemm(m, k, n)) for k, n in
                   _layer_gemms(job, layer_plan[i], layout.tp))  # fmt: skip
        fwd.append((gemm, attention))
    total = 3 * sum(g + a for g, a in fwd)
    if chunk.last:
        v = s.vocab_size // layout.tp
        total += 3 * 2 * m * s.hidden_size * v / (peak * eff.gemm(m, s.hidden_size, v))
    extra = 0.0
    if layout.recompute == "selective":
        extra = sum(a for _, a in fwd)
    elif layout.recompute == "full":
        n = len(fwd) if layout.recompute_method == "uniform" else layout.recompute_num_layers
        extra = sum(g + a for g, a in fwd[:n])
    return total, extra


def transfer_time(x: Transfer, n: int, machine: Machine, crosses: bool) -> float:
    """Seconds one rank spends in all `x.count` calls of a transfer over a group of n."""
    net = machine.net
    bw, lat = net.bandwidth(crosses), net.latency(crosses)
    if x.op == "send":
        return x.count * (x.nbytes / bw + lat)
    if n == 1:
        return 0.0
    steps = (n - 1) * (2 if x.op == "all_reduce" else 1)
    return x.count * (steps / n * x.nbytes / bw + steps * lat)


def _spans(layout: Layout, machine: Machine) -> dict[str, bool]:
    g = machine.gpus_per_node
    return {
        "tp": layout.tp > g,
        "dp": layout.tp * layout.dp > g,
        "pp": layout.gpus > g,
        "embedding": layout.gpus > g,
    }


def throughput(
    job: Job, layout: Layout, machine: Machine, eff: Efficiency | None = None
) -> Throughput:
    """Predicted step time and tokens/s of `layout` on `machine`."""
    eff = eff or Efficiency()
    eff.check()
    machine.net.check()
    peak = machine.peak_tflops * 1e12
    spans = _spans(layout, machine)
    sizes = {"tp": layout.tp, "dp": layout.dp, "embedding": 2, "pp": 2}
    every = chunks(job.shape.num_layers, layout)
    m, vpp = layout.num_microbatches, layout.vpp or 1
    per_rank = []
    for r in range(layout.pp):
        mine = [c for c in every if c.pp_rank == r]
        compute = recompute = 0.0
        for c in mine:
            f, e = _chunk_compute(job, layout, c, eff, peak)
            compute, recompute = compute + f, recompute + e
        transfers = step_transfers(job, layout, r)
        tp = sum(transfer_time(x, layout.tp, machine, spans["tp"]) for x in transfers
                 if x.group == "tp")  # fmt: skip
        per_rank.append((compute, recompute, tp, transfers, mine))
    # the slowest stage sets the pace of the pipeline
    slowest = max(per_rank, key=lambda p: p[0] + p[1] + p[2] / m)
    compute, recompute, tp, transfers, mine = slowest
    per_mb = compute + recompute + tp / m
    terms = dict.fromkeys(TERMS, 0.0)
    terms["compute"], terms["recompute"], terms["tp"] = m * compute, m * recompute, tp
    terms["bubble"] = (layout.pp - 1) / vpp * per_mb
    if layout.pp > 1:
        sends = [x for p in per_rank for x in p[3] if x.group == "pp"]
        largest = max(x.nbytes for x in sends)
        one = transfer_time(Transfer("pp", "send", largest, 1, ""), 2, machine, spans["pp"])
        terms["pp"] = 2 * (m * vpp + layout.pp - 1) * one
    terms["dp"] = _dp_exposed(job, layout, machine, spans, per_rank[0], m)
    for x in transfers:
        if x.group == "embedding":
            terms["dp"] += transfer_time(x, sizes["embedding"], machine, spans["embedding"])
    params = sum(sum(chunk_parameter_tensors(job, layout, c)) for c in mine)
    shard = params / (layout.dp if layout.distributed_optimizer else 1)
    terms["optimizer"] = shard * ADAM_BYTES_PER_PARAMETER / (machine.net.hbm_gbps * 1e9)
    step = sum(terms.values())
    tokens = layout.global_batch_size * job.seq_length
    flops = flops_per_token(job.padded_shape(layout), job.kv, job.seq_length) * tokens
    mfu = flops / (layout.gpus * peak * step)
    return Throughput(
        flops, mfu, step, tokens / step, terms["bubble"] / step,
        recompute_fraction(job, layout), terms,
    )  # fmt: skip


def _dp_exposed(job, layout, machine, spans, first_rank, m: int) -> float:
    """DP communication the step waits for (pipeline rank 0's, which holds the buckets)."""
    if layout.dp == 1:
        return 0.0
    compute, _, _, transfers, _ = first_rank
    d, crosses = layout.dp, spans["dp"]
    grads = [transfer_time(x, d, machine, crosses) for x in transfers
             if x.group == "dp" and x.op in ("reduce_scatter", "all_reduce")]  # fmt: skip
    weights = [transfer_time(x, d, machine, crosses) for x in transfers
               if x.group == "dp" and x.op == "all_gather"]  # fmt: skip
    backward, forward = compute * 2 / 3, compute / 3  # of one microbatch
    exposed = sum(grads)
    if layout.overlap_grad_reduce and grads:
        exposed = max(grads[-1], sum(grads) - backward)
    if weights:
        hidden = max(weights[0], sum(weights) - forward)
        exposed += hidden if layout.overlap_param_gather else sum(weights)
    return exposed


__all__ = ["TERMS", "TERM_NAMES", "Throughput", "recompute_fraction", "throughput"]
