"""The Hugging Face FusedKV model (the exported remote code) on tiny configurations: a cache of
storage layers only (half of vanilla's bytes), generation with the cache equals recomputation,
top-half prefill on the last token equals full prefill, relative positions with tied fusion
weights, and the vanilla path equals stock Qwen3ForCausalLM."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, Qwen3Config, Qwen3ForCausalLM

from fusedkv_megatron.hf import modeling_fusedkv
from fusedkv_megatron.hf.configuration_fusedkv import KV_SHARING_VARIANTS, FusedKVConfig
from fusedkv_megatron.hf.modeling_fusedkv import FusedKVForCausalLM, cache_nbytes

HALF_CACHE = [v for v in KV_SHARING_VARIANTS if v != "vanilla"]
TOP_HALF = ("yoco", "fusedkv", "fusedkv_lite", "fusedkv_lite_learnable", "dense_probe")
L, HEADS, HEAD_DIM, VOCAB = 4, 4, 8, 64


def assert_fp32_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to fp32 rounding of a different summation order: max |diff| <= 1e-5 * max
    |want| (the tolerance of the other parity tests in this repository)."""
    gap, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert got.shape == want.shape and gap <= 1e-5 * scale, f"max |diff| {gap} vs scale {scale}"


def config(variant: str, **kw) -> FusedKVConfig:
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=L,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS // 2 if variant == "gqa" else HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=128,
        kv_sharing=variant,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
        initializer_range=0.3,  # peaked logits: greedy choices are far from ties
    )
    return FusedKVConfig(**(fields | kw))


def model(variant: str, seed: int = 0, **kw) -> FusedKVForCausalLM:
    torch.manual_seed(seed)
    m = FusedKVForCausalLM(config(variant, **kw)).eval()
    with torch.no_grad():  # norms away from 1 so that every weight matters
        for name, p in m.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.3)
    return m


