"""Flash-attention kernels with the FusedKV reconstruction fused in: forward and backward.

K = wk1 * K1 (+ wk2 * K2) and V = wv1 * V1 (+ wv2 * V2), per-channel weights optional, are
formed tile by tile in registers and never written to memory. Causal, GQA (query head h
reads KV head h // group), any head dim `D` that is a multiple of 16 up to 256 (tiles are
`DP` = next power of two wide, masked past D); Megatron's sbhd layout `[s, b, heads, D]`
with any strides over s, b, heads (the last dim contiguous). The host side (configs,
autograd) is `triton_attention.py`.

Kernels (the flash-attention-2 split, written for this operator):
- `_fwd_kernel`   grid (q blocks, b * hq): online softmax in base 2; saves O and the row
                  log-sum-exp (base 2, fp32).
- `_delta_kernel` grid (q blocks, b * hq): delta = rowsum(O * dO).
- `_dkdv_kernel`  grid (kv blocks, b * hkv): a program owns one fused K/V tile and loops
                  over all `group` query heads that read it, so dK/dV need no atomics. It
                  writes dK_i = wk_i * dK (dV likewise) and, per weighted term, the tile's
                  weight-gradient partial sum_rows(dK * K_i) into `[4, kv blocks, b, hkv, D]`
                  (fp32), which torch then sums over blocks and batch: deterministic.
- `_dq_kernel`    grid (q blocks, b * hq): dQ, fusing the K/V tiles again.
Causal loops run the blocks left of (or below) the diagonal without a row mask, then the
diagonal blocks with it.

The four fusion weights travel as one fp32 tensor `W [4, hkv, D]` (k1, k2, v1, v2; ones
where a term is unweighted, shared weights expanded over heads); flags ON_W* say which apply.
The batch index is int64 in every offset; the rest is int32 (checked by the host side).
"""

import triton
import triton.language as tl

from .triton_common import _fused, _load, _store, _weight


# fmt: off
@triton.jit
def _fwd_inner(acc, m_i, l_i, q, K1, K2, V1, V2, wk1, wk2, wv1, wv2, stride_ks, lo, hi, S,
               offs_m, offs_d, d_ok, qk_scale, DIAGONAL: tl.constexpr, PAD: tl.constexpr,
               BLOCK_N: tl.constexpr, K2_ON: tl.constexpr, V2_ON: tl.constexpr,
               ON_WK1: tl.constexpr, ON_WK2: tl.constexpr, ON_WV1: tl.constexpr,
               ON_WV2: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        offs = cols[:, None] * stride_ks + offs_d[None, :]
        kv_ok = cols[:, None] < S
        k = _fused(K1, K2, wk1, wk2, offs, kv_ok, d_ok, DIAGONAL, PAD, K2_ON, ON_WK1,
                   ON_WK2).to(q.dtype)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        if DIAGONAL:
            keep = (offs_m[:, None] >= cols[None, :]) & (cols[None, :] < S)
            qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _fused(V1, V2, wv1, wv2, offs, kv_ok, d_ok, DIAGONAL, PAD, V2_ON, ON_WV1,
                   ON_WV2).to(q.dtype)
        acc = tl.dot(p.to(q.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(Q, K1, K2, V1, V2, W, OUT, LSE,
                stride_qs, stride_qb, stride_qh, stride_ks, stride_kb, stride_kh,
                stride_os, stride_ob, stride_oh, S, H, HK, qk_scale,
                GROUP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, K2_ON: tl.constexpr, V2_ON: tl.constexpr,
                ON_WK1: tl.constexpr, ON_WK2: tl.constexpr, ON_WV1: tl.constexpr,
                ON_WV2: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, DP)
    d_ok = offs_d[None, :] < D
    row_ok = offs_m[:, None] < S
    q = _load(Q + b * stride_qb + h * stride_qh, offs_m[:, None] * stride_qs + offs_d[None, :],
              row_ok, d_ok, True, D < DP)
    kv = b * stride_kb + hk * stride_kh
    Wh = W + hk * D
    wk1 = _weight(Wh, 0, HK * D, ON_WK1, D, DP)
    wk2 = _weight(Wh, 1, HK * D, ON_WK2, D, DP)
    wv1 = _weight(Wh, 2, HK * D, ON_WV1, D, DP)
    wv2 = _weight(Wh, 3, HK * D, ON_WV2, D, DP)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DP], dtype=tl.float32)
    # Left of the diagonal: no row mask (BLOCK_M is a multiple of BLOCK_N). Then the diagonal.
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K1 + kv, K2 + kv, V1 + kv, V2 + kv,
                               wk1, wk2, wv1, wv2, stride_ks, 0, start_m, S, offs_m, offs_d,
                               d_ok, qk_scale, False, D < DP, BLOCK_N,
                               K2_ON, V2_ON, ON_WK1, ON_WK2, ON_WV1, ON_WV2)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K1 + kv, K2 + kv, V1 + kv, V2 + kv,
                               wk1, wk2, wv1, wv2, stride_ks, start_m,
                               tl.minimum(start_m + BLOCK_M, S), S, offs_m, offs_d,
                               d_ok, qk_scale, True, D < DP, BLOCK_N,
                               K2_ON, V2_ON, ON_WK1, ON_WK2, ON_WV1, ON_WV2)
    acc = acc / l_i[:, None]
    _store(OUT + b * stride_ob + h * stride_oh, offs_m[:, None] * stride_os + offs_d[None, :],
           acc.to(OUT.dtype.element_ty), row_ok, d_ok, D < DP)
    tl.store(LSE + bh.to(tl.int64) * S + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < S)


