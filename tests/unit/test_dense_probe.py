"""The dense probe as a variant row: every top layer reads every storage layer, all of them are
live sources until the last storage layer, its parameter count and uniform start, the kernel
policy's fallback for more than two sources, and its configuration errors. (Parity with the
reference model is in test_model_core.py, TP/PP in tests/distributed.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fusedkv_megatron import KVSharingConfig, fusion_parameter_count, layer_plans, live_sources
from fusedkv_megatron.config import KVSharingError
from fusedkv_megatron.fusion import init_fusion_weight

L = 12  # n = 6 storage layers


def test_every_top_layer_reads_every_storage_layer():
    plans = layer_plans(KVSharingConfig("dense_probe"), L)
    for p in plans[: L // 2]:
        assert not p.is_reconstruction
        assert p.publishes == ((p.layer_number, "k"), (p.layer_number, "v"))
    for p in plans[L // 2 :]:
        assert [t.source for t in p.key] == [(j, "k") for j in range(1, 7)]
        assert [t.source for t in p.value] == [(j, "v") for j in range(1, 7)]
        assert all(t.weighted for t in p.key + p.value)


def test_live_sources_grow_through_the_bottom_half():
    """A pipeline boundary after layer j <= n carries the K and V of layers 1..j."""
    plans = layer_plans(KVSharingConfig("dense_probe"), L)
    for j in range(1, L):
        want = [(i, kind) for i in range(1, min(j, L // 2) + 1) for kind in ("k", "v")]
        assert list(live_sources(plans, j)) == sorted(want)


@pytest.mark.parametrize("per_head", [True, False])
def test_parameter_count(per_head):
    g, d = 4, 16
    kv = KVSharingConfig("dense_probe", weights_per_head=per_head)
    n = L // 2
    assert fusion_parameter_count(kv, L, g, d) == n * n * (g if per_head else 1) * (d // 2 + d)


def test_uniform_init_is_the_mean_of_the_sources():
    kv = KVSharingConfig("dense_probe", fusion_init="uniform")
    plan = layer_plans(kv, L)[-1]
    for term in plan.key + plan.value:
        w = torch.empty(4, 8)
        init_fusion_weight(w, kv, term, plan)
        assert torch.equal(w, torch.full((4, 8), 1 / 6))


def test_kernel_policy_materialises_more_than_two_sources():
    from fusedkv_megatron.attention_policy import fused_kernel_blockers

    config = SimpleNamespace(
        attention_dropout=0.0, context_parallel_size=1, softmax_type="vanilla", window_size=None
    )
    probe = layer_plans(KVSharingConfig("dense_probe"), L)[-1]
    fused = layer_plans(KVSharingConfig("fusedkv"), L)[-1]
    assert fused_kernel_blockers(config, 64, fused) == []
    assert fused_kernel_blockers(config, 64, probe) == ["more than two sources for K or V"]


@pytest.mark.parametrize(
    "kv, message",
    [
        (KVSharingConfig("dense_probe", source_layers=(1, 3)), "has no meaning for dense_probe"),
        (KVSharingConfig("dense_probe", fusion_init="ones"), "'uniform'"),
    ],
)
def test_configuration_errors(kv, message):
    with pytest.raises(KVSharingError, match=message):
        kv.validate(L, 4, 4)
