"""Hugging Face model of a FusedKV (arXiv 2512.03870) Qwen3-style decoder, for inference.

Exported next to the weights as remote code: imports only torch/transformers, never
fusedkv_megatron, and carries its own copy of the fusion math (`expand_key_weight`, `fuse`),
kept equal to the trainer's (fusedkv_megatron.fusion) by the fusedkv_megatron test suite.

- Storage layers compute Q, K, V as Qwen3 does; the cache holds them only (the config's
  `kv_sharing_modes` marks top layers "reuse", for which transformers' caches allocate nothing).
- Source layers publish their full-length (cached + new) post-k-norm, post-RoPE K/V into a
  per-forward `sources` dict; reconstruction layers fuse those and never rotate them again.
- Top-half prefill: the layers after the last storage layer only need the tokens whose logits
  are kept, because no later layer reads their K/V. With `logits_to_keep=1` (what `generate()`
  passes) the top half of a FusedKV/YOCO model runs on the last prompt token only.
- Decode: a reconstruction layer with few queries attends to its sources directly; on CUDA,
  when Triton imports, through the Triton decode kernel of triton_decode_fusedkv.py (exported
  with this file), else in torch. `FUSEDKV_ATTENTION_BACKEND=torch` keeps torch; `=triton`
  insists on the kernel (on CPU only under TRITON_INTERPRET=1, for tests).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel

from .configuration_fusedkv import FusedKVConfig

Sources = dict[tuple[int, str], torch.Tensor]


# ----------------------------------------------------------------------------- fusion math
def expand_key_weight(weight: torch.Tensor, rotary_interleaved: bool) -> torch.Tensor:
    """[..., d/2] -> [..., d], equal on the two channels one RoPE frequency rotates, so that
    w * RoPE_m(k) == RoPE_m(w * k) and fused scores stay relative."""
    if rotary_interleaved:
        return weight.repeat_interleave(2, dim=-1)
    return torch.cat([weight, weight], dim=-1)


def fuse(sources: list[torch.Tensor], weights: list[torch.Tensor | None]) -> torch.Tensor:
    """sum_i w_i * s_i with s_i [b, heads, s, d] and w_i [heads or 1, d] (None means 1)."""
    out = None
    for src, w in zip(sources, weights, strict=True):
        term = src if w is None else src * w.to(src.dtype)[:, None, :]
        out = term if out is None else out + term
    return out


# ----------------------------------------------------------------------------- RoPE
def rope_cos_sin(
    config: FusedKVConfig, position_ids: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [b, s, d] laid out for the model's pairing (rotate-half or interleaved)."""
    d, base = config.head_dim, config.rope_parameters["rope_theta"]
    inv_freq = 1.0 / base ** (
        torch.arange(0, d, 2, device=position_ids.device, dtype=torch.float32) / d
    )
    freqs = position_ids[..., None].float() * inv_freq
    if config.rotary_interleaved:
        emb = freqs.repeat_interleave(2, dim=-1)
    else:
        emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool):
    """x [b, heads, s, d]; cos/sin [b, s, d]."""
    if interleaved:
        rotated = torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2)
    else:
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


