"""Pure-PyTorch references for the reconstruction-attention kernels: materialize, then SDPA.

They run anywhere (CPU included), define what the Triton kernels must compute, and serve as
the test oracle. The fusion itself is `fusion.fuse`, the one home of the FusedKV math.

Layouts: training tensors are Megatron's sbhd `[s, b, heads, head_dim]`; decode tensors are
batch-first `[b, s, heads, head_dim]` (any strides, so a `[b, heads, s, d]` cache can be passed
as a transposed view).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..fusion import KVFusion


def sdpa_bshd(
    q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, attn_mask: Tensor | None = None
) -> Tensor:
    """SDPA on batch-first `[b, s, h, d]` tensors with GQA (query head h reads KV head
    h // (hq / hkv)); returns `[b, sq, hq, d]`."""
    hq, hkv = q.shape[2], k.shape[2]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=attn_mask,
        is_causal=causal and attn_mask is None,
        scale=scale,
        enable_gqa=hq != hkv,
    )
    return out.transpose(1, 2)


def reconstruction_attention_reference(
    q: Tensor, kv: KVFusion, softmax_scale: float | None = None
) -> Tensor:
    """Causal attention of `q` `[s, b, hq, d]` over `kv`'s K = sum_i wk_i * K_i and
    V = sum_i wv_i * V_i (sources `[s, b, hkv, d]`, weights `[hkv or 1, d]` or None).

    Returns `[s, b, hq, d]`. Gradients reach q, every source and every weight via autograd.
    """
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    key, value = kv.key, kv.value
    out = sdpa_bshd(q.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), scale, True)
    return out.transpose(0, 1)


def decode_mask(num_queries: int, cache_len: int, device: torch.device) -> Tensor:
    """Boolean `[t, S]` mask (True = attend): query i sits at position S - t + i."""
    rows = torch.arange(num_queries, device=device)[:, None] + (cache_len - num_queries)
    return torch.arange(cache_len, device=device)[None, :] <= rows


def reconstruction_decode_reference(
    q: Tensor, kv: KVFusion, softmax_scale: float | None = None, causal: bool = True
) -> Tensor:
    """Decode attention: `q` `[b, t, hq, d]` (the last t positions) against `kv`'s source
    caches `[b, S, hkv, d]` that already hold those positions. Returns `[b, t, hq, d]`.

    `causal`: query i sees cache positions <= S - t + i (no effect for t = 1)."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    key, value = kv.key, kv.value
    mask = decode_mask(q.shape[1], key.shape[1], q.device) if causal else None
    return sdpa_bshd(q, key, value, scale, False, attn_mask=mask)


__all__ = [
    "decode_mask",
    "reconstruction_attention_reference",
    "reconstruction_decode_reference",
    "sdpa_bshd",
]
