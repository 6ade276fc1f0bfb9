"""slurm/submit.py without SLURM: the rendered script for every preset, the errors for bad input,
and the job's control flow (requeue or not) run against stand-ins for srun/scontrol/squeue and
the trainer. The real cluster is exercised in test_slurm_cluster.py."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SUBMIT = REPO / "slurm" / "submit.py"


def _load_submit():
    spec = importlib.util.spec_from_file_location("fusedkv_slurm_submit", SUBMIT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


submit = _load_submit()
PRESETS = submit.PRESETS


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        "num_layers: 4\nhidden_size: 64\nnum_attention_heads: 4\nseq_length: 128\ntrain_iters: 10\n"
    )
    return path


def dry_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SUBMIT), "--dry-run", *args], capture_output=True, text=True, cwd=REPO
    )


# --- rendering -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
def test_each_preset_has_a_config_that_agrees_with_it(name):
    """submit.py reads train_iters from the preset's config and passes the preset's TP/PP."""
    import yaml

    path = REPO / "examples" / "configs" / f"{name}.yaml"
    assert path.is_file(), f"{path} missing"
    cfg = {k.replace("-", "_"): v for k, v in yaml.safe_load(path.read_text()).items()}
    assert submit.config_train_iters(path) == cfg["train_iters"] > 0
    with pytest.MonkeyPatch.context() as mp:  # a login node without PyYAML
        mp.setitem(sys.modules, "yaml", None)
        assert submit.config_train_iters(path) == cfg["train_iters"]
    p = PRESETS[name]
    assert cfg.get("tensor_model_parallel_size", 1) == p.tensor_parallel
    assert cfg.get("pipeline_model_parallel_size", 1) == p.pipeline_parallel
    assert cfg.get("context_parallel_size", 1) == p.context_parallel
    procs = p.nodes * (p.gpus_per_node or p.procs_per_node)
    dp = procs // (p.tensor_parallel * p.pipeline_parallel * p.context_parallel)
    assert cfg["global_batch_size"] % (cfg["micro_batch_size"] * dp) == 0, (
        f"{name}: global batch {cfg['global_batch_size']} does not split over DP={dp} x "
        f"micro batch {cfg['micro_batch_size']}"
    )


@pytest.mark.parametrize("name", list(PRESETS))
def test_dry_run_renders_the_presets_layout(name):
    p = PRESETS[name]
    out = dry_run("--preset", name)
    assert out.returncode == 0, out.stderr
    s = out.stdout
    assert f"#SBATCH --nodes={p.nodes}\n" in s
    assert "#SBATCH --ntasks-per-node=1\n" in s
    assert f"--tensor-model-parallel-size {p.tensor_parallel} " in s
    assert f"--pipeline-model-parallel-size {p.pipeline_parallel}" in s
    if p.cpu:
        assert "--gpus-per-node" not in s
        assert f"#SBATCH --cpus-per-task={p.procs_per_node}\n" in s
        assert 'export CUDA_VISIBLE_DEVICES=""' in s
        assert "--distributed-backend gloo" in s
        assert f"NPROC_PER_NODE={p.procs_per_node}\n" in s
    else:
        assert f"#SBATCH --gpus-per-node={p.gpus_per_node}\n" in s
        assert "#SBATCH --exclusive\n" in s
        assert f"NPROC_PER_NODE={p.gpus_per_node}\n" in s
        assert "CUDA_DEVICE_MAX_CONNECTIONS" in s and "NCCL_DEBUG" in s
    # preemption, requeue, logs, resume
    assert f"#SBATCH --signal=B:USR1@{p.signal_grace_s}\n" in s
    assert "#SBATCH --requeue\n" in s
    assert "#SBATCH --open-mode=append\n" in s
    assert "/slurm/logs/%x-%j.out\n" in s
    assert f"EXIT_MARGIN_S={p.exit_margin_s} " in s
    assert 'scontrol requeue "$SLURM_JOB_ID"' in s
    assert '--load "$CKPT_DIR"' in s and '--tensorboard-dir "$TB_DIR"' in s
    # srun one task per node, torchrun per GPU, c10d rendezvous on the first node
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1' in s
    assert "--rdzv-backend=c10d" in s and '--rdzv-endpoint="$rdzv_host:$rdzv_port"' in s
    assert "TRITON_CACHE_DIR" in s
    assert "{{" not in s
    syntax = subprocess.run(["bash", "-n"], input=s, capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr


def test_dry_run_options_reach_the_script(config, tmp_path):
    out = dry_run(
        "--preset", "1.5b", "--config", str(config), "--nodes", "4", "--partition", "gpu",
        "--account", "proj", "--time", "2-00:00:00", "--container", "nvcr.io/nvidia/pytorch:25.01-py3",
        "--kv-sharing", "fusedkv_lite", "--run-dir", str(tmp_path / "r"), "--sbatch=--qos=high",
        "--", "--micro-batch-size", "2", "--tensor-model-parallel-size", "2",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    s = out.stdout
    for line in (
        "--nodes=4",
        "--partition=gpu",
        "--account=proj",
        "--time=2-00:00:00",
        "--qos=high",
        "--job-name=fusedkv-1.5b-fusedkv_lite",
    ):
        assert f"#SBATCH {line}\n" in s
    assert "preset 1.5b: 4 node(s) x 8 GPUs, TP=2 PP=1 DP=16" in s
    assert "--container-image=nvcr.io/nvidia/pytorch:25.01-py3" in s
    assert "PYTHON=python\n" in s
    assert "--kv-sharing fusedkv_lite" in s
    assert s.rstrip().count("--micro-batch-size 2") == 1
    assert f"RUN_DIR={tmp_path / 'r'}\n" in s


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "7b"], "--preset '7b' is unknown; choose one of tiny, 332m"),
        (["--preset", "332m", "--nodes", "0"], "--nodes 0 must be >= 1"),
        (
            ["--preset", "4b", "--nodes", "1", "--gpus-per-node", "1"],
            "1 node(s) x 1 processes = 1 is not divisible by tensor parallel 2 x pipeline parallel 1",
        ),
        (
            ["--preset", "332m", "--", "--tensor-model-parallel-size", "3"],
            "= 8 is not divisible by tensor parallel 3",
        ),
        (
            ["--preset", "332m", "--", "--pipeline-model-parallel-size", "x"],
            "--pipeline-model-parallel-size 'x' is not an integer",
        ),
        (["--preset", "332m", "--time", "00:05:00"], "leaves no time to train"),
        (["--preset", "332m", "--time", "1h"], "--time '1h' is not a SLURM time"),
        (
            ["--preset", "tiny", "--", "--save", "/x"],
            "trainer argument --save is set by the launcher",
        ),
        (["--preset", "tiny", "--job-name", "a b"], "--job-name 'a b'"),
        (["--preset", "tiny", "--", "--config", "x.yaml"], "put --config before --"),
        (
            ["--preset", "332m", "--gpus-per-node", "4", "--nproc-per-node", "8"],
            "--nproc-per-node 8 exceeds --gpus-per-node 4",
        ),
        (["--preset", "tiny", "--socket-ifname", "eth0 ib0"], "--socket-ifname 'eth0 ib0'"),
        (["--preset", "tiny", "--rdzv-host", "{head}-ib"], "--rdzv-host '{head}-ib'"),
        (["--preset", "tiny", "--rdzv-port", "80"], "--rdzv-port 80 must be in 1024-65535"),
        (["--preset", "tiny", "--rdzv-timeout", "0"], "--rdzv-timeout 0 must be >= 1"),
    ],
)
def test_bad_input_is_refused_with_the_value_and_the_fix(args, message, config):
    out = dry_run("--config", str(config), *args)
    assert out.returncode == 2
    assert message in out.stderr, out.stderr
    assert out.stdout == ""


def test_a_config_without_train_iters_needs_it_on_the_command_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("num_layers: 4\n")
    out = dry_run("--preset", "tiny", "--config", str(cfg))
    assert out.returncode == 2 and "-- --train-iters N" in out.stderr
    out = dry_run("--preset", "tiny", "--config", str(cfg), "--", "--train-iters", "7")
    assert out.returncode == 0 and "TRAIN_ITERS=7\n" in out.stdout


def test_missing_config_is_named(tmp_path):
    out = dry_run("--preset", "tiny", "--config", str(tmp_path / "nope.yaml"))
    assert out.returncode == 2 and "nope.yaml not found" in out.stderr


# --- the memory check (fusedkv_megatron.planner) ---------------------------------------------


def _predicted_peak(name: str) -> str:
    """The planner's per-GPU peak for a preset, computed here from the library."""
    from fusedkv_megatron.planner import cli

    p = PRESETS[name]
    planned, _ = cli.plan_from_argv(
        ["--config", str(REPO / "examples" / "configs" / f"{name}.yaml"),
         "--tensor-model-parallel-size", str(p.tensor_parallel),
         "--pipeline-model-parallel-size", str(p.pipeline_parallel),
         "--gpus-per-node", str(p.gpus_per_node), "--nodes", str(p.nodes), "--gpu-memory", "80"]
    )  # fmt: skip
    assert planned.fits, f"preset {name} is predicted not to fit 80 GiB: {cli.summary(planned)}"
    return f"peak {cli.gib(planned.peak)} GiB per GPU of 76.0 usable"