def prompt(batch: int = 2, length: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def greedy_by_recompute(m, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Reference decoding: full forward over the whole sequence each step, no cache."""
    for _ in range(steps):
        nxt = m(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


@pytest.mark.parametrize("variant", HALF_CACHE)
def test_cache_bytes_are_half_of_vanilla(variant):
    ids = prompt()
    out = {}
    for v in ("vanilla", variant):
        g = model(v).generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
        out[v] = (cache_nbytes(g.cache), g.cache.get_seq_length())
    assert out[variant][1] == out["vanilla"][1] == ids.shape[1] + 5
    assert out[variant][0] * 2 == out["vanilla"][0]
    # vanilla: every layer's K and V, fp32
    assert out["vanilla"][0] == L * 2 * ids.shape[0] * HEADS * (ids.shape[1] + 5) * HEAD_DIM * 4


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("variant", KV_SHARING_VARIANTS)
def test_greedy_generation_with_cache_equals_recompute(variant, cache):
    """Also with a static cache, whose preallocated buffers the top half must mask."""
    m, ids = model(variant), prompt()
    got = m.generate(ids, max_new_tokens=8, do_sample=False, cache_implementation=cache)
    assert torch.equal(got, greedy_by_recompute(m, ids, 8))


def test_dense_probe_with_four_sources_decodes_like_recompute():
    """8 layers: every top layer fuses all four storage layers' caches (direct attention to
    the sources while decoding); greedy decoding with the cache equals full recompute."""
    m, ids = model("dense_probe", num_hidden_layers=8), prompt()
    assert [len(p[0]) for p in m.config.layer_plans()[4:]] == [4] * 4
    got = m.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, greedy_by_recompute(m, ids, 8))


@pytest.mark.parametrize("variant", ["fusedkv", "cla"])
def test_sampled_generation_with_cache_equals_without(variant):
    m, ids = model(variant), prompt()
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(123)
        runs.append(
            m.generate(
                ids,
                max_new_tokens=8,
                do_sample=True,
                top_k=0,
                top_p=1.0,
                temperature=1.0,
                use_cache=use_cache,
            )
        )
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], m.generate(ids, max_new_tokens=8, do_sample=False))


@pytest.mark.parametrize("variant", KV_SHARING_VARIANTS)
def test_last_token_prefill_equals_full_prefill(variant):
    """With a cache and logits_to_keep=1, the top half sees one token; logits are unchanged."""
    m, ids = model(variant), prompt()
    seen = []
    hook = m.model.layers[-1].register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    with torch.no_grad():
        full = m(ids, use_cache=False).logits[:, -1:]
        last = m(ids, cache=DynamicCache(config=m.config), use_cache=True, logits_to_keep=1)
    hook.remove()
    assert_fp32_close(last.logits, full)
    top_half = variant in TOP_HALF or variant == "cla"  # CLA: its last layer is a reader
    assert seen[1].shape[1] == (1 if top_half else ids.shape[1])
    assert seen[0].shape[1] == ids.shape[1]
    # the cache then continues the sequence as a full recompute would
    nxt = last.logits[:, -1].argmax(-1, keepdim=True)
    with torch.no_grad():
        step = m(nxt, cache=last.cache, use_cache=True).logits[:, -1]
        ref = m(torch.cat([ids, nxt], 1), use_cache=False).logits[:, -1]
    assert_fp32_close(step, ref)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_top_half_prefill_keeps_several_tokens(attn):
    """logits_to_keep=3: the top half runs on 3 queries against all keys (causal rows)."""
    m, ids = model("fusedkv"), prompt(length=10)
    m.config._attn_implementation = attn
    with torch.no_grad():
        full = m(ids, use_cache=False).logits[:, -3:]
        kept = m(ids, use_cache=True, logits_to_keep=3).logits
    assert_fp32_close(kept, full)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_left_padded_batch_generates_like_single_prompts(cache):
    m = model("fusedkv")
    a, b = prompt(1, 9, seed=2), prompt(1, 5, seed=3)
    pad = torch.zeros(1, 4, dtype=torch.long)
    ids = torch.cat([a, torch.cat([pad, b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    batch = m.generate(
        ids, attention_mask=mask, max_new_tokens=6, do_sample=False, cache_implementation=cache
    )
    assert torch.equal(batch[0, 9:], m.generate(a, max_new_tokens=6, do_sample=False)[0, 9:])
    assert torch.equal(batch[1, 9:], m.generate(b, max_new_tokens=6, do_sample=False)[0, 5:])


@pytest.mark.parametrize(
    "variant, kw",
    [
        ("fusedkv", {}),
        ("fusedkv", {"fusion_weights_per_head": False}),
        ("fusedkv", {"num_key_value_heads": 2}),
        ("fusedkv_lite_learnable", {}),
    ],
    ids=["per-head", "shared-weights", "gqa", "lite-learnable"],
)
def test_direct_source_attention_equals_fusing(monkeypatch, variant, kw):
    """Few queries attend to the sources without building fused K/V: same tokens and logits
    as fusing first, with a padded batch (4D mask) and without a mask (causal rows)."""
    m = model(variant, **kw)
    ids = torch.cat([prompt(1, 9, seed=2), torch.cat([torch.zeros(1, 3, dtype=torch.long),
                                                      prompt(1, 6, seed=3)], 1)])  # fmt: skip
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    calls = []
    direct = modeling_fusedkv.attend_to_sources
    monkeypatch.setattr(modeling_fusedkv, "attend_to_sources",
                        lambda *a: calls.append(a[0].shape[2]) or direct(*a))  # fmt: skip

    def run():
        g = m.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                       output_logits=True, return_dict_in_generate=True)  # fmt: skip
        with torch.no_grad():
            full = m(ids[:1], use_cache=False).logits  # 9 queries, no mask
        return g.sequences, torch.stack(g.logits), full

    a = run()
    assert 1 in calls and 9 in calls
    monkeypatch.setattr(modeling_fusedkv, "DIRECT_ATTENTION_MAX_QUERIES", 0)
    b = run()
    assert torch.equal(a[0], b[0])
    assert_fp32_close(a[1], b[1])
    assert_fp32_close(a[2], b[2])


@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate-half", "interleaved"])
def test_fused_scores_are_relative(monkeypatch, interleaved):
    """Tied key weights keep the model shift-invariant in position; pairing them the other
    way (negative control) breaks it."""
    m, ids = model("fusedkv", rotary_interleaved=interleaved), prompt(length=8)
    pos = torch.arange(8)[None].expand(2, 8)

    def shift_gap():
        with torch.no_grad():
            a = m(ids, position_ids=pos, use_cache=False).logits
            b = m(ids, position_ids=pos + 5, use_cache=False).logits
        return (a - b).abs().max().item(), a.abs().max().item()

    gap, scale = shift_gap()
    assert gap <= 1e-5 * scale
    original = modeling_fusedkv.expand_key_weight
    monkeypatch.setattr(
        modeling_fusedkv, "expand_key_weight", lambda w, inter: original(w, not inter)
    )
    gap, scale = shift_gap()
    assert gap > 1e-3 * scale


@pytest.mark.parametrize("variant", ["vanilla", "gqa"])
def test_vanilla_path_equals_stock_qwen3(variant):
    """Our model at vanilla/gqa and stock Qwen3ForCausalLM, same weights: same logits, same
    cache bytes (the baseline the half-cache ratios compare against)."""
    ours = model(variant)
    cfg = ours.config.to_dict()
    keep = {k: cfg[k] for k in Qwen3Config().to_dict() if k in cfg and k != "model_type"}
    stock = Qwen3ForCausalLM(Qwen3Config(**keep)).eval()
    stock.load_state_dict(ours.state_dict(), strict=True)
    ids = prompt()
    with torch.no_grad():
        assert_fp32_close(ours(ids, use_cache=False).logits, stock(ids, use_cache=False).logits)
    g1 = ours.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    g2 = stock.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(g1.sequences, g2.sequences)
    assert cache_nbytes(g1.cache) == cache_nbytes(g2.cache)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(kv_sharing="fused"), "not a known variant"),
        (dict(num_hidden_layers=5), "even layer count"),
        (dict(kv_source_layers=[2, 3]), "out of range"),
        (dict(fusion_init="zeros"), "fusion_init"),
    ],
)
def test_config_rejects_bad_values(kw, message):
    with pytest.raises(ValueError, match=message):
        config("fusedkv", **kw)
