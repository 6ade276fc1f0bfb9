"""Flash attention with the FusedKV reconstruction fused in: forward and backward (Triton).

K = wk1 * K1 (+ wk2 * K2) and V = wv1 * V1 (+ wv2 * V2), per-channel weights optional, are
formed tile by tile in registers and never written to memory. Causal, GQA (query head h
reads KV head h // group), head_dim 16..128 (power of two); Megatron's sbhd layout
`[s, b, heads, d]` with any strides over s, b, heads (the last dim contiguous).

Kernels (the flash-attention-2 split, written for this operator):
- `_fwd_kernel`   grid (q blocks, b * hq): online softmax in base 2; saves O and the row
                  log-sum-exp (base 2, fp32).
- `_delta_kernel` grid (q blocks, b * hq): delta = rowsum(O * dO).
- `_dkdv_kernel`  grid (kv blocks, b * hkv): a program owns one fused K/V tile and loops
                  over all `group` query heads that read it, so dK/dV need no atomics. It
                  writes dK_i = wk_i * dK (dV likewise) and, per weighted term, the tile's
                  weight-gradient partial sum_rows(dK * K_i) into `[4, kv blocks, b, hkv, d]`
                  (fp32), which torch then sums over blocks and batch: deterministic.
- `_dq_kernel`    grid (q blocks, b * hq): dQ, fusing the K/V tiles again.
Causal loops run the blocks left of (or below) the diagonal without a mask, then the
diagonal blocks with it.

The four fusion weights travel as one fp32 tensor `W [4, hkv, d]` (k1, k2, v1, v2; ones
where a term is unweighted, shared weights expanded over heads); flags ON_W* say which apply.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import KernelConfig, launch, pick

LOG2E = 1.4426950408889634


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# fmt: off
@triton.jit
def _weight(W, term, stride_term, ON: tl.constexpr, D: tl.constexpr):
    """Weight `term` (0..3) of this KV head, fp32 `[D]` (zeros, never used, when off)."""
    if ON:
        w = tl.load(W + term * stride_term + tl.arange(0, D))
    else:
        w = tl.zeros([D], dtype=tl.float32)
    return w


@triton.jit
def _load(P, offs, mask, MASKED: tl.constexpr):
    if MASKED:
        x = tl.load(P + offs, mask=mask, other=0.0)
    else:
        x = tl.load(P + offs)
    return x


@triton.jit
def _fused(P1, P2, w1, w2, offs, mask, MASKED: tl.constexpr, TWO: tl.constexpr,
           W1: tl.constexpr, W2: tl.constexpr):
    """w1 * P1 + w2 * P2 for one `[rows, d]` tile in fp32 (a plain load for one unweighted
    source); masked rows are zero."""
    x = _load(P1, offs, mask, MASKED)
    if TWO or W1:
        x = x.to(tl.float32)
        if W1:
            x = x * w1[None, :]
        if TWO:
            y = _load(P2, offs, mask, MASKED).to(tl.float32)
            if W2:
                y = y * w2[None, :]
            x = x + y
    return x


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, K1, K2, V1, V2, wk1, wk2, wv1, wv2, stride_ks, lo, hi, S,
               offs_m, offs_d, qk_scale, DIAGONAL: tl.constexpr, BLOCK_N: tl.constexpr,
               K2_ON: tl.constexpr, V2_ON: tl.constexpr, ON_WK1: tl.constexpr,
               ON_WK2: tl.constexpr, ON_WV1: tl.constexpr, ON_WV2: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        offs = cols[:, None] * stride_ks + offs_d[None, :]
        kv_ok = cols[:, None] < S
        k = _fused(K1, K2, wk1, wk2, offs, kv_ok, DIAGONAL, K2_ON, ON_WK1, ON_WK2).to(q.dtype)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        if DIAGONAL:
            keep = (offs_m[:, None] >= cols[None, :]) & (cols[None, :] < S)
            qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _fused(V1, V2, wv1, wv2, offs, kv_ok, DIAGONAL, V2_ON, ON_WV1, ON_WV2).to(q.dtype)
        acc = tl.dot(p.to(q.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(Q, K1, K2, V1, V2, W, OUT, LSE,
                stride_qs, stride_qb, stride_qh, stride_ks, stride_kb, stride_kh,
                stride_os, stride_ob, stride_oh, S, H, HK, qk_scale,
                GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, K2_ON: tl.constexpr, V2_ON: tl.constexpr,
                ON_WK1: tl.constexpr, ON_WK2: tl.constexpr, ON_WV1: tl.constexpr,
                ON_WV2: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m[:, None] < S
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs
                + offs_d[None, :], mask=row_ok, other=0.0)
    kv = b * stride_kb + hk * stride_kh
    Wh = W + hk * D
    wk1 = _weight(Wh, 0, HK * D, ON_WK1, D)
    wk2 = _weight(Wh, 1, HK * D, ON_WK2, D)
    wv1 = _weight(Wh, 2, HK * D, ON_WV1, D)
    wv2 = _weight(Wh, 3, HK * D, ON_WV2, D)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    # Left of the diagonal: no mask (BLOCK_M is a multiple of BLOCK_N). Then the diagonal.
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K1 + kv, K2 + kv, V1 + kv, V2 + kv,
                               wk1, wk2, wv1, wv2, stride_ks, 0, start_m, S, offs_m, offs_d,
                               qk_scale, False, BLOCK_N,
                               K2_ON, V2_ON, ON_WK1, ON_WK2, ON_WV1, ON_WV2)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K1 + kv, K2 + kv, V1 + kv, V2 + kv,
                               wk1, wk2, wv1, wv2, stride_ks, start_m,
                               tl.minimum(start_m + BLOCK_M, S), S, offs_m, offs_d,
                               qk_scale, True, BLOCK_N,
                               K2_ON, V2_ON, ON_WK1, ON_WK2, ON_WV1, ON_WV2)
    acc = acc / l_i[:, None]
    tl.store(OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os
             + offs_d[None, :], acc.to(OUT.dtype.element_ty), mask=row_ok)
    tl.store(LSE + bh.to(tl.int64) * S + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < S)


@triton.jit
def _delta_kernel(OUT, DO, DELTA, stride_os, stride_ob, stride_oh,
                  stride_ds, stride_db, stride_dh, S, H,
                  D: tl.constexpr, BLOCK_M: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_d = tl.arange(0, D)
    ok = offs_m[:, None] < S
    o = tl.load(OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os
                + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_ds
                 + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * S + offs_m, tl.sum(o * do, 1), mask=offs_m < S)


@triton.jit
def _dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qs, stride_ds, lo, hi, S,
                offs_n, offs_d, qk_scale, DIAGONAL: tl.constexpr, BLOCK_M: tl.constexpr):
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        ok = rows < S
        q = tl.load(Q + rows[:, None] * stride_qs + offs_d[None, :], mask=ok[:, None],
                    other=0.0)
        do = tl.load(DO + rows[:, None] * stride_ds + offs_d[None, :], mask=ok[:, None],
                     other=0.0)
        lse = tl.load(LSE + rows, mask=ok, other=float("inf"))  # rows past S: p = 0
        delta = tl.load(DELTA + rows, mask=ok, other=0.0)
        p_t = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])
        if DIAGONAL:
            p_t = tl.where(rows[None, :] >= offs_n[:, None], p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        ds_t = p_t * (tl.dot(v, tl.trans(do)) - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk)
    return dk, dv


@triton.jit
def _source_grad(G, GW, P, w, dx, offs_src, offs_grad, ok, ON: tl.constexpr):
    """Write d(source) = w * dx and, for a weighted term, the tile's sum_rows(dx * source)."""
    if ON:
        tl.store(G + offs_grad, (dx * w[None, :]).to(G.dtype.element_ty), mask=ok)
        src = tl.load(P + offs_src, mask=ok, other=0.0).to(tl.float32)
        tl.store(GW, tl.sum(dx * src, 0))
    else:
        tl.store(G + offs_grad, dx.to(G.dtype.element_ty), mask=ok)


