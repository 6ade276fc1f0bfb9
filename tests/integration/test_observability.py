"""What a 2-rank pipeline run (PP=2 with two virtual stages each, DataLoader workers) reports
with every observability flag on: the profiler trace of the asked iterations on the asked rank
only, Megatron's per-phase timers in the log and in TensorBoard, the parameter norm (equal to
the norm of the weights it saves), and memory as the largest value over ranks with its rank.
One torchrun launch, read back by several tests."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from tests.integration.trainer_helpers import run_subprocess, scalars

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

MODEL = [
    "--mock-data", "--kv-sharing", "fusedkv", "--num-layers", "4", "--hidden-size", "64",
    "--ffn-hidden-size", "128", "--num-attention-heads", "4", "--seq-length", "64",
    "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "4",
    "--log-interval", "2", "--eval-iters", "0", "--pipeline-model-parallel-size", "2",
    "--num-layers-per-virtual-pipeline-stage", "1", "--num-workers", "2",
]  # fmt: skip
PHASES = {  # the phases -> Megatron timer names that must appear
    "forward-backward": "forward-backward",
    "pipeline p2p": "forward-send-forward-recv",
    "data-parallel reduce": "all-grads-sync",
    "optimizer": "optimizer",
    "data": "batch-generator",
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("observed")
    argv = [*MODEL, "--timing-log-level", "2", "--log-timers-to-tensorboard",
            "--log-params-norm", "--profile", "--profile-step-start", "1",
            "--profile-step-end", "3", "--profile-ranks", "1", "--profile-dir", root / "prof",
            "--tensorboard-dir", root / "tb", "--save", root / "ckpt"]  # fmt: skip
    proc = run_subprocess(argv, nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root, proc.stdout


def test_the_trace_holds_iterations_2_and_3_of_rank_1_only(run):
    root, _ = run
    files = sorted(p.name for p in (root / "prof").iterdir())
    assert len(files) == 1 and re.fullmatch(r"rank1\..*\.pt\.trace\.json", files[0]), files
    events = json.loads((root / "prof" / files[0]).read_text())["traceEvents"]
    spans = {e["name"] for e in events if str(e.get("name", "")).startswith("iteration ")}
    assert spans == {"iteration 2", "iteration 3"}
    assert any(str(e.get("name", "")).startswith("aten::") for e in events)  # ops recorded


def test_every_phase_is_timed_in_the_log_and_tensorboard(run):
    root, out = run
    blocks = out.split("(min, max) time across ranks (ms):")[1:]
    assert len(blocks) == 2  # one per logged interval
    for phase, name in PHASES.items():
        values = scalars(root / "tb", f"{name}-time")  # seconds, the maximum over ranks
        assert sorted(values) == [2, 4], phase
        for step, block in zip((2, 4), blocks, strict=True):
            found = re.search(rf"\n    {name} \.+: \(([0-9.]+), ([0-9.]+)\)", block)
            assert found, (phase, block)
            low, high = float(found[1]), float(found[2])  # ms
            assert 0 < low <= high and abs(1000 * values[step] - high) <= 0.006, phase


def test_params_norm_is_the_norm_of_the_saved_weights(run, dist_single):
    from megatron.core.dist_checkpointing.serialization import load_plain_tensors

    from fusedkv_megatron import checkpoint_format as cf

    root, out = run
    saved = load_plain_tensors(str(cf.iteration_dir(root / "ckpt", 4)))
    weights = [v for k, v in saved.items() if isinstance(v, torch.Tensor)
               and not k.startswith("optimizer") and "_extra_state" not in k]  # fmt: skip
    assert len(weights) > 20
    want = math.sqrt(sum(float(w.double().pow(2).sum()) for w in weights))
    assert scalars(root / "tb", "params-norm")[4] == pytest.approx(want, rel=1e-6)
    assert f"params norm: {want:.3f}" in out


def test_memory_is_reported_once_for_all_ranks_in_gib(run):
    root, out = run
    lines = re.findall(r"host memory \(GiB\): ([0-9.]+) max RSS \(rank (\d)\)", out)
    assert len(lines) == 2 and all(r in ("0", "1") for _, r in lines)
    gib = scalars(root / "tb", "host-memory-max-rss-gib")
    assert [f"{gib[i]:.2f}" for i in (2, 4)] == [v for v, _ in lines]
    assert 0.05 < gib[4] < 16
    assert {int(v) for v in scalars(root / "tb", "host-memory-max-rss-rank").values()} <= {0, 1}
