"""slurm/submit.py against a real SLURM controller: the tiny CPU preset is submitted with a
3-minute time limit and `--signal=B:USR1@60`, trains with the real trainer, gets USR1 from SLURM
itself before the limit, checkpoints, requeues itself, resumes from the checkpoint and finishes.

SLURM sends the signal within 60 s before `grace` seconds ahead of the end time (sbatch(1): "may
be sent up to 60 seconds earlier than specified"), so the first start gets it 60-120 s in. The
first start runs paced (tests/slurm/paced_pretrain.py: 6 s per iteration) so it is still
training then on any machine; the later starts run at full speed and finish well inside their
own 60 s before the next signal. The job takes about 4 minutes, mostly waiting for its signal:
tests/conftest.py submits it when the session starts and runs these tests last, so the wait
overlaps the rest of the suite.

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
from datetime import datetime
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TIME_LIMIT_S = 180
GRACE_S = 60
# The first start, paced at 6 s per iteration, cannot reach it before its time limit.
TRAIN_ITERS = 32
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


def _slurm_problem(nodes: int = 1) -> str | None:
    """Why no job of `nodes` nodes can run here, or None when a controller answers and that
    many nodes are up."""
    if shutil.which("sbatch") is None:
        return "sbatch not found"
    try:
        ping = _run("scontrol", "ping", timeout=15)
        if ping.returncode != 0 or " is UP" not in ping.stdout:
            first = (ping.stdout + ping.stderr).strip().splitlines()[:1]
            return f"no SLURM controller answers ({' '.join(first) or 'scontrol ping failed'})"
        states = _run("sinfo", "-h", "-N", "-o", "%N %t", timeout=15).stdout.split("\n")
    except subprocess.TimeoutExpired:
        return "scontrol/sinfo timed out"
    up = {
        n.split()[0]
        for n in states
        if n.strip() and n.split()[1].rstrip("*") in ("idle", "mix", "alloc")
    }
    if len(up) < nodes:
        return f"{len(up)} SLURM node(s) up, {nodes} needed (sinfo: {[n for n in states if n]})"
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


def training_flags(data: dict, train_iters: int = TRAIN_ITERS) -> list[str]:
    """The trainer flags of the SLURM tests' runs: the tiny preset's model on the embedded
    corpus, with a smaller batch and sequence so that 2 CPU cores train it in seconds."""
    return [
        "--data-path", data["train_data_prefix"], "--tokenizer-model", data["tokenizer_model"],
        "--train-iters", str(train_iters), "--seq-length", "64", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--lr-warmup-iters", "2", "--log-interval", "1",
        "--eval-interval", "1000", "--eval-iters", "1", "--save-interval", "1000",
    ]  # fmt: skip


def session_data(basetemp: Path) -> dict:
    """The embedded corpus, prepared once per session (shared with the trainer tests)."""
    from fusedkv_megatron.data.datasets import prepare_default_data

    return prepare_default_data(str(basetemp / "trainer_default_data"), vocab_size=2000)


def submit(
    root: Path, name: str, submit_args: list[str], trainer_args: list[str], python: str = ""
) -> dict:
    """slurm/submit.py --preset tiny with a run and log dir under `root`/`name`; returns the
    job's id, log and run dir."""
    run_dir, log_dir = root / name / "run", root / name / "logs"
    cmd = [
        sys.executable, str(REPO / "slurm" / "submit.py"), "--parsable", "--preset", "tiny",
        "--job-name", name, "--run-dir", str(run_dir), "--log-dir", str(log_dir),
        "--python", python or sys.executable, *submit_args, "--", *trainer_args,
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=60)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip()
    return dict(job_id=job_id, log=log_dir / f"{name}-{job_id}.out", run_dir=run_dir)


def time_limited_args(nodes: int, nproc: int) -> list[str]:
    """submit.py options of a job that only SLURM's time-limit signal stops in its first
    start, which runs paced (tests/slurm/paced_pretrain.py)."""
    return [
        "--nodes", str(nodes), "--nproc-per-node", str(nproc),
        "--time", f"00:{TIME_LIMIT_S // 60:02d}:00", "--signal-grace", str(GRACE_S),
        "--exit-margin", "0", "--max-restarts", "3", "--trainer-module", "tests.slurm.paced_pretrain",
    ]  # fmt: skip


def submit_time_limited_job(basetemp: Path) -> dict:
    """Submit the tiny preset (2 gloo processes, DP=2) with a short time limit; returns the
    job's id and paths. Called at the start of the session by tests/conftest.py (so the job's
    minutes of waiting for its signal overlap the other tests) or by `time_limited_run` when
    that did not happen."""
    data = session_data(basetemp)
    root = basetemp / "slurm"
    root.mkdir(exist_ok=True)
    return submit(root, "fusedkv-slurm-test", time_limited_args(1, 2), training_flags(data))


# Set by tests/conftest.py when it submitted the job at the start of the session.
EARLY_JOB: dict | None = None