@pytest.mark.parametrize("name", [n for n, p in PRESETS.items() if not p.cpu])
def test_dry_run_shows_the_predicted_peak_and_throughput(name):
    out = dry_run("--preset", name)
    assert out.returncode == 0, out.stderr
    header = out.stdout.split("\n#\n", 1)[0]
    assert f"#   predicted (fusedkv-plan): {_predicted_peak(name)} (80 GiB H100" in header
    assert ": fits;" in header and " tokens/s, " in header and "(predicted MFU " in header
    assert ", bound by compute" in header


def test_a_layout_predicted_not_to_fit_is_refused_with_layouts_that_fit():
    args = ["--preset", "4b", "--nodes", "2", "--gpu-memory", "40", "--", "--micro-batch-size",
            "4", "--tensor-model-parallel-size", "1", "--no-sequence-parallel"]  # fmt: skip
    out = dry_run(*args)
    assert out.returncode == 2 and out.stdout == ""
    assert "TP=1 PP=1 VPP=1 DP=16 mbs=4 m=16 recompute=none is predicted not to fit" in out.stderr
    assert "DOES NOT FIT" in out.stderr and "Pass --ignore-memory-check" in out.stderr
    suggested = [line for line in out.stderr.splitlines() if line.startswith("  -- ")]
    assert len(suggested) == 5, out.stderr
    # Every suggested layout, submitted as the message says, passes the check.
    flags = suggested[0].split("   (")[0].split()[1:]
    again = dry_run(*args[:6], "--", *flags)
    assert again.returncode == 0, again.stderr
    assert ": fits;" in again.stdout
    forced = dry_run(*args[:6], "--ignore-memory-check", *args[6:])
    assert forced.returncode == 0, forced.stderr
    assert "DOES NOT FIT" in forced.stdout and "submitted anyway" in forced.stdout


