"""Uneven pipeline stages through the CLI: 6 layers at PP=2 as 2 + 4
(--num-layers-in-first-pipeline-stage 2) train to the same losses as one process (the same
--seed gives the same initial weights at any layout)."""

from __future__ import annotations

import pytest

from tests.integration.trainer_helpers import (
    TINY,
    data_flags,
    default_data,
    run_subprocess,
    scalars,
)

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return default_data(tmp_path_factory)


def _losses(data, tb, *flags, nproc=1) -> dict[int, float]:
    argv = [*TINY, *data_flags(data), "--kv-sharing", "fusedkv", "--num-layers", "6",
            "--train-iters", "3", "--eval-iters", "0", "--tensorboard-dir", tb, *flags]  # fmt: skip
    proc = run_subprocess(argv, nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout, scalars(tb, "lm loss")


def test_uneven_stages_train_like_one_process(data, tmp_path):
    out, uneven = _losses(data, tmp_path / "pp2", "--pipeline-model-parallel-size", "2",
                          "--num-layers-in-first-pipeline-stage", "2", nproc=2)  # fmt: skip
    assert "pipeline boundary after layer 2" in out, out[-3000:]
    _, single = _losses(data, tmp_path / "pp1")
    assert sorted(uneven) == sorted(single) == [1, 2, 3]
    for step, loss in single.items():
        assert uneven[step] == pytest.approx(loss, rel=1e-5), (step, uneven, single)
