"""The memory planner against the model it predicts: the pipeline split and payload equal the
library's (`pipeline_chunks`, `boundary_bytes`), parameter counts equal a built model's, the
bytes autograd saves for backward equal the activation formula exactly (TP=1, every variant,
every recompute mode; TP=2 with and without SP in tests/distributed/test_planner.py), the
schedule holds the microbatches Megatron's schedules hold, and the planner and `fusedkv-plan`
run without torch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fusedkv_megatron import VARIANTS, KVSharingConfig, qwen3_config
from fusedkv_megatron.pipeline import boundary_bytes, pipeline_chunks
from fusedkv_megatron.planner import (
    Job,
    Layout,
    Machine,
    PlanError,
    chunk_activations,
    chunk_parameters,
    chunks,
    plan,
    search,
)
from fusedkv_megatron.planner.cli import main as plan_main
from fusedkv_megatron.planner.memory import schedule_order
from fusedkv_megatron.training.model_size import ModelShape
from tests import planner_measure as pm

REPO = Path(__file__).resolve().parents[2]
BF16 = torch.bfloat16

# (PP, VPP, first-stage layers, last-stage layers) over 24 layers
SPLITS = [(2, None, None, None), (4, None, None, None), (3, None, None, None),
          (2, 2, None, None), (4, 3, None, None), (4, None, 9, None), (4, None, None, 3),
          (3, None, 10, 6)]  # fmt: skip


def _job(variant: str, layers: int = 24, tp_groups: int = 8) -> Job:
    shape = ModelShape(layers, 512, 1536, 8, tp_groups, 64, 32000, True)
    return Job(shape, KVSharingConfig(variant), 1024)


@pytest.mark.parametrize("pp, vpp, first, last", SPLITS)
def test_chunks_equal_the_library_split(pp, vpp, first, last):
    config = qwen3_config(24, 64, 4, pipeline_model_parallel_size=pp, pipeline_dtype=BF16,
                          virtual_pipeline_model_parallel_size=vpp,
                          num_layers_in_first_pipeline_stage=first,
                          num_layers_in_last_pipeline_stage=last)  # fmt: skip
    layout = Layout(pp=pp, vpp=vpp, first_stage_layers=first, last_stage_layers=last)
    ours = [(c.pp_rank, c.vp_stage, c.start, c.stop) for c in chunks(24, layout)]
    theirs = [(c.pp_rank, c.vp_stage, c.start, c.stop) for c in pipeline_chunks(config)]
    assert ours == theirs


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tp, sp", [(1, False), (2, False), (2, True)])
@pytest.mark.parametrize("pp, vpp, first, last", SPLITS)
def test_pipeline_payload_equals_boundary_bytes(variant, tp, sp, pp, vpp, first, last):
    """Every received tensor the planner holds is the boundary `pipeline.boundary_bytes`
    reports (bf16, micro-batch 2)."""
    job = _job(variant, tp_groups=4 if variant == "gqa" else 8)
    layout = Layout(tp=tp, pp=pp, vpp=vpp, sequence_parallel=sp, micro_batch_size=2,
                    first_stage_layers=first, last_stage_layers=last)  # fmt: skip
    config = qwen3_config(24, 512, 8, job.shape.num_query_groups, kv_channels=64,
                          pipeline_dtype=BF16,
                          tensor_model_parallel_size=tp, sequence_parallel=sp,
                          pipeline_model_parallel_size=pp,
                          virtual_pipeline_model_parallel_size=vpp,
                          num_layers_in_first_pipeline_stage=first,
                          num_layers_in_last_pipeline_stage=last)  # fmt: skip
    expected = [b.total_bytes for b in boundary_bytes(config, job.kv, 2, 1024, BF16)]
    received = [chunk_activations(job, layout, c).payload_in for c in chunks(24, layout)[1:]]
    assert received == expected
    assert chunk_activations(job, layout, chunks(24, layout)[0]).payload_in == 0


WEIGHTS = [(v, True) for v in VARIANTS] + [("fusedkv", False), ("fusedkv_lite_learnable", False)]


@pytest.mark.parametrize("variant, per_head", WEIGHTS)
@pytest.mark.parametrize("tied", [True, False])
def test_parameters_equal_the_built_model(variant, per_head, tied, megatron_tp1):
    model, _ = pm.build(variant, tied=tied, per_head=per_head)
    job = pm.planner_job(variant, tied, per_head)
    layout = Layout()
    assert pm.parameters(model) == chunk_parameters(job, layout, chunks(pm.LAYERS, layout)[0])


@pytest.mark.parametrize("variant", VARIANTS)
def test_saved_activations_equal_the_formula(variant, megatron_tp1):
    """Tolerance 0: the bytes of distinct storages autograd keeps after one forward equal the
    planner's count (composite norms, as torch runs RMSNorm on CPU) in every recompute mode."""
    got, want = {}, {}
    for recompute in pm.RECOMPUTE:
        model, config = pm.build(variant, recompute=recompute)
        got[recompute] = pm.saved_bytes(model, config)
        layout = pm.planner_layout(recompute)
        chunk = chunks(pm.LAYERS, layout)[0]
        want[recompute] = chunk_activations(
            pm.planner_job(variant), layout, chunk, "composite"
        ).saved
    assert got == want
    assert got["full-uniform-1"] < got["selective"] < got["none"]


