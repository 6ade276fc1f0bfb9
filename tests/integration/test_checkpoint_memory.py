"""Checkpoint memory, through the fusedkv-pretrain CLI (each run its own process, so its resident
memory is the run's alone):

- with the distributed optimizer at DP=1 and DP=2, a model whose training state is a known size
  (35M parameters, fp32: 16 bytes each) saves and resumes with a peak resident memory within
  1.3x of training's, and a save adds less than a quarter of the training state;
- a dp_reshardable checkpoint (the default format) refuses a TP/PP change with the fix;
- a run whose memory the node cannot hold (here: a process address-space limit) is refused at
  start-up with exit 2, instead of dying later.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from fusedkv_megatron import checkpoint_format as cf
from tests.integration.trainer_helpers import REPO, cli_command, cli_env, run_cli, run_subprocess

pytestmark = pytest.mark.slow

MODEL = [
    "--num-layers", "8", "--hidden-size", "512", "--ffn-hidden-size", "1536",
    "--num-attention-heads", "8", "--seq-length", "64", "--micro-batch-size", "1",
    "--global-batch-size", "2", "--mock-data", "--tokenizer-type", "NullTokenizer",
    "--vocab-size", "16000", "--use-distributed-optimizer", "--eval-iters", "0",
    "--lr-warmup-iters", "0", "--log-interval", "1",
]  # fmt: skip
GIB = 1024**3


def peaks(out: str, what: str) -> list[tuple[float, float]]:
    """(peak, before) in bytes of each 'saved'/'loaded' line."""
    pattern = rf"{what} checkpoint .*; peak resident ([0-9.]+) GiB = [0-9.]+x the ([0-9.]+) GiB"
    return [(float(p) * GIB, float(b) * GIB) for p, b in re.findall(pattern, out)]


def parameters(out: str) -> int:
    return int(re.search(r"> parameters: ([0-9,]+) with embeddings", out).group(1).replace(",", ""))


@pytest.mark.parametrize(
    "dp", [1, pytest.param(2, marks=pytest.mark.multiprocess)], ids=["dp1", "dp2"]
)
def test_save_and_resume_stay_within_1_3x_of_training(dp, tmp_path):
    ckpt = tmp_path / "ckpt"
    save_first = ["--save-first"] if dp == 1 else []
    first = run_subprocess(
        [*MODEL, "--train-iters", "2", "--save-interval", "2", *save_first, "--save", ckpt],
        nproc=dp,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    expected = [1, 2] if save_first else [2]  # --save-first: iteration 1 too
    assert cf.complete_iterations(ckpt) == expected
    n = parameters(first.stdout)
    state = 8 * n + 8 * n // dp  # fp32 weights and gradients, Adam's moments over DP
    saves = peaks(first.stdout, "saved")
    assert len(saves) == len(expected), first.stdout[-3000:]
    steady = saves[-1][1]  # resident after two training steps, when the save starts
    assert steady > state  # the training state is the bulk of what is measured
    for peak, before in saves:
        assert peak <= 1.3 * before, (peak / GIB, before / GIB)
        assert peak - before <= 0.25 * state, ((peak - before) / GIB, state / GIB)

    second = run_subprocess(
        [*MODEL, "--train-iters", "3", "--save-interval", "3", "--save", ckpt, "--load", ckpt],
        nproc=dp,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    ((load_peak, _),) = peaks(second.stdout, "loaded")
    ((save_peak, resumed_steady),) = peaks(second.stdout, "saved")
    for reference in (steady, resumed_steady):
        assert load_peak <= 1.3 * reference, (load_peak / GIB, reference / GIB)
    assert save_peak <= 1.3 * resumed_steady


def test_a_dp_reshardable_optimizer_refuses_another_tp_pp(tmp_path, capfd, dist_single):
    ckpt = tmp_path / "ckpt"
    small = [*MODEL, "--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "128"]
    code, _, err = run_cli([*small, "--train-iters", "1", "--save", ckpt], capfd)
    assert code == 0, err[-3000:]
    info_file = cf.iteration_dir(ckpt, 1) / cf.RUN_FILE
    info = json.loads(info_file.read_text())
    info["parallel"]["tensor_model_parallel_size"] = 2  # as if saved at TP=2
    info_file.write_text(json.dumps(info))
    code, _, err = run_cli([*small, "--train-iters", "2", "--load", ckpt], capfd)
    assert code == 2, err[-3000:]
    assert "stores the distributed optimizer's state as dp_reshardable" in err
    assert "changes TP/PP from 2/1 to 1/1" in err
    assert "--dist-ckpt-optim-fully-reshardable" in err and "--no-load-optim" in err


def test_a_run_the_node_cannot_hold_is_refused_at_start_up(tmp_path):
    # 64 sequences of 512 tokens per micro-batch: tens of GiB of activations, far above an
    # 8 GiB address space, which still holds the interpreter, Megatron and the model.
    big = [*MODEL, "--micro-batch-size", "64", "--global-batch-size", "64", "--seq-length",
           "512", "--train-iters", "2", "--save", tmp_path / "ckpt"]  # fmt: skip
    limited = ["prlimit", f"--as={8 * GIB}", "--"]

    def run(argv):
        return subprocess.run([*limited, *cli_command(argv)], capture_output=True, text=True,
                              timeout=600, env=cli_env(), cwd=REPO)  # fmt: skip

    proc = run(big)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: host memory: this run needs about" in proc.stderr
    assert "address-space limit 8.0 GiB per process" in proc.stderr
    assert "a smaller --micro-batch-size" in proc.stderr
    assert " iteration " not in proc.stdout  # refused before the first step
    # Without the check the same run fails later, in its first step.
    proc = run([*big, "--no-host-memory-check"])
    assert proc.returncode != 0 and "> training from iteration 0" in proc.stdout
