"""Decode attention over source caches with the FusedKV reconstruction fused in (Triton).

One or a few new query tokens attend to long caches of the sources; the fused K/V tiles are
formed in registers, so each source cache is read once per step, which is the I/O the paper
accounts for (four tensors for fusedkv, two for Lite/YOCO). Flash-decoding:

- `_decode_split_kernel` grid (splits, b * hkv): a program takes one slice of the sequence for
  one KV head and ALL its `group * t` query rows at once (so a cache tile is read once per KV
  head, not once per query head), and writes a partial output and base-2 log-sum-exp.
- `_decode_combine_kernel` grid (b * hq * t): rescales and sums the partials of the splits.

Layouts are batch-first: q `[b, t, hq, d]`, caches `[b, S, hkv, d]`, any strides (the last
dim contiguous), so HF-style `[b, h, S, d]` caches go in as `.transpose(1, 2)` views.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..fusion import KVFusion
from .launch import KernelConfig, launch, pick, recorded
from .triton_common import (
    LOG2E,
    _fused,
    _load,
    _store,
    _weight,
    check_int32_offsets,
    check_sources,
    interpreting,
    pack_weights,
    pad2,
    padded_head_dim,
    same_strides,
)


# fmt: off
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


# Per padded head dim: (16, BLOCK_N, warps, stages) for up to 16 query rows (BLOCK_R; the
# split kernel has no BLOCK_M). More rows (GROUP * t up to MAX_ROWS) get more warps so that the
# fp32 accumulator `[rows, DP]` stays in registers: see `decode_config`. From sm_90 compiles
# (tools/compile_matrix.py): no spills, 2-3 programs per SM by shared memory and registers so
# that enough cache bytes are in flight; untimed.
GPU_CONFIG = {
    64: KernelConfig(16, 64, 4, 3),
    128: KernelConfig(16, 32, 4, 3),
    256: KernelConfig(16, 32, 8, 2),
}
MAX_ROWS = 128  # query rows per program; more query tokens are processed in chunks
COMBINE_CONFIG = KernelConfig(1, 1, 4, 1)


def decode_rows(group: int, tokens: int) -> int:
    """BLOCK_R for `tokens` query tokens of a `group`-head GQA group: a power of two >= 16."""
    return max(16, triton.next_power_of_2(group * tokens))


def decode_config(head_dim: int, rows: int) -> KernelConfig:
    """The split kernel's configuration at `head_dim` for BLOCK_R = `rows`."""
    if interpreting():
        return KernelConfig(16, 16, 1, 1)
    dp = padded_head_dim(head_dim)
    if recorded(f"decode{rows}", dp) is not None:
        return recorded(f"decode{rows}", dp)  # a step-down that ran
    base = GPU_CONFIG[dp] if dp in GPU_CONFIG else pick(GPU_CONFIG, dp, "decode")
    # More warps keep a taller accumulator in registers, up to 16; at 256-wide tiles 16 warps
    # would cap a thread at 128 registers and spill, so 8 (compile_matrix.py).
    warps = min(16 if dp <= 128 else 8, max(base.num_warps, base.num_warps * rows // 16))
    return KernelConfig(16, base.block_n, warps, base.num_stages)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_num_splits(
    batch: int, kv_heads: int, cache_len: int, device: torch.device, block_n: int = 64
) -> int:
    """Enough programs to fill the GPU twice over, each split at least 4 blocks long."""
    sms = _sm_count(device.index or 0) if device.type == "cuda" else 8
    want = triton.cdiv(2 * sms, batch * kv_heads)
    return max(1, min(want, triton.cdiv(cache_len, 4 * block_n)))


def fused_reconstruction_decode(
    q: Tensor,
    kv: KVFusion,
    softmax_scale: float | None = None,
    causal: bool = True,
    num_splits: int | None = None,
) -> Tensor:
    """Flash-decoding of q `[b, t, hq, d]` against fused source caches `[b, S, hkv, d]`.
    Same contract as `reference.reconstruction_decode_reference` (forward only). More than
    MAX_ROWS query rows per KV head (GROUP * t) run as several launches over chunks of t."""
    k_sources, v_sources = kv.k_sources, kv.v_sources
    check_sources(q, k_sources, v_sources)
    b, t, hq, d = q.shape
    _, S, hk, _ = k_sources[0].shape
    if k_sources[0].shape[0] != b or t > S:
        raise ValueError(
            f"q {tuple(q.shape)} vs caches {tuple(k_sources[0].shape)}: the batch "
            "must match and the caches must already hold the t query positions"
        )
    nk, nv = len(k_sources), len(v_sources)
    srcs = same_strides(list(k_sources) + list(v_sources))
    src4 = [srcs[0], srcs[nk - 1], srcs[nk], srcs[-1]]
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    check_int32_offsets(0, q=q, cache=srcs[0], out=out)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    w, flags = pack_weights(pad2(kv.k_weights) + pad2(kv.v_weights), hk, d, q)
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
    cfg = decode_config(d, rows)
    if num_splits is None:
        num_splits = default_num_splits(b, hk, S, q.device, cfg.block_n)
    n_rows = b * hq * t
    parts: dict[str, Tensor | int] = {}

    def build(c: KernelConfig):
        split_len = triton.cdiv(triton.cdiv(S, num_splits), c.block_n) * c.block_n
        splits = triton.cdiv(S, split_len)
        parts.update(
            n=splits,
            o=q.new_empty((splits, n_rows, d), dtype=torch.float32),
            lse=q.new_empty((splits, n_rows), dtype=torch.float32),
        )
        args = (
            q,
            *src4,
            w,
            parts["o"],
            parts["lse"],
            q.stride(0),
            q.stride(1),
            q.stride(2),
            *src4[0].stride()[:3],
            S,
            t,
            pos0,
            hk,
            n_rows,
            split_len,
            scale * LOG2E,
        )
        return (splits, b * hk), args, dict(BLOCK_N=c.block_n, BLOCK_R=rows, **flags)

    launch(_decode_split_kernel, f"decode{rows}", flags["DP"], cfg, build, q.device)

    def build_combine(c: KernelConfig):
        args = (
            parts["o"],
            parts["lse"],
            out,
            out.stride(0),
            out.stride(1),
            out.stride(2),
            n_rows,
            t,
            hq,
            parts["n"],
        )
        meta = dict(D=d, DP=flags["DP"], SPLITS=max(2, triton.next_power_of_2(parts["n"])))
        return (n_rows,), args, meta

    launch(_decode_combine_kernel, "combine", flags["DP"], COMBINE_CONFIG, build_combine, q.device)


def decode_io_bytes(q: Tensor, sources: list[Tensor]) -> int:
    """Bytes one decode step must move at least: every source cache read once, q read and
    the output written once (the I/O bound of docs/model.md, "KV-cache accounting")."""
    return sum(x.numel() * x.element_size() for x in sources) + 2 * q.numel() * q.element_size()


__all__ = [
    "GPU_CONFIG",
    "MAX_ROWS",
    "decode_config",
    "decode_io_bytes",
    "decode_rows",
    "default_num_splits",
    "fused_reconstruction_decode",
]
