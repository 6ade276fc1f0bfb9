"""The exported HF files carry their own copy of the FusedKV math (they must not import this
package); it computes exactly what fusedkv_megatron.fusion computes."""

from __future__ import annotations

import pytest
import torch

from fusedkv_megatron import VARIANTS, KVSharingConfig, kv_cache_bytes_per_token, layer_plans
from fusedkv_megatron import fusion as mg
from fusedkv_megatron.hf import modeling_fusedkv as hf
from fusedkv_megatron.hf.configuration_fusedkv import (
    KV_SHARING_VARIANTS,
    FusedKVConfig,
    kv_sharing_plan,
)

TOP_HALF = ("yoco", "fusedkv", "fusedkv_lite", "fusedkv_lite_learnable")
LAYOUTS = [(4, None), (6, None), (8, None), (8, (1, 2)), (8, (2, 3)), (8, (2, 4))]
CASES = [(v, lay) for v in VARIANTS for lay in LAYOUTS if lay[1] is None or v in TOP_HALF]


def _hf_config(variant, num_layers=4, source_layers=None, **kw):
    return FusedKVConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        kv_sharing=variant,
        kv_source_layers=list(source_layers) if source_layers else None,
        **kw,
    )


def test_variant_lists_agree():
    assert KV_SHARING_VARIANTS == VARIANTS


@pytest.mark.parametrize("variant, layout", CASES, ids=str)
def test_layer_plans_equal(variant, layout):
    num_layers, sources = layout
    kv = KVSharingConfig(variant, source_layers=sources)
    theirs = [
        None
        if not p.is_reconstruction
        else (
            tuple((t.source[0] - 1, t.weighted) for t in p.key),
            tuple((t.source[0] - 1, t.weighted) for t in p.value),
        )
        for p in layer_plans(kv, num_layers)
    ]
    assert kv_sharing_plan(variant, num_layers, sources) == theirs
    assert all(t.source[1] == "k" for p in layer_plans(kv, num_layers) for t in p.key)


@pytest.mark.parametrize("variant", VARIANTS)
def test_cache_layers_are_the_storage_layers(variant):
    """Layers marked "reuse" get no cache; the rest hold exactly the bytes fusion.py counts."""
    cfg = _hf_config(variant)
    storage = sum(mode != "reuse" for mode in cfg.kv_sharing_modes)
    per_token = storage * 2 * cfg.num_key_value_heads * cfg.head_dim * 2
    assert per_token == kv_cache_bytes_per_token(KVSharingConfig(variant), 4, 2, 8, 2)


@pytest.mark.parametrize("interleaved", [False, True])
def test_expand_key_weight_equal(interleaved):
    w = torch.randn(3, 5, 4)
    torch.testing.assert_close(
        hf.expand_key_weight(w, interleaved),
        mg.expand_key_weight(w, interleaved),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("groups", [3, 1], ids=["per-head", "shared"])
def test_fuse_equal(groups):
    """HF layout [b, heads, s, d] vs Megatron's [s, b, heads, d]: the same numbers."""
    sources = [torch.randn(2, 3, 5, 8) for _ in range(2)]  # [b, heads, s, d]
    weights = [torch.randn(groups, 8), None]
    got = hf.fuse(sources, weights)
    want = mg.fuse([s.permute(2, 0, 1, 3) for s in sources], weights).permute(1, 2, 0, 3)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("init", ["lite", "uniform"])
@pytest.mark.parametrize(
    "variant, num_layers",
    [("fusedkv", 4), ("fusedkv_lite_learnable", 4), ("dense_probe", 8)],
)
def test_deterministic_inits_equal(variant, num_layers, init):
    """fusion_init='lite' and 'uniform' set the same vectors as fusion.init_fusion_weight."""
    torch.manual_seed(0)
    model = hf.FusedKVForCausalLM(_hf_config(variant, num_layers, fusion_init=init))
    kv = KVSharingConfig(variant, fusion_init=init)
    for plan in layer_plans(kv, num_layers):
        attn = model.model.layers[plan.layer_number - 1].self_attn
        for kind, terms in (("key", plan.key), ("value", plan.value)):
            for j, term in enumerate(terms):
                want = torch.empty_like(getattr(attn, f"{kind}_weight_{j}"))
                mg.init_fusion_weight(want, kv, term, plan)
                torch.testing.assert_close(getattr(attn, f"{kind}_weight_{j}"), want)
