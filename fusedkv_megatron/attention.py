"""Megatron-Core attention and layer modules for KV sharing.

- `StorageAttention`: Megatron's SelfAttention (own Q/K/V, q/k-norm, RoPE); after RoPE it
  hands the K and/or V that later layers read (its plan's `publishes`) to the layer.
- `ReconstructionAttention`: a Q-only projection and q-norm; K/V are built from sources by
  `fusion.fuse` with per-channel weights (keys tied per RoPE pair) and are never rotated again.
- `KVSharingTransformerLayer`: a TransformerLayer whose `context` argument carries the live
  sources as one stacked tensor `[n_live, s, b, kv_heads_local, head_dim]`. `context` is what
  Megatron's TransformerBlock threads from layer to layer and through full activation
  recompute as a checkpoint argument, so gradients reach the source layers under recompute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.attention import Attention, SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
)
from torch import Tensor

from .attention_policy import fused_attention_applies
from .config import KVSharingConfig
from .core_attention import SDPAAttention
from .fusion import (
    KVFusion,
    LayerPlan,
    Source,
    expand_key_weight,
    fusion_weight_name,
    init_fusion_weight,
)
from .kernels import reconstruction_attention
from .pipeline import SourcePayload

_UNSUPPORTED = ("inference_context", "inference_params", "rotary_pos_cos", "rotary_pos_sin")


def _reject_unsupported(kwargs: dict) -> None:
    for name in _UNSUPPORTED:
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"{name} is not supported by KV-sharing attention in Megatron; run inference "
                "through the Hugging Face export (fusedkv-convert-hf), which has the compact cache"
            )
    psp = kwargs.get("packed_seq_params")
    if psp is not None and psp.qkv_format == "thd":
        raise NotImplementedError(
            "packed sequences (qkv_format='thd') are not supported with KV sharing yet; "
            "train with padded/concatenated sequences (the default GPTDataset)"
        )


class _AttendMixin:
    """Shared tail: RoPE on the query, core attention (optionally recomputed), output proj."""

    def _rotate(self, x: Tensor, emb: Tensor | None) -> Tensor:
        if emb is None:
            return x
        return apply_rotary_pos_emb(
            x,
            emb,
            config=self.config,
            mscale=self._yarn_concentration_factor,
            cp_group=self.pg_collection.cp,
        )

    def _attend(self, query, key, value, attention_mask, attention_bias, packed_seq_params):
        recompute = self.checkpoint_core_attention and self.training
        core = self._checkpointed_attention_forward if recompute else self.core_attention
        out = core(
            query,
            key,
            value,
            attention_mask,
            attn_mask_type=self.attn_mask_type,
            attention_bias=attention_bias,
            packed_seq_params=packed_seq_params,
        )
        return self.linear_proj(out)


def _split_rope(rotary_pos_emb):
    if isinstance(rotary_pos_emb, tuple):
        return rotary_pos_emb
    return rotary_pos_emb, rotary_pos_emb


class StorageAttention(_AttendMixin, SelfAttention):
    """Self-attention with its own K/V that publishes the sources its plan names."""

    def __init__(self, config, submodules, layer_number, plan: LayerPlan, **kwargs):
        super().__init__(config, submodules, layer_number, **kwargs)
        if config.attention_output_gate:
            raise NotImplementedError("attention_output_gate is not supported with KV sharing")
        self.plan = plan

    def forward(
        self,
        hidden_states,
        attention_mask,
        sources=None,
        rotary_pos_emb=None,
        attention_bias=None,
        packed_seq_params=None,
        **kwargs,
    ) -> tuple[tuple[Tensor, Tensor | None], dict[Source, Tensor]]:
        _reject_unsupported({**kwargs, "packed_seq_params": packed_seq_params})
        query, key, value = self.get_query_key_value_tensors(hidden_states)
        q_emb, k_emb = _split_rope(rotary_pos_emb)
        query, key = self._rotate(query, q_emb), self._rotate(key, k_emb)
        own = {(self.layer_number, "k"): key, (self.layer_number, "v"): value}
        published = {s: own[s] for s in self.plan.publishes}
        out = self._attend(query, key, value, attention_mask, attention_bias, packed_seq_params)
        return out, published


@dataclass
class ReconstructionAttentionSubmodules:
    linear_q: type
    core_attention: type
    linear_proj: type
    q_layernorm: type | None = None


class ReconstructionAttention(_AttendMixin, Attention):
    """A top layer: Q-only projection; K and V are fused from earlier layers' sources.

    `attention_backend` (auto|triton|torch, default: env FUSEDKV_ATTENTION_BACKEND, else auto)
    picks the Triton kernel that fuses K/V on chip (auto: on CUDA) or the materializing path
    (fused K/V + the spec's core attention); see fusedkv_megatron/kernels.
    """

    def __init__(
        self,
        config,
        submodules: ReconstructionAttentionSubmodules,
        layer_number: int,
        plan: LayerPlan,
        kv_sharing: KVSharingConfig,
        attn_mask_type: AttnMaskType = AttnMaskType.causal,
        pg_collection=None,
        attention_backend: str | None = None,
        **kwargs,
    ):
        super().__init__(
            config=config,
            submodules=submodules,
            layer_number=layer_number,
            attn_mask_type=attn_mask_type,
            attention_type="self",
            pg_collection=pg_collection,
            **kwargs,
        )
        self.plan = plan
        self.attention_backend = attention_backend
        self.linear_q = build_module(
            submodules.linear_q,
            config.hidden_size,
            self.query_projection_size,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=config.add_bias_linear or config.add_qkv_bias,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="qkv",
            tp_group=self.pg_collection.tp,
        )
        self.q_layernorm = None
        if config.qk_layernorm and submodules.q_layernorm is not None:
            self.q_layernorm = submodules.q_layernorm(
                hidden_size=self.hidden_size_per_attention_head,
                config=config,
                eps=config.layernorm_epsilon,
            )
        # Fusion weights: key vectors are stored per RoPE pair (head_dim/2) and expanded.
        groups = self.num_query_groups_per_partition if kv_sharing.weights_per_head else 1
        hn = self.hidden_size_per_attention_head
        for kind, i, term in plan.fusion_terms():
            width = hn // 2 if kind == "key" else hn
            w = torch.nn.Parameter(torch.empty(groups, width, dtype=config.params_dtype))
            self._init_fusion(w, kv_sharing, term)
            if kv_sharing.weights_per_head:
                tensor_parallel.set_tensor_model_parallel_attributes(w, True, 0, 1)
            self.register_parameter(fusion_weight_name(kind, i), w)
        self.weights_per_head = kv_sharing.weights_per_head

    def _init_fusion(self, w, kv, term):
        # Drawn full-size from the CPU generator, which every TP rank of a stage seeds alike,
        # then sliced to this rank's heads: per-head weights differ between heads and a shared
        # vector is the same on every TP rank, on CPU and GPU (a forked TP generator would give
        # a shared vector different values per rank). build_model(init_seed=...) redraws all
        # parameters independently of the layout (initialization.py).
        full = torch.empty(self.config.num_query_groups if kv.weights_per_head else 1, w.shape[1])
        init_fusion_weight(full, kv, term, self.plan)
        n = w.shape[0]
        rank = self.pg_collection.tp.rank() if kv.weights_per_head and self.world_size > 1 else 0
        with torch.no_grad():
            w.copy_(full[rank * n : (rank + 1) * n])

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Per-head fusion weights are split over TP ranks by KV head (dim 0): checkpoint them as
        TP-sharded so that they save completely and reshard to any TP size. (Megatron's default
        treats a module's own parameters as replicated: only TP rank 0's heads would be saved.)"""
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.weights_per_head:
            own = dict(self.named_parameters(recurse=False))
            metadata = ensure_metadata_has_dp_cp_group(metadata)
            state.update(
                make_sharded_tensors_for_checkpoint(
                    own,
                    prefix,
                    dict.fromkeys(own, 0),
                    sharded_offsets,
                    tp_group=self.tp_group,
                    dp_cp_group=metadata["dp_cp_group"],
                )
            )
        return state

    def fusion_weight(self, kind: str, i: int) -> Tensor | None:
        """The full-width weight of term i of "key"/"value", or None for an unweighted term."""
        w = getattr(self, fusion_weight_name(kind, i), None)
        if w is None:
            return None
        if not self.weights_per_head and self.world_size > 1:
            # A weight shared by all heads is replicated over TP: sum its grads across ranks.
            w = tensor_parallel.copy_to_tensor_model_parallel_region(w, group=self.tp_group)
        return expand_key_weight(w, self.config.rotary_interleaved) if kind == "key" else w

    def kv_fusion(self, sources: dict[Source, Tensor]) -> KVFusion:
        """This layer's K/V as a fusion of `sources` (the kernels' argument)."""
        return KVFusion(
            [sources[t.source] for t in self.plan.key],
            [self.fusion_weight("key", i) for i in range(len(self.plan.key))],
            [sources[t.source] for t in self.plan.value],
            [self.fusion_weight("value", i) for i in range(len(self.plan.value))],
        )

    def reconstruct(self, sources: dict[Source, Tensor]) -> tuple[Tensor, Tensor]:
        kv = self.kv_fusion(sources)
        return kv.key, kv.value

    def get_query(self, hidden_states: Tensor) -> Tensor:
        """The query from the Q-only projection, q-normed, not yet rotated."""
        query, _ = self.linear_q(hidden_states)
        query = query.view(*query.shape[:2], -1, self.hidden_size_per_attention_head)
        if self.q_layernorm is not None:
            query = self.q_layernorm(query)
        return query

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, **kwargs):
        """Query as `get_query`; key and value fused from `key_value_states`, the dict of
        sources."""
        query = self.get_query(hidden_states)
        key, value = self.reconstruct(key_value_states)
        return query, key, value

    def _fused_attention(self, query: Tensor, sources: dict[Source, Tensor]):
        """The Triton path: K/V are fused tile by tile inside attention and never stored; the
        kernel's backward recomputes the scores, so selective recompute has nothing to save."""
        out = reconstruction_attention(
            query,
            self.kv_fusion(sources),
            softmax_scale=self.config.softmax_scale,
            backend="triton",
        )
        return self.linear_proj(out.flatten(2))

    def forward(
        self,
        hidden_states,
        attention_mask,
        sources=None,
        rotary_pos_emb=None,
        attention_bias=None,
        packed_seq_params=None,
        **kwargs,
    ) -> tuple[tuple[Tensor, Tensor | None], dict[Source, Tensor]]:
        _reject_unsupported({**kwargs, "packed_seq_params": packed_seq_params})
        missing = [s for s in self.plan.reads if s not in (sources or {})]
        if missing:
            raise RuntimeError(
                f"layer {self.layer_number} needs sources {missing} that did not reach it; "
                "build the model with fusedkv_megatron.build_model / the FusedKV block spec"
            )
        q_emb, _ = _split_rope(rotary_pos_emb)
        query = self.get_query(hidden_states)
        read = [sources[s] for s in self.plan.reads]
        # The query's dtype decides (fp32 residuals or autocast leave hidden_states in fp32).
        if fused_attention_applies(self, query, self.attention_backend, read, attention_mask):
            return self._fused_attention(self._rotate(query, q_emb), sources), {}
        key, value = self.reconstruct(sources)
        if not isinstance(self.core_attention, SDPAAttention):
            key, value = owned(key), owned(value)
        query = self._rotate(query, q_emb)  # the fused key is already rotated: never again
        out = self._attend(query, key, value, attention_mask, attention_bias, packed_seq_params)
        return out, {}