@pytest.mark.slow
def test_the_preset_table_in_the_docs_is_the_planners():
    """docs/planner.md shows what `submit.py --preset-table` prints today."""
    table = submit.preset_table()
    assert table.count("\n| ") == sum(not p.cpu for p in PRESETS.values())  # one row each
    assert table in (REPO / "docs" / "planner.md").read_text(), (
        "docs/planner.md is out of date: paste `python slurm/submit.py --preset-table`"
    )


@pytest.mark.parametrize("blocked", [("torch",), ("torch", "yaml")])
def test_a_login_node_without_torch_or_pyyaml(blocked):
    """Without torch the check runs as usual; without PyYAML too, submit says plainly that it
    could not check, and renders the job."""
    code = (
        "import runpy, sys\n"
        + "".join(f"sys.modules[{m!r}] = None\n" for m in blocked)
        + "sys.argv = ['submit.py', '--preset', '1.5b', '--dry-run']\n"
        + f"runpy.run_path({str(SUBMIT)!r}, run_name='__main__')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    if "yaml" in blocked:
        assert "#   memory check: not done, the planner cannot be imported here" in out.stdout
    else:
        assert f"#   predicted (fusedkv-plan): {_predicted_peak('1.5b')}" in out.stdout


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("30", 1800),
        ("1:30", 90),
        ("24:00:00", 86400),
        ("2-00:00:00", 172800),
        ("1-12", 129600),
        ("1-00:30", 88200),
    ],
)
def test_slurm_time_formats(text, seconds):
    assert submit.parse_slurm_time(text) == seconds


# --- the job's control flow, against stand-ins for SLURM and the trainer ----------------------

