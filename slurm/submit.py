#!/usr/bin/env python3
"""Render and submit a FusedKV pretraining job to SLURM.

    python slurm/submit.py --preset 1.5b --partition gpu --account myproj
    python slurm/submit.py --preset tiny --nodes 1 --dry-run            # print the script only
    python slurm/submit.py --preset 332m --kv-sharing fusedkv-lite -- --data-path data/web_text_document

Arguments after `--` go to the trainer (fusedkv-pretrain), after the preset's. Each run lives in
--run-dir (default runs/slurm/<job name>): checkpoints/ and tensorboard/. Submitting again with
the same run dir resumes from its latest checkpoint. Standard library only, so it runs on a login
node without the project's environment; see docs/slurm.md.

Before a GPU job is rendered, the memory planner (fusedkv_megatron.planner, plain Python: no torch
needed) predicts its per-GPU peak and throughput; the prediction goes into the script's header,
and a layout predicted not to fit is refused with layouts that would (--ignore-memory-check
submits it anyway). Where the planner cannot be imported (no PyYAML, say) submit.py says so
and submits unchecked. See docs/planner.md.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_check import MemoryCheckError, memory_check, preset_table  # noqa: E402
from presets import PRESETS, Preset  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = Path(__file__).resolve().parent / "job.sbatch.in"
TRAINER = ["-m", "fusedkv_megatron.pretrain"]
# The launcher owns these trainer flags: the run directory decides them.
OWNED_FLAGS = ("--save", "--load", "--tensorboard-dir")


class SubmitError(ValueError):
    """A bad option value; the message names the value, the rule and the fix."""


def parse_slurm_time(text: str) -> int:
    """sbatch --time formats -> seconds: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise SubmitError(
            f"--time {text!r} is not a SLURM time; use HH:MM:SS, D-HH:MM:SS or minutes "
            "(e.g. --time 24:00:00)"
        )
    days, a, b, c = m.groups()
    parts = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:  # D-H, D-H:M, D-H:M:S
        h, mnt, s = (parts + [0, 0])[:3]
        return ((int(days) * 24 + h) * 60 + mnt) * 60 + s
    if len(parts) == 1:  # minutes
        return parts[0] * 60
    if len(parts) == 2:  # minutes:seconds
        return parts[0] * 60 + parts[1]
    return (parts[0] * 60 + parts[1]) * 60 + parts[2]


def flag_value(argv: list[str], flag: str) -> str | None:
    """The value of the last `flag V` or `flag=V` in argv (argparse: the last one wins)."""
    value = None
    for i, tok in enumerate(argv):
        if tok == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif tok.startswith(flag + "="):
            value = tok.split("=", 1)[1]
    return value


def _int_flag(argv: list[str], flag: str, default: int) -> int:
    value = flag_value(argv, flag)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise SubmitError(f"trainer argument {flag} {value!r} is not an integer") from None


