"""Shared pieces of the trainer tests: the embedded data, a tiny model's flags, running the CLI
in this process or as subprocesses, and reading TensorBoard scalars back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# A tiny model: fast on one CPU thread, still every code path of the real thing.
TINY = [
    "--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "128",
    "--num-attention-heads", "4", "--seq-length", "64", "--micro-batch-size", "4",
    "--global-batch-size", "8", "--lr", "3e-3", "--min-lr", "3e-4", "--log-interval", "1",
    "--eval-interval", "1000", "--eval-iters", "1", "--split", "98,2,0", "--seed", "7",
]  # fmt: skip


SHAPE_FLAGS = ("--num-layers", "--hidden-size", "--ffn-hidden-size", "--num-attention-heads",
               "--seq-length")  # fmt: skip


def without(flags: list, *names: str) -> list:
    """`flags` without the named flags and their values (one value each)."""
    out, skip = [], False
    for item in flags:
        if skip:
            skip = False
        elif item in names:
            skip = True
        else:
            out.append(item)
    return out


def default_data(tmp_path_factory) -> dict:
    """The embedded corpus, tokenized once per test session (prepare_default_data reuses it)."""
    from fusedkv_megatron.data.datasets import prepare_default_data

    out = tmp_path_factory.getbasetemp() / "trainer_default_data"
    return prepare_default_data(str(out), vocab_size=2000)


def data_flags(data: dict) -> list[str]:
    return ["--data-path", data["train_data_prefix"], "--tokenizer-model", data["tokenizer_model"]]


def run_cli(argv: list[str], capfd) -> tuple[int, str, str]:
    """fusedkv-pretrain in this process (world size 1); returns (exit code, stdout, stderr)."""
    from fusedkv_megatron.pretrain import main

    capfd.readouterr()
    code = main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return code, out, err


def cli_env() -> dict:
    """This environment without the test process's own rendezvous variables."""
    dist = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    env = {k: v for k, v in os.environ.items() if k not in dist}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def cli_command(argv: list[str], nproc: int = 1, port: int | None = None) -> list[str]:
    """The command line of fusedkv-pretrain, under torchrun when nproc > 1."""
    if nproc == 1:
        return [sys.executable, "-m", "fusedkv_megatron.pretrain", *map(str, argv)]
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(port),
        "-m", "fusedkv_megatron.pretrain", *map(str, argv),
    ]  # fmt: skip


def run_subprocess(
    argv: list[str], nproc: int = 1, timeout: int = 600
) -> subprocess.CompletedProcess:
    from tests.conftest import free_port

    cmd = cli_command(argv, nproc, free_port())
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=cli_env(),
                          cwd=REPO)  # fmt: skip


def scalars(tb_dir, tag: str) -> dict[int, float]:
    """TensorBoard scalar `tag` as {step: value}, read with tensorboard's EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def scalar_tags(tb_dir) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return acc.Tags()["scalars"]
