"""Sample-based training, WSD, batch-size ramp-up and checkpoint-driven restarts through
fusedkv-pretrain (one process, CPU): an interrupted run resumed with --use-checkpoint-args and
no model flags equals a straight run, its learning rates follow Megatron-LM's WSD formula
sample by sample, and --finetune starts a fresh run from a checkpoint's weights."""

from __future__ import annotations

import math

import pytest

from fusedkv_megatron import checkpoint_format as cf
from tests.integration.trainer_helpers import (
    SHAPE_FLAGS,
    TINY,
    data_flags,
    default_data,
    run_cli,
    scalars,
    without,
)

pytestmark = pytest.mark.slow

LR, MIN_LR = 3e-3, 3e-4  # TINY's
SAMPLES, WARMUP, WSD = 96, 0.1, 40  # --train-samples, --lr-warmup-fraction, --lr-wsd-decay-samples
RAMPUP = (4, 4, 16)  # global batch 4 for the first 16 samples, then TINY's 8
SCHEDULE = ["--train-samples", SAMPLES, "--lr-warmup-fraction", WARMUP, "--lr-decay-style",
            "WSD", "--lr-wsd-decay-samples", WSD, "--lr-wsd-decay-style", "cosine",
            "--rampup-batch-size", *RAMPUP]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return default_data(tmp_path_factory)


def _consumed_after_each_iteration() -> list[int]:
    """Samples read after iterations 1, 2, ...: 4 a batch until 16 samples, then 8."""
    consumed, out = 0, []
    while consumed + (4 if consumed < 16 else 8) <= SAMPLES:
        consumed += 4 if consumed < 16 else 8
        out.append(consumed)
    return out


def _wsd_lr(samples: float) -> float:
    """Megatron-LM's WSD with a cosine anneal, from its documented formula (by hand)."""
    warmup = WARMUP * SAMPLES
    if samples <= warmup:
        return LR * samples / warmup
    anneal_start = SAMPLES - WSD
    if samples <= anneal_start:
        return LR
    ratio = (samples - anneal_start) / WSD
    return MIN_LR + (LR - MIN_LR) * 0.5 * (math.cos(math.pi * ratio) + 1.0)


def test_wsd_ramp_up_run_resumed_from_checkpoint_args_equals_a_straight_run(data, tmp_path, capfd):
    """Straight: 14 iterations (4 of 4 samples, 10 of 8; 96 samples). Interrupted after 5 (one
    past the ramp) and resumed with --use-checkpoint-args and neither model nor tokenizer
    flags: the same losses, grad norms and learning rates bit for bit, and the learning rate is
    Megatron-LM's WSD at every iteration's consumed samples."""
    flags = [*TINY, *data_flags(data), *SCHEDULE]
    straight, parts = tmp_path / "straight", tmp_path / "parts"
    code, out, err = run_cli([*flags, "--tensorboard-dir", straight / "tb"], capfd)
    assert code == 0, err[-3000:]
    consumed = _consumed_after_each_iteration()
    assert len(consumed) == 14 and "training from iteration 0 to 14" in out
    code, out, err = run_cli([*flags, "--save", parts / "ckpt", "--exit-interval", "5",
                              "--tensorboard-dir", parts / "tb1"], capfd)  # fmt: skip
    assert code == 0, err[-3000:]
    assert cf.read_latest_iteration(parts / "ckpt") == 5
    resume = [*without(TINY, *SHAPE_FLAGS), "--data-path", data["train_data_prefix"],
              *SCHEDULE, "--use-checkpoint-args", "--load", parts / "ckpt", "--save",
              parts / "ckpt", "--tensorboard-dir", parts / "tb2"]  # fmt: skip
    assert "--tokenizer-model" not in resume and "--num-layers" not in resume
    code, out, err = run_cli(resume, capfd)
    assert code == 0, err[-3000:]
    assert "training from iteration 5 to 14" in out
    assert "> model: fusedkv, 4 layers, hidden 64, ffn 128, heads 4/4 KV" in out

    for tag in ("lm loss", "grad-norm", "learning-rate", "consumed-samples"):
        a = scalars(straight / "tb", tag)
        b = {**scalars(parts / "tb1", tag), **scalars(parts / "tb2", tag)}
        assert [b[i] for i in range(1, 15)] == [a[i] for i in range(1, 15)], tag
    assert [scalars(straight / "tb", "consumed-samples")[i] for i in range(1, 15)] == consumed
    lr = scalars(straight / "tb", "learning-rate")
    for i, samples in enumerate(consumed, start=1):
        assert lr[i] == pytest.approx(_wsd_lr(samples), rel=1e-6), (i, samples)
    assert lr[4] == pytest.approx(LR) and lr[14] == pytest.approx(MIN_LR)  # stable, annealed


def test_finetune_loads_weights_only_and_starts_at_iteration_0(data, tmp_path, capfd):
    """--finetune --load CKPT: iteration 0, a fresh optimizer (another --lr is accepted, which
    a resume refuses), and the weights of CKPT (the first loss is the checkpoint's, not a
    fresh model's)."""
    base = [*TINY, *data_flags(data), "--train-iters", "6"]
    ckpt = tmp_path / "ckpt"
    code, _, err = run_cli([*base, "--save", ckpt], capfd)
    assert code == 0, err[-3000:]
    tuned = [*base, "--load", ckpt, "--lr", "1e-3", "--min-lr", "1e-4", "--train-iters", "2"]
    code, _, err = run_cli(tuned, capfd)
    assert code == 2 and "resume with the saved run's --lr/--min-lr" in err
    code, out, err = run_cli([*tuned, "--finetune", "--tensorboard-dir", tmp_path / "ft"], capfd)
    assert code == 0, err[-3000:]
    assert "to fine-tune: iteration 0" in out and "training from iteration 0 to 2" in out
    code, _, err = run_cli([*base, "--train-iters", "2", "--tensorboard-dir", tmp_path / "fresh"],
                           capfd)  # fmt: skip
    assert code == 0, err[-3000:]
    tuned_loss = scalars(tmp_path / "ft", "lm loss")[1]
    assert tuned_loss < scalars(tmp_path / "fresh", "lm loss")[1] - 0.5  # trained weights
    code, _, err = run_cli([*base, "--finetune"], capfd)
    assert code == 2 and "--finetune loads weights: it needs --load" in err
