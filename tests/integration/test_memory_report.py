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


@pytest.mark.parametrize("extra", [[], ["--recompute-granularity", "full", "--recompute-method",
                                        "uniform", "--recompute-num-layers", "1"]])  # fmt: skip
def test_trainer_prints_predicted_and_measured_peak(extra, data, capfd):
    argv = [*TINY, *data_flags(data), "--kv-sharing", "fusedkv", "--train-iters", "3", *extra]
    code, out, err = run_cli(argv, capfd)
    assert code == 0, err[-3000:]
    assert "> memory predicted by the planner (pipeline rank 0): peak" in out
    found = re.search(
        r"> memory after 2 iterations \(rank 0, the largest ratio\): measured ([0-9.]+) GiB "
        r"\(buffers \+ optimizer tensors \+ peak bytes saved for backward\), predicted "
        r"([0-9.]+) GiB, ratio ([0-9.]+)",
        out,
    )
    assert found, out[-3000:]
    # padding of the DDP buffers is the only thing the planner leaves out here
    assert float(found.group(3)) == pytest.approx(1.0, abs=0.02)