def config_train_iters(config: Path) -> int | None:
    """train_iters from a YAML config (flat mapping of flag names), or None if it has none."""
    text = config.read_text()
    try:
        import yaml

        data = yaml.safe_load(text) or {}
        value = next(
            (v for k, v in data.items() if str(k).replace("-", "_") == "train_iters"), None
        )
    except ImportError:  # a login node without PyYAML: the configs are flat `key: value` files
        m = re.search(r"^train[_-]iters\s*:\s*([0-9_]+)\s*(#.*)?$", text, re.MULTILINE)
        value = m.group(1) if m else None
    return None if value is None else int(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="slurm/submit.py",
        description="Render an sbatch script for a FusedKV pretraining run and submit it.",
        epilog="Arguments after -- are passed to fusedkv-pretrain. Presets: "
        + "; ".join(f"{n}: {_layout(pr, pr.nodes)}" for n, pr in PRESETS.items()),
    )
    p.add_argument("--preset", default=None, help=f"one of {', '.join(PRESETS)} (required)")
    p.add_argument(
        "--preset-table",
        action="store_true",
        help="print the planner's predictions for every GPU preset on 80 GB (H100) and 141 GB "
        "(H200) GPUs as a Markdown table (docs/planner.md) and exit",
    )
    p.add_argument("--nodes", type=int, default=None, help="default: the preset's")
    p.add_argument(
        "--gpus-per-node", type=int, default=None, help="default: the preset's (tiny: 0)"
    )
    p.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        help="trainer processes per node (default: one per GPU; tiny: 2)",
    )
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--time", default=None, help="time limit, HH:MM:SS (default: the preset's)")
    p.add_argument(
        "--container",
        default=None,
        metavar="IMAGE",
        help="run inside IMAGE with pyxis/enroot (srun --container-image)",
    )
    p.add_argument(
        "--container-mounts",
        default=None,
        help="extra pyxis mounts SRC:DST[,...]; the repo and run dir are mounted",
    )
    p.add_argument("--kv-sharing", default=None, help="variant (default: the config's)")
    p.add_argument("--config", default=None, help="default: examples/configs/<preset>.yaml")
    p.add_argument("--job-name", default=None, help="default: fusedkv-<preset>[-<variant>]")
    p.add_argument(
        "--run-dir",
        default=None,
        help="checkpoints and tensorboard (default: runs/slurm/<job name>)",
    )
    p.add_argument(
        "--log-dir",
        default=str(REPO / "slurm" / "logs"),
        help="where SLURM writes <job name>-<job id>.out (default: slurm/logs)",
    )
    p.add_argument(
        "--python",
        default=None,
        help="python on the compute nodes (default: .venv/bin/python of this repo, "
        "'python' in a container)",
    )
    p.add_argument(
        "--signal-grace",
        type=int,
        default=None,
        metavar="SECONDS",
        help="USR1 this long before the time limit (default: the preset's)",
    )
    p.add_argument(
        "--exit-margin",
        type=int,
        default=None,
        metavar="SECONDS",
        help="the trainer stops this long before the time limit; 0 disables "
        "(default: the preset's)",
    )
    p.add_argument(
        "--max-restarts", type=int, default=50, help="requeue at most this many times (default 50)"
    )
    p.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="OPTION",
        help="an extra sbatch option, e.g. --sbatch=--qos=high (repeatable)",
    )
    p.add_argument(
        "--gpu-memory",
        type=float,
        default=80.0,
        metavar="GB",
        help="memory per GPU in GiB, for the memory check (default 80: the presets' H100/A100)",
    )
    p.add_argument(
        "--gpu-kind", default="H100", help="GPU for the throughput estimate (default H100)"
    )
    p.add_argument(
        "--gemm-efficiency",
        type=float,
        default=0.6,
        help="share of the bf16 peak a large GEMM sustains, for the estimate (default 0.6; "
        "docs/planner.md)",
    )
    p.add_argument(
        "--ignore-memory-check",
        action="store_true",
        help="submit even if the planner predicts the layout does not fit",
    )
    add_multinode_flags(p)
    p.add_argument("--trainer-module", default=TRAINER[1], help=argparse.SUPPRESS)
    p.add_argument("--dry-run", action="store_true", help="print the script instead of submitting")
    p.add_argument("--parsable", action="store_true", help="print only the job id")
    return p


# --- multi-node launch: rendezvous and network (docs/slurm.md, "Several nodes") ---
DEFAULT_RDZV_TIMEOUT_S = 600  # torchrun's own join timeout


def add_multinode_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("several nodes (rendezvous and network)")
    g.add_argument(
        "--socket-ifname",
        default=None,
        metavar="IFACE",
        help="the network interface the nodes talk over: sets GLOO_SOCKET_IFNAME and "
        "NCCL_SOCKET_IFNAME (e.g. eth0, ib0). Needed where a node's hostname resolves to a "
        "loopback address; the job checks that and names this flag",
    )
    g.add_argument(
        "--rdzv-host",
        default="{node}",
        metavar="NAME",
        help="the rendezvous host as every node resolves it; {node} is the first node of the "
        "allocation (default: {node}; e.g. {node}-ib or {node}.cluster.example)",
    )
    g.add_argument(
        "--rdzv-port",
        type=int,
        default=None,
        metavar="PORT",
        help="the rendezvous port on the first node (default: 20000 + job id mod 20000)",
    )
    g.add_argument(
        "--rdzv-timeout",
        type=int,
        default=DEFAULT_RDZV_TIMEOUT_S,
        metavar="SECONDS",
        help="how long the nodes wait for each other at the rendezvous before the job fails "
        f"(default {DEFAULT_RDZV_TIMEOUT_S}; raise it where nodes start slowly, e.g. "
        "container pulls)",
    )