@triton.jit
def _delta_kernel(OUT, DO, DELTA, stride_os, stride_ob, stride_oh,
                  stride_ds, stride_db, stride_dh, S, H,
                  D: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_d = tl.arange(0, DP)
    d_ok = offs_d[None, :] < D
    ok = offs_m[:, None] < S
    o = _load(OUT + b * stride_ob + h * stride_oh, offs_m[:, None] * stride_os + offs_d[None, :],
              ok, d_ok, True, D < DP).to(tl.float32)
    do = _load(DO + b * stride_db + h * stride_dh, offs_m[:, None] * stride_ds + offs_d[None, :],
               ok, d_ok, True, D < DP).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * S + offs_m, tl.sum(o * do, 1), mask=offs_m < S)


@triton.jit
def _dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qs, stride_ds, lo, hi, S,
                offs_n, offs_d, d_ok, qk_scale, DIAGONAL: tl.constexpr, PAD: tl.constexpr,
                BLOCK_M: tl.constexpr):
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        ok = rows < S
        q = _load(Q, rows[:, None] * stride_qs + offs_d[None, :], ok[:, None], d_ok, True, PAD)
        do = _load(DO, rows[:, None] * stride_ds + offs_d[None, :], ok[:, None], d_ok, True, PAD)
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
def _source_grad(G, GW, P, w, dx, offs_src, offs_grad, ok, d_ok, ON: tl.constexpr,
                 D: tl.constexpr, DP: tl.constexpr):
    """Write d(source) = w * dx and, for a weighted term, the tile's sum_rows(dx * source)."""
    if ON:
        _store(G, offs_grad, (dx * w[None, :]).to(G.dtype.element_ty), ok, d_ok, D < DP)
        src = _load(P, offs_src, ok, d_ok, True, D < DP).to(tl.float32)
        offs = tl.arange(0, DP)
        tl.store(GW + offs, tl.sum(dx * src, 0), mask=offs < D)
    else:
        _store(G, offs_grad, dx.to(G.dtype.element_ty), ok, d_ok, D < DP)


