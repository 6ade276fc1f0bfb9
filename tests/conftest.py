"""Shared fixtures: a one-process gloo group with Megatron's parallel state, and a torchrun
launcher for multi-process tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session", autouse=True)
def megatron_patches():
    """Megatron's CPU patches and upstream fixes, applied once before any test runs (importing
    fusedkv_megatron applies nothing). Torchrun workers and subprocesses apply them themselves."""
    from fusedkv_megatron import compat

    compat.apply()


@pytest.fixture(scope="session")
def dist_single():
    """torch.distributed initialised once per pytest process (gloo, world size 1)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
    yield


@pytest.fixture
def megatron_tp1(dist_single):
    """Megatron's parallel state at TP=PP=1 with the model-parallel RNG seeded."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)
    yield
    ps.destroy_model_parallel()


def run_torchrun(script: Path, nproc: int, *args: str, timeout: int = 600) -> str:
    """Run `script` under torchrun with `nproc` gloo processes; return its stdout."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        str(script),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(
            f"torchrun {script.name} failed (rc={proc.returncode})\n"
            f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc.stdout


def read_json(path: Path):
    return json.loads(Path(path).read_text())
