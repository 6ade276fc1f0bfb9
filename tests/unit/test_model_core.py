"""The Megatron model computes docs/model.md's network: parity with the plain reference, parameter
and cache accounting, and unchanged results under activation recompute."""

from __future__ import annotations

import pytest
import torch

from fusedkv_megatron import (
    VARIANTS,
    KVSharingConfig,
    fusion_parameter_count,
    kv_cache_bytes_per_token,
)
from tests.reference_model import ReferenceModel
from tests.tiny import HEADS, HIDDEN, L, groups_for, tiny_batch, tiny_model

HEAD_DIM = HIDDEN // HEADS


def _megatron_loss_and_grads(model, batch):
    tokens, labels, pos = batch
    model.zero_grad(set_to_none=True)
    loss = model(tokens, pos, None, labels=labels)
    loss.sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return loss.detach(), grads


@pytest.mark.parametrize("variant", VARIANTS)
def test_megatron_matches_reference(megatron_tp1, variant):
    """Logits, per-token loss and every gradient equal the plain-PyTorch reference."""
    model = tiny_model(variant)
    batch = tiny_batch()
    tokens, labels, pos = batch
    with torch.no_grad():
        logits = model(tokens, pos, None)
    loss, grads = _megatron_loss_and_grads(model, batch)

    weights = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    ref = ReferenceModel(weights, variant, L, HEADS, groups_for(variant))
    torch.testing.assert_close(logits, ref.logits(tokens), rtol=1e-5, atol=1e-5)
    ref_loss = ref.loss(tokens, labels)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    ref_loss.sum().backward()
    assert grads.keys() == weights.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, weights[name].grad, rtol=1e-4, atol=1e-5, msg=name)
    # The claim that matters most: gradients reach the fusion weights and the source layers.
    watched = [k for k in grads if "linear_qkv.weight" in k or "_weight_" in k]
    for name in watched:
        assert grads[name].abs().sum() > 0, f"no gradient reached {name}"


TOP_HALF = ("yoco", "fusedkv", "fusedkv_lite", "fusedkv_lite_learnable", "dense_probe")


