"""slurm/submit.py on a real two-node SLURM cluster: one srun task per node, torchrun's c10d
rendezvous on the first node, gloo traffic between the nodes.

`bash tools/slurm_local.sh start --nodes 2` makes such a cluster on one machine: each node is a
slurmd in its own network namespace with its own address on a private bridge, so the
rendezvous and the collectives really cross between "hosts". The nodes share the machine's
hostname, which resolves to 127.0.0.1 as on many real nodes, so the jobs pass
`--socket-ifname eth0` (FUSEDKV_SLURM_IFNAME) and one test shows the error without it.

The jobs are submitted when the session starts (tests/conftest.py) and these tests run last,
so their minutes of start-up and of waiting for SLURM's time-limit signal overlap the rest of
the suite:
- DP=2 across the nodes (`--nodes 2 --nproc-per-node 1`), stopped by SLURM's own
  `--signal=B:USR1@60` in its paced first start, requeued, resumed: its losses equal the
  one-node `--nproc-per-node 2` job of test_slurm_cluster.py at every iteration (same global
  batch; layout-independent init and bit-exact resume make them identical);
- PP=2 with one stage per node equals PP=2 on one node;
- a node whose task is killed mid-run ends the job with srun naming it, in seconds;
- an unresolvable rendezvous host, a loopback hostname without --socket-ifname, a taken
  rendezvous port and a node that does not join in time each end the job with one line.

Skipped without a controller and two nodes, unless FUSEDKV_REQUIRE_SLURM=2 (CI).
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.slurm import test_slurm_cluster as clock

pytestmark = [pytest.mark.slurm, pytest.mark.slurm2, pytest.mark.slow]

IFNAME = os.environ.get("FUSEDKV_SLURM_IFNAME", "eth0")
TWO_NODES = ["--nodes", "2", "--nproc-per-node", "1"]
PP_ITERS = 6
JOIN_TIMEOUT_S = 30
DIST_TIMEOUT_MIN = 2  # the kill job's --distributed-timeout-minutes: the bound on its end

# Set by tests/conftest.py when it submitted the jobs at the start of the session.
EARLY_JOBS: dict | None = None


def _late_python(root: Path) -> str:
    """A --python for a node that starts late: on the job's second node it waits 5 minutes
    before anything runs (a slow container pull, say); the first node runs at once."""
    path = root / "late-python.sh"
    path.write_text(
        f'#!/bin/bash\n[ "${{SLURM_NODEID:-0}}" = 1 ] && sleep 300\nexec {sys.executable} "$@"\n'
    )
    path.chmod(0o755)
    return str(path)


def submit_two_node_jobs(basetemp: Path) -> dict[str, dict]:
    """Submit every two-node job of this module; returns them by name."""
    data = clock.session_data(basetemp)
    root = basetemp / "slurm2"
    root.mkdir(exist_ok=True)
    net = ["--socket-ifname", IFNAME]
    short = [*clock.training_flags(data, PP_ITERS), "--pipeline-model-parallel-size", "2"]
    kill_submit = [*TWO_NODES, *net, "--time", "01:00:00", "--max-restarts", "0",
                   "--trainer-module", "tests.slurm.paced_pretrain"]  # fmt: skip
    kill_train = [*clock.training_flags(data, 1000),
                  "--distributed-timeout-minutes", str(DIST_TIMEOUT_MIN)]  # fmt: skip
    nojoin = [*TWO_NODES, *net, "--rdzv-timeout", str(JOIN_TIMEOUT_S)]
    jobs = {
        # the same training as the one-node time-limit job, one process on each node
        "dp": clock.submit(
            root, "fkv2-dp", [*clock.time_limited_args(2, 1), *net], clock.training_flags(data)
        ),
        "pp2": clock.submit(root, "fkv2-pp", [*TWO_NODES, *net], short),
        "pp1": clock.submit(root, "fkv1-pp", ["--nodes", "1", "--nproc-per-node", "2"], short),
        # paced (6 s per iteration) and long: still training when a node is killed
        "kill": clock.submit(root, "fkv2-kill", kill_submit, kill_train),
        "badhost": clock.submit(
            root, "fkv2-badhost", [*TWO_NODES, *net, "--rdzv-host", "{node}.invalid"], short
        ),
        "loopback": clock.submit(root, "fkv2-loopback", TWO_NODES, short),
        "nojoin": clock.submit(root, "fkv2-nojoin", nojoin, short, python=_late_python(root)),
    }
    # The node is killed as soon as the job trains, not when its test runs: the job then
    # holds no memory through the rest of the suite.
    kill = jobs["kill"]
    kill["killer"] = threading.Thread(
        target=_kill_second_node_when_training, args=(kill,), daemon=True
    )
    kill["killer"].start()
    return jobs


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> dict[str, dict]:
    clock.require_slurm(nodes=2)
    return EARLY_JOBS or submit_two_node_jobs(tmp_path_factory.getbasetemp())


def _seconds(info: dict, start: str = "StartTime", end: str = "EndTime") -> float:
    fmt = "%Y-%m-%dT%H:%M:%S"
    return (datetime.strptime(info[end], fmt) - datetime.strptime(info[start], fmt)).total_seconds()


def _node_names(log: str) -> dict[int, str]:
    """SLURM node names by node id, from each node's own start-up line."""
    return {int(i): n for i, n in re.findall(r"^\[node (\d+) (\S+)\] host ", log, re.MULTILINE)}


