"""Training/prefill attention with the FusedKV reconstruction fused in (Triton), host side:
the block configurations, the autograd function and `fused_reconstruction_attention`.

The kernels themselves are in `triton_attention_kernels.py`; what they share with decode
(fused tile loads, source checks, weight packing, head-dim padding) in `triton_common.py`.
"""

from __future__ import annotations

import math

import torch
import triton
from torch import Tensor

from ..fusion import KVFusion
from .launch import KernelConfig, launch, pick
from .triton_attention_kernels import _delta_kernel, _dkdv_kernel, _dq_kernel, _fwd_kernel
from .triton_common import (
    HEAD_DIMS,
    LOG2E,
    check_int32_offsets,
    check_sources,
    interpreting,
    pack_weights,
    pad2,
    padded_head_dim,
    same_strides,
)

# Block sizes per kernel and padded head dim: (BLOCK_M, BLOCK_N, num_warps, num_stages); a
# head dim uses the entry of its padded width (96 -> 128, 160 -> 256). Chosen without a GPU
# from sm_90 compiles with the JIT's usual alignment specialization (tools/compile_matrix.py,
# docs/benchmarks.md): loads pipelined (cp.async), shared memory within an H100/H200 block's
# 227 KB, no spills in the loops except dq at 256-wide tiles (~420 B with every shape tried). Untimed; `launch` steps down if one does not fit. The
# interpreter gets tiny blocks so that small test shapes span several blocks and both loop
# stages.
GPU_CONFIGS = {
    "fwd": {
        64: KernelConfig(128, 64, 8, 3),
        128: KernelConfig(128, 64, 8, 3),
        256: KernelConfig(64, 32, 8, 2),
    },
    "dkdv": {
        64: KernelConfig(32, 64, 8, 3),
        128: KernelConfig(32, 64, 8, 2),
        256: KernelConfig(16, 32, 8, 2),
    },
    "dq": {
        64: KernelConfig(128, 64, 8, 2),
        128: KernelConfig(128, 64, 8, 2),
        256: KernelConfig(64, 16, 8, 2),
    },
}
INTERPRETER_CONFIGS = {
    "fwd": KernelConfig(32, 16, 1, 1),
    "dkdv": KernelConfig(16, 32, 1, 1),
    "dq": KernelConfig(32, 16, 1, 1),
}


def kernel_config(kind: str, head_dim: int) -> KernelConfig:
    """The configuration `kind` (fwd, dkdv, dq) launches with at `head_dim`."""
    if interpreting():
        return INTERPRETER_CONFIGS[kind]
    return pick(GPU_CONFIGS[kind], padded_head_dim(head_dim), kind)


def _strides(x: Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


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
        check_int32_offsets(1, q=q, source=srcs[0])
        # A missing second source points at the first; K2_ON/V2_ON keep it unread.
        src4 = [srcs[0], srcs[len(ks) - 1], srcs[len(ks)], srcs[-1]]
        s, b, hq, d = q.shape
        hk = srcs[0].shape[2]
        ws = [wk1, wk2, wv1, wv2]
        w, flags = pack_weights(ws, hk, d, q)
        flags.update(
            K2_ON=len(ks) == 2, V2_ON=len(vs) == 2, GROUP=hq // hk, D=d, DP=padded_head_dim(d)
        )
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

        launch(_fwd_kernel, "fwd", flags["DP"], kernel_config("fwd", d), build, q.device)
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
        grads = [torch.empty(k1.shape, device=q.device, dtype=q.dtype) for _ in range(4)]
        dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
        check_int32_offsets(1, do=do, o=o, dq=dq, source_grad=grads[0])
        pad = dict(D=d, DP=flags["DP"])

        def build_delta(c: KernelConfig):
            args = (o, do, delta, *_strides(o), *_strides(do), s, hq)
            return (triton.cdiv(s, c.block_m), b * hq), args, dict(BLOCK_M=c.block_m, **pad)

        dp = flags["DP"]
        launch(_delta_kernel, "delta", dp, kernel_config("fwd", d), build_delta, q.device)

        srcs = (k1, k2, v1, v2)
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

        launch(_dkdv_kernel, "dkdv", dp, kernel_config("dkdv", d), build_dkdv, q.device)

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

        launch(_dq_kernel, "dq", dp, kernel_config("dq", d), build_dq, q.device)

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


def fused_reconstruction_attention(
    q: Tensor, kv: KVFusion, softmax_scale: float | None = None
) -> Tensor:
    """Causal attention of q `[s, b, hq, d]` over the fused sources, without materializing K
    or V. Same contract as `reference.reconstruction_attention_reference`."""
    check_sources(q, kv.k_sources, kv.v_sources)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    k1, k2 = pad2(kv.k_sources)
    v1, v2 = pad2(kv.v_sources)
    wk1, wk2 = pad2(kv.k_weights)
    wv1, wv2 = pad2(kv.v_weights)
    return FusedKVAttentionFunction.apply(q, scale, k1, k2, v1, v2, wk1, wk2, wv1, wv2)


__all__ = [
    "GPU_CONFIGS",
    "HEAD_DIMS",
    "FusedKVAttentionFunction",
    "fused_reconstruction_attention",
    "kernel_config",
]
