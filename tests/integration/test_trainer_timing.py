"""The trainer's throughput leaves out evaluation and checkpoint saves: a run whose every
evaluation and save takes (on a fake clock) 1,000 s still logs iteration times of a tiny model."""

from __future__ import annotations

import re
import time

import pytest

from fusedkv_megatron.training import checkpointing, reporting
from fusedkv_megatron.training.loop import Trainer
from tests.integration.trainer_helpers import TINY, run_cli

STALL_S = 1000.0

pytestmark = pytest.mark.slow  # an in-process training run, like the other trainer tests


def test_evaluation_and_saves_are_not_training_time(monkeypatch, tmp_path, capfd):
    offset = [0.0]
    calls = {"evaluate": 0, "save": 0}
    monkeypatch.setattr(
        reporting.IntervalTimer, "clock", staticmethod(lambda: time.perf_counter() + offset[0])
    )
    real_evaluate = Trainer.evaluate

    def slow_evaluate(self, *args, **kwargs):
        calls["evaluate"] += 1
        offset[0] += STALL_S
        return real_evaluate(self, *args, **kwargs)

    def slow_save(*args, **kwargs):  # writes nothing: only its duration matters here
        calls["save"] += 1
        offset[0] += STALL_S

    monkeypatch.setattr(Trainer, "evaluate", slow_evaluate)
    monkeypatch.setattr(checkpointing, "save_checkpoint", slow_save)
    argv = [*TINY, "--kv-sharing", "fusedkv", "--mock-data", "--tokenizer-type",
            "NullTokenizer", "--vocab-size", "128", "--train-iters", "4", "--eval-interval", "1",
            "--save-interval", "1", "--save", tmp_path / "ckpt"]  # fmt: skip
    code, out, err = run_cli(argv, capfd)
    assert code == 0, err[-3000:]
    # Evaluation after iterations 1-3 (and at the end); a save after each of the 4.
    assert calls["evaluate"] >= 3 and calls["save"] == 4, calls
    ms = [float(x) for x in re.findall(r"elapsed time per iteration \(ms\): ([0-9.]+)", out)]
    assert len(ms) == 4, out[-3000:]
    # A tiny iteration takes well under a minute even on a loaded machine; one stall is 1e6 ms.
    assert max(ms) < 60_000, ms
    tokens = [float(x) for x in re.findall(r"tokens/s: ([0-9.]+)", out)]
    assert min(tokens) > 8 * 64 / 60, tokens
