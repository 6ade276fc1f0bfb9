"""Bad input through the CLI ends in one clear message and exit 2 on every rank, also when only
one rank meets it (a file missing on one node), and within seconds rather than after the
distributed timeout."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.conftest import free_port
from tests.integration.trainer_helpers import (
    REPO,
    TINY,
    cli_env,
    data_flags,
    default_data,
    run_subprocess,
)

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return default_data(tmp_path_factory)


def _one_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]
    assert len(lines) == 1, f"expected one error line, got {lines}\n{proc.stderr[-3000:]}"
    for needle in needles:
        assert needle in lines[0], lines[0]
    # torchrun prints its own ChildFailedError traceback; no worker may print one.
    assert f'File "{REPO / "fusedkv_megatron"}' not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


# Each rule has one owner (the library); the CLI reports its error once, naming the fix.
@pytest.mark.parametrize(
    "flags, needles",
    [
        (["--seq-length", "65", "--tensor-model-parallel-size", "2", "--sequence-parallel"],
         ["seq_length=65", "tensor_model_parallel_size=2 (sequence parallel)", "multiple of 2"]),
        (["--num-attention-heads", "3", "--kv-channels", "16", "--tensor-model-parallel-size", "2"],
         ["num_query_groups=3", "tensor_model_parallel_size=2", "TP size that divides 3"]),
        (["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2",
          "--global-batch-size", "12"],
         ["num_microbatches=3 does not fit the interleaved schedule", "use 4 microbatches"]),
        (["--pipeline-model-parallel-size", "2", "--num-layers-in-first-pipeline-stage", "5"],
         ["num_layers=4", "num_layers_in_first_pipeline_stage=5"]),
    ],
    ids=["seq-length-vs-sp", "heads-vs-tp", "interleaved-microbatches", "layers-over-stages"],
)  # fmt: skip
def test_config_error_on_every_rank_prints_once(data, flags, needles):
    proc = run_subprocess([*TINY, *data_flags(data), "--train-iters", "2", *flags], nproc=2)
    assert proc.returncode != 0
    _one_error(proc, *needles)


def _launch_rank(rank: int, port: int, argv: list[str]) -> subprocess.Popen:
    env = {**cli_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
           "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
    cmd = [sys.executable, "-m", "fusedkv_megatron.pretrain", *map(str, argv)]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def test_error_on_rank1_only_is_printed_by_rank1_and_stops_every_rank(data, tmp_path):
    """Each rank is its own "node": rank 1's tokenizer file is missing there. Rank 0 has its
    file and goes on to its first collective; it must not wait for the distributed timeout
    (10 minutes here)."""
    common = [*TINY, "--data-path", data["train_data_prefix"], "--train-iters", "3",
              "--distributed-timeout-minutes", "10"]  # fmt: skip
    missing = tmp_path / "node1" / "tokenizer.model"
    port = free_port()
    start = time.monotonic()
    procs = [
        _launch_rank(0, port, [*common, "--tokenizer-model", data["tokenizer_model"]]),
        _launch_rank(1, port, [*common, "--tokenizer-model", missing]),
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    elapsed = time.monotonic() - start
    codes = [p.returncode for p in procs]
    assert codes == [2, 2], f"exit codes {codes}\n--- rank 0 ---\n{outs[0][1][-3000:]}"
    rank1 = [ln for ln in outs[1][1].splitlines() if ln.startswith("error")]
    assert len(rank1) == 1 and "(rank 1, host" in rank1[0] and str(missing) in rank1[0], rank1
    rank0 = [ln for ln in outs[0][1].splitlines() if ln.startswith("error")]
    assert len(rank0) == 1 and "stopping: rank 1" in rank0[0], outs[0][1][-3000:]
    assert "Traceback" not in outs[0][1] + outs[1][1]
    assert elapsed < 120, f"the run took {elapsed:.0f} s to stop"
