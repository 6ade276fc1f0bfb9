"""Megatron's fusions: fused == unfused where the fused op runs on the CPU, and which fusion
the trainer turns on where (fastpath.resolve_fusions).

The jit-fused SwiGLU (`bias_activation_fusion`, an autograd Function with its own backward,
compiled by torch.compile) and the fused residual add (`bias_dropout_fusion`) run on the CPU
too, so every variant's loss and every gradient are compared with the unfused model's at
fp32's default tolerance. The CUDA-only fusions (TE's RoPE, apex's weight-gradient
accumulation) are exercised by tools/gpu_check.sh.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fusedkv_megatron import VARIANTS, KVSharingConfig, build_model
from fusedkv_megatron.fastpath import FUSIONS, describe_fusions, fusion_fields, resolve_fusions
from fusedkv_megatron.training.arguments import parse_args
from fusedkv_megatron.training.flags_fastpath import disabled_fusions
from tests.tiny import SEQ, VOCAB, tiny_batch, tiny_config

# A model shape (required) and mock data: the tiny config, no tokenizer.
TINY = Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny.yaml"
BASE = [
    "--config",
    str(TINY),
    "--tokenizer-type",
    "NullTokenizer",
    "--vocab-size",
    "512",
    "--mock-data",
]

CPU_FUSIONS = dict(bias_activation_fusion=True, bias_dropout_fusion=True)


def _loss_and_grads(variant: str, fused: bool):
    overrides = CPU_FUSIONS if fused else {k: False for k in CPU_FUSIONS}
    config = tiny_config(variant, **overrides)
    assert all(getattr(config, k) == fused for k in CPU_FUSIONS)
    model = build_model(config, KVSharingConfig(variant), VOCAB, SEQ, init_seed=11)
    tokens, labels, pos = tiny_batch(seed=3)
    loss = model(tokens, pos, None, labels=labels).float().mean()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    assert all(g is not None for g in grads.values())
    return loss.detach(), grads


@pytest.mark.slow
def test_fused_swiglu_and_residual_match_unfused_for_every_variant(megatron_tp1, monkeypatch):
    from megatron.core.fusions import fused_bias_swiglu

    calls = []
    real = fused_bias_swiglu.SwiGLUFunction.apply

    def counting(*args):
        calls.append(1)
        return real(*args)

    # the fused op (no bias: SwiGLUFunction, compiled forward and backward) really runs
    monkeypatch.setattr(fused_bias_swiglu.SwiGLUFunction, "apply", counting)
    for variant in VARIANTS:
        loss_u, grads_u = _loss_and_grads(variant, fused=False)
        assert not calls
        loss_f, grads_f = _loss_and_grads(variant, fused=True)
        assert len(calls) == 4, variant  # one SwiGLU per layer, all fused
        calls.clear()
        torch.testing.assert_close(loss_f, loss_u, msg=f"{variant}: loss")
        assert grads_f.keys() == grads_u.keys()
        for name in grads_u:
            torch.testing.assert_close(
                grads_f[name], grads_u[name], msg=lambda m, n=name, v=variant: f"{v} {n}: {m}"
            )


def _probe_none(_interleaved):
    return None


def test_fusions_on_where_they_can_run_and_off_by_flag():
    """CPU: all off (no CUDA). CUDA: the jit fusions on, TE's RoPE with TE, apex's wgrad
    accumulation with apex; the two fields this model never uses always off; each opt-out
    flag turns its own fusion off and only it."""
    cpu = fusion_fields(resolve_fusions(False))
    assert not any(cpu.values())
    full = fusion_fields(resolve_fusions(True, te_rope_error=_probe_none, apex_wgrad=lambda: True))
    assert full == {
        "bias_activation_fusion": True,
        "bias_dropout_fusion": True,
        "apply_rope_fusion": True,
        "gradient_accumulation_fusion": True,
        "masked_softmax_fusion": False,
        "persist_layer_norm": False,
    }
    bare = resolve_fusions(True, te_rope_error=lambda _: "no TE", apex_wgrad=lambda: False)
    assert fusion_fields(bare)["apply_rope_fusion"] is False
    assert fusion_fields(bare)["gradient_accumulation_fusion"] is False
    line = describe_fusions(bare)
    assert line.startswith("> fusions on: swiglu (jit-fused), bias-dropout-add (jit-fused); off:")
    assert "rope (no TE)" in line and "fused_weight_gradient_mlp_cuda is not installed" in line
    for f in FUSIONS:
        args = parse_args([*BASE, f.flag])
        disabled = disabled_fusions(args)
        assert disabled == {f.field}
        fields = fusion_fields(
            resolve_fusions(True, disabled, te_rope_error=_probe_none, apex_wgrad=lambda: True)
        )
        assert fields[f.field] is False
        assert {k for k, v in full.items() if v} - {f.field} == {k for k, v in fields.items() if v}


def test_trainer_config_carries_the_fusion_state(monkeypatch):
    """transformer_config sets the resolved fields (here CUDA and both probes faked on)."""
    from fusedkv_megatron import fastpath
    from fusedkv_megatron.training import initialize
    from fusedkv_megatron.training.arguments import validate_args

    args = validate_args(parse_args([*BASE, "--no-rope-fusion"]), world_size=1, cuda=False)
    monkeypatch.setattr(initialize.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fastpath, "apex_wgrad_available", lambda: False)
    states = initialize.fusion_states(args)
    assert fusion_fields(states) == {
        "bias_activation_fusion": True,
        "bias_dropout_fusion": True,
        "apply_rope_fusion": False,
        "gradient_accumulation_fusion": False,
        "masked_softmax_fusion": False,
        "persist_layer_norm": False,
    }
    assert "rope (--no-rope-fusion)" in describe_fusions(states)
