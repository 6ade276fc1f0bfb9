"""Context parallelism (CP) for the local attention paths: the sequence split, the K/V
all-gather and the masks of each rank's chunks.

The sequence is split as Megatron splits it (`megatron.core.utils.get_batch_on_this_cp_rank`):
into 2N chunks, rank r holding chunks r and 2N-1-r, so that under a causal mask every rank has
the same amount of attention work. RoPE follows (Megatron's `RotaryEmbedding` slices the same
chunks for its `cp_group`). Everything before attention is per token, the FusedKV
reconstruction included, so the sources stay sharded like the activations and the pipeline
routes them unchanged (with s/N rows).

Attention needs every key: the local path all-gathers K and V over the CP group (the gradient
of the all-gather is a reduce-scatter back to the owners), restores the sequence order, and
masks each local query with its global position (causal) and, for packed documents, with the
rows of the document mask that belong to this rank's chunks. A reconstruction layer gathers its
fused K/V (two tensors), not its sources: the fusion is per token, so fusing the local chunk
first is exact and moves 2 tensors per layer instead of the 4 sources FusedKV reads (Lite
reads 2: a tie). The materialised mask is [s/N, s] per sequence: this path is for CPU tests
and moderate lengths; Transformer Engine's CP (`cp_comm_type`) is the GPU path.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from torch import Tensor


def chunk_order(cp_size: int) -> list[int]:
    """The chunk index held at each slot of the CP-rank-major gathered sequence: rank r holds
    chunks (r, 2N-1-r), so the gather yields [0, 2N-1, 1, 2N-2, ...]."""
    return [c for r in range(cp_size) for c in (r, 2 * cp_size - 1 - r)]


def local_positions(local_len: int, cp_size: int, cp_rank: int, device=None) -> Tensor:
    """Global sequence positions of this rank's `local_len` tokens (two chunks of local_len/2)."""
    if local_len % 2:
        raise ValueError(
            f"local sequence length {local_len} is odd: under context parallelism the sequence "
            f"is split into 2 x {cp_size} chunks; use a seq_length divisible by {2 * cp_size}"
        )
    half = local_len // 2
    starts = (cp_rank * half, (2 * cp_size - 1 - cp_rank) * half)
    return torch.cat([torch.arange(s, s + half, device=device) for s in starts])


def batch_on_this_rank(batch: dict, cp_group) -> dict:
    """This CP rank's part of a batch of [b, s, ...] tensors ([b, 1, s, s] for the attention
    mask, split by query rows only): Megatron's load-balanced split. A new dict."""
    if cp_group is None or cp_group.size() == 1:
        return batch
    from megatron.core.utils import get_batch_on_this_cp_rank

    seq = batch["tokens"].shape[1]
    if seq % (2 * cp_group.size()):
        raise ValueError(
            f"seq_length={seq} is not divisible by 2 x context_parallel_size="
            f"{2 * cp_group.size()}: the sequence is split into that many chunks"
        )
    return get_batch_on_this_cp_rank(dict(batch), is_hybrid_cp=False, cp_group=cp_group)


def gather_sequence(x: Tensor, cp_group) -> Tensor:
    """The whole sequence from every CP rank's `[s/N, ...]` piece, in sequence order. Autograd:
    each rank receives the sum of the gradients of its own rows (a reduce-scatter)."""
    n = cp_group.size()
    full = gather_from_sequence_parallel_region(x, True, group=cp_group)
    half = x.shape[0] // 2
    slots = full.view(2 * n, half, *x.shape[1:])
    inverse = torch.argsort(torch.tensor(chunk_order(n), device=x.device))
    return slots.index_select(0, inverse).reshape(2 * n * half, *x.shape[1:])


def keep_mask(local_len: int, cp_group, attention_mask: Tensor | None, device) -> Tensor:
    """Boolean [.., s/N, s] (True = attend) for this rank's queries against all keys: causal by
    global position, and-ed with a Megatron attention mask's rows ([b, 1, s/N, s], True = masked
    out) when one is given (packed documents)."""
    n, rank = cp_group.size(), cp_group.rank()
    q = local_positions(local_len, n, rank, device)
    keep = torch.arange(local_len * n, device=device)[None, :] <= q[:, None]
    if attention_mask is not None:
        keep = keep & ~attention_mask.bool()
    return keep


__all__ = ["batch_on_this_rank", "chunk_order", "gather_sequence", "keep_mask", "local_positions"]
