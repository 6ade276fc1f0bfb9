"""Tiny model configurations and batches shared by the tests."""

from __future__ import annotations

import torch

L, HIDDEN, HEADS, FFN, VOCAB, SEQ, BATCH = 4, 64, 4, 128, 128, 16, 2


def groups_for(variant: str) -> int:
    return HEADS // 2 if variant == "gqa" else HEADS


def tiny_config(variant: str, num_layers: int = L, **overrides):
    from fusedkv_megatron import qwen3_config

    fields = dict(
        num_query_groups=groups_for(variant), ffn_hidden_size=FFN, use_cpu_initialization=True
    )
    fields.update(overrides)
    return qwen3_config(num_layers, HIDDEN, HEADS, **fields)


def tiny_model(variant: str, num_layers: int = L, kv_overrides=None, **overrides):
    from fusedkv_megatron import KVSharingConfig, build_model

    kv = KVSharingConfig(variant, **(kv_overrides or {}))
    return build_model(tiny_config(variant, num_layers, **overrides), kv, VOCAB, SEQ)


def tiny_batch(seed: int = 0, batch: int = BATCH, seq: int = SEQ):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq + 1), generator=g)
    tokens, labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    position_ids = torch.arange(seq).expand(batch, seq)
    return tokens, labels, position_ids


def full_state(model) -> dict[str, torch.Tensor]:
    """Detached copies of a TP=1 model's parameters, by name."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "_extra" not in k}
