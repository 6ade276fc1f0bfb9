"""A Megatron core attention on torch's scaled_dot_product_attention, for the local backend.

Megatron's local `DotProductAttention` materializes the `[b, heads, s, s]` score matrix and
its softmax (2 GiB each per sequence and layer in bf16 at s = 8192 with 16 heads), so a GPU
without Transformer Engine could not train at the paper's context. `SDPAAttention` has the same
constructor and forward signature and lets torch pick its flash / memory-efficient kernels
on CUDA (math on CPU); GQA goes through SDPA's `enable_gqa`, without repeating K/V.

Masks (True = masked out, Megatron's convention): with `causal` the causal mask is implied,
and a passed `attention_mask` (packed documents: Megatron's GPT data with
reset_attention_mask gives a block-diagonal causal one) is applied on top of it, as Megatron's
local DotProductAttention applies it; `no_mask` uses none; `padding`/`arbitrary` use the mask.

Context parallelism: K/V are all-gathered over the CP group and each local query is masked by
its global position (context_parallel.py); the GPU alternative is Transformer Engine's CP.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide
from torch import Tensor

from .context_parallel import gather_sequence, keep_mask

_CAUSAL = (AttnMaskType.causal, AttnMaskType.padding_causal)


class SDPAAttention(MegatronModule):
    """Drop-in for Megatron's DotProductAttention: sbhd in, `[sq, b, heads * d]` out."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ):
        super().__init__(config=config)
        if config.softmax_type != "vanilla" or config.window_size is not None:
            raise NotImplementedError(
                f"softmax_type={config.softmax_type!r}, window_size={config.window_size}: the "
                "local SDPA core attention supports vanilla full softmax only"
            )
        if pg_collection is None:
            required = ["tp", "cp"] if config.context_parallel_size > 1 else ["tp"]
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=required)
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        cp_group = getattr(pg_collection, "cp", None)
        self.cp_group = cp_group if cp_group is not None and cp_group.size() > 1 else None
        if self.cp_group is not None and attn_mask_type not in _CAUSAL:
            raise NotImplementedError(
                f"attn_mask_type={attn_mask_type.name} with context_parallel_size="
                f"{cp_group.size()}: the local SDPA core attention splits the sequence for "
                "causal attention only; use CP=1 or Transformer Engine"
            )
        tp = pg_collection.tp.size()
        self.num_heads = divide(config.num_attention_heads, tp)
        self.num_query_groups = divide(config.num_query_groups, tp)
        head_dim = config.kv_channels
        # Megatron's apply_query_key_layer_scaling divides the scores by layer_number and
        # multiplies them back inside the fp32 softmax: the net scale is this one.
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        )
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else (attention_dropout)
        )

    def _mask(self, attention_mask: Tensor | None, mask_type: AttnMaskType):
        """(attn_mask, is_causal) for SDPA; its boolean masks mean True = attend."""
        if mask_type == AttnMaskType.causal and attention_mask is None:
            return None, True
        if mask_type == AttnMaskType.no_mask or attention_mask is None:
            return None, False
        keep = ~attention_mask.bool()
        if mask_type in _CAUSAL:
            sq, sk = keep.shape[-2:]
            keep = keep & torch.ones(sq, sk, dtype=torch.bool, device=keep.device).tril()
        return keep, False

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params=None,
    ) -> Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError(
                "packed sequences and attention bias are not supported by the local SDPA core "
                "attention; use Transformer Engine"
            )
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if self.cp_group is not None:
            # This rank's queries against the whole sequence's keys (context_parallel.py).
            key, value = gather_sequence(key, self.cp_group), gather_sequence(value, self.cp_group)
            attn_mask = keep_mask(query.shape[0], self.cp_group, attention_mask, query.device)
            is_causal = False
        else:
            attn_mask, is_causal = self._mask(attention_mask, mask_type)
        sq, b, hq, d = query.shape
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, h, s, d]
        dropout = self.dropout_p if self.training else 0.0

        def attend():
            return F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_mask,
                dropout_p=dropout,
                is_causal=is_causal,
                scale=self.softmax_scale,
                enable_gqa=k.shape[1] != hq,
            )

        if dropout > 0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = attend()
        else:
            out = attend()
        return out.permute(2, 0, 1, 3).reshape(sq, b, hq * d)


__all__ = ["SDPAAttention"]
