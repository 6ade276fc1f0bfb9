"""The observability pieces on their own: the profiler records exactly the asked iterations on
the asked ranks, and memory is reported as the largest value over the ranks with its rank."""

from __future__ import annotations

import json
import os
from argparse import Namespace

import pytest
import torch

from fusedkv_megatron.training import observe
from fusedkv_megatron.training.profiling import StepProfiler


def _profiled_spans(tmp_path, rank: int, start: int, end: int, iterations: int) -> dict:
    """Run `iterations` fake training steps under StepProfiler; {trace file: iteration spans}."""
    args = Namespace(profile=True, profile_ranks=[1], profile_step_start=start,
                     profile_step_end=end, profile_dir=str(tmp_path))  # fmt: skip
    prof = StepProfiler(args, rank)
    x = torch.randn(32, 32)
    for finished in range(iterations):
        prof.before(finished)
        x = torch.tanh(x @ x)
        prof.after(finished + 1)
    prof.close()
    spans = {}
    for name in os.listdir(tmp_path):
        events = json.loads((tmp_path / name).read_text())["traceEvents"]
        spans[name] = sorted(
            int(e["name"].split()[1])
            for e in events
            if str(e.get("name", "")).startswith("iteration ")
        )
    return spans


@pytest.mark.parametrize(
    "start, end, iterations, want",
    [(1, 3, 5, [2, 3]), (0, 2, 5, [1, 2]), (2, 9, 4, [3, 4])],
    ids=["window", "from-the-first", "cut-short-by-the-end"],
)
def test_profiler_traces_iterations_start_plus_1_to_end(tmp_path, start, end, iterations, want):
    spans = _profiled_spans(tmp_path, 1, start, end, iterations)
    assert len(spans) == 1, spans
    (name, got), = spans.items()  # fmt: skip
    assert name.startswith("rank1.") and name.endswith(".pt.trace.json")
    assert got == want


def test_profiler_leaves_other_ranks_alone(tmp_path):
    assert _profiled_spans(tmp_path, 0, 1, 3, 5) == {}


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_memory_is_the_max_over_ranks_with_the_rank_that_has_it(kind):
    """Each figure is maximised on its own: the peak may sit on another rank than the
    allocation (the real all-gather runs in the multi-process trainer test)."""
    gib = 2.0**30
    table = torch.tensor([[2.0, 7.0], [5.0, 1.0], [3.0, 6.5]], dtype=torch.float64) * gib
    fields, scalars = observe.describe_memory(kind, table[:, :1] if kind == "cpu" else table)
    if kind == "cpu":
        assert fields == ["host memory (GiB): 5.00 max RSS (rank 1)"]
        assert scalars == {"host-memory-max-rss-gib": 5.0, "host-memory-max-rss-rank": 1.0}
    else:
        assert fields == ["memory (GiB): 5.00 allocated (rank 1), 7.00 max allocated (rank 0)"]
        assert scalars == {
            "memory-allocated-gib": 5.0,
            "memory-allocated-rank": 1.0,
            "memory-max-allocated-gib": 7.0,
            "memory-max-allocated-rank": 0.0,
        }


BAD_FLAGS = [
    (["--num-workers", "-1"], "--num-workers=-1 must be >= 0"),
    (
        ["--profile", "--profile-step-start", "3", "--profile-step-end", "3"],
        "need 0 <= start < end",
    ),
    (["--profile", "--profile-ranks", "0", "2"], r"--profile-ranks \[2\] are not ranks"),
    (["--profile", "--tensorboard-dir", ""], "--profile needs a place for the trace"),
    (
        ["--log-timers-to-tensorboard", "--timing-log-level", "1", "--tensorboard-dir", ""],
        "needs --tensorboard-dir",
    ),
    (["--log-timers-to-tensorboard", "--tensorboard-dir", "tb"], "has no timers to write"),
]


@pytest.mark.parametrize("argv, message", BAD_FLAGS, ids=[m[:24] for _, m in BAD_FLAGS])
def test_bad_observability_flags_name_the_fix(argv, message):
    from fusedkv_megatron.training.arguments import ArgumentError, build_parser
    from fusedkv_megatron.training.flags_observability import check_observability_args

    args = build_parser().parse_args(["--tensorboard-dir", "tb", *argv])
    with pytest.raises(ArgumentError, match=message):
        check_observability_args(args, world_size=2, cuda=False)


def test_observability_defaults():
    from fusedkv_megatron.training.arguments import build_parser
    from fusedkv_megatron.training.flags_observability import check_observability_args

    for cuda, workers in ((False, 0), (True, 2)):
        args = build_parser().parse_args(["--profile", "--tensorboard-dir", "tb"])
        check_observability_args(args, world_size=1, cuda=cuda)
        assert args.num_workers == workers and args.profile_dir == "tb"
        assert (args.profile_step_start, args.profile_step_end, args.profile_ranks) == (10, 12, [0])
        assert args.barrier_with_level_1_timing and args.timing_log_level == 0