@triton.jit
def _dkdv_kernel(Q, K1, K2, V1, V2, W, DO, LSE, DELTA, DK1, DK2, DV1, DV2, GW,
                 stride_qs, stride_qb, stride_qh, stride_ks, stride_kb, stride_kh,
                 stride_ds, stride_db, stride_dh, stride_gs, stride_gb, stride_gh,
                 S, H, HK, qk_scale, sm_scale,
                 GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, K2_ON: tl.constexpr, V2_ON: tl.constexpr,
                 ON_WK1: tl.constexpr, ON_WK2: tl.constexpr, ON_WV1: tl.constexpr,
                 ON_WV2: tl.constexpr):
    pid_n = tl.program_id(0)
    start_n = pid_n * BLOCK_N
    bhk = tl.program_id(1)
    b = (bhk // HK).to(tl.int64)
    hk = bhk % HK
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    ok = offs_n[:, None] < S
    kv = b * stride_kb + hk * stride_kh
    offs_src = offs_n[:, None] * stride_ks + offs_d[None, :]
    Wh = W + hk * D
    wk1 = _weight(Wh, 0, HK * D, ON_WK1, D)
    wk2 = _weight(Wh, 1, HK * D, ON_WK2, D)
    wv1 = _weight(Wh, 2, HK * D, ON_WV1, D)
    wv2 = _weight(Wh, 3, HK * D, ON_WV2, D)
    dtype = Q.dtype.element_ty
    k = _fused(K1 + kv, K2 + kv, wk1, wk2, offs_src, ok, True, K2_ON, ON_WK1, ON_WK2).to(dtype)
    v = _fused(V1 + kv, V2 + kv, wv1, wv2, offs_src, ok, True, V2_ON, ON_WV1, ON_WV2).to(dtype)

    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    for g in range(GROUP):
        h = hk * GROUP + g
        q_ptr = Q + b * stride_qb + h * stride_qh
        do_ptr = DO + b * stride_db + h * stride_dh
        row = (b * H + h) * S
        # Query blocks on the diagonal (BLOCK_N is a multiple of BLOCK_M), then below it.
        dk, dv = _dkdv_inner(dk, dv, k, v, q_ptr, do_ptr, LSE + row, DELTA + row, stride_qs,
                             stride_ds, start_n, tl.minimum(start_n + BLOCK_N, S), S, offs_n,
                             offs_d, qk_scale, True, BLOCK_M)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_ptr, do_ptr, LSE + row, DELTA + row, stride_qs,
                             stride_ds, start_n + BLOCK_N, S, S, offs_n, offs_d, qk_scale,
                             False, BLOCK_M)
    dk = dk * sm_scale

    # Recompute offsets and reload weights rather than keep them live through the loop:
    # they would cost registers for the whole loop.
    offs_src = offs_n[:, None] * stride_ks + offs_d[None, :]
    wk1 = _weight(Wh, 0, HK * D, ON_WK1, D)
    wk2 = _weight(Wh, 1, HK * D, ON_WK2, D)
    wv1 = _weight(Wh, 2, HK * D, ON_WV1, D)
    wv2 = _weight(Wh, 3, HK * D, ON_WV2, D)
    offs_grad = offs_n[:, None] * stride_gs + offs_d[None, :]
    g_off = b * stride_gb + hk * stride_gh
    # GW is [4, blocks, b * hk, d]: term t of this tile at ((t * blocks + pid_n) * bhks + bhk).
    term = tl.num_programs(0) * tl.num_programs(1) * D
    gw = GW + (pid_n * tl.num_programs(1) + bhk).to(tl.int64) * D + offs_d
    _source_grad(DK1 + g_off, gw, K1 + kv, wk1, dk, offs_src, offs_grad, ok, ON_WK1)
    if K2_ON:
        _source_grad(DK2 + g_off, gw + term, K2 + kv, wk2, dk, offs_src, offs_grad, ok, ON_WK2)
    _source_grad(DV1 + g_off, gw + 2 * term, V1 + kv, wv1, dv, offs_src, offs_grad, ok, ON_WV1)
    if V2_ON:
        _source_grad(DV2 + g_off, gw + 3 * term, V2 + kv, wv2, dv, offs_src, offs_grad, ok,
                     ON_WV2)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, K1, K2, V1, V2, wk1, wk2, wv1, wv2, stride_ks, lo, hi, S,
              offs_m, offs_d, qk_scale, DIAGONAL: tl.constexpr, BLOCK_N: tl.constexpr,
              K2_ON: tl.constexpr, V2_ON: tl.constexpr, ON_WK1: tl.constexpr,
              ON_WK2: tl.constexpr, ON_WV1: tl.constexpr, ON_WV2: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        offs = cols[:, None] * stride_ks + offs_d[None, :]
        kv_ok = cols[:, None] < S
        k = _fused(K1, K2, wk1, wk2, offs, kv_ok, DIAGONAL, K2_ON, ON_WK1, ON_WK2).to(q.dtype)
        v = _fused(V1, V2, wv1, wv2, offs, kv_ok, DIAGONAL, V2_ON, ON_WV1, ON_WV2).to(q.dtype)
        p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
        if DIAGONAL:
            p = tl.where((offs_m[:, None] >= cols[None, :]) & (cols[None, :] < S), p, 0.0)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dq = tl.dot(ds.to(q.dtype), k, dq)
    return dq


