"""fusedkv-pretrain across processes: a checkpoint saved at TP=2 x PP=2 (4 gloo processes under
torchrun) loads at TP=1 x PP=1 with the same validation loss and keeps training; SIGTERM saves
and exits 0; a process killed in the middle of a save leaves the previous checkpoint as the
latest, and the next run resumes from it."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from fusedkv_megatron import checkpoint_format as cf
from fusedkv_megatron.training.signals import ExitSignalHandler
from tests.integration.trainer_helpers import (
    REPO,
    TINY,
    cli_command,
    cli_env,
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


def test_checkpoint_reshards_from_tp2_pp2_to_tp1_pp1(data, tmp_path, capfd, dist_single):
    flags = [*TINY, *data_flags(data), "--kv-sharing", "fusedkv", "--use-distributed-optimizer",
             "--eval-iters", "2"]  # fmt: skip
    ckpt = tmp_path / "ckpt"
    # The optimizer's TP/PP-reshardable format is asked for (the default reshards over DP only).
    proc = run_subprocess(
        [*flags, "--train-iters", "3", "--tensor-model-parallel-size", "2",
         "--pipeline-model-parallel-size", "2", "--save", ckpt, "--tensorboard-dir", tmp_path / "tb4",
         "--dist-ckpt-optim-fully-reshardable"],
        nproc=4,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "pipeline boundary after layer 2" in proc.stdout  # start-up report of PP bytes
    info = cf.read_run_info(cf.latest_checkpoint_dir(ckpt))
    assert info["parallel"]["tensor_model_parallel_size"] == 2
    assert info["parallel"]["pipeline_model_parallel_size"] == 2
    saved_val = scalars(tmp_path / "tb4", "validation/lm loss")[3]

    code, out, err = run_cli([*flags, "--train-iters", "3", "--load", ckpt, "--skip-train",
                              "--tensorboard-dir", tmp_path / "tb1"], capfd)  # fmt: skip
    assert code == 0, err[-3000:]
    loaded_val = scalars(tmp_path / "tb1", "validation/lm loss")[3]
    # Same weights; only the order of float32 sums differs between TP=2 and TP=1.
    assert loaded_val == pytest.approx(saved_val, rel=1e-5, abs=0)

    # The optimizer state resharded too: training continues from iteration 3.
    code, out, err = run_cli([*flags, "--train-iters", "4", "--load", ckpt, "--save", ckpt],
                             capfd)  # fmt: skip
    assert code == 0, err[-3000:]
    assert "training from iteration 3 to 4" in out and cf.read_latest_iteration(ckpt) == 4


def test_exit_signal_handler_records_sigterm_and_sigusr1():
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        handler = ExitSignalHandler()
        try:
            os.kill(os.getpid(), sig)
            time.sleep(0.05)
            assert handler.received == sig and handler.name == sig.name
        finally:
            handler.release()


def test_sigterm_saves_a_checkpoint_and_exits_0(data, tmp_path):
    ckpt = tmp_path / "ckpt"
    cmd = cli_command([*TINY, *data_flags(data), "--train-iters", "2000", "--save", ckpt])
    errors = open(tmp_path / "stderr.txt", "w+")  # a file: an unread pipe could fill and block
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors, text=True,
                            env=cli_env(), cwd=REPO, start_new_session=True)  # fmt: skip
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(" iteration        3/"):
                break
        assert lines and lines[-1].startswith(" iteration        3/"), "".join(lines)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        errors.seek(0)
        err = errors.read()
        errors.close()
    assert proc.returncode == 0, err[-3000:]
    stopped = cf.read_latest_iteration(ckpt)
    assert stopped is not None and stopped >= 3
    assert f"exiting at iteration {stopped}: SIGTERM; checkpoint saved" in out
    assert cf.read_run_info(cf.iteration_dir(ckpt, stopped))["iteration"] == stopped


def test_a_kill_during_save_leaves_the_previous_checkpoint(data, tmp_path, capfd, dist_single):
    ckpt = tmp_path / "ckpt"
    flags = [*TINY, *data_flags(data), "--save", ckpt, "--load", ckpt]
    code, _, err = run_cli([*flags, "--train-iters", "2"], capfd)
    assert code == 0, err[-3000:]
    assert cf.read_latest_iteration(ckpt) == 2

    # The process is SIGKILLed once iteration 4 is fully written, just before its commit.
    partial = cf.iteration_dir(ckpt, 4).with_name("iter_0000004.tmp")
    proc = run_subprocess([*flags, "--train-iters", "4", "--inject-kill-during-save"])
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (partial / cf.RUN_FILE).is_file() and not cf.iteration_dir(ckpt, 4).exists()
    assert cf.read_latest_iteration(ckpt) == 2

    code, out, err = run_cli([*flags, "--train-iters", "4"], capfd)
    assert code == 0, err[-3000:]
    assert "training from iteration 2 to 4" in out
    assert cf.read_latest_iteration(ckpt) == 4 and not partial.exists()