def check_multinode(opts: argparse.Namespace) -> None:
    if opts.socket_ifname is not None and not re.fullmatch(
        r"[A-Za-z0-9_.:@-]+(,[A-Za-z0-9_.:@-]+)*", opts.socket_ifname
    ):
        raise SubmitError(
            f"--socket-ifname {opts.socket_ifname!r} is not an interface name (or a "
            "comma-separated list of them), e.g. eth0 or ib0"
        )
    host = opts.rdzv_host
    if not re.fullmatch(r"[A-Za-z0-9._-]+", host.replace("{node}", "node")):
        raise SubmitError(
            f"--rdzv-host {host!r}: use a host name, where {{node}} stands for the first node "
            "(e.g. {node}-ib)"
        )
    if opts.rdzv_port is not None and not 1024 <= opts.rdzv_port <= 65535:
        raise SubmitError(f"--rdzv-port {opts.rdzv_port} must be in 1024-65535")
    if opts.rdzv_timeout < 1:
        raise SubmitError(f"--rdzv-timeout {opts.rdzv_timeout} must be >= 1 second")


def multinode_env(opts: argparse.Namespace) -> list[str]:
    if opts.socket_ifname is None:
        return []
    q = shlex.quote(opts.socket_ifname)
    return [
        "# --socket-ifname: gloo and NCCL's bootstrap use this interface between the nodes.",
        f"export GLOO_SOCKET_IFNAME={q}",
        f"export NCCL_SOCKET_IFNAME={q}",
    ]


def multinode_values(opts: argparse.Namespace) -> dict[str, str]:
    return {
        "RDZV_HOST": shlex.quote(opts.rdzv_host),
        "RDZV_PORT": "" if opts.rdzv_port is None else str(opts.rdzv_port),
        "RDZV_TIMEOUT": str(opts.rdzv_timeout),
    }


# --- end of multi-node launch ---


def _layout(preset: Preset, nodes: int, gpus: int | None = None) -> str:
    gpus = preset.gpus_per_node if gpus is None else gpus
    tp, pp, cp = preset.tensor_parallel, preset.pipeline_parallel, preset.context_parallel
    cp_text = f" CP={cp}" if cp > 1 else ""
    if gpus == 0:
        procs = preset.procs_per_node * nodes
        return f"{nodes} node(s) x {preset.procs_per_node} CPU processes, TP={tp} PP={pp}{cp_text} DP={procs // (tp * pp * cp)}"
    return f"{nodes} node(s) x {gpus} GPUs, TP={tp} PP={pp}{cp_text} DP={nodes * gpus // (tp * pp * cp)}"