@triton.jit
def _dkdv_kernel(Q, K1, K2, V1, V2, W, DO, LSE, DELTA, DK1, DK2, DV1, DV2, GW,
                 stride_qs, stride_qb, stride_qh, stride_ks, stride_kb, stride_kh,
                 stride_ds, stride_db, stride_dh, stride_gs, stride_gb, stride_gh,
                 S, H, HK, qk_scale, sm_scale,
                 GROUP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, K2_ON: tl.constexpr, V2_ON: tl.constexpr,
                 ON_WK1: tl.constexpr, ON_WK2: tl.constexpr, ON_WV1: tl.constexpr,
                 ON_WV2: tl.constexpr):
    pid_n = tl.program_id(0)
    start_n = pid_n * BLOCK_N
    bhk = tl.program_id(1)
    b = (bhk // HK).to(tl.int64)
    hk = bhk % HK
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, DP)
    d_ok = offs_d[None, :] < D
    ok = offs_n[:, None] < S
    kv = b * stride_kb + hk * stride_kh
    offs_src = offs_n[:, None] * stride_ks + offs_d[None, :]
    Wh = W + hk * D
    wk1 = _weight(Wh, 0, HK * D, ON_WK1, D, DP)
    wk2 = _weight(Wh, 1, HK * D, ON_WK2, D, DP)
    wv1 = _weight(Wh, 2, HK * D, ON_WV1, D, DP)
    wv2 = _weight(Wh, 3, HK * D, ON_WV2, D, DP)
    dtype = Q.dtype.element_ty
    k = _fused(K1 + kv, K2 + kv, wk1, wk2, offs_src, ok, d_ok, True, D < DP, K2_ON, ON_WK1,
               ON_WK2).to(dtype)
    v = _fused(V1 + kv, V2 + kv, wv1, wv2, offs_src, ok, d_ok, True, D < DP, V2_ON, ON_WV1,
               ON_WV2).to(dtype)

    dk = tl.zeros([BLOCK_N, DP], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, DP], dtype=tl.float32)
    for g in range(GROUP):
        h = hk * GROUP + g
        q_ptr = Q + b * stride_qb + h * stride_qh
        do_ptr = DO + b * stride_db + h * stride_dh
        row = (b * H + h) * S
        # Query blocks on the diagonal (BLOCK_N is a multiple of BLOCK_M), then below it.
        dk, dv = _dkdv_inner(dk, dv, k, v, q_ptr, do_ptr, LSE + row, DELTA + row, stride_qs,
                             stride_ds, start_n, tl.minimum(start_n + BLOCK_N, S), S, offs_n,
                             offs_d, d_ok, qk_scale, True, D < DP, BLOCK_M)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_ptr, do_ptr, LSE + row, DELTA + row, stride_qs,
                             stride_ds, start_n + BLOCK_N, S, S, offs_n, offs_d, d_ok, qk_scale,
                             False, D < DP, BLOCK_M)
    dk = dk * sm_scale

    # Recompute offsets and reload weights rather than keep them live through the loop:
    # they would cost registers for the whole loop.
    offs_src = offs_n[:, None] * stride_ks + offs_d[None, :]
    wk1 = _weight(Wh, 0, HK * D, ON_WK1, D, DP)
    wk2 = _weight(Wh, 1, HK * D, ON_WK2, D, DP)
    wv1 = _weight(Wh, 2, HK * D, ON_WV1, D, DP)
    wv2 = _weight(Wh, 3, HK * D, ON_WV2, D, DP)
    offs_grad = offs_n[:, None] * stride_gs + offs_d[None, :]
    g_off = b * stride_gb + hk * stride_gh
    # GW is [4, blocks, b * hk, D]: term t of this tile at ((t * blocks + pid_n) * bhks + bhk).
    term = tl.num_programs(0) * tl.num_programs(1) * D
    gw = GW + (pid_n * tl.num_programs(1) + bhk).to(tl.int64) * D
    _source_grad(DK1 + g_off, gw, K1 + kv, wk1, dk, offs_src, offs_grad, ok, d_ok, ON_WK1, D, DP)
    if K2_ON:
        _source_grad(DK2 + g_off, gw + term, K2 + kv, wk2, dk, offs_src, offs_grad, ok, d_ok,
                     ON_WK2, D, DP)
    _source_grad(DV1 + g_off, gw + 2 * term, V1 + kv, wv1, dv, offs_src, offs_grad, ok, d_ok,
                 ON_WV1, D, DP)
    if V2_ON:
        _source_grad(DV2 + g_off, gw + 3 * term, V2 + kv, wv2, dv, offs_src, offs_grad, ok, d_ok,
                     ON_WV2, D, DP)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, K1, K2, V1, V2, wk1, wk2, wv1, wv2, stride_ks, lo, hi, S,
              offs_m, offs_d, d_ok, qk_scale, DIAGONAL: tl.constexpr, PAD: tl.constexpr,
              BLOCK_N: tl.constexpr, K2_ON: tl.constexpr, V2_ON: tl.constexpr,
              ON_WK1: tl.constexpr, ON_WK2: tl.constexpr, ON_WV1: tl.constexpr,
              ON_WV2: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        offs = cols[:, None] * stride_ks + offs_d[None, :]
        kv_ok = cols[:, None] < S
        k = _fused(K1, K2, wk1, wk2, offs, kv_ok, d_ok, DIAGONAL, PAD, K2_ON, ON_WK1,
                   ON_WK2).to(q.dtype)
        v = _fused(V1, V2, wv1, wv2, offs, kv_ok, d_ok, DIAGONAL, PAD, V2_ON, ON_WV1,
                   ON_WV2).to(q.dtype)
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
               GROUP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, K2_ON: tl.constexpr, V2_ON: tl.constexpr,
               ON_WK1: tl.constexpr, ON_WK2: tl.constexpr, ON_WV1: tl.constexpr,
               ON_WV2: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, DP)
    d_ok = offs_d[None, :] < D
    ok = offs_m < S
    q = _load(Q + b * stride_qb + h * stride_qh, offs_m[:, None] * stride_qs + offs_d[None, :],
              ok[:, None], d_ok, True, D < DP)
    do = _load(DO + b * stride_db + h * stride_dh, offs_m[:, None] * stride_ds + offs_d[None, :],
               ok[:, None], d_ok, True, D < DP)
    row = bh.to(tl.int64) * S
    lse = tl.load(LSE + row + offs_m, mask=ok, other=float("inf"))
    delta = tl.load(DELTA + row + offs_m, mask=ok, other=0.0)
    kv = b * stride_kb + hk * stride_kh
    Wh = W + hk * D
    wk1 = _weight(Wh, 0, HK * D, ON_WK1, D, DP)
    wk2 = _weight(Wh, 1, HK * D, ON_WK2, D, DP)
    wv1 = _weight(Wh, 2, HK * D, ON_WV1, D, DP)
    wv2 = _weight(Wh, 3, HK * D, ON_WV2, D, DP)

    dq = tl.zeros([BLOCK_M, DP], dtype=tl.float32)
    dq = _dq_inner(dq, q, do, lse, delta, K1 + kv, K2 + kv, V1 + kv, V2 + kv,
                   wk1, wk2, wv1, wv2, stride_ks, 0, start_m, S, offs_m, offs_d, d_ok, qk_scale,
                   False, D < DP, BLOCK_N, K2_ON, V2_ON, ON_WK1, ON_WK2, ON_WV1, ON_WV2)
    dq = _dq_inner(dq, q, do, lse, delta, K1 + kv, K2 + kv, V1 + kv, V2 + kv,
                   wk1, wk2, wv1, wv2, stride_ks, start_m, tl.minimum(start_m + BLOCK_M, S),
                   S, offs_m, offs_d, d_ok, qk_scale,
                   True, D < DP, BLOCK_N, K2_ON, V2_ON, ON_WK1, ON_WK2, ON_WV1, ON_WV2)
    _store(DQ + b * stride_gb + h * stride_gh, offs_m[:, None] * stride_gs + offs_d[None, :],
           (dq * sm_scale).to(DQ.dtype.element_ty), ok[:, None], d_ok, D < DP)
# fmt: on
