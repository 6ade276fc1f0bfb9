"""The trainer logs the planner's memory prediction for its own layout at start-up and, after
the first iterations, the measured peak against it (on CPU: buffers, optimizer tensors and the
peak bytes autograd holds for backward)."""

from __future__ import annotations

import re

import pytest

from tests.integration.trainer_helpers import TINY, data_flags, default_data, run_cli


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return default_data(tmp_path_factory)


def test_trainer_prints_predicted_and_measured_peak(data, capfd):
    """fusedkv, bf16, distributed optimizer, full recompute: the measured CPU peak is the
    predicted one to 0.5%."""
    extra = ["--use-distributed-optimizer", "--recompute-granularity", "full",
             "--recompute-method", "uniform", "--recompute-num-layers", "1"]  # fmt: skip
    argv = [
        *TINY,
        *data_flags(data),
        "--kv-sharing",
        "fusedkv",
        "--train-iters",
        "3",
        "--bf16",
        *extra,
    ]
    code, out, err = run_cli(argv, capfd)
    assert code == 0, err[-3000:]
    assert "> memory predicted by the planner (pipeline rank 0): peak" in out
    found = re.search(
        r"> memory after 2 iterations \(rank 0, the largest ratio\): measured ([0-9.]+) MiB "
        r"\(weights, gradient buffer, optimizer tensors \+ peak bytes saved for backward\), "
        r"predicted ([0-9.]+) MiB, ratio ([0-9.]+)",
        out,
    )
    assert found, out[-3000:]
    # bf16 on CPU: what the planner leaves out is the DDP buffers' padding and the loss mask
    assert float(found.group(3)) == pytest.approx(1.0, abs=0.005)