@triton.jit
def _dq_kernel(Q, K1, K2, V1, V2, W, DO, LSE, DELTA, DQ,
               stride_qs, stride_qb, stride_qh, stride_ks, stride_kb, stride_kh,
               stride_ds, stride_db, stride_dh, stride_gs, stride_gb, stride_gh,
               S, H, HK, qk_scale, sm_scale,
               GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, K2_ON: tl.constexpr, V2_ON: tl.constexpr,
               ON_WK1: tl.constexpr, ON_WK2: tl.constexpr, ON_WV1: tl.constexpr,
               ON_WV2: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    ok = offs_m < S
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs
                + offs_d[None, :], mask=ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_ds
                 + offs_d[None, :], mask=ok[:, None], other=0.0)
    row = bh.to(tl.int64) * S
    lse = tl.load(LSE + row + offs_m, mask=ok, other=float("inf"))
    delta = tl.load(DELTA + row + offs_m, mask=ok, other=0.0)
    kv = b * stride_kb + hk * stride_kh
    Wh = W + hk * D
    wk1 = _weight(Wh, 0, HK * D, ON_WK1, D)
    wk2 = _weight(Wh, 1, HK * D, ON_WK2, D)
    wv1 = _weight(Wh, 2, HK * D, ON_WV1, D)
    wv2 = _weight(Wh, 3, HK * D, ON_WV2, D)

    dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    dq = _dq_inner(dq, q, do, lse, delta, K1 + kv, K2 + kv, V1 + kv, V2 + kv,
                   wk1, wk2, wv1, wv2, stride_ks, 0, start_m, S, offs_m, offs_d, qk_scale,
                   False, BLOCK_N, K2_ON, V2_ON, ON_WK1, ON_WK2, ON_WV1, ON_WV2)
    dq = _dq_inner(dq, q, do, lse, delta, K1 + kv, K2 + kv, V1 + kv, V2 + kv,
                   wk1, wk2, wv1, wv2, stride_ks, start_m, tl.minimum(start_m + BLOCK_M, S),
                   S, offs_m, offs_d, qk_scale,
                   True, BLOCK_N, K2_ON, V2_ON, ON_WK1, ON_WK2, ON_WV1, ON_WV2)
    tl.store(DQ + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gs
             + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty), mask=ok[:, None])
