"""What the training and decode Triton kernels share: tile loads that fuse the sources, and
the host-side checks and packing done before a launch.

Head dims: any multiple of 16 up to 256. A tile's head-dim axis is `DP` = the next power of
two (`tl.arange` and `tl.dot` need one); when `D < DP` the extra columns are masked on load
(read as 0, so they add nothing to q.k or p.v) and on store. Memory layouts keep the true `D`.
The fusion weights reach the kernels already expanded to `D` channels (the RoPE-pair tie of
the key weights, channel j with j + D/2, is applied in torch by `fusion.expand_key_weight`),
so padding never pairs a channel with the wrong partner.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import HEAD_DIMS

LOG2E = 1.4426950408889634
INT32_MAX = 2**31 - 1


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def padded_head_dim(head_dim: int) -> int:
    """The tile width for `head_dim`: the next power of two, at least 16."""
    return max(16, triton.next_power_of_2(head_dim))


# fmt: off
@triton.jit
def _weight(W, term, stride_term, ON: tl.constexpr, D: tl.constexpr, DP: tl.constexpr):
    """Weight `term` (0..3) of this KV head, fp32 `[DP]` (0 past D; zeros when off)."""
    offs = tl.arange(0, DP)
    if ON:
        if D < DP:
            w = tl.load(W + term * stride_term + offs, mask=offs < D, other=0.0)
        else:
            w = tl.load(W + term * stride_term + offs)
    else:
        w = tl.zeros([DP], dtype=tl.float32)
    return w


@triton.jit
def _load(P, offs, row_ok, d_ok, ROWS: tl.constexpr, COLS: tl.constexpr):
    """A `[rows, DP]` tile, masked by rows (`row_ok [rows, 1]`) and/or head-dim columns
    (`d_ok [1, DP]`) as the constexpr flags say; masked entries are 0."""
    if ROWS and COLS:
        x = tl.load(P + offs, mask=row_ok & d_ok, other=0.0)
    elif ROWS:
        x = tl.load(P + offs, mask=row_ok, other=0.0)
    elif COLS:
        x = tl.load(P + offs, mask=d_ok, other=0.0)
    else:
        x = tl.load(P + offs)
    return x


@triton.jit
def _store(P, offs, x, row_ok, d_ok, COLS: tl.constexpr):
    """Store a `[rows, DP]` tile where the row is valid (and the column is < D if padded)."""
    if COLS:
        tl.store(P + offs, x, mask=row_ok & d_ok)
    else:
        tl.store(P + offs, x, mask=row_ok)


@triton.jit
def _fused(P1, P2, w1, w2, offs, row_ok, d_ok, ROWS: tl.constexpr, COLS: tl.constexpr,
           TWO: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr):
    """w1 * P1 + w2 * P2 for one `[rows, DP]` tile in fp32 (a plain load for one unweighted
    source); masked entries are zero."""
    x = _load(P1, offs, row_ok, d_ok, ROWS, COLS)
    if TWO or W1:
        x = x.to(tl.float32)
        if W1:
            x = x * w1[None, :]
        if TWO:
            y = _load(P2, offs, row_ok, d_ok, ROWS, COLS).to(tl.float32)
            if W2:
                y = y * w2[None, :]
            x = x + y
    return x
# fmt: on


def check_sources(q: Tensor, k_sources: list[Tensor], v_sources: list[Tensor]) -> None:
    """Shapes the kernels take: q `[*, *, hq, d]`, 1-2 sources each `[*, *, hkv, d]` of q's
    dtype and device (dims 0-1 checked by the caller), hq a multiple of hkv, d in HEAD_DIMS."""
    d, hq = q.shape[-1], q.shape[-2]
    if not (1 <= len(k_sources) <= 2 and 1 <= len(v_sources) <= 2):
        raise ValueError(
            f"the fused kernels take 1 or 2 key and value sources, got {len(k_sources)} and "
            f"{len(v_sources)}; use the torch reference for more"
        )
    if d not in HEAD_DIMS:
        raise ValueError(
            f"head_dim={d} is not supported by the fused kernels: a multiple of 16 up to 256 "
            "(use the torch reference, FUSEDKV_ATTENTION_BACKEND=torch)"
        )
    shape = k_sources[0].shape
    for x in (*k_sources, *v_sources):
        if x.shape != shape or x.dtype != q.dtype or x.device != q.device:
            raise ValueError(
                f"sources must share shape, dtype and device with each other and q: got "
                f"{tuple(x.shape)} {x.dtype} {x.device}, q {tuple(q.shape)} {q.dtype} {q.device}"
            )
    if shape[-1] != d or hq % shape[-2]:
        raise ValueError(
            f"q {tuple(q.shape)} and sources {tuple(shape)}: head_dim must match and the query "
            "heads must be a multiple of the KV heads"
        )


def check_int32_offsets(batch_dim: int, **tensors: Tensor) -> None:
    """The kernels index the batch with int64 and everything else with int32: every tensor's
    largest element offset within one batch entry must fit in int32."""
    for name, x in tensors.items():
        largest = sum(
            (n - 1) * abs(st)
            for i, (n, st) in enumerate(zip(x.shape, x.stride()))
            if i != batch_dim
        )
        if largest > INT32_MAX:
            raise ValueError(
                f"{name} {tuple(x.shape)} with strides {x.stride()}: its largest offset within "
                f"one sequence, {largest}, exceeds int32 ({INT32_MAX}); make it contiguous, "
                "shorten the sequence or use the torch reference (FUSEDKV_ATTENTION_BACKEND=torch)"
            )


def same_strides(xs: list[Tensor]) -> list[Tensor]:
    """The kernels give all sources one set of strides: copy them if they differ."""
    xs = [x if x.stride(-1) == 1 else x.contiguous() for x in xs]
    if len({x.stride() for x in xs}) > 1:
        xs = [x.contiguous() for x in xs]
    return xs


def pack_weights(weights: list[Tensor | None], hk: int, d: int, like: Tensor):
    """`W [4, hk, d]` fp32 (ones for absent/unweighted terms) and the on/off flags. A weight
    shared by all KV heads (`[1, d]`) is expanded: the kernels see one layout either way."""
    packed = torch.ones((4, hk, d), device=like.device, dtype=torch.float32)
    for i, w in enumerate(weights):
        if w is None:
            continue
        if w.dim() != 2 or w.shape[-1] != d or w.shape[0] not in (1, hk):
            raise ValueError(f"a fusion weight must be [{hk} or 1, {d}], got {tuple(w.shape)}")
        packed[i] = w.detach().float().expand(hk, d)
    flags = dict(
        ON_WK1=weights[0] is not None,
        ON_WK2=weights[1] is not None,
        ON_WV1=weights[2] is not None,
        ON_WV2=weights[3] is not None,
    )
    return packed, flags


def pad2(xs: list) -> list:
    return list(xs) + [None] * (2 - len(xs))


__all__ = [
    "HEAD_DIMS",
    "LOG2E",
    "check_int32_offsets",
    "check_sources",
    "interpreting",
    "pack_weights",
    "pad2",
    "padded_head_dim",
    "same_strides",
]