def _losses(run_dir: Path) -> dict[int, float]:
    """'lm loss' by iteration from all TensorBoard files of a run (one per start)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    losses: dict[int, float] = {}
    for events in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if "lm loss" in acc.Tags()["scalars"]:
            for s in acc.Scalars("lm loss"):
                assert losses.get(s.step, s.value) == s.value, (events, s.step)
                losses[s.step] = s.value
    return losses


def _assert_one_clear_error(run: dict, message: str) -> str:
    """The job failed, was not requeued, and its log has `message` and no traceback."""
    info, log = run["info"], run["log"]
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", info
    assert re.search(message, log), log[-4000:]
    assert "Traceback" not in log, log[-4000:]
    assert not re.search(r"^ iteration +\d+/", log, re.MULTILINE)  # nothing trained
    assert "not requeueing" in log
    return log


# --- DP=2 across the nodes, preempted by SLURM's signal and resumed ---------------------------


@pytest.fixture(scope="module")
def dp_run(jobs):
    return clock.wait_until_over(jobs["dp"], 900, "the two-node DP job to end")


def test_dp_across_nodes_has_the_one_node_losses_at_every_iteration(dp_run, tmp_path_factory):
    one_node = clock.time_limited_job_over(tmp_path_factory.getbasetemp())
    assert dp_run["info"]["JobState"] == "COMPLETED", dp_run["log"][-4000:]
    assert one_node["info"]["JobState"] == "COMPLETED", one_node["log"][-4000:]
    two, one = _losses(dp_run["run_dir"]), _losses(one_node["run_dir"])
    assert sorted(two) == list(range(1, clock.TRAIN_ITERS + 1)), sorted(two)
    # Exact: the same global batch, layout-independent init, and a bit-exact resume, whatever
    # iteration each job was preempted at.
    assert two == one


def test_schedulers_signal_reaches_both_nodes_and_the_job_resumes_on_both(dp_run):
    starts, info = clock._starts(dp_run["log"]), dp_run["info"]
    assert len(starts) >= 2 and info["Restarts"] == str(len(starts) - 1), dp_run["log"][-3000:]
    names = _node_names(starts[0])
    assert sorted(names) == [0, 1] and names[0] != names[1], names
    ckpt = dp_run["run_dir"] / "checkpoints"
    saved = []
    for before, after in zip(starts, starts[1:]):
        assert _node_names(after) == names  # both nodes rejoined, each logs its own line
        assert "USR1 (time limit or preemption notice)" in before
        got = set(re.findall(r"\[paced_pretrain\] node (\S+) rank (\d) got SIGUSR1", before))
        assert got == {(names[0], "0"), (names[1], "1")}, before[-3000:]
        writes = re.findall(r"saved checkpoint of iteration (\d+) to ", before)
        assert len(writes) == 1, writes  # written once, by the job as a whole
        stopped = int(writes[0])
        assert f"trainer stopped at checkpoint iteration {stopped} of " in before
        assert f"resuming from iteration {stopped} " in after
        resumed = [int(x) for x in re.findall(r" iteration +(\d+)/", after)]
        assert resumed and resumed[0] == stopped + 1, resumed[:5]
        saved.append(stopped)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
    assert f"training finished: iteration {clock.TRAIN_ITERS} of " in starts[-1]
    # complete checkpoints only (no staging directory left), the last one the latest
    iters = sorted(p.name for p in ckpt.iterdir() if p.is_dir())
    assert iters == [f"iter_{i:07d}" for i in sorted({*saved, clock.TRAIN_ITERS})], iters
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(
        clock.TRAIN_ITERS
    )


# --- PP=2 with one stage per node -------------------------------------------------------------


def test_pipeline_stage_per_node_equals_pipeline_on_one_node(jobs):
    two = clock.wait_until_over(jobs["pp2"], 600, "the two-node PP=2 job to end")
    one = clock.wait_until_over(jobs["pp1"], 600, "the one-node PP=2 job to end")
    for run in (two, one):
        assert run["info"]["JobState"] == "COMPLETED", run["log"][-4000:]
        # the source K/V of the second stage's fused layers cross the pipeline boundary
        assert re.search(r"pipeline boundary after layer 2: .* sources \['K1'", run["log"])
    assert len(_node_names(two["log"])) == 2 and len(_node_names(one["log"])) == 1
    losses = _losses(two["run_dir"])
    assert sorted(losses) == list(range(1, PP_ITERS + 1))
    assert losses == _losses(one["run_dir"])


# --- a node dies mid-run ----------------------------------------------------------------------


def _kill_node_task(job_id: str, node_id: str) -> list[int]:
    """SIGKILL the processes of the job's step on one node (its torchrun and workers), as if
    that node died; the test cluster's nodes are all on this machine."""
    killed = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = set(Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if {f"SLURM_JOB_ID={job_id}".encode(), f"SLURM_NODEID={node_id}".encode(),
                b"SLURM_STEP_ID=0"} <= env:  # fmt: skip
            try:
                os.kill(int(pid), signal.SIGKILL)
                killed.append(int(pid))
            except ProcessLookupError:
                pass
    return killed


def _kill_second_node_when_training(job: dict, timeout: float = 900) -> None:
    """Once the job has trained 3 iterations on both nodes, kill its second node's task;
    records the time in job["killed_at"] and the processes in job["killed"]."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = job["log"].read_text() if job["log"].exists() else ""
        if len(_node_names(text)) == 2 and re.search(r"^ iteration +3/", text, re.MULTILINE):
            job["killed"] = _kill_node_task(job["job_id"], "1")
            job["killed_at"] = time.time()
            return
        if "not requeueing" in text:  # ended by itself
            return
        time.sleep(1)


def test_a_node_killed_mid_run_ends_the_job_with_a_clear_message(jobs):
    job = jobs["kill"]
    job["killer"].join(timeout=900)
    run = clock.wait_until_over(job, DIST_TIMEOUT_MIN * 60 + 60, "the job to end after the kill")
    info, text = run["info"], run["log"]
    assert job.get("killed"), f"no process of the job's second node was killed:\n{text[-3000:]}"
    ended_s = datetime.strptime(info["EndTime"], "%Y-%m-%dT%H:%M:%S").timestamp() - job["killed_at"]
    # well inside --distributed-timeout-minutes: the survivors see a closed connection
    assert ended_s < DIST_TIMEOUT_MIN * 60, ended_s
    names = _node_names(text)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", info
    assert f"srun: error: {names[1]}: task 1: Killed" in text
    assert re.search(r"trainer failed \(exit \d+, signal \d+: a node's task was killed", text)
    assert "not requeueing" in text
    print(f"job {job['job_id']} ended {ended_s:.0f} s after node {names[1]}'s task was killed")


# --- launch failures: one clear error each ----------------------------------------------------


def test_unresolvable_rendezvous_host(jobs):
    run = clock.wait_until_over(jobs["badhost"], 300, "the bad rendezvous host job to end")
    _assert_one_clear_error(
        run, r"\] error: the rendezvous host '\S+\.invalid' \(--rdzv-host, for the first node"
    )


def test_loopback_hostname_without_socket_ifname(jobs):
    run = clock.wait_until_over(jobs["loopback"], 300, "the job without --socket-ifname to end")
    host = socket.gethostname()
    if not all(ipaddress.ip_address(a).is_loopback for a in socket.gethostbyname_ex(host)[2]):
        pytest.skip(f"the hostname {host!r} resolves to a routable address here")
    _assert_one_clear_error(
        run, rf"\] error: the hostname '{host}' resolves to 127\.[0-9.]+ here: .*--socket-ifname"
    )


def test_rendezvous_port_taken(tmp_path_factory, jobs):
    """Another job on the first node listens on the port the job asks for."""
    root = tmp_path_factory.mktemp("slurm2-port")
    out = root / "blocker.out"
    nodes = clock._run("sinfo", "-h", "-o", "%N").stdout.split()
    head = clock._run("scontrol", "show", "hostnames", ",".join(nodes)).stdout.split()[0]
    blocker = subprocess.run(
        ["sbatch", "--parsable", "--nodelist", head, "--ntasks", "1", "--cpus-per-task", "1",
         "--job-name", "fkv2-port-blocker", "--output", str(out), "--time", "00:10:00",
         "--wrap", f"exec {sys.executable} -c 'import socket, time; s = socket.socket(); "
         's.bind(("0.0.0.0", 0)); s.listen(1); '
         'print("listening", s.getsockname()[1], flush=True); time.sleep(600)\''],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert blocker.returncode == 0, blocker.stderr
    blocker_id = blocker.stdout.strip().split(";")[0]
    try:
        port = clock._wait_for(
            lambda: out.exists() and re.search(r"listening (\d+)", out.read_text()),
            300, "the port blocker to listen", out,
        ).group(1)  # fmt: skip
        data = clock.session_data(tmp_path_factory.getbasetemp())
        job = clock.submit(
            root, "fkv2-port", [*TWO_NODES, "--socket-ifname", IFNAME, "--rdzv-port", port],
            clock.training_flags(data, PP_ITERS),
        )  # fmt: skip
        run = clock.wait_until_over(job, 300, "the job with a taken port to end")
    finally:
        subprocess.run(["scancel", blocker_id], timeout=30)
    assert _node_names(run["log"])[0] == head  # the rendezvous host is the blocked node
    _assert_one_clear_error(run, rf"\[node 0 {head}\] error: the rendezvous port {port} is taken")


def test_a_node_that_does_not_join_in_time(jobs):
    run = clock.wait_until_over(jobs["nojoin"], 600, "the job with a late node to end")
    log = _assert_one_clear_error(
        run,
        rf"\[node 0 \S+\] error: the rendezvous at \S+ timed out after {JOIN_TIMEOUT_S} s: "
        r"not all 2 nodes joined",
    )
    assert "--rdzv-timeout" in log
    # bounded by the join timeout: start-up, the timeout, tear-down (a loaded machine)
    assert _seconds(run["info"]) < JOIN_TIMEOUT_S + 150, run["info"]