# fmt: on


# Block sizes per kernel and head_dim: (BLOCK_M, BLOCK_N, num_warps, num_stages). Chosen
# without a GPU from sm_90 compiles with the JIT's usual alignment specialization
# (`tools/bench_kernels.py --compile-only 90`): loads pipelined (cp.async), no register
# spills except ~150 bytes in dkdv's d=128 epilogue, shared memory <= 180 KB. Untimed
# (docs/benchmarks.md); `launch` steps down if one does not fit. The interpreter gets tiny
# blocks so that small test shapes span several blocks and both loop stages.
GPU_CONFIGS = {
    "fwd": {64: KernelConfig(128, 64, 4, 3), 128: KernelConfig(128, 64, 8, 3)},
    "dkdv": {64: KernelConfig(32, 64, 8, 3), 128: KernelConfig(32, 64, 8, 2)},
    "dq": {64: KernelConfig(128, 64, 8, 2), 128: KernelConfig(128, 64, 8, 2)},
}
INTERPRETER_CONFIGS = {
    "fwd": KernelConfig(32, 16, 1, 1),
    "dkdv": KernelConfig(16, 32, 1, 1),
    "dq": KernelConfig(32, 16, 1, 1),
}
HEAD_DIMS = (16, 32, 64, 128)


def _config(kind: str, head_dim: int) -> KernelConfig:
    if interpreting():
        return INTERPRETER_CONFIGS[kind]
    return pick(GPU_CONFIGS[kind], head_dim, kind)