def owned(x: Tensor) -> Tensor:
    """`x` if it is a contiguous tensor that owns its whole storage, else a contiguous copy.

    An unweighted single-source K or V (Lite, YOCO, CLA) is a view into the stacked sources of
    `context`; Transformer Engine infers the qkv layout from storage offsets and strides and
    rejects such views ("The provided qkv memory layout is not supported!"). `.contiguous()`
    is a no-op on them, so copy."""
    storage = x.untyped_storage()
    whole = storage.data_ptr() == x.data_ptr() and storage.nbytes() == x.numel() * x.element_size()
    return x if whole and x.is_contiguous() else x.clone(memory_format=torch.contiguous_format)


class KVSharingTransformerLayer(TransformerLayer):
    """A TransformerLayer that reads and extends the stacked live sources in `context`."""

    def __init__(
        self,
        config,
        submodules,
        layer_number: int = 1,
        *,
        in_sources=(),
        out_sources=(),
        unpack_input: bool = False,
        pack_output: bool = False,
        **kwargs,
    ):
        super().__init__(config, submodules, layer_number=layer_number, **kwargs)
        self.in_sources: tuple[Source, ...] = tuple(in_sources)
        self.out_sources: tuple[Source, ...] = tuple(out_sources)
        if config.fine_grained_activation_offloading or config.cpu_offloading:
            raise NotImplementedError("activation offloading is not supported with KV sharing")
        # First/last layer of a pipeline stage: the sources cross the boundary folded onto the
        # hidden state (pipeline.py); inside a stage they travel in `context`.
        payload = SourcePayload.for_config
        self.pipeline_input = payload(config, self.in_sources) if unpack_input else None
        self.pipeline_output = payload(config, self.out_sources) if pack_output else None

    def forward(self, hidden_states=None, **kwargs):
        if self.pipeline_input is not None:
            hidden_states, kwargs["context"] = self.pipeline_input.unpack(hidden_states)
        hidden_states, context = super().forward(hidden_states=hidden_states, **kwargs)
        if self.pipeline_output is not None:
            hidden_states, context = self.pipeline_output.pack(hidden_states, context), None
        return hidden_states, context

    def _forward_attention(
        self,
        hidden_states,
        attention_mask=None,
        context=None,
        context_mask=None,
        rotary_pos_emb=None,
        attention_bias=None,
        packed_seq_params=None,
        **kwargs,
    ):
        available: dict[Source, Tensor] = {}
        if self.in_sources:
            if context is None or context.shape[0] != len(self.in_sources):
                got = None if context is None else tuple(context.shape)
                raise RuntimeError(
                    f"layer {self.layer_number} expected sources {self.in_sources} in context, "
                    f"got {got}"
                )
            available = dict(zip(self.in_sources, context.unbind(0), strict=True))

        if self.recompute_input_layernorm:
            self.input_layernorm_checkpoint = tensor_parallel.CheckpointWithoutOutput()
            normed = self.input_layernorm_checkpoint.checkpoint(self.input_layernorm, hidden_states)
        else:
            normed = self.input_layernorm(hidden_states)
        residual = hidden_states.float() if self.config.fp32_residual_connection else hidden_states

        out_with_bias, published = self.self_attention(
            normed,
            attention_mask,
            sources=available,
            rotary_pos_emb=rotary_pos_emb,
            attention_bias=attention_bias,
            packed_seq_params=packed_seq_params,
            **kwargs,
        )
        if self.recompute_input_layernorm:
            self.input_layernorm_checkpoint.discard_output_and_register_recompute(out_with_bias[0])
        with self.bias_dropout_add_exec_handler():
            hidden_states = self.self_attn_bda(self.training, self.config.bias_dropout_fusion)(
                out_with_bias, residual, self.hidden_dropout
            )

        if self.out_sources != self.in_sources:
            available.update(published)
            context = (
                torch.stack([available[s] for s in self.out_sources]) if self.out_sources else None
            )
        return hidden_states, context


__all__ = [
    "KVSharingTransformerLayer",
    "ReconstructionAttention",
    "ReconstructionAttentionSubmodules",
    "SelfAttentionSubmodules",
    "StorageAttention",
]