def require_slurm(nodes: int = 1) -> None:
    """Skip (fail under FUSEDKV_REQUIRE_SLURM=N for N >= nodes) without a controller and
    `nodes` nodes up."""
    problem = _slurm_problem(nodes)
    if problem:
        required = os.environ.get("FUSEDKV_REQUIRE_SLURM", "0")
        if required.isdigit() and int(required) >= nodes:
            pytest.fail(f"FUSEDKV_REQUIRE_SLURM={required} but {problem}")
        start = "start" + (f" --nodes {nodes}" if nodes > 1 else "")
        pytest.skip(f"{problem}; start a local cluster with: bash tools/slurm_local.sh {start}")


def wait_until_over(job: dict, timeout: float, what: str) -> dict:
    """Wait for `job` (from `submit`) to end; returns its id, final record, log and run dir.
    A job still running at the timeout is cancelled."""
    job_id, log = job["job_id"], job["log"]

    def ended() -> dict[str, str] | None:
        info = _job(job_id)
        if not info:  # the controller forgot the job (MinJobAge; no accounting database)
            pytest.fail(
                f"SLURM has no record of job {job_id} any more: it ended more than MinJobAge "
                "seconds ago; restart the test cluster with tools/slurm_local.sh (MinJobAge=3600)"
            )
        return info if info.get("JobState") in TERMINAL else None

    try:
        info = _wait_for(ended, timeout, what, log)
    finally:
        state = _job(job_id).get("JobState")
        if state is not None and state not in TERMINAL:
            _run("scancel", job_id)
    return dict(job_id=job_id, info=info, log=log.read_text(), run_dir=job["run_dir"])


@pytest.fixture(scope="module")
def time_limited_run(tmp_path_factory):
    """The job of `submit_time_limited_job` (submitted early when the session selected these
    tests), waited for until it is over; every signal it gets comes from SLURM."""
    return time_limited_job_over(tmp_path_factory.getbasetemp())


def time_limited_job_over(basetemp: Path) -> dict:
    """The one-node time-limit job (submitted now if it was not at the start), once over.
    The two-node tests compare their losses with it."""
    global EARLY_JOB
    require_slurm()
    if EARLY_JOB is None:
        EARLY_JOB = submit_time_limited_job(basetemp)
    return wait_until_over(EARLY_JOB, 900, "the job to end (signal, checkpoint, requeue, finish)")


def _starts(log: str) -> list[str]:
    """The job log cut into its starts (the first, and one per requeue)."""
    parts = re.split(r"\] job \d+ \([^)]*\), start \d+,", log)
    heads = re.findall(r"\[sbatch ([0-9-]+ [0-9:]+)\] job \d+ \([^)]*\), start \d+,", log)
    return [f"[start {h}]{body}" for h, body in zip(heads, parts[1:])]


def _clock(start: str, pattern: str) -> float | None:
    """Seconds from the start's first log line to the first line matching `pattern`."""
    t0 = re.match(r"\[start ([0-9-]+ [0-9:]+)\]", start).group(1)
    m = re.search(r"\[sbatch ([0-9-]+ [0-9:]+)\] " + pattern, start)
    if m is None:
        return None
    fmt = "%Y-%m-%d %H:%M:%S"
    return (datetime.strptime(m.group(1), fmt) - datetime.strptime(t0, fmt)).total_seconds()


def test_job_trained_and_wrote_tensorboard_and_a_checkpoint(time_limited_run):
    run_dir = time_limited_run["run_dir"]
    assert re.search(r"\] host \S+, 2 workers", time_limited_run["log"])  # 2 gloo processes (DP=2)
    assert re.search(rf" iteration +\d+/ +{TRAIN_ITERS} \|.*lm loss", time_limited_run["log"])
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


def test_slurm_signals_before_the_time_limit_and_the_job_requeues(time_limited_run):
    """Every start but the last got USR1 from SLURM on its time-limit schedule, saved a
    checkpoint and requeued; the next start resumed right after that checkpoint."""
    starts, info = _starts(time_limited_run["log"]), time_limited_run["info"]
    assert len(starts) >= 2, time_limited_run["log"][-3000:]
    assert info["Restarts"] == str(len(starts) - 1)
    for before, after in zip(starts, starts[1:]):
        assert "USR1 (time limit or preemption notice)" in before, before[-3000:]
        # SLURM's schedule: grace seconds before the end, or up to 60 s earlier (+ slack for
        # the shell's start-up and the log's whole seconds).
        t = _clock(before, r"USR1 \(time limit")
        assert TIME_LIMIT_S - GRACE_S - 60 - 5 <= t <= TIME_LIMIT_S - GRACE_S + 5, t
        m = re.search(
            rf"trainer stopped at checkpoint iteration (\d+) of {TRAIN_ITERS} "
            r"\(exit 0, USR1\): requeueing",
            before,
        )
        assert m, before[-3000:]
        stopped = int(m.group(1))
        assert 0 < stopped < TRAIN_ITERS
        assert (time_limited_run["run_dir"] / "checkpoints" / f"iter_{stopped:07d}").is_dir()
        assert f"resuming from iteration {stopped} " in after
        resumed = [int(x) for x in re.findall(r" iteration +(\d+)/", after)]
        assert resumed and resumed[0] == stopped + 1, resumed[:5]


def test_finished_job_is_not_requeued(time_limited_run):
    info = time_limited_run["info"]
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
    last = _starts(time_limited_run["log"])[-1]
    assert f"training finished: iteration {TRAIN_ITERS} of {TRAIN_ITERS}" in last
    assert ": requeueing" not in last and "USR1" not in last