FAKE_TRAINER = """\
import json, os, signal, sys, time
argv = sys.argv[1:]
log = os.environ["FAKE_CALLS"]
if argv[0].endswith("/slurm/node_launch.py"):  # the node's checks, then torchrun
    with open(log, "a") as f:
        f.write(f"node-launch {os.environ['SLURMD_NODENAME']} {os.environ['RDZV_HOST']}:"
                f"{os.environ['RDZV_PORT']} local-addr {os.environ['PET_LOCAL_ADDR']}\\n")
    if os.environ.get("FAKE_NODE_CHECK_RC"):
        sys.exit(int(os.environ["FAKE_NODE_CHECK_RC"]))
with open(log, "a") as f:
    f.write("trainer " + json.dumps(argv) + "\\n")
    conf = os.environ.get("PET_RDZV_CONF").split(",")
    f.write(f"rdzv-conf {conf[0]}\\n")
    f.write(f"rdzv-timeout {conf[1]}\\n")
def value(flag):
    return argv[argv.index(flag) + 1] if flag in argv else None
ckpt = value("--save")
def checkpoint(it):
    os.makedirs(ckpt, exist_ok=True)
    with open(os.path.join(ckpt, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(f"{it}\\n")
mode = os.environ["FAKE_MODE"]
if mode == "finish":
    checkpoint(int(value("--train-iters") or os.environ["FAKE_TRAIN_ITERS"]))
elif mode == "stop-early":
    checkpoint(5)
elif mode == "crash":
    sys.exit(1)
elif mode == "wait-signal":
    got = []
    signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
    open(os.environ["FAKE_READY"], "w").close()
    deadline = time.time() + 30
    while not got and time.time() < deadline:
        time.sleep(0.05)
    with open(log, "a") as f:
        f.write(f"trainer got {got}\\n")
    checkpoint(7)
"""

STUBS = {
    # srun runs the node command once per name in FAKE_NODES (once, in place, without it)
    "srun": textwrap.dedent("""\
        echo "srun $*" >> "$FAKE_CALLS"
        while [ $# -gt 0 ] && [ "$1" != bash ]; do shift; done
        [ -z "${FAKE_NODES:-}" ] && exec "$@"
        i=0; pids=()
        for n in $FAKE_NODES; do SLURMD_NODENAME=$n SLURM_NODEID=$i "$@" & pids+=($!); i=$((i+1)); done
        rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done; exit $rc
    """),
    "squeue": 'echo "$FAKE_TIME_LEFT"\n',
    # requeue: as SLURM does, end the batch shell with TERM
    "scontrol": textwrap.dedent("""\
        echo "scontrol $*" >> "$FAKE_CALLS"
        case "$1" in show) echo nodeA; echo nodeB ;; requeue) kill -TERM "$PPID" ;; esac
    """),
}


