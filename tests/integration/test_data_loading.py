"""fusedkv-pretrain with DataLoader workers reads the same samples as without, also across a
resume, and a SIGTERM to every process of the job (workers included, as SLURM sends it) still
saves and exits 0; with --fp16 the log carries the loss scale. World size 1, CPU."""

from __future__ import annotations

import os
import re
import signal
import subprocess

import pytest

from fusedkv_megatron import checkpoint_format as cf
from tests.integration.trainer_helpers import (
    REPO,
    TINY,
    cli_command,
    cli_env,
    data_flags,
    default_data,
    run_cli,
    scalars,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return default_data(tmp_path_factory)


def test_two_workers_and_a_resume_give_the_losses_of_zero_workers(data, tmp_path, capfd):
    """6 iterations read in the training process == 3 + resume + 3 with 2 workers each (which
    read ahead past the exit), bit for bit."""
    flags = [*TINY, *data_flags(data), "--kv-sharing", "fusedkv", "--train-iters", "6"]
    code, _, err = run_cli([*flags, "--num-workers", "0", "--tensorboard-dir", tmp_path / "tb0"],
                           capfd)  # fmt: skip
    assert code == 0, err[-3000:]
    ckpt = tmp_path / "ckpt"
    code, out, err = run_cli([*flags, "--num-workers", "2", "--save", ckpt, "--exit-interval", "3",
                              "--tensorboard-dir", tmp_path / "tb1"], capfd)  # fmt: skip
    assert code == 0 and cf.read_latest_iteration(ckpt) == 3, err[-3000:]
    code, out, err = run_cli([*flags, "--num-workers", "2", "--load", ckpt,
                              "--tensorboard-dir", tmp_path / "tb2"], capfd)  # fmt: skip
    assert code == 0 and "training from iteration 3 to 6" in out, err[-3000:]
    for tag in ("lm loss", "grad-norm"):
        want = scalars(tmp_path / "tb0", tag)
        got = {**scalars(tmp_path / "tb1", tag), **scalars(tmp_path / "tb2", tag)}
        assert got == want and sorted(want) == [1, 2, 3, 4, 5, 6], tag


def test_fp16_logs_the_loss_scale(data, tmp_path, capfd):
    """The dynamic loss scaler's value in the log and TensorBoard; it halves on every
    iteration it skips for overflowing gradients."""
    argv = [*TINY, *data_flags(data), "--train-iters", "3", "--fp16", "--eval-iters", "0",
            "--tensorboard-dir", tmp_path / "tb"]  # fmt: skip
    code, out, err = run_cli(argv, capfd)
    assert code == 0, err[-3000:]
    scale = scalars(tmp_path / "tb", "loss-scale")
    skipped = scalars(tmp_path / "tb", "skipped-iterations")
    logged = [float(x) for x in re.findall(r"loss scale: ([0-9.]+) \|", out)]
    assert logged == [scale[i] for i in (1, 2, 3)]
    for i in (2, 3):
        halvings = skipped[i] - skipped[i - 1]
        assert scale[i] == scale[i - 1] / 2**halvings
    assert all(v > 1.0 and float(v).is_integer() for v in scale.values())


def test_sigterm_to_the_workers_too_saves_and_exits_0(data, tmp_path):
    """SLURM signals every process of a job step: the loader's workers ignore it, so the
    trainer finishes the iteration, saves and exits as it does without workers."""
    ckpt = tmp_path / "ckpt"
    cmd = cli_command([*TINY, *data_flags(data), "--train-iters", "2000", "--num-workers", "2",
                       "--eval-iters", "0", "--save", ckpt])  # fmt: skip
    errors = open(tmp_path / "stderr.txt", "w+")  # a file: an unread pipe could fill and block
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors, text=True,
                            env=cli_env(), cwd=REPO, start_new_session=True)  # fmt: skip
    try:
        for line in proc.stdout:
            if line.startswith(" iteration        3/"):
                break
        os.killpg(proc.pid, signal.SIGTERM)  # the trainer and its loader workers
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        errors.seek(0)
        err = errors.read()
        errors.close()
    assert proc.returncode == 0, err[-3000:]
    stopped = cf.read_latest_iteration(ckpt)
    assert stopped is not None and f"exiting at iteration {stopped}: SIGTERM" in out
