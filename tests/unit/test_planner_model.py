"""The planner's second model: fusions in the memory model (the fused SwiGLU's saved bytes
measured on CPU), Megatron-LM's theoretical memory formula for every preset with the difference
explained term by term, the communication terms that separate layouts in the search, and the
fusion flags of `fusedkv-plan`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from fusedkv_megatron import VARIANTS
from fusedkv_megatron.planner import Fusions, GiB, chunk_activations, chunks, memory_per_rank
from fusedkv_megatron.planner.cli import plan_from_argv
from fusedkv_megatron.planner.comm import step_bytes
from fusedkv_megatron.planner.megatron_formula import explain, megatron_formula
from fusedkv_megatron.planner.search import search, ties, why_first
from tests import planner_measure as pm

REPO = Path(__file__).resolve().parents[2]
PRESETS = {"332m": 1, "650m": 2, "1.5b": 8, "4b": 16}  # name -> nodes of 8 GPUs


def _preset(name: str, *flags: str):
    argv = ["--config", str(REPO / "examples/configs" / f"{name}.yaml"), "--nodes",
            str(PRESETS[name]), *flags]  # fmt: skip
    return plan_from_argv(argv)[0]


@pytest.mark.parametrize("variant", ["vanilla", "fusedkv", "cla"])
def test_fused_swiglu_saves_what_the_planner_says(variant, monkeypatch, megatron_tp1):
    """Megatron's fused SwiGLU keeps only its input: the bytes autograd saves with
    bias_activation_fusion on equal the planner's with Fusions(swiglu=True) (torch.compile is
    off: the same autograd function runs eagerly)."""
    import torch._dynamo

    original = pm.qwen3_config
    monkeypatch.setattr(
        pm, "qwen3_config", lambda *a, **k: original(*a, bias_activation_fusion=True, **k)
    )
    model, config = pm.build(variant)
    assert config.bias_activation_fusion
    layout = pm.planner_layout("none")
    job = replace(pm.planner_job(variant), fusions=Fusions(swiglu=True))
    want = chunk_activations(job, layout, chunks(pm.LAYERS, layout)[0], "composite").saved
    unfused = chunk_activations(pm.planner_job(variant), layout, chunks(pm.LAYERS, layout)[0],
                                "composite").saved  # fmt: skip
    with torch._dynamo.config.patch(disable=True):
        got = pm.saved_bytes(model, config)
    assert got == want < unfused


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("fused", [False, True])
def test_megatron_formula_difference_is_explained_term_by_term(name, fused):
    """For the vanilla model of every preset at its layout, the planner's peak minus Megatron-
    LM's formula equals the sum of the named differences (SwiGLU vs 4h GeLU, fp32 softmax vs
    2-byte logits, q/k-norm, RoPE, dropout masks, 5% allowance, transient, parameters)."""
    p = _preset(name, "--kv-sharing", "vanilla")
    job = replace(p.job, fusions=Fusions.on() if fused else Fusions())
    peak = max(r.peak for r in memory_per_rank(job, p.layout))
    formula = megatron_formula(job, p.layout)
    terms = explain(job, p.layout)
    assert sum(t.bytes for t in terms) == pytest.approx(peak - formula.total, abs=16)
    by_name = {t.name.split(":")[0]: t.bytes for t in terms}
    assert by_name["dropout masks (dropout is 0 here)"] < 0  # the formula counts them
    assert by_name["output layer and loss"] > 0  # fp32 softmax against 2-byte logits


def test_megatron_formula_at_the_1_5b_preset():
    """1.5B vanilla, TP1, mbs 1, seq 8192, bf16, distributed optimizer over 64: the formula
    gives 24.4 GiB; the planner 38.4 with every fusion off (the unfused SwiGLU alone 4.4 GiB),
    33.1 with them on."""
    p = _preset("1.5b", "--kv-sharing", "vanilla")
    off, on = replace(p.job, fusions=Fusions()), replace(p.job, fusions=Fusions.on())
    assert megatron_formula(off, p.layout).total / GiB == pytest.approx(24.43, abs=0.01)
    assert max(r.peak for r in memory_per_rank(off, p.layout)) / GiB == pytest.approx(
        38.39, abs=0.01
    )
    assert max(r.peak for r in memory_per_rank(on, p.layout)) / GiB == pytest.approx(
        33.12, abs=0.01
    )
    swiglu = [t for t in explain(off, p.layout) if t.name.startswith("MLP")][0].bytes
    fused = [t for t in explain(on, p.layout) if t.name.startswith("MLP")][0].bytes
    assert (swiglu - fused) / GiB == pytest.approx(24 * 8192 * 6016 * 2 * 2 / GiB)


def test_fusion_flags_reach_the_plan():
    """`--no-bias-swiglu-fusion` and `--no-rope-fusion` switch those fusions off in the plan
    (and cost memory); without flags a planner run assumes a GPU run with every fusion on."""
    on = _preset("1.5b")
    off = _preset("1.5b", "--no-bias-swiglu-fusion", "--no-rope-fusion")
    assert on.job.fusions == Fusions.on()
    assert not off.job.fusions.swiglu and not off.job.fusions.rope
    assert off.job.fusions.gradient_accumulation
    assert off.peak > on.peak


def test_4b_search_separates_layouts_by_communication():
    """The 4b preset on 16 x 8 x 80 GB: the first rows differ in throughput (no tie between
    layouts whose TP differs), TP=1 beats TP=2 because it moves no TP traffic, and the reason
    is printed."""
    given = _preset("4b", "--gpu-memory", "80")
    found = search(given.job, given.machine, given.layout.global_batch_size, given.layout)
    tie = ties(found)
    for i, p in enumerate(found[:10]):
        for j in range(i):
            if tie[i] == tie[j]:
                q = found[j]
                assert step_bytes(p.job, p.layout) == step_bytes(q.job, q.layout) or (
                    p.layout.tp == q.layout.tp and p.layout.pp == q.layout.pp
                )
    best = {}
    for p in found:
        best.setdefault(p.layout.tp, p)
    assert best[1].speed.tokens_per_s > best[2].speed.tokens_per_s > best[8].speed.tokens_per_s
    assert best[1].speed.terms["tp"] == 0 < best[2].speed.terms["tp"] < best[8].speed.terms["tp"]
    reason = why_first(found)
    assert reason.startswith("#1 ") and "TP comm" in reason


@pytest.mark.parametrize("variant", VARIANTS)
def test_sp_turns_tp_all_reduces_into_gathers_and_scatters(variant):
    """Per step, SP moves through reduce-scatters what TP alone moves through all-reduces, and
    gathers it 1.5 times (the weight-gradient re-gather); it all-reduces the norm gradients."""
    job = pm.planner_job(variant)
    plain = step_bytes(job, pm.planner_layout("none", tp=2))
    sp = step_bytes(job, pm.planner_layout("none", tp=2, sp=True))
    a, h, layers = pm.SEQ * pm.MBS * pm.HIDDEN * 2, pm.HIDDEN, pm.LAYERS
    assert ("tp", "all_gather") not in plain and ("tp", "reduce_scatter") not in plain
    assert sp[("tp", "reduce_scatter")] == a * (4 * layers + 2)
    assert sp[("tp", "all_gather")] == a * (6 * layers + 3)
    norms = 4 * (2 * h * layers + h)  # fp32 gradients of the norms SP replicates
    assert plain[("tp", "all_reduce")] - sp[("tp", "all_reduce")] == a * (4 * layers + 2) - norms


def test_network_flags_change_only_communication():
    slow = _preset("4b", "--network-gbps", "12.5")
    fast = _preset("4b")
    assert slow.speed.terms["compute"] == fast.speed.terms["compute"]
    assert slow.speed.terms["dp"] > fast.speed.terms["dp"] and slow.peak == fast.peak


def test_bad_network_and_efficiency_values_are_named():
    with pytest.raises(ValueError, match="network efficiency=1.5"):
        _preset("332m", "--network-efficiency", "1.5")
    with pytest.raises(ValueError, match="ceiling=0"):
        _preset("332m", "--gemm-efficiency", "0")
