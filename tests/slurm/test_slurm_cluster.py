"""slurm/submit.py against a real SLURM controller: the tiny CPU preset is submitted, trains with
the real trainer, gets USR1 as a preemption notice, checkpoints, requeues itself, resumes from
the checkpoint and finishes without another requeue.

Needs a reachable controller (`bash tools/slurm_local.sh start` makes a one-node cluster on this
machine); skipped without one, unless FUSEDKV_REQUIRE_SLURM=1 (CI), where that is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TRAIN_ITERS = 60
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}


def _run(*cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _slurm_problem() -> str | None:
    """Why no job can run here, or None when a controller answers and a node is up."""
    if shutil.which("sbatch") is None:
        return "sbatch not found"
    try:
        ping = _run("scontrol", "ping", timeout=15)
        if ping.returncode != 0 or " is UP" not in ping.stdout:
            first = (ping.stdout + ping.stderr).strip().splitlines()[:1]
            return f"no SLURM controller answers ({' '.join(first) or 'scontrol ping failed'})"
        nodes = _run("sinfo", "-h", "-o", "%t %c", timeout=15).stdout.split("\n")
    except subprocess.TimeoutExpired:
        return "scontrol/sinfo timed out"
    if not any(n.split()[0].rstrip("*") in ("idle", "mix", "alloc") for n in nodes if n.strip()):
        return f"no SLURM node is up (sinfo: {nodes})"
    return None


def _job(job_id: str) -> dict[str, str]:
    out = _run("scontrol", "show", "job", "-o", job_id).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def _wait_for(predicate, timeout: float, what: str, log: Path):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    tail = log.read_text()[-4000:] if log.exists() else "(no log)"
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; log tail:\n{tail}")


@pytest.fixture(scope="module")
def preempted_run(tmp_path_factory):
    """Submit the tiny preset, send USR1 once it trains, wait until the job is over."""
    problem = _slurm_problem()
    if problem:
        if os.environ.get("FUSEDKV_REQUIRE_SLURM") == "1":
            pytest.fail(f"FUSEDKV_REQUIRE_SLURM=1 but {problem}")
        pytest.skip(f"{problem}; start a local cluster with: bash tools/slurm_local.sh start")

    from fusedkv_megatron.training.data import prepare_default_data

    # the embedded corpus, shared with the trainer tests of the same session
    data = prepare_default_data(
        str(tmp_path_factory.getbasetemp() / "trainer_default_data"), vocab_size=2000
    )
    root = tmp_path_factory.mktemp("slurm")
    run_dir, log_dir = root / "run", root / "logs"
    # The tiny preset (2 gloo processes, DP=2) and config, with a smaller batch and sequence so
    # that 2 CPU cores train it in seconds.
    cmd = [
        sys.executable, str(REPO / "slurm" / "submit.py"), "--parsable", "--preset", "tiny",
        "--job-name", "fusedkv-slurm-test", "--time", "00:15:00", "--run-dir", str(run_dir),
        "--log-dir", str(log_dir), "--python", sys.executable,
        "--", "--data-path", data["train_data_prefix"], "--tokenizer-model", data["tokenizer_model"],
        "--train-iters", str(TRAIN_ITERS), "--seq-length", "64", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--lr-warmup-iters", "2", "--log-interval", "1",
        "--eval-interval", "1000", "--eval-iters", "1", "--save-interval", "1000",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=60)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip()
    log = log_dir / f"fusedkv-slurm-test-{job_id}.out"

    def log_text() -> str:
        return log.read_text() if log.exists() else ""

    def ended() -> dict[str, str] | None:
        info = _job(job_id)
        return info if info.get("JobState") in TERMINAL else None

    try:
        _wait_for(
            lambda: re.search(r" iteration +\d+/", log_text()) or ended(),
            300,
            "the first training iteration",
            log,
        )
        assert not ended(), f"the job ended before it was signalled:\n{log_text()[-4000:]}"
        signalled = _run("scancel", "--signal=USR1", "--batch", job_id)
        assert signalled.returncode == 0, signalled.stderr
        info = _wait_for(ended, 420, "the job to end (checkpoint, requeue, resume, finish)", log)
    finally:
        if not ended():
            _run("scancel", job_id)
    return dict(job_id=job_id, info=info, log=log.read_text(), run_dir=run_dir)


def _before_and_after_requeue(log: str) -> tuple[str, str]:
    first, _, second = log.partition(", start 2,")
    return first, second


def test_job_trained_and_wrote_tensorboard_and_a_checkpoint(preempted_run):
    run_dir = preempted_run["run_dir"]
    assert "] 2 workers" in preempted_run["log"]  # the preset's 2 gloo processes (DP=2)
    assert re.search(rf" iteration +\d+/ +{TRAIN_ITERS} \|.*lm loss", preempted_run["log"])
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(TRAIN_ITERS)
    assert (ckpt / f"iter_{TRAIN_ITERS:07d}").is_dir()
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps: set[int] = set()
    for e in events:
        acc = EventAccumulator(str(e))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            steps.update(s.step for s in acc.Scalars(tag))
    assert steps and max(steps) == TRAIN_ITERS, sorted(steps)


def test_usr1_checkpoints_requeues_and_resumes(preempted_run):
    log, info = preempted_run["log"], preempted_run["info"]
    first, second = _before_and_after_requeue(log)
    assert "USR1 (time limit or preemption notice)" in first
    m = re.search(
        rf"trainer stopped at checkpoint iteration (\d+) of {TRAIN_ITERS} "
        r"\(exit 0, USR1\): requeueing",
        first,
    )
    assert m, first[-3000:]
    stopped = int(m.group(1))
    assert 0 < stopped < TRAIN_ITERS
    assert (preempted_run["run_dir"] / "checkpoints" / f"iter_{stopped:07d}").is_dir()
    assert info["Restarts"] == "1"
    assert f"resuming from iteration {stopped} " in second
    # the second start continues where the checkpoint left off, not from iteration 1
    resumed = [int(x) for x in re.findall(r" iteration +(\d+)/", second)]
    assert resumed and resumed[0] == stopped + 1, resumed[:5]


def test_finished_job_is_not_requeued(preempted_run):
    info = preempted_run["info"]
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
    assert info["Restarts"] == "1"
    _, second = _before_and_after_requeue(preempted_run["log"])
    assert f"training finished: iteration {TRAIN_ITERS} of {TRAIN_ITERS}" in second
    assert ": requeueing" not in second