def _strides(x: Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def check_sources(q: Tensor, k_sources: list[Tensor], v_sources: list[Tensor]) -> None:
    """Shapes the kernels take: q `[*, *, hq, d]`, 1-2 sources each `[*, *, hkv, d]` of q's
    dtype and device (dims 0-1 checked by the caller), hq a multiple of hkv."""
    d, hq = q.shape[-1], q.shape[-2]
    if not (1 <= len(k_sources) <= 2 and 1 <= len(v_sources) <= 2):
        raise ValueError(
            f"the fused kernels take 1 or 2 key and value sources, got {len(k_sources)} and "
            f"{len(v_sources)}; use the torch reference for more"
        )
    if d not in HEAD_DIMS:
        raise ValueError(f"head_dim={d} is not supported by the fused kernels {HEAD_DIMS}")
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
    for x in (q, *k_sources):
        if x.numel() >= 2**31:
            raise ValueError(f"a tensor of {x.numel()} >= 2**31 elements needs int64 offsets")


def same_strides(xs: list[Tensor]) -> list[Tensor]:
    """The kernels give all sources one set of strides: copy them if they differ."""
    xs = [x if x.stride(-1) == 1 else x.contiguous() for x in xs]
    if len({x.stride() for x in xs}) > 1:
        xs = [x.contiguous() for x in xs]
    return xs


def pack_weights(weights: list[Tensor | None], hk: int, d: int, like: Tensor):
    """`W [4, hk, d]` fp32 (ones for absent/unweighted terms) and the on/off flags."""
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


class FusedKVAttentionFunction(torch.autograd.Function):
    """apply(q, sm_scale, k1, k2, v1, v2, wk1, wk2, wv1, wv2) -> o, causal; k2, v2 and the
    weights may be None. Returns gradients for q, every source and every weight."""

    @staticmethod
    def forward(ctx, q, sm_scale, k1, k2, v1, v2, wk1, wk2, wv1, wv2):
        ks = [x for x in (k1, k2) if x is not None]
        vs = [x for x in (v1, v2) if x is not None]
        check_sources(q, ks, vs)
        if ks[0].shape[:2] != q.shape[:2]:
            raise ValueError(f"q {tuple(q.shape)} and sources {tuple(ks[0].shape)}: s, b differ")
        q = q if q.stride(-1) == 1 else q.contiguous()
        srcs = same_strides(ks + vs)
        # A missing second source points at the first; K2_ON/V2_ON keep it unread.
        src4 = [srcs[0], srcs[len(ks) - 1], srcs[len(ks)], srcs[-1]]
        s, b, hq, d = q.shape
        hk = srcs[0].shape[2]
        ws = [wk1, wk2, wv1, wv2]
        w, flags = pack_weights(ws, hk, d, q)
        flags.update(K2_ON=len(ks) == 2, V2_ON=len(vs) == 2, GROUP=hq // hk, D=d)
        o = torch.empty(q.shape, device=q.device, dtype=q.dtype)
        lse = torch.empty((b, hq, s), device=q.device, dtype=torch.float32)

        def build(c: KernelConfig):
            args = (
                q,
                *src4,
                w,
                o,
                lse,
                *_strides(q),
                *_strides(src4[0]),
                *_strides(o),
                s,
                hq,
                hk,
                sm_scale * LOG2E,
            )
            meta = dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, **flags)
            return (triton.cdiv(s, c.block_m), b * hq), args, meta

        launch(_fwd_kernel, "fwd", d, _config("fwd", d), build)
        ctx.save_for_backward(q, *src4, w, o, lse)
        ctx.sm_scale, ctx.flags = sm_scale, flags
        ctx.weight_like = [(x.shape, x.dtype) if x is not None else None for x in ws]
        ctx.num_sources = (len(ks), len(vs))
        return o

    @staticmethod
    def backward(ctx, do):
        q, k1, k2, v1, v2, w, o, lse = ctx.saved_tensors
        sm_scale, flags = ctx.sm_scale, ctx.flags
        s, b, hq, d = q.shape
        hk = k1.shape[2]
        do = do if do.stride(-1) == 1 else do.contiguous()
        delta = torch.empty_like(lse)

        def build_delta(c: KernelConfig):
            args = (o, do, delta, *_strides(o), *_strides(do), s, hq)
            return (triton.cdiv(s, c.block_m), b * hq), args, dict(D=d, BLOCK_M=c.block_m)

        launch(_delta_kernel, "delta", d, _config("fwd", d), build_delta)

        srcs = (k1, k2, v1, v2)
        grads = [torch.empty(k1.shape, device=q.device, dtype=q.dtype) for _ in range(4)]
        gw_holder: list[Tensor] = []

        def build_dkdv(c: KernelConfig):
            blocks = triton.cdiv(s, c.block_n)
            gw_holder[:] = [
                torch.empty((4, blocks, b, hk, d), device=q.device, dtype=torch.float32)
            ]
            args = (
                q,
                *srcs,
                w,
                do,
                lse,
                delta,
                *grads,
                gw_holder[0],
                *_strides(q),
                *_strides(k1),
                *_strides(do),
                *_strides(grads[0]),
                s,
                hq,
                hk,
                sm_scale * LOG2E,
                sm_scale,
            )
            meta = dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, **flags)
            return (blocks, b * hk), args, meta

        launch(_dkdv_kernel, "dkdv", d, _config("dkdv", d), build_dkdv)
        dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)

        def build_dq(c: KernelConfig):
            args = (
                q,
                *srcs,
                w,
                do,
                lse,
                delta,
                dq,
                *_strides(q),
                *_strides(k1),
                *_strides(do),
                *_strides(dq),
                s,
                hq,
                hk,
                sm_scale * LOG2E,
                sm_scale,
            )
            meta = dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, **flags)
            return (triton.cdiv(s, c.block_m), b * hq), args, meta

        launch(_dq_kernel, "dq", d, _config("dq", d), build_dq)

        wgrads = []
        for i, like in enumerate(ctx.weight_like):
            if like is None:
                wgrads.append(None)
                continue
            g = gw_holder[0][i].sum(dim=(0, 1))  # over KV tiles and batch -> [hk, d]
            if like[0][0] == 1:  # one weight shared by all KV heads
                g = g.sum(0, keepdim=True)
            wgrads.append(g.to(like[1]))
        nk, nv = ctx.num_sources
        dk1, dk2, dv1, dv2 = grads
        return (dq, None, dk1, dk2 if nk == 2 else None, dv1, dv2 if nv == 2 else None, *wgrads)


def _pad2(xs: list) -> list:
    return list(xs) + [None] * (2 - len(xs))


def fused_reconstruction_attention(
    q: Tensor,
    k_sources: list[Tensor],
    k_weights: list[Tensor | None],
    v_sources: list[Tensor],
    v_weights: list[Tensor | None],
    softmax_scale: float | None = None,
) -> Tensor:
    """Causal attention of q `[s, b, hq, d]` over the fused sources, without materializing K
    or V. Same contract as `reference.reconstruction_attention_reference`."""
    check_sources(q, k_sources, v_sources)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    k1, k2 = _pad2(k_sources)
    v1, v2 = _pad2(v_sources)
    wk1, wk2 = _pad2(k_weights)
    wv1, wv2 = _pad2(v_weights)
    return FusedKVAttentionFunction.apply(q, scale, k1, k2, v1, v2, wk1, wk2, wv1, wv2)


__all__ = [
    "GPU_CONFIGS",
    "FusedKVAttentionFunction",
    "check_sources",
    "fused_reconstruction_attention",
    "interpreting",
    "pack_weights",
    "same_strides",
]
