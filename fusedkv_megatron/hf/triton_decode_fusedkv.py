"""Triton decode kernel of an exported FusedKV model: flash-decoding over the source caches with
the FusedKV reconstruction fused in (each source cache is read once per step).

Exported next to modeling_fusedkv.py as remote code, which imports nothing from the training
package: this is a standalone copy of fusedkv_megatron/kernels/triton_decode.py (the
`@triton.jit` functions are the same text, checked by that package's tests) with a smaller
host side (no launch retries beyond fewer pipeline stages). modeling_fusedkv imports it only
when Triton imports, and uses it on CUDA (or, for tests, under TRITON_INTERPRET=1).

Layouts are batch-first: q `[b, t, hq, d]`, caches `[b, S, hkv, d]`, any strides with the last
dim contiguous (HF `[b, h, S, d]` caches go in as `.transpose(1, 2)` views).
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
from torch import Tensor

try:  # inside try: transformers' import check then does not require Triton for the model
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources
except ImportError:  # pragma: no cover - modeling_fusedkv imports this module only with Triton
    triton = tl = None
    OutOfResources = RuntimeError

LOG2E = 1.4426950408889634
INT32_MAX = 2**31 - 1
HEAD_DIMS = tuple(range(16, 257, 16))
MAX_ROWS = 128  # query rows per program; more query tokens are processed in chunks
# (BLOCK_N, num_warps, num_stages) of the split kernel per padded head dim, for 16 query rows.
GPU_CONFIG = {64: (64, 4, 3), 128: (32, 4, 3), 256: (32, 8, 2)}
COMBINE_CONFIG = (4, 1)  # (num_warps, num_stages)


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


@triton.jit
def _decode_split_kernel(Q, K1, K2, V1, V2, W, OPART, LPART,
                         stride_qb, stride_qt, stride_qh, stride_kb, stride_ks, stride_kh,
                         S, T, pos0, HK, n_rows, split_len, qk_scale,
                         GROUP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                         BLOCK_R: tl.constexpr,
                         BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, K2_ON: tl.constexpr,
                         V2_ON: tl.constexpr, ON_WK1: tl.constexpr, ON_WK2: tl.constexpr,
                         ON_WV1: tl.constexpr, ON_WV2: tl.constexpr):
    split = tl.program_id(0)
    bhk = tl.program_id(1)
    b = (bhk // HK).to(tl.int64)
    hk = bhk % HK
    offs_r = tl.arange(0, BLOCK_R)  # row r = (query head within the group) * T + token
    offs_d = tl.arange(0, DP)
    d_ok = offs_d[None, :] < D
    t = offs_r % T
    h = hk * GROUP + offs_r // T
    row_ok = offs_r < GROUP * T
    q = _load(Q + b * stride_qb, t[:, None] * stride_qt + h[:, None] * stride_qh
              + offs_d[None, :], row_ok[:, None], d_ok, True, D < DP)
    pos = pos0 + t  # cache position of each query token
    kv = b * stride_kb + hk * stride_kh
    Wh = W + hk * D
    wk1 = _weight(Wh, 0, HK * D, ON_WK1, D, DP)
    wk2 = _weight(Wh, 1, HK * D, ON_WK2, D, DP)
    wv1 = _weight(Wh, 2, HK * D, ON_WV1, D, DP)
    wv2 = _weight(Wh, 3, HK * D, ON_WV2, D, DP)

    lo = split * split_len
    hi = tl.minimum(lo + split_len, S)
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, DP], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        offs = cols[:, None] * stride_ks + offs_d[None, :]
        k = _fused(K1 + kv, K2 + kv, wk1, wk2, offs, col_ok[:, None], d_ok, True, D < DP, K2_ON,
                   ON_WK1, ON_WK2).to(q.dtype)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        keep = col_ok[None, :]
        if CAUSAL:
            keep = keep & (cols[None, :] <= pos[:, None])
        qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row that has seen no allowed position yet keeps m = -inf: shift by 0 instead.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _fused(V1 + kv, V2 + kv, wv1, wv2, offs, col_ok[:, None], d_ok, True, D < DP, V2_ON,
                   ON_WV1, ON_WV2).to(q.dtype)
        acc = tl.dot(p.to(q.dtype), v, acc * alpha[:, None])
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
    row = split.to(tl.int64) * n_rows + (b * HK * GROUP + h) * T + t  # partials [splits, b, hq, t]
    _store(OPART, row[:, None] * D + offs_d[None, :], acc / l_safe[:, None], row_ok[:, None],
           d_ok, D < DP)
    tl.store(LPART + row, lse, mask=row_ok)


@triton.jit
def _decode_combine_kernel(OPART, LPART, OUT, stride_ob, stride_ot, stride_oh,
                           n_rows, T, HQ, n_splits, D: tl.constexpr, DP: tl.constexpr,
                           SPLITS: tl.constexpr):
    row = tl.program_id(0)  # (b * hq + h) * t + token
    offs_s = tl.arange(0, SPLITS)
    offs_d = tl.arange(0, DP)
    s_ok = offs_s < n_splits
    idx = offs_s.to(tl.int64) * n_rows + row
    lse = tl.load(LPART + idx, mask=s_ok, other=float("-inf"))
    w = tl.math.exp2(lse - tl.max(lse, 0))
    parts = _load(OPART, idx[:, None] * D + offs_d[None, :], s_ok[:, None], offs_d[None, :] < D,
                  True, D < DP)
    out = tl.sum(parts * w[:, None], 0) / tl.sum(w, 0)
    t = row % T
    bh = row // T
    b = (bh // HQ).to(tl.int64)
    h = bh % HQ
    tl.store(OUT + b * stride_ob + t * stride_ot + h * stride_oh + offs_d,
             out.to(OUT.dtype.element_ty), mask=offs_d < D)

# fmt: on


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def padded_head_dim(head_dim: int) -> int:
    """The tile width for `head_dim`: the next power of two, at least 16."""
    return max(16, triton.next_power_of_2(head_dim))


def decode_rows(group: int, tokens: int) -> int:
    """BLOCK_R for `tokens` query tokens of a `group`-head GQA group: a power of two >= 16."""
    return max(16, triton.next_power_of_2(group * tokens))


def decode_config(head_dim: int, rows: int) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) of the split kernel at `head_dim` for BLOCK_R `rows`."""
    if interpreting():
        return 16, 1, 1
    dp = padded_head_dim(head_dim)
    listed = sorted(GPU_CONFIG)
    block_n, warps, stages = GPU_CONFIG[next((h for h in listed if h >= dp), listed[-1])]
    # More warps keep a taller accumulator in registers (up to 16; 8 at 256-wide tiles).
    return block_n, min(16 if dp <= 128 else 8, max(warps, warps * rows // 16)), stages


def default_num_splits(batch: int, kv_heads: int, cache_len: int, device, block_n: int = 64):
    """Enough programs to fill the GPU twice over, each split at least 4 blocks long."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device.index or 0).multi_processor_count
    else:
        sms = 8
    want = triton.cdiv(2 * sms, batch * kv_heads)
    return max(1, min(want, triton.cdiv(cache_len, 4 * block_n)))


def supported(q: Tensor, k_sources: list[Tensor], v_sources: list[Tensor]) -> bool:
    """Whether the kernel takes these tensors (else the caller uses the torch path): head dim a
    multiple of 16 up to 256, 1-2 sources of q's shape, dtype and device, int32 offsets."""
    sources = [*k_sources, *v_sources]
    shape = k_sources[0].shape
    return (
        q.shape[-1] in HEAD_DIMS
        and 1 <= len(k_sources) <= 2
        and 1 <= len(v_sources) <= 2
        and all(x.shape == shape and x.dtype == q.dtype and x.device == q.device for x in sources)
        and shape[-1] == q.shape[-1]
        and q.shape[-2] % shape[-2] == 0
        and shape[0] == q.shape[0]
        and q.shape[1] <= shape[1]
        and all(_largest_offset(x) <= INT32_MAX for x in (q, *sources))
    )


def _largest_offset(x: Tensor) -> int:
    """The largest element offset within one batch entry (the kernels index it in int32)."""
    return sum((n - 1) * abs(st) for n, st in zip(x.shape[1:], x.stride()[1:], strict=True))


def _pack_weights(weights: list[Tensor | None], hk: int, d: int, like: Tensor):
    """`W [4, hk, d]` fp32 (ones for absent terms) and the on/off flags."""
    packed = torch.ones((4, hk, d), device=like.device, dtype=torch.float32)
    for i, w in enumerate(weights):
        if w is not None:
            packed[i] = w.detach().float().expand(hk, d)
    names = ("ON_WK1", "ON_WK2", "ON_WV1", "ON_WV2")
    return packed, {name: w is not None for name, w in zip(names, weights, strict=True)}


def _same_strides(xs: list[Tensor]) -> list[Tensor]:
    xs = [x if x.stride(-1) == 1 else x.contiguous() for x in xs]
    if len({x.stride() for x in xs}) > 1:
        xs = [x.contiguous() for x in xs]
    return xs


def _launch(kernel, grid, args, meta, warps: int, stages: int, device) -> None:
    """Run the kernel; on a shared-memory overflow retry with fewer pipeline stages."""
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    while True:
        try:
            with on_device:
                kernel[grid](*args, **meta, num_warps=warps, num_stages=stages)
            return
        except OutOfResources:
            if stages == 1:
                raise
            stages -= 1


def fused_reconstruction_decode(
    q: Tensor,
    k_sources: list[Tensor],
    v_sources: list[Tensor],
    k_weights: list[Tensor | None],
    v_weights: list[Tensor | None],
    softmax_scale: float | None = None,
    causal: bool = True,
    num_splits: int | None = None,
) -> Tensor:
    """Flash-decoding of q `[b, t, hq, d]` against K = sum wk_i * K_i, V = sum wv_i * V_i over
    source caches `[b, S, hkv, d]` that already hold the t query positions (weights
    `[hkv or 1, d]` or None). Query i sees positions <= S - t + i when `causal`. Returns
    `[b, t, hq, d]`; forward only. The caller checks `supported` first."""
    b, t, hq, d = q.shape
    _, S, hk, _ = k_sources[0].shape
    nk, nv = len(k_sources), len(v_sources)
    srcs = _same_strides([*k_sources, *v_sources])
    src4 = [srcs[0], srcs[nk - 1], srcs[nk], srcs[-1]]
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    pad = [None, None]
    w, flags = _pack_weights([*k_weights, *pad][:2] + [*v_weights, *pad][:2], hk, d, q)
    group = hq // hk
    flags.update(
        K2_ON=nk == 2, V2_ON=nv == 2, GROUP=group, D=d, DP=padded_head_dim(d), CAUSAL=causal
    )
    chunk = max(1, MAX_ROWS // group)
    for t0 in range(0, t, chunk):
        t1 = min(t, t0 + chunk)
        rows = decode_rows(group, t1 - t0)
        _decode(q[:, t0:t1], src4, w, out[:, t0:t1], S - t + t0, scale, flags, rows, num_splits)
    return out


def _decode(q, src4, w, out, pos0, scale, flags, rows, num_splits) -> None:
    """One split + combine launch for q `[b, t, hq, d]` at cache positions pos0 .. pos0 + t - 1."""
    b, t, hq, d = q.shape
    _, S, hk, _ = src4[0].shape
    block_n, warps, stages = decode_config(d, rows)
    if num_splits is None:
        num_splits = default_num_splits(b, hk, S, q.device, block_n)
    n_rows = b * hq * t
    split_len = triton.cdiv(triton.cdiv(S, num_splits), block_n) * block_n
    splits = triton.cdiv(S, split_len)
    o_part = q.new_empty((splits, n_rows, d), dtype=torch.float32)
    lse_part = q.new_empty((splits, n_rows), dtype=torch.float32)
    args = (q, *src4, w, o_part, lse_part, q.stride(0), q.stride(1), q.stride(2),
            *src4[0].stride()[:3], S, t, pos0, hk, n_rows, split_len, scale * LOG2E)  # fmt: skip
    meta = dict(BLOCK_N=block_n, BLOCK_R=rows, **flags)
    _launch(_decode_split_kernel, (splits, b * hk), args, meta, warps, stages, q.device)
    args = (o_part, lse_part, out, out.stride(0), out.stride(1), out.stride(2), n_rows, t, hq,
            splits)  # fmt: skip
    meta = dict(D=d, DP=flags["DP"], SPLITS=max(2, triton.next_power_of_2(splits)))
    _launch(_decode_combine_kernel, (n_rows,), args, meta, *COMBINE_CONFIG, q.device)