def resolve(opts: argparse.Namespace, extra: list[str]) -> dict:
    """Check the options against the preset and return what the template needs."""
    if opts.preset is None:
        raise SubmitError(f"--preset is required: one of {', '.join(PRESETS)}")
    if opts.preset not in PRESETS:
        raise SubmitError(
            f"--preset {opts.preset!r} is unknown; choose one of {', '.join(PRESETS)}"
        )
    preset = PRESETS[opts.preset]
    nodes = preset.nodes if opts.nodes is None else opts.nodes
    if nodes < 1:
        raise SubmitError(f"--nodes {nodes} must be >= 1")
    gpus = preset.gpus_per_node if opts.gpus_per_node is None else opts.gpus_per_node
    if gpus < 0:
        raise SubmitError(f"--gpus-per-node {gpus} must be >= 0 (0 runs on CPU under gloo)")
    nproc = opts.nproc_per_node or (gpus if gpus else preset.procs_per_node or 1)
    if nproc < 1:
        raise SubmitError(f"--nproc-per-node {nproc} must be >= 1")
    if gpus and nproc > gpus:
        raise SubmitError(
            f"--nproc-per-node {nproc} exceeds --gpus-per-node {gpus}: one process per GPU"
        )
    if flag_value(extra, "--config") is not None:
        raise SubmitError(
            "trainer argument --config: put --config before -- (submit.py reads train_iters "
            "from it and passes it to the trainer)"
        )
    for flag in OWNED_FLAGS:
        if flag_value(extra, flag) is not None:
            raise SubmitError(
                f"trainer argument {flag} is set by the launcher ({opts.run_dir or 'the run dir'}/"
                "checkpoints, .../tensorboard); choose the place with --run-dir instead"
            )
    tp = _int_flag(extra, "--tensor-model-parallel-size", preset.tensor_parallel)
    pp = _int_flag(extra, "--pipeline-model-parallel-size", preset.pipeline_parallel)
    cp = _int_flag(extra, "--context-parallel-size", preset.context_parallel)
    world = nodes * nproc
    if tp < 1 or pp < 1 or cp < 1 or world % (tp * pp * cp):
        raise SubmitError(
            f"{nodes} node(s) x {nproc} processes = {world} is not divisible by tensor parallel "
            f"{tp} x pipeline parallel {pp} x context parallel {cp}; change --nodes/"
            "--gpus-per-node or pass -- --tensor-model-parallel-size N "
            "--pipeline-model-parallel-size M --context-parallel-size C"
        )
    if tp > nproc:
        print(
            f"warning: TP={tp} spans nodes ({nproc} processes per node): tensor parallel "
            "traffic will cross the network",
            file=sys.stderr,
        )

    time_s = parse_slurm_time(opts.time or preset.time)
    grace = preset.signal_grace_s if opts.signal_grace is None else opts.signal_grace
    margin = preset.exit_margin_s if opts.exit_margin is None else opts.exit_margin
    if grace < 0 or margin < 0:
        raise SubmitError(f"--signal-grace {grace} and --exit-margin {margin} must be >= 0")
    if flag_value(extra, "--exit-duration-in-mins") is not None:
        margin = 0  # the user's own value wins
    if time_s <= max(grace, margin) + 60:
        raise SubmitError(
            f"--time {opts.time or preset.time} ({time_s} s) leaves no time to train: it must "
            f"exceed the exit margin ({margin} s) and the signal grace ({grace} s) by a minute; "
            "raise --time or lower --exit-margin/--signal-grace"
        )
    if opts.max_restarts < 0:
        raise SubmitError(f"--max-restarts {opts.max_restarts} must be >= 0")
    check_multinode(opts)

    config = (
        Path(opts.config) if opts.config else REPO / "examples" / "configs" / f"{preset.name}.yaml"
    )
    config = config.resolve()
    if not config.is_file():
        raise SubmitError(f"config {config} not found; pass --config FILE")
    iters = flag_value(extra, "--train-iters")
    train_iters = int(iters) if iters is not None else config_train_iters(config)
    if train_iters is None or train_iters < 1:
        raise SubmitError(
            f"{config} sets no train_iters; pass it to the trainer: -- --train-iters N "
            "(the job needs it to tell a finished run from a stopped one)"
        )

    if gpus:
        try:
            plan_lines = memory_check(opts, config, nodes, nproc, tp, pp, extra)
        except MemoryCheckError as e:
            raise SubmitError(str(e)) from None
    else:
        plan_lines = ["memory check: a CPU run, not planned"]

    name = opts.job_name or "-".join(
        ["fusedkv", preset.name] + ([opts.kv_sharing] if opts.kv_sharing else [])
    )
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise SubmitError(f"--job-name {name!r}: use letters, digits, '.', '_' and '-' only")
    run_dir = Path(opts.run_dir or REPO / "runs" / "slurm" / name).resolve()
    log_dir = Path(opts.log_dir).resolve()
    python = opts.python or ("python" if opts.container else _default_python())

    trainer_args = ["--config", str(config)]
    if opts.kv_sharing:
        trainer_args += ["--kv-sharing", opts.kv_sharing]
    trainer_args += [
        "--tensor-model-parallel-size",
        str(tp),
        "--pipeline-model-parallel-size",
        str(pp),
    ]
    if gpus == 0:
        trainer_args += ["--distributed-backend", "gloo"]
    trainer_args += extra

    return dict(
        preset=preset,
        nodes=nodes,
        gpus=gpus,
        nproc=nproc,
        tp=tp,
        pp=pp,
        dp=world // (tp * pp),
        time=opts.time or preset.time,
        grace=grace,
        margin=margin,
        train_iters=train_iters,
        name=name,
        run_dir=run_dir,
        log_dir=log_dir,
        python=python,
        trainer_args=trainer_args,
        plan_lines=plan_lines,
    )


