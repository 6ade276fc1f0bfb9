"""fusedkv-pretrain with --context-parallel-size 2 (two gloo processes under torchrun) trains with
the same losses as CP=1 from the same checkpoint, with the distributed optimizer: a CP=1
checkpoint resumes at CP=2, and the CP=2 checkpoint resumes at CP=1 where the CP=1 run would
be, and the Hugging Face export reads the CP checkpoint. Packed documents (--reset-attention-mask --reset-position-ids) give the same losses at
CP=2 as at CP=1 (document masks and the load-balanced split together)."""

from __future__ import annotations

import pytest

from fusedkv_megatron import checkpoint_format as cf
from fusedkv_megatron.hf.convert import megatron_to_hf
from tests.integration.trainer_helpers import (
    TINY,
    data_flags,
    default_data,
    run_cli,
    run_subprocess,
    scalars,
)

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return default_data(tmp_path_factory)


def _same(got: dict, want: dict, steps):
    for step in steps:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=0), (step, got, want)


def test_cp2_trains_like_cp1_from_the_same_checkpoint_and_back(data, tmp_path, capfd, dist_single):
    flags = [*TINY, *data_flags(data), "--kv-sharing", "fusedkv", "--use-distributed-optimizer",
             "--eval-iters", "0"]  # fmt: skip
    a, b = tmp_path / "cp1", tmp_path / "cp2"
    code, _, err = run_cli([*flags, "--train-iters", "2", "--save", a], capfd)
    assert code == 0, err[-3000:]
    code, _, err = run_cli([*flags, "--train-iters", "5", "--load", a,
                            "--tensorboard-dir", tmp_path / "tb-ref"], capfd)  # fmt: skip
    assert code == 0, err[-3000:]
    ref = scalars(tmp_path / "tb-ref", "lm loss")

    proc = run_subprocess(
        [*flags, "--train-iters", "4", "--load", a, "--save", b, "--context-parallel-size", "2",
         "--tensorboard-dir", tmp_path / "tb-cp2"],
        nproc=2,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "CP 2, DP 1" in proc.stdout
    assert "SDPA with CP 2 (K/V all-gathered over the CP group)" in proc.stdout
    _same(scalars(tmp_path / "tb-cp2", "lm loss"), ref, (3, 4))
    info = cf.read_run_info(cf.latest_checkpoint_dir(b))
    assert info["parallel"]["context_parallel_size"] == 2 and info["iteration"] == 4
    # The Hugging Face export reads a CP-trained checkpoint like any other (nothing to undo).
    hf = megatron_to_hf(b, tmp_path / "hf", no_tokenizer=True)
    assert (hf / "config.json").is_file()

    code, _, err = run_cli([*flags, "--train-iters", "5", "--load", b,
                            "--tensorboard-dir", tmp_path / "tb-back"], capfd)  # fmt: skip
    assert code == 0, err[-3000:]
    _same(scalars(tmp_path / "tb-back", "lm loss"), ref, (5,))


def test_packed_documents_under_cp2_train_like_cp1(data, tmp_path, capfd, dist_single):
    flags = [*TINY, *data_flags(data), "--kv-sharing", "fusedkv_lite", "--train-iters", "2",
             "--eval-iters", "0", "--reset-attention-mask", "--reset-position-ids"]  # fmt: skip
    code, _, err = run_cli([*flags, "--tensorboard-dir", tmp_path / "tb1"], capfd)
    assert code == 0, err[-3000:]
    proc = run_subprocess(
        [*flags, "--context-parallel-size", "2", "--tensorboard-dir", tmp_path / "tb2"], nproc=2
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    _same(scalars(tmp_path / "tb2", "lm loss"), scalars(tmp_path / "tb1", "lm loss"), (1, 2))