def test_dense_probe_matches_reference_with_four_sources(megatron_tp1):
    """At 8 layers every top layer fuses the K/V of all four storage layers (at the default
    4 layers the probe has two sources, like fusedkv); logits and gradients equal the reference."""
    layers = 8
    model = tiny_model("dense_probe", num_layers=layers)
    tokens, labels, pos = tiny_batch()
    loss, grads = _megatron_loss_and_grads(model, (tokens, labels, pos))
    weights = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    ref = ReferenceModel(weights, "dense_probe", layers, HEADS, groups_for("dense_probe"))
    ref_loss = ref.loss(tokens, labels)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    ref_loss.sum().backward()
    for name, g in grads.items():
        torch.testing.assert_close(g, weights[name].grad, rtol=1e-4, atol=1e-5, msg=name)
    top = "decoder.layers.5.self_attention."
    for kind in ("key", "value"):
        names = sorted(n for n in grads if n.startswith(top + kind + "_weight_"))
        assert len(names) == layers // 2
        assert all(grads[n].abs().sum() > 0 for n in names), names


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_accounting(megatron_tp1, variant):
    """Reconstruction layers own no K/V weights; fusedkv adds exactly the stated fusion params.

    Formula (fusion.fusion_parameter_count): fusedkv adds (L/2) * G * (2*d/2 + 2*d) = 1.5*L*G*d,
    lite_learnable (L/2) * G * (d/2 + d); G = KV heads (1 if shared across heads), d = head dim.
    """
    model = tiny_model(variant)
    params = dict(model.named_parameters())
    g = groups_for(variant)
    for i in range(L):
        attn = f"decoder.layers.{i}.self_attention."
        reconstructs = (variant in TOP_HALF and i >= L // 2) or (variant == "cla" and i % 2)
        if reconstructs:
            assert attn + "linear_qkv.weight" not in params
            assert attn + "k_layernorm.weight" not in params
            assert params[attn + "linear_q.weight"].shape == (HEADS * HEAD_DIM, HIDDEN)
        else:
            q_rows = HEADS * HEAD_DIM + 2 * g * HEAD_DIM
            assert params[attn + "linear_qkv.weight"].shape == (q_rows, HIDDEN)
    fusion = sum(p.numel() for n, p in params.items() if "_weight_" in n)
    expected = {
        "fusedkv": 3 * L * g * HEAD_DIM // 2,
        "fusedkv_lite_learnable": (L // 2) * g * (HEAD_DIM // 2 + HEAD_DIM),
        "dense_probe": (L // 2) * g * (L // 2) * (HEAD_DIM // 2 + HEAD_DIM),
    }
    assert fusion == expected.get(variant, 0)
    assert fusion == fusion_parameter_count(KVSharingConfig(variant), L, g, HEAD_DIM)


def test_shared_fusion_weights_count(megatron_tp1):
    model = tiny_model("fusedkv", kv_overrides={"weights_per_head": False})
    fusion = {n: p.shape for n, p in model.named_parameters() if "_weight_" in n}
    assert all(shape[0] == 1 for shape in fusion.values())
    assert sum(s.numel() for s in fusion.values()) == 3 * L * HEAD_DIM // 2


def test_build_model_checks_its_config_and_never_changes_it(megatron_tp1):
    from fusedkv_megatron import build_model
    from tests.tiny import tiny_config

    config = tiny_config("fusedkv", hetereogenous_dist_checkpoint=False)
    with pytest.raises(ValueError, match=r"hetereogenous_dist_checkpoint=True .* qwen3_config"):
        build_model(config, KVSharingConfig("fusedkv"), 64, 8)
    assert config.hetereogenous_dist_checkpoint is False
    fine = tiny_config("fusedkv")
    before = dict(vars(fine))
    build_model(fine, KVSharingConfig("fusedkv"), 64, 8)
    assert dict(vars(fine)) == before


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_is_half_of_vanilla(variant):
    vanilla = kv_cache_bytes_per_token(KVSharingConfig("vanilla"), 24, 8, 128)
    assert vanilla == 24 * 2 * 8 * 128 * 2
    groups = 4 if variant == "gqa" else 8
    got = kv_cache_bytes_per_token(KVSharingConfig(variant), 24, groups, 128)
    assert got * (1 if variant == "vanilla" else 2) == vanilla


RECOMPUTE = {
    "full-uniform": dict(
        recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
    ),
    "full-block": dict(
        recompute_granularity="full", recompute_method="block", recompute_num_layers=3
    ),
    "selective-core_attn": dict(recompute_granularity="selective", recompute_modules=["core_attn"]),
    "selective-layernorm": dict(
        recompute_granularity="selective", recompute_modules=["core_attn", "layernorm", "mlp"]
    ),
}


@pytest.mark.parametrize("variant", ["fusedkv", "cla", "fusedkv_lite_learnable"])
@pytest.mark.parametrize("mode", RECOMPUTE)
def test_recompute_keeps_loss_and_grads(megatron_tp1, variant, mode):
    batch = tiny_batch(1)
    base = tiny_model(variant)
    loss0, grads0 = _megatron_loss_and_grads(base, batch)
    model = tiny_model(variant, **RECOMPUTE[mode])
    model.load_state_dict(base.state_dict())
    model.train()
    loss, grads = _megatron_loss_and_grads(model, batch)
    torch.testing.assert_close(loss, loss0, rtol=0, atol=0)
    for name, g in grads0.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=name)
    assert all(grads[n].abs().sum() > 0 for n in grads if "_weight_" in n)


def test_sources_are_stacked_context_not_attributes(megatron_tp1):
    """Sources live in forward arguments: no layer keeps a tensor attribute after forward."""
    model = tiny_model("fusedkv")
    tokens, labels, pos = tiny_batch()
    model(tokens, pos, None, labels=labels).sum().backward()
    for module in model.modules():
        for name, value in vars(module).items():
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                assert value.grad_fn is None, f"{type(module).__name__}.{name} holds a graph"
