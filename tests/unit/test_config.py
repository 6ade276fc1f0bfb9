"""Invalid KV-sharing configurations fail with errors that name the value and the fix."""

from __future__ import annotations

import pytest

from fusedkv_megatron import KVSharingConfig, KVSharingError, layer_plans, live_sources


@pytest.mark.parametrize(
    ("kv", "args", "words"),
    [
        (KVSharingConfig("fusedkv"), (15, 16, 16), ["num_layers=15", "even", "16"]),
        (KVSharingConfig("yoco"), (2, 16, 16), ["num_layers=2", "L >= 4"]),
        (
            KVSharingConfig("fusedkv"),
            (16, 16, 2, 4),
            ["num_query_groups=2", "tensor_model_parallel_size=4"],
        ),
        (KVSharingConfig("fusedkv_v2"), (16, 16, 16), ["'fusedkv_v2'", "fusedkv_lite"]),
        (KVSharingConfig("fusedkv", source_layers=(1, 9)), (16, 16, 16), ["(1, 9)", "L/2 = 8"]),
        (
            KVSharingConfig("fusedkv", source_layers=(3, 3)),
            (16, 16, 16),
            ["(3, 3)", "bottom < middle"],
        ),
        (KVSharingConfig("gqa"), (16, 16, 16), ["gqa", "num_query_groups=8"]),
        (KVSharingConfig("cla", source_layers=(1, 2)), (16, 16, 16), ["source_layers", "cla"]),
        (KVSharingConfig("fusedkv", fusion_init="zeros"), (16, 16, 16), ["fusion_init='zeros'"]),
        (KVSharingConfig("vanilla"), (16, 16, 6), ["num_query_groups=6", "divides"]),
    ],
)
def test_invalid_configs_have_clear_errors(kv, args, words):
    with pytest.raises(KVSharingError) as err:
        kv.validate(*args)
    for word in words:
        assert word in str(err.value), str(err.value)


def test_rotary_percent_rejected_for_learnable_keys():
    with pytest.raises(KVSharingError, match="rotary_percent=0.5"):
        KVSharingConfig("fusedkv").validate(8, 4, 4, rotary_percent=0.5)
    KVSharingConfig("yoco").validate(8, 4, 4, rotary_percent=0.5)  # plain reuse is fine


def test_plans_follow_the_spec_tables():
    L = 8
    fused = layer_plans(KVSharingConfig("fusedkv"), L)
    assert [p.is_reconstruction for p in fused] == [False] * 4 + [True] * 4
    assert fused[0].publishes == ((1, "k"), (1, "v")) and fused[3].publishes == ((4, "k"), (4, "v"))
    assert fused[1].publishes == () and fused[2].publishes == ()
    assert [t.source for t in fused[5].key] == [(1, "k"), (4, "k")]
    assert all(t.weighted for t in fused[5].key + fused[5].value)
    lite = layer_plans(KVSharingConfig("fusedkv_lite"), L)[6]
    assert [t.source for t in lite.key] == [(4, "k")] and [t.source for t in lite.value] == [
        (1, "v")
    ]
    assert not any(t.weighted for t in lite.key + lite.value)
    cla = layer_plans(KVSharingConfig("cla"), L)
    assert [p.is_reconstruction for p in cla] == [False, True] * 4
    assert [t.source for t in cla[3].key] == [(3, "k")]


def test_live_sources_are_what_a_boundary_must_carry():
    plans = layer_plans(KVSharingConfig("fusedkv"), 8)
    assert live_sources(plans, 0) == ()
    assert live_sources(plans, 1) == ((1, "k"), (1, "v"))
    assert live_sources(plans, 3) == ((1, "k"), (1, "v"))
    assert live_sources(plans, 4) == ((1, "k"), (1, "v"), (4, "k"), (4, "v"))
    assert live_sources(plans, 7) == ((1, "k"), (1, "v"), (4, "k"), (4, "v"))
    assert live_sources(plans, 8) == ()
    lite = layer_plans(KVSharingConfig("fusedkv_lite"), 8)
    assert live_sources(lite, 2) == ((1, "v"),)
    assert live_sources(lite, 5) == ((1, "v"), (4, "k"))
    cla = layer_plans(KVSharingConfig("cla"), 8)
    assert live_sources(cla, 3) == ((3, "k"), (3, "v")) and live_sources(cla, 4) == ()
