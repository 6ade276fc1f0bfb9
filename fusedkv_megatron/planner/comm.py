"""Bytes one rank hands to collectives and point-to-point sends in one training step, as
Megatron-Core issues them for this project's layers.

A transfer's size is the size of the full buffer the call works on: the tensor of an
all-reduce or a send, the gathered output of an all-gather, the unscattered input of a
reduce-scatter (what a counting wrapper around torch.distributed sees; the wire time is
derived in timing.py). Per layer and microbatch, A = s*b*h*e bytes (the full-sequence hidden
state on one TP rank):

- TP without SP: all-reduce A after the attention output projection and after FC2 (forward),
  all-reduce A of the input gradient of the QKV (or Q) projection and of FC1 (backward):
  4 all-reduces. Embedding: an all-reduce A (forward); output layer: an all-reduce A of its
  input gradient (backward).
- TP with SP (Korthikanti et al. 2022): all-gather A before each column-parallel GEMM and
  reduce-scatter A after each row-parallel GEMM (forward); backward mirrors them and gathers
  the column-parallel GEMM's input once more for its weight gradient (Megatron saves the
  sequence shard): 6 all-gathers and 4 reduce-scatters per layer. Embedding: reduce-scatter
  (forward), all-gather (backward); output layer: all-gather (forward), all-gather and
  reduce-scatter (backward). Once per step, an all-reduce of the fp32 gradients of the
  parameters SP replicates (the norm weights).
- Cross entropy (TP > 1): three fp32 all-reduces of one value per token (max, target logit,
  sum of exponentials).
- Full recompute runs each recomputed layer's forward collectives again.
- DP: with the distributed optimizer a reduce-scatter of the fp32 gradient buffer and an
  all-gather of the bf16 parameter buffer, without it an all-reduce of the gradient buffer;
  buffers laid out as Megatron-Core lays them (each parameter's start aligned to 64 elements,
  each bucket's end to lcm(DP, 128), buckets of max(4e7, 1e6 DP) elements when the gradient
  reduce overlaps backward; one bucket otherwise and on later pipeline stages).
- PP: per microbatch the activation (hidden + live FusedKV sources, `pipeline.boundary_bytes`)
  forward and its gradient back. With tied embeddings, the first and last stage all-reduce the
  embedding's fp32 gradient once per step.
Small control messages (loss and token counts, the grad-norm, the finite-check flags) are not
modelled; tests bound them.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from .layout import Chunk, Job, Layout, chunks, live, plans

GROUPS = ("tp", "dp", "pp", "embedding")
OPS = ("all_reduce", "all_gather", "reduce_scatter", "send")


@dataclass(frozen=True)
class Transfer:
    group: str  # tp | dp | pp | embedding
    op: str  # all_reduce | all_gather | reduce_scatter | send
    nbytes: int  # one call's buffer
    count: int  # calls per step
    what: str

    @property
    def total(self) -> int:
        return self.nbytes * self.count


def layer_parameter_tensors(job: Job, plan, tp: int) -> list[int]:
    """Element counts of one layer's parameter tensors on one TP rank, in module order."""
    s, d = job.shape, job.shape.kv_channels
    h, f = s.hidden_size, s.ffn_hidden_size // tp
    q, kv = s.num_attention_heads * d // tp, s.num_query_groups * d // tp
    groups = s.num_query_groups // tp if job.kv.weights_per_head else 1
    out = [h]  # input norm
    if plan.is_reconstruction:
        out += [q * h, d]  # Q projection, q-norm
    else:
        out += [(q + 2 * kv) * h, d, d]  # QKV projection, q-norm, k-norm
    out += [groups * d // 2 for t in plan.key if t.weighted]
    out += [groups * d for t in plan.value if t.weighted]
    out += [h * q, h, 2 * f * h, h * f]  # output projection, pre-MLP norm, FC1, FC2
    return out


def chunk_parameter_tensors(job: Job, layout: Layout, chunk: Chunk) -> list[int]:
    """Element counts of a chunk's parameter tensors on one TP rank, in module order."""
    shape = job.padded_shape(layout)
    embedding = shape.vocab_size * shape.hidden_size // layout.tp
    layer_plan = plans(job.kv, shape.num_layers)
    out = [embedding] if chunk.first else []
    for i in range(chunk.start, chunk.stop):
        out += layer_parameter_tensors(job, layer_plan[i], layout.tp)
    if chunk.last:
        out.append(shape.hidden_size)
        if not (shape.share_embeddings_and_output_weights and chunk.first):
            out.append(embedding)
    return out


def _pad(n: int, divisor: int) -> int:
    return -(-n // divisor) * divisor


def bucket_sizes(
    tensors: list[int], layout: Layout, bucketed: bool, shared: frozenset[int] = frozenset()
) -> list[int]:
    """Elements of each DDP bucket (padded) for one chunk's parameters, Megatron-Core's
    layout: parameters in reverse order, starts aligned to 64 and bucket ends to lcm(DP, 128)
    with the distributed optimizer, where a tied embedding shared across pipeline stages (the
    indices in `shared`) gets a bucket of its own; no padding without it."""
    dist = layout.distributed_optimizer
    limit = max(40_000_000, 1_000_000 * layout.dp) if bucketed else None
    end_divisor = math.lcm(layout.dp, 128) if dist else 1
    sizes, start, bucket_start = [], 0, 0

    def close(end: int) -> int:
        padded = _pad(end, end_divisor)
        sizes.append(padded - bucket_start)
        return padded

    for i in reversed(range(len(tensors))):
        if dist:
            start = _pad(start, 64)
        own = dist and i in shared
        if own and start > bucket_start:
            start = bucket_start = close(start)
        start += tensors[i]
        if (limit is not None and start - bucket_start >= limit) or own:
            start = bucket_start = close(start)
    if start > bucket_start:
        close(start)
    return sizes


def _shared_embedding(job: Job, layout: Layout, chunk: Chunk, tensors: list[int]) -> frozenset:
    """Indices of a chunk's tied embedding copy that Megatron syncs across pipeline stages."""
    if layout.pp == 1 or not job.shape.share_embeddings_and_output_weights:
        return frozenset()
    out = set()
    if chunk.first:
        out.add(0)
    if chunk.last:
        out.add(len(tensors) - 1)
    return frozenset(out)


def _tp_reduced_gradients(job: Job, layout: Layout, chunk: Chunk) -> int:
    """Elements of a chunk's parameters whose gradients Megatron all-reduces over TP once per
    step (finalize_model_grads): the q/k-norm weights (each TP rank normalises other heads),
    and with SP the input and pre-MLP norms and the final norm (each rank sees other tokens)."""
    d, h = job.shape.kv_channels, job.shape.hidden_size
    layer_plan = plans(job.kv, job.shape.num_layers)
    n = sum(d if layer_plan[i].is_reconstruction else 2 * d
            for i in range(chunk.start, chunk.stop))  # fmt: skip
    if layout.sequence_parallel:
        n += 2 * h * (chunk.stop - chunk.start) + (h if chunk.last else 0)
    return n


def _tp_per_microbatch(job: Job, layout: Layout, chunk: Chunk) -> list[Transfer]:
    t = layout.tp
    e, tokens = job.bytes_per_element, job.seq_length * layout.micro_batch_size
    a = tokens * job.shape.hidden_size * e
    layers = chunk.stop - chunk.start
    recomputed = 0
    if layout.recompute == "full":
        recomputed = layers
        if layout.recompute_method == "block":
            recomputed = min(layout.recompute_num_layers, layers)
    out = []
    if t == 1:
        pass
    elif layout.sequence_parallel:
        out += [
            Transfer("tp", "all_gather", a, 6 * layers + 2 * recomputed, "layers"),
            Transfer("tp", "reduce_scatter", a, 4 * layers + 2 * recomputed, "layers"),
        ]
        if chunk.first:
            out += [
                Transfer("tp", "reduce_scatter", a, 1, "embedding"),
                Transfer("tp", "all_gather", a, 1, "embedding"),
            ]
        if chunk.last:
            out += [
                Transfer("tp", "all_gather", a, 2, "output layer"),
                Transfer("tp", "reduce_scatter", a, 1, "output layer"),
            ]
    else:
        out.append(Transfer("tp", "all_reduce", a, 4 * layers + 2 * recomputed, "layers"))
        if chunk.first:
            out.append(Transfer("tp", "all_reduce", a, 1, "embedding"))
        if chunk.last:
            out.append(Transfer("tp", "all_reduce", a, 1, "output layer"))
    if chunk.last:  # Megatron's vocab-parallel cross entropy calls them at TP=1 too
        out.append(Transfer("tp", "all_reduce", tokens * 4, 3, "cross entropy"))
    return out


def payload_bytes(job: Job, layout: Layout, chunk: Chunk) -> int:
    """The tensor a chunk receives from the previous stage per microbatch (hidden + live
    sources; 0 for the first chunk): `pipeline.boundary_bytes`."""
    if chunk.first:
        return 0
    rows = job.seq_length * layout.micro_batch_size
    rows //= layout.tp if layout.sequence_parallel else 1
    k = job.shape.num_query_groups * job.shape.kv_channels // layout.tp
    n = len(live(job.kv, job.shape.num_layers, chunk.start))
    e = job.bytes_per_element
    return rows * job.shape.hidden_size * e + n * job.seq_length * layout.micro_batch_size * k * e


def step_transfers(job: Job, layout: Layout, pp_rank: int = 0) -> list[Transfer]:
    """Every transfer one rank of pipeline rank `pp_rank` makes in one training step."""
    every = chunks(job.shape.num_layers, layout)
    mine = [c for c in every if c.pp_rank == pp_rank]
    m = layout.num_microbatches
    out = []
    for c in mine:
        out += [Transfer(x.group, x.op, x.nbytes, x.count * m, x.what) for x in
                _tp_per_microbatch(job, layout, c)]  # fmt: skip
        if not c.last:
            nxt = every[c.index + 1]
            out.append(Transfer("pp", "send", payload_bytes(job, layout, nxt), m, "activation"))
        if not c.first:
            out.append(Transfer("pp", "send", payload_bytes(job, layout, c), m, "gradient"))
    if layout.tp > 1:
        n = sum(_tp_reduced_gradients(job, layout, c) for c in mine)
        out.append(Transfer("tp", "all_reduce", 4 * n, 1, "norm gradients"))
    if layout.dp > 1:
        grad_e = 4  # fp32 gradient buffer (grad_reduce_in_fp32 with bf16/fp16)
        for i, c in enumerate(mine):
            bucketed = layout.overlap_grad_reduce and pp_rank == 0 and i == 0
            tensors = chunk_parameter_tensors(job, layout, c)
            shared = _shared_embedding(job, layout, c, tensors)
            for size in bucket_sizes(tensors, layout, bucketed, shared):
                if layout.distributed_optimizer:
                    out.append(Transfer("dp", "reduce_scatter", size * grad_e, 1, "gradients"))
                    out.append(
                        Transfer("dp", "all_gather", size * job.bytes_per_element, 1, "weights")
                    )
                else:
                    out.append(Transfer("dp", "all_reduce", size * grad_e, 1, "gradients"))
    shape = job.padded_shape(layout)
    if layout.pp > 1 and shape.share_embeddings_and_output_weights:
        if any(c.first or c.last for c in mine):
            size = shape.vocab_size * shape.hidden_size // layout.tp * 4
            out.append(Transfer("embedding", "all_reduce", size, 1, "tied embedding gradient"))
    return out


def step_bytes(job: Job, layout: Layout, pp_rank: int = 0) -> Counter:
    """Bytes per (group, op) one rank of `pp_rank` hands to collectives in one step."""
    total: Counter = Counter()
    for x in step_transfers(job, layout, pp_rank):
        total[(x.group, x.op)] += x.total
    return total


__all__ = [
    "GROUPS",
    "OPS",
    "Transfer",
    "bucket_sizes",
    "chunk_parameter_tensors",
    "layer_parameter_tensors",
    "payload_bytes",
    "step_bytes",
    "step_transfers",
]