def _default_python() -> str:
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def render(opts: argparse.Namespace, extra: list[str]) -> tuple[str, dict]:
    """The sbatch script for these options, and the resolved values."""
    r = resolve(opts, extra)
    q = shlex.quote
    sb = [
        f"--job-name={r['name']}",
        f"--nodes={r['nodes']}",
        "--ntasks-per-node=1",
    ]
    if r["gpus"]:
        sb += [f"--gpus-per-node={r['gpus']}", "--exclusive", "--mem=0"]
    else:
        sb += [f"--cpus-per-task={r['nproc']}"]
    sb += [f"--time={r['time']}"]
    if opts.partition:
        sb.append(f"--partition={opts.partition}")
    if opts.account:
        sb.append(f"--account={opts.account}")
    sb += [
        f"--output={r['log_dir']}/%x-%j.out",
        "--open-mode=append",
        "--requeue",
        f"--signal=B:USR1@{r['grace']}",
        f"--chdir={REPO}",
    ]
    sb += opts.sbatch
    srun_extra: list[str] = []
    if opts.container:
        mounts = [f"{REPO}:{REPO}"]
        if not r["run_dir"].is_relative_to(REPO):
            mounts.append(f"{r['run_dir']}:{r['run_dir']}")
        if opts.container_mounts:
            mounts.append(opts.container_mounts)
        srun_extra = [
            f"--container-image={opts.container}",
            f"--container-mounts={','.join(mounts)}",
            f"--container-workdir={REPO}",
        ]

    if r["gpus"]:
        env = [
            "# NCCL and CUDA conventions for Megatron; values already in the environment win.",
            "# Init hangs: NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,ENV, and set NCCL_SOCKET_IFNAME",
            "# to the cluster network (not docker0/lo) if the nodes pick the wrong interface.",
            'export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"  # TP comm overlap ordering',
            'export TORCH_NCCL_AVOID_RECORD_STREAMS="${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}"',
            'export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"',
        ]
    else:
        env = [
            "# A CPU run (gloo): hide any GPU so every rank takes the CPU path.",
            'export CUDA_VISIBLE_DEVICES=""',
        ]
    env += multinode_env(opts)
    env.append("# Triton's kernel cache goes on node-local disk (see NODE_SCRIPT): shared file")
    env.append("# systems make its many small files slow and racy across nodes.")

    summary = (
        f"preset {r['preset'].name}: {r['nodes']} node(s) x {r['nproc']} "
        f"{'GPUs' if r['gpus'] else 'CPU processes'}, TP={r['tp']} PP={r['pp']} DP={r['dp']}"
    )
    summary = "\n#   ".join([summary, *r["plan_lines"]])
    values = {
        "SUMMARY": summary,
        "GRACE": str(r["grace"]),
        "SBATCH_LINES": "\n".join(f"#SBATCH {line}" for line in sb),
        "REPO": q(str(REPO)),
        "RUN_DIR": q(str(r["run_dir"])),
        "TRAIN_ITERS": str(r["train_iters"]),
        "EXIT_MARGIN_S": str(r["margin"]),
        "MAX_RESTARTS": str(opts.max_restarts),
        "NPROC_PER_NODE": str(r["nproc"]),
        "PYTHON": q(r["python"]),
        "TRAINER": " ".join(q(x) for x in ["-m", opts.trainer_module]),
        "TRAINER_ARGS": " ".join(q(x) for x in r["trainer_args"]),
        "SRUN_EXTRA": " ".join(q(x) for x in srun_extra),
        "ENV_EXPORTS": "\n".join(env),
        **multinode_values(opts),
    }
    text = TEMPLATE.read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    left = re.findall(r"\{\{[A-Z_]+\}\}", text)
    assert not left, f"template placeholders without a value: {left}"
    return text, r


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    opts = build_parser().parse_args(argv)
    try:
        if opts.preset_table:
            print(preset_table(opts.gemm_efficiency))
            return 0
        script, r = render(opts, extra)
    except (SubmitError, MemoryCheckError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if opts.dry_run:
        sys.stdout.write(script)
        return 0
    if shutil.which("sbatch") is None:
        print(
            "error: sbatch not found: run this on a SLURM login node, or use --dry-run to "
            "see the script",
            file=sys.stderr,
        )
        return 2
    r["log_dir"].mkdir(parents=True, exist_ok=True)
    r["run_dir"].mkdir(parents=True, exist_ok=True)
    path = r["run_dir"] / "job.sbatch"
    path.write_text(script)
    proc = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        print(
            f"error: sbatch {path} failed (exit {proc.returncode}):\n{proc.stderr.strip()}",
            file=sys.stderr,
        )
        return proc.returncode or 1
    job_id = proc.stdout.strip().split(";")[0]
    if opts.parsable:
        print(job_id)
        return 0
    print(
        f"submitted job {job_id}: {r['name']}, {r['nodes']} node(s), TP={r['tp']} PP={r['pp']} DP={r['dp']}"
    )
    print(f"  script      {path}")
    print(f"  log         {r['log_dir']}/{r['name']}-{job_id}.out")
    for line in r["plan_lines"]:
        print(f"  {line}")
    print(f"  checkpoints {r['run_dir']}/checkpoints")
    print(f"  tensorboard tensorboard --logdir {r['run_dir']}/tensorboard")
    return 0


if __name__ == "__main__":
    sys.exit(main())
