"""Per-rank memory of a training step: weights, gradients, optimizer state, activations in
flight under the pipeline schedule, and the peak.

Weights and optimizer (Megatron-Core as the trainer configures it; Rajbhandari et al. 2020,
"ZeRO", for the sharding): bf16/fp16 weights 2 bytes per parameter, the DDP gradient buffer in
fp32 (4 bytes, `grad_reduce_in_fp32`), and Adam's fp32 main weights, first and second moments
(12 bytes) which the distributed optimizer shards over the data-parallel ranks. fp32 training
keeps 4 + 4 + 8 bytes (no main copy).

Activations in flight follow Megatron-Core's schedules: without pipelining one microbatch at a
time; 1F1B keeps `PP - rank` microbatches on a rank (Narayanan et al. 2021, "Efficient
Large-Scale Language Model Training on GPU Clusters"); the interleaved schedule runs
`2 (PP - rank - 1) + (VPP - 1) PP` warm-up chunk-forwards, then one forward per backward. The
planner walks the schedule table and sums what each forward leaves behind, chunk by chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..training.model_size import _layer_matmul_params
from .activations import ChunkActivations, chunk_activations, logits_transient
from .comm import chunk_parameter_tensors
from .layout import Chunk, Job, Layout, chunks, plans


def _layer_params(job: Job, plan, tp: int) -> int:
    """Parameters of one layer on one TP rank (norms are replicated over TP)."""
    s, d = job.shape, job.shape.kv_channels
    rec = plan.is_reconstruction
    total = 2 * s.hidden_size + (d if rec else 2 * d)  # norms, q(/k) norm
    total += _layer_matmul_params(s, rec) // tp
    groups = s.num_query_groups // tp if job.kv.weights_per_head else 1
    total += sum(groups * d // 2 for t in plan.key if t.weighted)
    total += sum(groups * d for t in plan.value if t.weighted)
    return total


def chunk_parameters(job: Job, layout: Layout, chunk: Chunk) -> int:
    """Parameters one TP rank stores for a chunk: its layers, the input embedding on the first
    chunk, the final norm and output layer on the last (a tied output layer is the input
    embedding without pipelining, a copy on the last stage with it)."""
    shape = job.padded_shape(layout)
    layer_plan = plans(job.kv, shape.num_layers)
    total = sum(
        _layer_params(job, layer_plan[i], layout.tp) for i in range(chunk.start, chunk.stop)
    )
    embedding = shape.vocab_size * shape.hidden_size // layout.tp
    if chunk.first:
        total += embedding
    if chunk.last:
        total += shape.hidden_size
        tied_here = shape.share_embeddings_and_output_weights and chunk.first
        total += 0 if tied_here else embedding
    return total


@dataclass(frozen=True)
class RankMemory:
    """One pipeline rank's memory (every TP and DP rank of it is alike), bytes."""

    pp_rank: int
    parameters: int  # count
    weights: int
    gradients: int
    optimizer: int
    activations: int  # in flight at the worst moment of the schedule
    in_flight: int  # chunk-microbatches held at that moment
    transient: int  # short-lived buffers on top: logits, a recompute group, backward work
    payload: int  # received pipeline tensors among `activations`
    per_microbatch: tuple[ChunkActivations, ...] = ()  # each model chunk's, one microbatch

    @property
    def static(self) -> int:
        return self.weights + self.gradients + self.optimizer

    @property
    def peak(self) -> int:
        return self.static + self.activations + self.transient


def _state_bytes(job: Job, layout: Layout, params: int) -> tuple[int, int, int]:
    if job.precision == "fp32":
        weights, grads, optim = 4 * params, 4 * params, 8 * params
    else:
        weights, grads, optim = 2 * params, 4 * params, 12 * params
    if layout.distributed_optimizer:
        optim = -(-optim // layout.dp)
    return weights, grads, optim


def schedule_order(layout: Layout, pp_rank: int) -> tuple[list[int], int]:
    """The virtual-stage index of each forward on this rank in schedule order, and how many
    forwards run before the first backward (Megatron-Core's warm-up count + 1)."""
    m, pp, vpp = layout.num_microbatches, layout.pp, layout.vpp or 1
    if pp == 1:
        return [0] * m, 1
    if layout.vpp is None:
        return [0] * m, min(pp - pp_rank - 1, m) + 1
    table = []
    for start in range(0, m, pp):  # microbatch groups of size PP (Megatron's default)
        table += [chunk for chunk in range(vpp) for _ in range(min(pp, m - start))]
    total = m * vpp
    warmup = min((pp - pp_rank - 1) * 2 + (vpp - 1) * pp, total)
    return table, warmup + (1 if warmup < total else 0)


def _in_flight(held: dict[int, tuple[int, int]], layout: Layout, pp_rank: int):
    """The worst moment of the schedule: (held bytes, chunk-microbatches held, of which
    received pipeline tensors), given each virtual stage's (held, payload) per microbatch."""
    order, first_backward = schedule_order(layout, pp_rank)
    vpp = layout.vpp or 1
    current, payload, count, worst = 0, 0, 0, (0, 0, 0)
    backwards = iter(vpp - 1 - c for c in order)  # backward runs the chunks in reverse
    for step, chunk in enumerate(order):
        current, payload, count = current + held[chunk][0], payload + held[chunk][1], count + 1
        worst = max(worst, (current, count, payload))
        if step + 1 >= first_backward:
            back = next(backwards)
            current, payload, count = current - held[back][0], payload - held[back][1], count - 1
    return worst


def rank_memory(job: Job, layout: Layout, pp_rank: int, norm_impl: str = "fused") -> RankMemory:
    """Memory of one pipeline rank for this job and layout (the layout must pass check())."""
    mine = [c for c in chunks(job.shape.num_layers, layout) if c.pp_rank == pp_rank]
    acts = {c.vp_stage or 0: chunk_activations(job, layout, c, norm_impl) for c in mine}
    params = sum(chunk_parameters(job, layout, c) for c in mine)
    weights, grads, optim = _state_bytes(job, layout, params)
    per_chunk = {k: (a.held, a.payload_in) for k, a in acts.items()}
    held, in_flight, payload = _in_flight(per_chunk, layout, pp_rank)
    transient = max(a.recompute_group for a in acts.values())
    transient += max(a.largest_layer for a in acts.values())
    if any(c.last for c in mine):
        transient += logits_transient(job, layout)
    if not job.fusions.gradient_accumulation:
        # the weight gradient is made in the compute dtype, then added to the fp32 main grad
        largest = max(max(chunk_parameter_tensors(job, layout, c)) for c in mine)
        transient += largest * job.bytes_per_element
    return RankMemory(
        pp_rank=pp_rank,
        parameters=params,
        weights=weights,
        gradients=grads,
        optimizer=optim,
        activations=held,
        in_flight=in_flight,
        transient=transient,
        payload=payload,
        per_microbatch=tuple(acts[k] for k in sorted(acts)),
    )


def memory_per_rank(job: Job, layout: Layout, norm_impl: str = "fused") -> list[RankMemory]:
    """Every pipeline rank's memory, rank 0 first."""
    return [rank_memory(job, layout, r, norm_impl) for r in range(layout.pp)]


__all__ = ["RankMemory", "chunk_parameters", "memory_per_rank", "rank_memory", "schedule_order"]