class FakeJob:
    """The rendered batch script run by bash with SLURM's environment and stand-in commands."""

    def __init__(self, tmp_path: Path, config: Path, *submit_args: str):
        self.dir = tmp_path
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        for name, body in STUBS.items():
            (bin_dir / name).write_text("#!/bin/bash\n" + body)
            (bin_dir / name).chmod(0o755)
        python = bin_dir / "fake-python"
        python.write_text(f"#!{sys.executable}\n" + FAKE_TRAINER)
        python.chmod(0o755)
        self.run_dir = tmp_path / "run"
        self.ckpt = self.run_dir / "checkpoints"
        self.calls = tmp_path / "calls.log"
        opts = submit.build_parser().parse_args(
            [
                "--preset",
                "tiny",
                "--config",
                str(config),
                "--run-dir",
                str(self.run_dir),
                "--python",
                str(python),
                *submit_args,
            ]
        )
        self.script, _ = submit.render(opts, [])
        (tmp_path / "job.sbatch").write_text(self.script)
        self.env = dict(
            os.environ,
            PATH=f"{bin_dir}:{os.environ['PATH']}",
            FAKE_CALLS=str(self.calls),
            FAKE_READY=str(tmp_path / "ready"),
            FAKE_TRAIN_ITERS="10",
            FAKE_TIME_LEFT="9:00",
            SLURM_JOB_ID="4242",
            SLURM_JOB_NAME="fake",
            SLURM_JOB_NUM_NODES="1",
            SLURM_JOB_NODELIST="nodeA",
            SLURM_NODEID="0",
            SLURMD_NODENAME="nodeA",
            SLURM_CPUS_PER_TASK="2",
            SLURM_RESTART_COUNT="0",
        )

    def start(self, mode: str, **env: str) -> subprocess.Popen:
        self.env.update(FAKE_MODE=mode, **env)
        return subprocess.Popen(
            ["bash", str(self.dir / "job.sbatch")],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def run(self, mode: str, **env: str) -> tuple[int, str]:
        return self.finish(self.start(mode, **env))

    @staticmethod
    def finish(proc: subprocess.Popen) -> tuple[int, str]:
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            pytest.fail(f"the batch script did not finish in 60 s:\n{out}")
        return proc.returncode, out

    def calls_log(self) -> list[str]:
        return self.calls.read_text().splitlines() if self.calls.exists() else []

    def trainer_argv(self) -> list[str]:
        lines = [x for x in self.calls_log() if x.startswith("trainer [")]
        return json.loads(lines[-1][len("trainer ") :])

    def requeued(self) -> bool:
        return "scontrol requeue 4242" in self.calls_log()

    def checkpoint_at(self, iteration: int) -> None:
        self.ckpt.mkdir(parents=True, exist_ok=True)
        (self.ckpt / "latest_checkpointed_iteration.txt").write_text(f"{iteration}\n")


def test_finished_run_is_not_requeued_and_gets_the_launch_arguments(tmp_path, config):
    job = FakeJob(tmp_path, config)
    rc, out = job.run("finish")
    assert rc == 0, out
    assert "training finished: iteration 10 of 10" in out
    assert not job.requeued()
    argv = job.trainer_argv()
    # torchrun: one per node, c10d rendezvous on the first node of the allocation
    assert argv[0] == str(REPO / "slurm" / "node_launch.py")
    assert "--rdzv-endpoint=nodeA:24242" in argv and "--nproc-per-node=2" in argv
    assert "--nnodes=1" in argv and "--max-restarts=0" in argv
    assert "rdzv-conf is_host=1" in job.calls_log()  # the first node hosts the store
    i = argv.index("fusedkv_megatron.pretrain")
    trainer = argv[i + 1 :]
    ckpt = str(job.ckpt)
    assert trainer[trainer.index("--save") + 1] == ckpt
    assert trainer[trainer.index("--load") + 1] == ckpt
    assert trainer[trainer.index("--tensorboard-dir") + 1] == str(job.run_dir / "tensorboard")
    # 9 minutes left, tiny preset's margin 120 s -> 7 minutes of training
    assert trainer[trainer.index("--exit-duration-in-mins") + 1] == "7.0"
    srun = next(x for x in job.calls_log() if x.startswith("srun "))
    assert "--ntasks-per-node=1" in srun and "--cpus-per-task=2" in srun


def test_two_nodes_meet_at_the_first_node(tmp_path, config):
    job = FakeJob(tmp_path, config, "--nodes", "2")
    rc, out = job.run(
        "finish", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="node[A-B]", FAKE_NODES="nodeA nodeB"
    )
    assert rc == 0, out
    calls = job.calls_log()
    assert sorted(x for x in calls if x.startswith("rdzv-conf")) == [
        "rdzv-conf is_host=0",
        "rdzv-conf is_host=1",
    ]
    launches = [json.loads(x[len("trainer ") :]) for x in calls if x.startswith("trainer [")]
    assert len(launches) == 2
    for argv in launches:
        assert "--nnodes=2" in argv and "--rdzv-endpoint=nodeA:24242" in argv
    assert "[node 1 nodeB] host " in out and "[node 0 nodeA] host " in out
    # each node gives torchrun its SLURM name as the address the others reach it by
    assert sorted(x for x in calls if x.startswith("node-launch")) == [
        "node-launch nodeA nodeA:24242 local-addr nodeA",
        "node-launch nodeB nodeA:24242 local-addr nodeB",
    ]


def test_rendezvous_and_network_options_reach_the_nodes(tmp_path, config):
    job = FakeJob(
        tmp_path, config, "--nodes", "2", "--socket-ifname", "ib0", "--rdzv-host", "{node}-ib",
        "--rdzv-port", "29400", "--rdzv-timeout", "90",
    )  # fmt: skip
    assert "export GLOO_SOCKET_IFNAME=ib0" in job.script
    assert "export NCCL_SOCKET_IFNAME=ib0" in job.script
    rc, out = job.run(
        "finish", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="node[A-B]", FAKE_NODES="nodeA nodeB"
    )
    assert rc == 0, out
    calls = job.calls_log()
    assert sorted(x for x in calls if x.startswith("node-launch")) == [
        "node-launch nodeA nodeA-ib:29400 local-addr nodeA-ib",
        "node-launch nodeB nodeA-ib:29400 local-addr nodeB-ib",
    ]
    assert "--rdzv-endpoint=nodeA-ib:29400" in job.trainer_argv()
    assert "rendezvous nodeA-ib:29400 (store on nodeA, join timeout 90 s)" in out
    assert "GLOO_SOCKET_IFNAME=ib0" in out  # each node's line says which interface it uses
    assert "rdzv-timeout join_timeout=90" in calls


def test_a_node_that_fails_its_checks_ends_the_job_without_a_requeue(tmp_path, config):
    job = FakeJob(tmp_path, config)
    rc, out = job.run("finish", FAKE_NODE_CHECK_RC="2")
    assert rc == 2, out
    assert "trainer failed (exit 2)" in out and not job.requeued()
    assert not any(x.startswith("trainer [") for x in job.calls_log())


def test_run_stopped_before_the_end_is_requeued(tmp_path, config):
    """The trainer exits 0 at its --exit-duration-in-mins (or --exit-interval) with a checkpoint."""
    job = FakeJob(tmp_path, config)
    rc, out = job.run("stop-early")
    assert job.requeued(), out
    assert "trainer stopped at checkpoint iteration 5 of 10" in out


def test_usr1_is_forwarded_and_the_job_requeued(tmp_path, config):
    job = FakeJob(tmp_path, config)
    proc = job.start("wait-signal")
    ready = tmp_path / "ready"
    deadline = time.time() + 30
    while not ready.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert ready.exists(), "the fake trainer did not start"
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@grace does
    _, out = job.finish(proc)
    assert f"trainer got [{int(signal.SIGUSR1)}]" in job.calls_log()
    assert "USR1 (time limit or preemption notice)" in out
    assert job.requeued(), out
    assert "checkpoint iteration 7 of 10 (exit 0, USR1): requeueing" in out


def test_crash_is_not_requeued(tmp_path, config):
    job = FakeJob(tmp_path, config)
    rc, out = job.run("crash")
    assert rc == 1
    assert not job.requeued()
    assert "trainer failed (exit 1)" in out


def test_clean_exit_without_progress_is_not_requeued(tmp_path, config):
    job = FakeJob(tmp_path, config)
    job.checkpoint_at(5)
    rc, out = job.run("no-progress")
    assert rc == 1 and not job.requeued()
    assert "without a new checkpoint" in out
    assert "resuming from iteration 5" in out


def test_requeues_stop_at_max_restarts(tmp_path, config):
    job = FakeJob(tmp_path, config, "--max-restarts", "3")
    rc, out = job.run("stop-early", SLURM_RESTART_COUNT="3")
    assert rc == 1 and not job.requeued()
    assert "after 3 restarts (--max-restarts 3)" in out


def test_already_finished_run_does_not_start(tmp_path, config):
    job = FakeJob(tmp_path, config)
    job.checkpoint_at(10)
    rc, out = job.run("crash")
    assert rc == 0 and "already trained" in out
    assert not any(x.startswith("srun") for x in job.calls_log())


@pytest.mark.parametrize(
    "left, minutes",
    [
        ("UNLIMITED", None),
        ("1-02:03:04", "1561.1"),
        ("2:30", "1.0"),
        ("10:00", "8.0"),
        ("08:09:00", "487.0"),
    ],
)
def test_exit_duration_follows_the_time_left(tmp_path, config, left, minutes):
    job = FakeJob(tmp_path, config)
    rc, out = job.run("finish", FAKE_TIME_LEFT=left)
    assert rc == 0, out
    argv = job.trainer_argv()
    if minutes is None:
        assert "--exit-duration-in-mins" not in argv
    else:
        assert argv[argv.index("--exit-duration-in-mins") + 1] == minutes


def test_users_exit_duration_wins(tmp_path, config):
    out = dry_run("--preset", "tiny", "--config", str(config), "--", "--exit-duration-in-mins", "5")
    assert out.returncode == 0
    assert "EXIT_MARGIN_S=0 " in out.stdout