# ----------------------------------------------------------------------------- modules
class FusedKVRMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class FusedKVMLP(nn.Module):
    def __init__(self, config: FusedKVConfig):
        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, f, bias=False)
        self.up_proj = nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain softmax attention; query [b, h, q, d], key/value [b, kv_heads, k, d]."""
    key = key.repeat_interleave(module.num_key_value_groups, dim=1)
    value = value.repeat_interleave(module.num_key_value_groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


# Reconstruction layers with at most this many queries (decode, top-half prefill) attend to
# their sources directly instead of materialising the fused K/V.
DIRECT_ATTENTION_MAX_QUERIES = 16


def attend_to_sources(query, keys, key_weights, values, value_weights, attention_mask, scaling):
    """Attention over fused K/V without building them: q.(sum a_i*K_i) = sum (q*a_i).K_i and
    P.(sum b_i*V_i) = sum b_i*(P.V_i), as the weights are per KV head and channel. Each source
    is read once per step (the paper's decode accounting) instead of fused into new tensors.

    query [b, heads, n, d]; sources [b, kv_heads, S, d]; weights [kv_heads or 1, d] or None;
    attention_mask None (causal, aligned to the last key), or 4D additive / boolean.
    """
    b, heads, n, d = query.shape
    groups, length = keys[0].shape[1], keys[0].shape[2]
    q = query.reshape(b, groups, heads // groups * n, d)  # query heads of one KV head together

    def weighted(x, w):
        return x if w is None else x * w.to(x.dtype)[None, :, None, :]

    scores = sum(torch.matmul(weighted(q, w), k.transpose(2, 3)) for k, w in zip(keys, key_weights))
    scores = scores.view(b, heads, n, length) * scaling
    if attention_mask is None and n > 1:
        rows = torch.arange(length - n, length, device=query.device)[:, None]
        attention_mask = torch.arange(length, device=query.device)[None, :] <= rows
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = probs.view(b, groups, heads // groups * n, length)
    out = sum(weighted(torch.matmul(probs, v), w) for v, w in zip(values, value_weights))
    return out.view(b, heads, n, d).transpose(1, 2).contiguous()


BACKEND_ENV = "FUSEDKV_ATTENTION_BACKEND"


@functools.cache
def _triton_decode():
    """(supported, fused_reconstruction_decode) of the exported kernel when Triton imports,
    else None. (Spelled `from .x import`: transformers copies the files it finds that way.)"""
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    from .triton_decode_fusedkv import fused_reconstruction_decode, supported

    return supported, fused_reconstruction_decode


def use_triton_decode(x: torch.Tensor) -> bool:
    """Whether decode of tensors like `x` runs the Triton kernel: FUSEDKV_ATTENTION_BACKEND
    auto (default: on CUDA when Triton imports), triton (also on CPU under TRITON_INTERPRET=1;
    an error where it cannot run) or torch (never)."""
    choice = (os.environ.get(BACKEND_ENV, "auto") or "auto").strip().lower()
    if choice not in ("auto", "triton", "torch"):
        raise ValueError(f"{BACKEND_ENV}={choice!r} is not one of auto, triton, torch")
    if choice == "torch":
        return False
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    runnable = (x.is_cuda or interpret) and _triton_decode() is not None
    if choice == "triton" and not runnable:
        raise RuntimeError(
            f"{BACKEND_ENV}=triton but the Triton decode kernel cannot run on {x.device} "
            f"(triton importable: {_triton_decode() is not None}); use a CUDA device, "
            "TRITON_INTERPRET=1 on CPU, or auto/torch"
        )
    return runnable and (choice == "triton" or x.is_cuda)


def triton_attend_to_sources(query, keys, key_weights, values, value_weights, scaling):
    """`attend_to_sources` (causal, no mask) through the Triton decode kernel; None where the
    kernel does not take these tensors (head dim, more than two sources, int32 offsets)."""
    supported, decode = _triton_decode()
    q = query.transpose(1, 2)  # [b, n, heads, d], as the kernel takes it
    ks = [k.transpose(1, 2) for k in keys]
    vs = [v.transpose(1, 2) for v in values]
    if not supported(q, ks, vs):
        return None
    return decode(q, ks, vs, key_weights, value_weights, scaling)


class FusedKVAttention(nn.Module):
    """Storage layer: own Q/K/V (k-norm, RoPE, cached). Reconstruction layer: own Q only; K and
    V fused from the sources with per-channel weights (keys tied per RoPE pair)."""

    def __init__(self, config: FusedKVConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = d = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = d**-0.5
        self.is_causal = True
        h, heads, kv_heads = (
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
        )
        self.q_proj = nn.Linear(h, heads * d, bias=False)
        self.q_norm = FusedKVRMSNorm(d, config.rms_norm_eps)
        self.o_proj = nn.Linear(heads * d, h, bias=False)
        self.plan = config.layer_plans()[layer_idx]
        self.publishes = [
            (layer_idx, kind)
            for p in config.layer_plans()
            if p is not None
            for kind, terms in (("k", p[0]), ("v", p[1]))
            for t in terms
            if t[0] == layer_idx
        ]
        if self.plan is None:
            self.k_proj = nn.Linear(h, kv_heads * d, bias=False)
            self.v_proj = nn.Linear(h, kv_heads * d, bias=False)
            self.k_norm = FusedKVRMSNorm(d, config.rms_norm_eps)
            return
        groups = kv_heads if config.fusion_weights_per_head else 1
        for kind, terms in (("key", self.plan[0]), ("value", self.plan[1])):
            for j, (_, weighted) in enumerate(terms):
                if weighted:
                    width = d // 2 if kind == "key" else d
                    self.register_parameter(
                        f"{kind}_weight_{j}", nn.Parameter(torch.ones(groups, width))
                    )

    def fusion_weight(self, kind: str, j: int) -> torch.Tensor | None:
        w = getattr(self, f"{kind}_weight_{j}", None)
        if w is None or kind == "value":
            return w
        return expand_key_weight(w, self.config.rotary_interleaved)

    def _attends_directly(self, num_queries: int, attention_mask) -> bool:
        """Few queries and a fusion that would build new tensors (a weight or two sources)."""
        key_terms, value_terms = self.plan
        builds = any(w for _, w in key_terms + value_terms) or len(key_terms + value_terms) > 2
        return (
            builds
            and num_queries <= DIRECT_ATTENTION_MAX_QUERIES
            and self.config._attn_implementation in ("sdpa", "eager")
            and (attention_mask is None or attention_mask.dim() == 4)
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        sources: Sources,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        b, s, _ = hidden_states.shape
        cos, sin = position_embeddings
        interleaved = self.config.rotary_interleaved
        q = self.q_norm(self.q_proj(hidden_states).view(b, s, -1, self.head_dim)).transpose(1, 2)
        q = apply_rope(q, cos, sin, interleaved)
        if self.plan is None:
            k = self.k_norm(self.k_proj(hidden_states).view(b, s, -1, self.head_dim))
            k = apply_rope(k.transpose(1, 2), cos, sin, interleaved)
            v = self.v_proj(hidden_states).view(b, s, -1, self.head_dim).transpose(1, 2)
            if cache is not None:
                k, v = cache.update(k, v, self.layer_idx)
            for src in self.publishes:  # full length (cached + new) for the readers
                sources[src] = k if src[1] == "k" else v
        else:
            key_terms, value_terms = self.plan
            # .to(): with a device map, the sources may live on an earlier layer's device.
            keys = [sources[(layer, "k")].to(q.device) for layer, _ in key_terms]
            values = [sources[(layer, "v")].to(q.device) for layer, _ in value_terms]
            key_w = [self.fusion_weight("key", j) for j in range(len(key_terms))]
            value_w = [self.fusion_weight("value", j) for j in range(len(value_terms))]
            if self._attends_directly(s, attention_mask):
                out = None
                forward_only = not (torch.is_grad_enabled() and q.requires_grad)
                if attention_mask is None and forward_only and use_triton_decode(q):
                    out = triton_attend_to_sources(q, keys, key_w, values, value_w, self.scaling)
                if out is None:
                    out = attend_to_sources(q, keys, key_w, values, value_w, attention_mask,
                                            self.scaling)  # fmt: skip
                return self.o_proj(out.reshape(b, s, -1))
            k, v = fuse(keys, key_w), fuse(values, value_w)
        attend: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention
        )
        out, _ = attend(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
        return self.o_proj(out.reshape(b, s, -1))


class FusedKVDecoderLayer(nn.Module):
    def __init__(self, config: FusedKVConfig, layer_idx: int):
        super().__init__()
        self.self_attn = FusedKVAttention(config, layer_idx)
        self.mlp = FusedKVMLP(config)
        self.input_layernorm = FusedKVRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = FusedKVRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, hidden_states, position_embeddings, attention_mask, sources, cache=None, **kwargs
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings,
            attention_mask,
            sources,
            cache,
            **kwargs,
        )
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class FusedKVPreTrainedModel(PreTrainedModel):
    config_class = FusedKVConfig
    config: FusedKVConfig
    base_model_prefix = "model"
    _no_split_modules = ["FusedKVDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    # Sources travel in a dict mutated inside layers: recompute would not see them.
    supports_gradient_checkpointing = False

    def _init_weights(self, module):
        super()._init_weights(module)
        if not isinstance(module, FusedKVAttention) or module.plan is None:
            return
        # "normal": the paper's N(0, 1); "lite": 1 on the FusedKV-Lite source (K from the
        # middle, V from the bottom layer), 0 on the other (our sanity option); "uniform":
        # 1/(number of terms) on every term (the dense probe's start).
        for kind, terms in (("key", module.plan[0]), ("value", module.plan[1])):
            layers = [layer for layer, _ in terms]
            lite = max(layers) if kind == "key" else min(layers)
            for j, (layer, weighted) in enumerate(terms):
                if not weighted:
                    continue
                w = getattr(module, f"{kind}_weight_{j}")
                if self.config.fusion_init == "normal":
                    init.normal_(w, mean=0.0, std=1.0)
                elif self.config.fusion_init == "equivalent":
                    want = equivalent_fusion_weight(tuple(w.shape), module.layer_idx, kind, j,
                                                    module.plan)  # fmt: skip
                    init.copy_(w, want)
                elif self.config.fusion_init == "uniform":
                    init.constant_(w, 1.0 / len(terms))
                else:
                    init.constant_(w, 1.0 if layer == lite else 0.0)


def equivalent_fusion_weight(shape, layer_idx: int, kind: str, j: int, plan) -> torch.Tensor:
    """fusion_init="equivalent" (the paper appendix's start that reproduces iterative fusion):
    the same values as the trainer's rule at seed 0 (fusedkv_megatron.fusion, 1-based layers).
    Chain: c_first = a'_first; c_i = a'_{i,prev} c_{i-1} (+ a'_{i,anchor} on the anchor term;
    anchor: the middle layer for keys, the bottom layer for values)."""
    import hashlib

    def aux(layer: int, source: str) -> torch.Tensor:
        key = f"0:fusion-equivalent:{layer}:{kind[0]}:{source}".encode()
        seed = int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))

    terms = plan[0] if kind == "key" else plan[1]
    layers = [t[0] + 1 for t in terms]
    anchor = max(layers) if kind == "key" else min(layers)
    source = layers[j]
    first = max(t[0] + 1 for t in plan[0] + plan[1]) + 1
    coeff = aux(first, str(source))
    for i in range(first + 1, layer_idx + 2):
        coeff = aux(i, "prev") * coeff + (aux(i, str(anchor)) if source == anchor else 0.0)
    return coeff


class FusedKVModel(FusedKVPreTrainedModel):
    def __init__(self, config: FusedKVConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            FusedKVDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = FusedKVRMSNorm(config.hidden_size, config.rms_norm_eps)
        plans = config.layer_plans()
        # First layer after the last storage layer: from here on only kept tokens matter.
        self.top_start = max(i for i, p in enumerate(plans) if p is None) + 1
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        top_tokens: int | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """top_tokens: run the layers after the last storage layer on the last `top_tokens`
        positions only (None: all). Their outputs are only needed for the kept logits."""
        cache = kwargs.pop("past_key_values", cache)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(
                past, past + inputs_embeds.shape[1], device=inputs_embeds.device
            )[None]
        prepared = isinstance(attention_mask, dict)  # generate() with a static cache
        mask_kwargs = dict(
            config=self.config,
            inputs_embeds=inputs_embeds,
            # A prepared mask is None only without padding, so rebuilding it needs no 2D mask.
            attention_mask=None if prepared else attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        mask = attention_mask["full_attention"] if prepared else create_causal_mask(**mask_kwargs)
        cos, sin = rope_cos_sin(self.config, position_ids, inputs_embeds.dtype)

        seq = inputs_embeds.shape[1]
        keep = min(top_tokens or seq, seq)
        static = cache is not None and cache.is_compileable
        flash_static = static and "flash" in self.config._attn_implementation
        if output_hidden_states or flash_static:  # all positions needed / no safe row mask
            keep = seq
        # Built before the layers run: the mask functions read the cache's current length.
        top_mask = self._top_mask(mask, keep, mask_kwargs, cache) if keep < seq else mask
        hidden_states, sources, all_hidden = inputs_embeds, {}, []
        for i, layer in enumerate(self.layers):
            if i == self.top_start and keep < seq:
                hidden_states = hidden_states[:, -keep:]
                cos, sin, mask = cos[:, -keep:], sin[:, -keep:], top_mask
            if output_hidden_states:
                all_hidden.append(hidden_states)
            hidden_states = layer(hidden_states, (cos, sin), mask, sources, cache, **kwargs)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden.append(hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=cache if use_cache else None,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
        )

    def _top_mask(self, mask, keep: int, mask_kwargs: dict, cache: Cache | None):
        """The mask rows of the last `keep` queries (against every key)."""
        # A skipped mask (None) means "causal, aligned top-left" to SDPA. One query may then
        # attend to every key only if the keys are exactly the sequence so far; a static cache
        # returns its whole preallocated buffer, so spell the mask out there.
        exact_keys = cache is None or not cache.is_compileable
        if mask is None and "flash" not in self.config._attn_implementation:
            if keep > 1 or not exact_keys:
                mask = create_causal_mask(**mask_kwargs, allow_is_causal_skip=False)
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            return mask[:, :, -keep:, :]
        if mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            return mask  # flash attention: padding mask over keys, causal bottom-right
        raise NotImplementedError(
            f"attention mask of type {type(mask).__name__} cannot be restricted to the last "
            f"{keep} queries; use attn_implementation='sdpa' or 'eager'"
        )


class FusedKVForCausalLM(FusedKVPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: FusedKVConfig):
        super().__init__(config)
        self.model = FusedKVModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """logits_to_keep: an int k > 0 keeps the logits of the last k positions, and the top
        half then runs on those k positions only (generate() passes 1)."""
        top = logits_to_keep if isinstance(logits_to_keep, int) and logits_to_keep > 0 else None
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            top_tokens=top,
            **kwargs,
        )
        hidden = out.last_hidden_state
        if top is not None:
            hidden = hidden[:, -top:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs
            )
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states
        )


def cache_nbytes(cache: Cache) -> int:
    """Bytes of K/V tensors a transformers cache holds (layers without storage count 0)."""
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


__all__ = [
    "FusedKVForCausalLM",
    "FusedKVModel",
    "FusedKVPreTrainedModel",
    "cache_nbytes",
    "expand_key_weight",
    "fuse",
]
