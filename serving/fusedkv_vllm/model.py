"""The vLLM model of a FusedKV export (FusedKVForCausalLM, model_type fusedkv_qwen3).

A Qwen3 decoder whose attention layers follow the export's serving layout (layout.py):
- OWN layers are Qwen3 attention (q/k-norm, RoPE, own cache).
- SHARE layers (CLA, YOCO) have a query projection only and read another layer's cache through
  vLLM's `kv_sharing_target_layer_name` (no cache allocated for them).
- The FusedKV family shares one cache of head size 2d owned by the bottom source b: b writes
  [K_b | 0] rows and attends with [q | 0]; the middle source m rewrites the same rows with
  [K_b | K_m] through the owner's cache update op and attends with [0 | q]; top layers attend
  with [q*a | q*c] and combine the output halves with the value weights. Every write goes
  through vLLM's `unified_kv_cache_update` (the backend's own cache layout).

With FUSEDKV_VLLM_TOP_PREFILL=1 (CPU backend) the layers after the last cache writer run on the
logit rows only (top_prefill.py). The model runs eagerly (no torch.compile decorator): the 2d
cache's second write happens outside the attention layer's own op.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import (
    get_pp_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
)
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.attention.attention import unified_kv_cache_update
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import SupportsPP
from vllm.model_executor.models.qwen2 import Qwen2MLP
from vllm.model_executor.models.utils import (
    PPMissingLayer,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.sequence import IntermediateTensors

from . import top_prefill
from .layout import (
    FUSED,
    OWN,
    PAIR_BOTTOM,
    PAIR_MIDDLE,
    SHARE,
    LayerRole,
    kv_head_rows,
    layout_from_config,
)

# Per forward: the bottom source's new K/V rows, which the middle source writes next to its own.
Stash = dict[str, torch.Tensor]


class FusionWeight(nn.Module):
    """One exported fusion weight (`key_weight_j` [rows, d/2] or `value_weight_j` [rows, d]),
    sharded by KV head; `per_query_head` expands it to [local query heads, d]."""

    def __init__(self, rows: int, width: int, total_kv_heads: int, key: bool, interleaved: bool):
        super().__init__()
        self.start, self.end = kv_head_rows(total_kv_heads, rows,
                                            get_tensor_model_parallel_world_size(),
                                            get_tensor_model_parallel_rank())  # fmt: skip
        self.key, self.interleaved = key, interleaved
        self.weight = nn.Parameter(torch.ones(self.end - self.start, width), requires_grad=False)
        self.weight.weight_loader = self._load

    def _load(self, param: torch.Tensor, loaded: torch.Tensor) -> None:
        default_weight_loader(param, loaded[self.start : self.end])

    def per_query_head(self, heads: int) -> torch.Tensor:
        w = self.weight
        if self.key:  # tied per RoPE pair: [.., d/2] -> [.., d]
            w = w.repeat_interleave(2, dim=-1) if self.interleaved else torch.cat([w, w], dim=-1)
        return (
            w.repeat_interleave(heads // w.shape[0], dim=0)
            if w.shape[0] > 1
            else w.expand(heads, -1)
        )


class FusedKVAttention(nn.Module):
    def __init__(
        self, config, role: LayerRole, layer: int, prefix: str, cache_config, quant_config
    ):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        self.role, self.layer = role, layer
        self.total_heads, self.total_kv_heads = (
            config.num_attention_heads,
            config.num_key_value_heads,
        )
        self.heads = self.total_heads // tp
        self.kv_heads = max(1, self.total_kv_heads // tp)
        d = self.head_dim = config.head_dim
        self.q_size, self.kv_size = self.heads * d, self.kv_heads * d
        h = config.hidden_size
        self.layer_prefix = prefix.rsplit(".self_attn", 1)[0].rsplit(".", 1)[0]  # model.layers
        if role.has_kv_projections:
            self.qkv_proj = QKVParallelLinear(h, d, self.total_heads, self.total_kv_heads,
                                              bias=False, quant_config=quant_config,
                                              prefix=f"{prefix}.qkv_proj")  # fmt: skip
            self.k_norm = RMSNorm(d, eps=config.rms_norm_eps)
        else:
            self.q_proj = ColumnParallelLinear(h, self.total_heads * d, bias=False,
                                               quant_config=quant_config,
                                               prefix=f"{prefix}.q_proj")  # fmt: skip
        self.o_proj = RowParallelLinear(self.total_heads * d, h, bias=False,
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")  # fmt: skip
        self.q_norm = RMSNorm(d, eps=config.rms_norm_eps)
        self.interleaved = bool(getattr(config, "rotary_interleaved", False))
        self.rotary_emb = get_rope(d, max_position=config.max_position_embeddings,
                                   is_neox_style=not self.interleaved,
                                   rope_parameters=config.rope_parameters)  # fmt: skip
        target = (
            None if role.target is None else f"{self.layer_prefix}.{role.target}.self_attn.attn"
        )
        self.owner_name = target if role.role == PAIR_MIDDLE else f"{prefix}.attn"
        self.attn = Attention(self.heads, 2 * d if role.wide_cache else d, d**-0.5,
                              num_kv_heads=self.kv_heads, cache_config=cache_config,
                              quant_config=quant_config, prefix=f"{prefix}.attn",
                              kv_sharing_target_layer_name=target)  # fmt: skip
        self.fusion = nn.ModuleDict()
        if role.role == FUSED:
            rows = config.num_key_value_heads if config.fusion_weights_per_head else 1
            for kind, terms in (("key", role.key_terms), ("value", role.value_terms)):
                for j in terms:
                    if isinstance(j, int):
                        width = d // 2 if kind == "key" else d
                        self.fusion[f"{kind}_weight_{j}"] = FusionWeight(
                            rows, width, config.num_key_value_heads, kind == "key", self.interleaved
                        )

    def _half_weight(self, kind: str, term) -> torch.Tensor | float | None:
        if term is None:
            return None
        if term == "one":
            return 1.0
        return self.fusion[f"{kind}_weight_{term}"].per_query_head(self.heads)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, stash: Stash) -> torch.Tensor:
        d, role = self.head_dim, self.role.role
        if self.role.has_kv_projections:
            q, k, v = self.qkv_proj(hidden)[0].split([self.q_size, self.kv_size, self.kv_size], -1)
            k = self.k_norm(k.view(-1, self.kv_heads, d)).view(k.shape)
        else:
            q, k, v = self.q_proj(hidden)[0], None, None
        q = self.q_norm(q.view(-1, self.heads, d)).view(q.shape)
        q, k = self.rotary_emb(positions, q, k)  # k None: the query alone
        if role in (OWN, SHARE):
            out = self.attn(q, k, v)
        elif role == PAIR_BOTTOM:
            stash["k"], stash["v"] = k, v
            out = self._wide(q, self._pad(k, 0), self._pad(v, 0), (1.0, None), (1.0, None))
        elif role == PAIR_MIDDLE:
            k2 = torch.cat(
                [stash["k"].view(-1, self.kv_heads, d), k.view(-1, self.kv_heads, d)], -1
            )
            v2 = torch.cat(
                [stash["v"].view(-1, self.kv_heads, d), v.view(-1, self.kv_heads, d)], -1
            )
            unified_kv_cache_update(k2, v2, self.owner_name)  # rows now hold both halves
            out = self._wide(q, None, None, (None, 1.0), (None, 1.0))
        else:
            keys = tuple(self._half_weight("key", t) for t in self.role.key_terms)
            values = tuple(self._half_weight("value", t) for t in self.role.value_terms)
            out = self._wide(q, None, None, keys, values)
        return self.o_proj(out)[0]

    def _pad(self, x: torch.Tensor, half: int) -> torch.Tensor:
        """[T, kv_heads*d] -> [T, kv_heads, 2d] with x in `half` (0 first, 1 second), zeros else."""
        x = x.view(-1, self.kv_heads, self.head_dim)
        zeros = torch.zeros_like(x)
        return torch.cat([x, zeros] if half == 0 else [zeros, x], dim=-1)

    def _wide(self, q, k2, v2, key_weights, value_weights) -> torch.Tensor:
        """Attention over the 2d cache: query halves scaled by key_weights (None: zero), output
        halves combined with value_weights (None: left out)."""
        qh = q.view(-1, self.heads, self.head_dim)
        halves = [torch.zeros_like(qh) if w is None else qh * w for w in key_weights]
        out = self.attn(torch.cat(halves, dim=-1), k2, v2).view(-1, self.heads, 2 * self.head_dim)
        first, second = out[..., : self.head_dim], out[..., self.head_dim :]
        result = None
        for part, w in zip((first, second), value_weights):
            if w is None:
                continue
            term = part * w
            result = term if result is None else result + term
        return result.reshape(-1, self.heads * self.head_dim)


class FusedKVDecoderLayer(nn.Module):
    def __init__(
        self, config, role: LayerRole, layer: int, prefix: str, cache_config, quant_config
    ):
        super().__init__()
        self.self_attn = FusedKVAttention(config, role, layer, f"{prefix}.self_attn",
                                          cache_config, quant_config)  # fmt: skip
        self.mlp = Qwen2MLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                            quant_config=quant_config, prefix=f"{prefix}.mlp")  # fmt: skip
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions, hidden, residual, stash: Stash):
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, stash)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class FusedKVModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config, self.layout = config, layout_from_config(config)
        cache_config, quant_config = vllm_config.cache_config, vllm_config.quant_config
        pp = get_pp_group()
        if pp.is_first_rank or (config.tie_word_embeddings and pp.is_last_rank):
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                       quant_config=quant_config,
                                                       prefix=f"{prefix}.embed_tokens")  # fmt: skip
        else:
            self.embed_tokens = PPMissingLayer()

        def layer_fn(prefix: str) -> nn.Module:
            i = int(prefix.rsplit(".", 1)[1])
            return FusedKVDecoderLayer(config, self.layout.roles[i], i, prefix,
                                       cache_config, quant_config)  # fmt: skip

        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers, layer_fn, prefix=f"{prefix}.layers"
        )
        self.norm = (
            RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            if pp.is_last_rank
            else PPMissingLayer()
        )
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], config.hidden_size
        )
        # Layers from here on neither own nor write a cache: only the logit rows need them.
        writers = [i for i, r in enumerate(self.layout.roles) if r.role not in (SHARE, FUSED)]
        self.top_start = max(writers) + 1
        self.top_names = [
            f"{prefix}.layers.{i}.self_attn.attn"
            for i in range(max(self.top_start, self.start_layer), self.end_layer)
        ]
        self.top_prefill = top_prefill.wanted(vllm_config) and bool(self.top_names)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        if get_pp_group().is_first_rank:
            hidden = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
            residual = None
        else:
            hidden, residual = (
                intermediate_tensors["hidden_states"],
                intermediate_tensors["residual"],
            )
        stash: Stash = {}
        top, full = None, None
        for i in range(self.start_layer, self.end_layer):
            if i == max(self.top_start, self.start_layer) and self.top_prefill:
                top = top_prefill.TopRows.enter(self.top_names, hidden.dtype)
                if top is not None:  # the top half on the logit rows only
                    full = (hidden, residual)
                    hidden, residual = hidden[top.rows], residual[top.rows]
                    positions = positions[..., top.rows]
            try:
                hidden, residual = self.layers[i](positions, hidden, residual, stash)
            except BaseException:
                if top is not None:
                    top.exit()
                raise
        if top is not None:
            top.exit()
            full[0][top.rows], full[1][top.rows] = hidden, residual
            hidden, residual = full
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": hidden, "residual": residual})
        hidden, _ = self.norm(hidden, residual)
        return hidden


class FusedKVForCausalLM(nn.Module, SupportsPP):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = FusedKVModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                          quant_config=vllm_config.quant_config,
                                          prefix=maybe_prefix(prefix, "lm_head"))  # fmt: skip
            if config.tie_word_embeddings:
                self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        else:
            self.lm_head = PPMissingLayer()
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """HF names -> this model's parameters: q/k/v into qkv_proj (storage layers), q_proj
        alone (readers), gate/up into gate_up_proj, fusion weights sharded by KV head."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        stacked = {".q_proj": ("qkv_proj", "q"), ".k_proj": ("qkv_proj", "k"),
                   ".v_proj": ("qkv_proj", "v"), ".gate_proj": ("gate_up_proj", 0),
                   ".up_proj": ("gate_up_proj", 1)}  # fmt: skip
        for name, tensor in weights:
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            target, shard = name, None
            for part, (fused, shard_id) in stacked.items():
                if part in name:
                    candidate = name.replace(part[1:], fused)
                    if candidate in params:
                        target, shard = candidate, shard_id
                    break
            if ".key_weight_" in name or ".value_weight_" in name:
                stem, kind = name.rsplit(".", 1)
                target = f"{stem}.fusion.{kind}.weight"
            if target not in params:
                if self._is_other_stage(name):
                    continue
                raise ValueError(
                    f"fusedkv_vllm: the export's tensor {name} has no place in the model"
                )
            param = params[target]
            loader = getattr(param, "weight_loader", default_weight_loader)
            loader(param, tensor) if shard is None else loader(param, tensor, shard)
            loaded.add(target)
        return loaded

    def _is_other_stage(self, name: str) -> bool:
        if ".layers." in name:
            i = int(name.split(".layers.")[1].split(".")[0])
            return not self.model.start_layer <= i < self.model.end_layer
        return isinstance(self.lm_head, PPMissingLayer) or isinstance(
            self.model.embed_tokens, PPMissingLayer
        )
