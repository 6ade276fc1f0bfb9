"""Context parallelism (CP) in the plan: each of N ranks holds s/N tokens of every sequence.

Memory. Everything the activation model counts is per token except attention's keys: a rank
keeps its own s/N rows of every activation (the plan of the same job at seq_length s/N, with the
N CP ranks counted as data-parallel ones: they hold the same weights, and the distributed
optimizer shards over data x context parallel ranks, as Megatron's dp_cp group does), plus,
per attention layer and microbatch in flight, the K and V of the other ranks that attention
saves for backward: 2 (N-1)/N s b (G/t) d e (the local SDPA path all-gathers them; Transformer
Engine's p2p ring keeps the chunks it received). Full recompute frees them with the layer.

Traffic. Per attention layer and microbatch each rank receives those 2 (N-1)/N s b (G/t) d e
bytes of K/V in the forward pass and sends as much gradient back (a reduce-scatter); a
reconstruction layer gathers its fused K/V, the same size (see context_parallel.py). Tensor
parallelism with SP moves 4 (t-1)/t s b h e per layer each way: with GQA (G d << h) CP moves
much less, and it divides the attention's quadratic work too; TP divides the weights.

Speed: the model FLOPs of the whole sequence (attention over all s keys) on all GPUs.
"""

from __future__ import annotations

from dataclasses import replace

from .efficiency import Efficiency
from .flops import Throughput, throughput
from .layout import Job, Layout, Machine, PlanError
from .search import Plan, plan


def gathered_kv_bytes(job: Job, layout: Layout, cp: int) -> int:
    """K and V of the other CP ranks, per attention layer and microbatch, on one rank."""
    s = job.shape
    kv_width = s.num_query_groups // layout.tp * s.kv_channels
    rows = job.seq_length - job.seq_length // cp
    return 2 * rows * layout.micro_batch_size * kv_width * job.bytes_per_element


def plan_context_parallel(
    job: Job,
    layout: Layout,
    machine: Machine,
    cp: int,
    eff: Efficiency | None = None,
    norm: str = "fused",
) -> Plan:
    """The plan of `layout` (its dp is the data-parallel size without CP) run with CP=`cp`."""
    if job.seq_length % (2 * cp):
        raise PlanError(f"seq_length={job.seq_length} is not divisible by 2 x CP={2 * cp}")
    local_job = replace(job, seq_length=job.seq_length // cp)
    local = plan(local_job, replace(layout, dp=layout.dp * cp), machine, eff, norm)
    per_chunk_layers = job.shape.num_layers // (layout.pp * (layout.vpp or 1))
    kept = (
        0 if layout.recompute == "full" else per_chunk_layers * gathered_kv_bytes(job, layout, cp)
    )
    ranks = tuple(replace(r, activations=r.activations + r.in_flight * kept) for r in local.ranks)
    # All tokens of the real global batch, attention over the whole sequence.
    full = throughput(job, local.layout, machine, eff)
    speed = Throughput(
        full.model_flops_per_step / cp,
        full.mfu,
        full.step_time_s / cp,
        full.tokens_per_s,
        full.bubble,
        full.recompute,
        {k: v / cp for k, v in full.terms.items()},
    )
    return Plan(job, layout, machine, ranks, speed)


def describe_context_parallel(job: Job, layout: Layout, cp: int) -> str:
    """The CP line of a plan: tokens per rank, the gathered K/V and the traffic next to TP's."""
    s, e = job.shape, job.bytes_per_element
    kv = gathered_kv_bytes(job, layout, cp)
    tokens = job.seq_length * layout.micro_batch_size
    tp_sp = 4 * (tokens - tokens // 2) * s.hidden_size * e  # what TP=2 + SP would move
    mib = 1 << 20
    return (
        f"context parallel: CP={cp} on top of the layout above ({layout.tp * layout.pp * layout.dp} "
        f"x {cp} GPUs); {job.seq_length // cp} of {job.seq_length} tokens per rank (activations "
        f"/ {cp}); K/V of the other ranks {kv / mib:,.0f} MiB per attention layer and microbatch, "
        f"received forward and sent back as gradient (TP=2 with SP would move {tp_sp / mib:,.0f} "
        "MiB per layer each way)"
    )


__all__ = ["describe_context_parallel", "gathered_kv_bytes", "plan_context_parallel"]
