"""A plain-PyTorch FusedKV decoder written from docs/model.md, independent of the production code.

It takes the weights of a TP=1 Megatron model by name and computes logits the obvious way:
pre-norm blocks, q/k RMSNorm per head, rotate-half RoPE, causal GQA attention, SwiGLU. The
KV-sharing rules below restate docs/model.md's variant table; nothing is imported from fusedkv_megatron.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x, base):
    """x: [b, s, heads, d]; rotate-half RoPE at positions 0..s-1."""
    d = x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = torch.arange(x.shape[1], dtype=torch.float32)[:, None] * inv[None]  # [s, d/2]
    cos = torch.cat([ang.cos(), ang.cos()], -1)[None, :, None, :]
    sin = torch.cat([ang.sin(), ang.sin()], -1)[None, :, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def causal_attention(q, k, v):
    """q: [b, s, H, d]; k, v: [b, s, G, d] with H a multiple of G."""
    rep = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(rep, dim=2)
    v = v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    s = q.shape[1]
    mask = torch.ones(s, s, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


def kv_rule(variant: str, i: int, L: int):
    """For layer i (1-based): None if it computes its own K/V, else
    (key terms, value terms) as lists of (source layer, weight name or None)."""
    n = L // 2
    if variant == "cla":
        return None if i % 2 else ([(i - 1, None)], [(i - 1, None)])
    if i <= n or variant in ("vanilla", "gqa"):
        return None
    if variant == "fusedkv":
        return (
            [(1, "key_weight_0"), (n, "key_weight_1")],
            [(1, "value_weight_0"), (n, "value_weight_1")],
        )
    if variant == "fusedkv_lite":
        return [(n, None)], [(1, None)]
    if variant == "fusedkv_lite_learnable":
        return [(n, "key_weight_0")], [(1, "value_weight_0")]
    if variant == "yoco":
        return [(n, None)], [(n, None)]
    if variant == "dense_probe":  # every storage layer j = 1..n, each with its own weight
        return (
            [(j, f"key_weight_{j - 1}") for j in range(1, n + 1)],
            [(j, f"value_weight_{j - 1}") for j in range(1, n + 1)],
        )
    raise ValueError(variant)


class ReferenceModel:
    def __init__(
        self,
        weights: dict,
        variant: str,
        num_layers: int,
        heads: int,
        groups: int,
        rotary_base: float = 1e6,
        eps: float = 1e-6,
    ):
        self.w = weights
        self.variant, self.L, self.H, self.G = variant, num_layers, heads, groups
        self.base, self.eps = rotary_base, eps

    def logits(self, ids):
        w, eps = self.w, self.eps
        x = w["embedding.word_embeddings.weight"][ids]  # [b, s, h]
        b, s, _ = x.shape
        kv_of = {}
        for i in range(1, self.L + 1):
            p = f"decoder.layers.{i - 1}."
            h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
            rule = kv_rule(self.variant, i, self.L)
            if rule is None:
                qkv = h @ w[p + "self_attention.linear_qkv.weight"].T
                d = w[p + "self_attention.q_layernorm.weight"].shape[0]
                # Megatron's fused layout: per KV group, its query heads, then k, then v.
                qkv = qkv.view(b, s, self.G, self.H // self.G + 2, d)
                q = qkv[:, :, :, :-2].reshape(b, s, self.H, d)
                k, v = qkv[:, :, :, -2], qkv[:, :, :, -1]
                k = rope(rms_norm(k, w[p + "self_attention.k_layernorm.weight"], eps), self.base)
                kv_of[i] = (k, v)
            else:
                q = h @ w[p + "self_attention.linear_q.weight"].T
                d = w[p + "self_attention.q_layernorm.weight"].shape[0]
                q = q.view(b, s, self.H, d)
                key_terms, value_terms = rule
                k = sum(kv_of[src][0] * self._key_weight(p, name) for src, name in key_terms)
                v = sum(kv_of[src][1] * self._weight(p, name) for src, name in value_terms)
            q = rope(rms_norm(q, w[p + "self_attention.q_layernorm.weight"], eps), self.base)
            attn = causal_attention(q, k, v).reshape(b, s, -1)
            x = x + attn @ w[p + "self_attention.linear_proj.weight"].T
            h = rms_norm(x, w[p + "pre_mlp_layernorm.weight"], eps)
            gate, up = (h @ w[p + "mlp.linear_fc1.weight"].T).chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ w[p + "mlp.linear_fc2.weight"].T
        x = rms_norm(x, w["decoder.final_layernorm.weight"], eps)
        return x @ w["output_layer.weight"].T

    def _weight(self, prefix, name):
        return 1.0 if name is None else self.w[prefix + "self_attention." + name]

    def _key_weight(self, prefix, name):
        if name is None:
            return 1.0
        half = self.w[prefix + "self_attention." + name]  # [G or 1, d/2]
        return torch.cat([half, half], dim=-1)  # rotate-half pairs j with j + d/2

    def loss(self, ids, labels):
        logits = self.logits(ids)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(
            labels.shape
        )