def test_schedules_hold_what_megatron_holds():
    """1F1B: rank r holds min(PP - r, m) microbatches; interleaved: rank r runs
    2 (PP - r - 1) + (VPP - 1) PP warm-up chunk-forwards before its first backward."""
    for m in (1, 3, 8):
        for r in range(4):
            order, first_backward = schedule_order(Layout(pp=4, num_microbatches=m), r)
            assert min(first_backward, len(order)) == min(4 - r, m)
    order, first_backward = schedule_order(Layout(pp=4, vpp=3, num_microbatches=8), 0)
    assert first_backward == 2 * 3 + 2 * 4 + 1
    assert order[:12] == [0] * 4 + [1] * 4 + [2] * 4 and len(order) == 24


def test_peak_grows_with_what_it_should():
    job = _job("fusedkv")
    machine = Machine(8, 1, 80)
    base = Layout(dp=8, num_microbatches=4)
    p = plan(job, base, machine)
    assert plan(job, replace(base, micro_batch_size=2, num_microbatches=2), machine).peak > p.peak
    assert plan(job, replace(base, recompute="full"), machine).peak < p.peak
    no_dist = plan(job, replace(base, distributed_optimizer=False), machine)
    assert no_dist.ranks[0].optimizer == 8 * p.ranks[0].optimizer  # Adam state over DP=8
    pipe = plan(job, replace(base, pp=2, dp=4, num_microbatches=8), machine)
    assert pipe.ranks[0].in_flight == 2 and pipe.ranks[1].in_flight == 1
    # Only the second stage receives: hidden + the four fusedkv sources, per microbatch held.
    received = chunk_activations(job, pipe.layout, chunks(24, pipe.layout)[1]).payload_in
    assert (pipe.ranks[0].payload, pipe.ranks[1].payload) == (0, received)


def test_search_ranks_layouts_that_fit_best_first():
    job = _job("fusedkv")
    found = search(job, Machine(8, 1, 16), global_batch_size=64)
    assert found and all(p.fits for p in found)
    speeds = [p.speed.tokens_per_s for p in found]
    assert speeds == sorted(speeds, reverse=True)
    assert all(p.layout.gpus == 8 and p.layout.global_batch_size == 64 for p in found)


def test_layouts_the_trainer_refuses_are_refused():
    job = _job("fusedkv")
    with pytest.raises(PlanError, match="does not split over PP=5"):
        plan(job, Layout(pp=5, dp=1), Machine(5, 1, 80))
    with pytest.raises(PlanError, match="num_attention_heads=8 is not divisible by TP=16"):
        plan(job, Layout(tp=16, dp=1), Machine(16, 1, 80))
    with pytest.raises(ValueError, match="num_query_groups=4 is not divisible by tensor_model"):
        plan(_job("gqa", tp_groups=4), Layout(tp=8, dp=1), Machine(8, 1, 80))


def test_cli_plans_and_searches_the_4b_config(capsys):
    argv = ["--config", str(REPO / "examples/configs/4b.yaml"), "--gpus-per-node", "8",
            "--nodes", "16", "--gpu-memory", "80", "--search"]  # fmt: skip
    assert plan_main(argv) == 0
    out = capsys.readouterr().out
    assert "layout: TP=2+SP PP=1 VPP=1 DP=64 mbs=1 m=16 recompute=none" in out
    assert "peak per GPU:" in out and "-> fits" in out
    assert " #  TP  SP  PP  VPP" in out and "\n 1  " in out
    assert plan_main([*argv[:-1], "--gpu-memory", "8"]) == 1  # 4B weights alone need more
    assert plan_main([*argv[:-1], "--tensor-model-parallel-size", "3"]) == 2
    assert "error:" in capsys.readouterr().err


def test_planner_runs_without_torch():
    """A login node without torch: block the import and plan the 4b config from the CLI."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        from fusedkv_megatron.planner.cli import main
        code = main(["--config", "examples/configs/4b.yaml", "--gpus-per-node", "8",
                     "--nodes", "16", "--gpu-memory", "80"])
        assert "megatron" not in sys.modules
        print("exit", code)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exit 0" in proc.stdout and "peak per GPU:" in proc.stdout
