"""fusion_init='equivalent' (the paper appendix): standard fusion that starts as its iterative
scheme. Claims: the unrolled weights compute what the iterative chain computes; a fresh model
(Megatron, layout-invariant redraw, Hugging Face) starts from exactly those weights; the config
rejects a middle source other than L/2."""

from __future__ import annotations

import pytest
import torch

from fusedkv_megatron import KVSharingConfig, KVSharingError
from fusedkv_megatron.fusion import (
    equivalent_auxiliary,
    equivalent_fusion_weight,
    expand_key_weight,
    fuse,
    layer_plans,
)

CASES = [("fusedkv", 8), ("fusedkv_lite_learnable", 8), ("fusedkv", 4)]


def _iterative(sources: dict, kind: str, plans, shape, seed: int) -> dict[int, torch.Tensor]:
    """The appendix's iterative scheme: X_first from its sources, then every layer from the
    layer below plus the anchor (K: middle, V: bottom), all with auxiliary weights."""
    key = kind == "k"
    out, prev = {}, None
    for plan in plans:
        if not plan.is_reconstruction:
            continue
        terms = plan.key if key else plan.value
        layers = [t.source[0] for t in terms]
        anchor = max(layers) if key else min(layers)
        i = plan.layer_number

        def w(source, i=i):
            aux = equivalent_auxiliary(shape, seed, i, kind, source)
            return expand_key_weight(aux, False) if key else aux

        if prev is None:
            prev = sum(w(str(j)) * sources[j] for j in layers)
        else:
            prev = w("prev") * prev + w(str(anchor)) * sources[anchor]
        out[i] = prev
    return out


@pytest.mark.parametrize("variant, num_layers", CASES)
@pytest.mark.parametrize("groups", [4, 1])
def test_unrolled_weights_compute_the_iterative_chain(variant, num_layers, groups):
    kv = KVSharingConfig(variant, fusion_init="equivalent")
    plans = layer_plans(kv, num_layers)
    d, seed = 8, 5
    g = torch.Generator().manual_seed(0)
    src = {j: torch.randn(3, 2, groups, d, generator=g) for j in range(1, num_layers // 2 + 1)}
    for kind, width in (("k", d // 2), ("v", d)):
        chain = _iterative(src, kind, plans, (groups, width), seed)
        assert len(chain) == num_layers // 2
        for plan in plans[num_layers // 2 :]:
            terms = plan.key if kind == "k" else plan.value
            weights = [equivalent_fusion_weight((groups, width), t, plan, seed) for t in terms]
            if kind == "k":
                weights = [expand_key_weight(w, False) for w in weights]
            got = fuse([src[t.source[0]] for t in terms], weights)
            torch.testing.assert_close(got, chain[plan.layer_number])


def test_weights_differ_by_seed_layer_and_source():
    kv = KVSharingConfig("fusedkv", fusion_init="equivalent")
    plans = layer_plans(kv, 8)
    seen = []
    for plan in plans[4:]:
        for term in plan.key + plan.value:
            w = equivalent_fusion_weight((2, 4), term, plan, seed=3)
            assert torch.isfinite(w).all() and not any(torch.equal(w, s) for s in seen)
            seen.append(w)
    term, plan = plans[5].key[0], plans[5]
    assert not torch.equal(
        equivalent_fusion_weight((2, 4), term, plan, 3),
        equivalent_fusion_weight((2, 4), term, plan, 4),
    )


def test_first_top_layer_is_its_own_auxiliaries():
    kv = KVSharingConfig("fusedkv", fusion_init="equivalent")
    plan = layer_plans(kv, 8)[4]  # layer 5 = L/2 + 1
    for term in plan.key:
        want = equivalent_auxiliary((2, 4), 9, 5, "k", str(term.source[0]))
        assert torch.equal(equivalent_fusion_weight((2, 4), term, plan, 9), want)


def test_config_accepts_equivalent_and_needs_the_middle_at_half():
    KVSharingConfig("fusedkv", fusion_init="equivalent").validate(8, 4, 4)
    KVSharingConfig("fusedkv", (2, 4), fusion_init="equivalent").validate(8, 4, 4)
    with pytest.raises(KVSharingError, match=r"fusion_init='equivalent' needs the middle"):
        KVSharingConfig("fusedkv", (1, 3), fusion_init="equivalent").validate(8, 4, 4)
    with pytest.raises(KVSharingError, match="'equivalent'"):
        KVSharingConfig("fusedkv", fusion_init="equivalnt").validate(8, 4, 4)


def _fusion_params(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.named_parameters() if "_weight_" in k.rsplit(".", 1)[-1]}


@pytest.mark.parametrize("init_seed", [None, 11])
def test_fresh_megatron_model_starts_from_the_rule(megatron_tp1, init_seed):
    """build_model draws every fusion vector as equivalent_fusion_weight: at seed 0 without
    the layout-invariant redraw, at the run's seed with it (the trainer's --seed)."""
    from fusedkv_megatron import build_model
    from tests.tiny import SEQ, VOCAB, tiny_config

    kv = KVSharingConfig("fusedkv", fusion_init="equivalent")
    model = build_model(tiny_config("fusedkv", 8), kv, VOCAB, SEQ, init_seed=init_seed)
    params = _fusion_params(model)
    assert len(params) == 4 * 4
    for plan in layer_plans(kv, 8)[4:]:
        for kind, terms in (("key", plan.key), ("value", plan.value)):
            for j, term in enumerate(terms):
                p = params[
                    f"decoder.layers.{plan.layer_number - 1}.self_attention.{kind}_weight_{j}"
                ]
                seed = init_seed or 0
                assert torch.equal(p, equivalent_fusion_weight(tuple(p.shape), term, plan, seed))


@pytest.mark.parametrize("variant", ["fusedkv", "fusedkv_lite_learnable"])
def test_fresh_hf_model_starts_from_the_same_weights(variant):
    from fusedkv_megatron.hf import modeling_fusedkv as hf
    from fusedkv_megatron.hf.configuration_fusedkv import FusedKVConfig

    cfg = FusedKVConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, kv_sharing=variant,
        fusion_init="equivalent",
    )  # fmt: skip
    model = hf.FusedKVForCausalLM(cfg)
    kv = KVSharingConfig(variant, fusion_init="equivalent")
    for plan in layer_plans(kv, 8)[4:]:
        attn = model.model.layers[plan.layer_number - 1].self_attn
        for kind, terms in (("key", plan.key), ("value", plan.value)):
            for j, term in enumerate(terms):
                got = getattr(attn, f"{kind}_weight_{j}")
                assert torch.equal(got, equivalent_fusion_weight(tuple(got.shape), term, plan))
