"""Flags of data loading and observability: loader workers, the torch profiler, per-phase
timers, the parameter norm. Names and defaults follow Megatron-LM's where it has the flag.

No torch or Megatron import here: `--help` stays fast.
"""

from __future__ import annotations

import argparse

TIMING_LOG_OPTIONS = ("max", "minmax", "all")


def add_observability_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data loading and observability")
    g.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="DataLoader worker processes per rank that read and stack the next microbatches "
        "ahead of the step (pinned memory on CUDA); the samples are the same for any count "
        "(default: 2 on CUDA, 0 on CPU, where workers would compete with the compute threads)",
    )
    g.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="record a torch.profiler trace (CPU and CUDA activities) of iterations "
        "--profile-step-start+1 .. --profile-step-end on --profile-ranks; view it in "
        "TensorBoard's profiler plugin or ui.perfetto.dev",
    )
    g.add_argument(
        "--profile-step-start",
        type=int,
        default=10,
        help="profile from after this many iterations (default 10)",
    )
    g.add_argument(
        "--profile-step-end",
        type=int,
        default=12,
        help="stop profiling after this iteration (default 12)",
    )
    g.add_argument(
        "--profile-ranks",
        type=int,
        nargs="+",
        default=[0],
        help="global ranks to profile (default 0)",
    )
    g.add_argument(
        "--profile-dir",
        type=str,
        default=None,
        help="where the traces go, one RANK.*.pt.trace.json per profiled rank "
        "(default: --tensorboard-dir)",
    )
    g.add_argument(
        "--timing-log-level",
        type=int,
        choices=(0, 1, 2),
        default=0,
        help="per-phase timers in the log: 0 none; 1 forward-backward, all-grads-sync (the "
        "data-parallel reduce), params-all-gather, optimizer and its parts; 2 also "
        "forward/backward compute, the pipeline send/recv and batch-generator (the data). "
        "Level-1 timers synchronise the ranks (see --no-barrier-with-level-1-timing)",
    )
    g.add_argument(
        "--timing-log-option",
        choices=TIMING_LOG_OPTIONS,
        default="minmax",
        help="the timers over ranks: max, minmax (default) or all (every rank)",
    )
    g.add_argument(
        "--log-timers-to-tensorboard",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also write the timers to TensorBoard as NAME-time scalars (max over ranks, "
        "seconds per iteration, as Megatron-LM)",
    )
    g.add_argument(
        "--barrier-with-level-1-timing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="level-1 timers start and stop at a barrier of all ranks (default, as "
        "Megatron-LM); --no-barrier-with-level-1-timing saves the sync, less exact",
    )
    g.add_argument(
        "--log-params-norm",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="log the L2 norm of all parameters (one extra reduction per logged iteration)",
    )


def check_observability_args(args: argparse.Namespace, world_size: int, cuda: bool) -> None:
    """Check the flags above and fill `num_workers` and `profile_dir`; raises ArgumentError."""
    from .arguments import ArgumentError  # imported here: arguments.py imports this module

    if args.num_workers is None:
        args.num_workers = 2 if cuda else 0
    if args.num_workers < 0:
        raise ArgumentError(
            f"--num-workers={args.num_workers} must be >= 0 (0 reads the data in the training "
            "process)"
        )
    if args.log_timers_to_tensorboard and not args.tensorboard_dir:
        raise ArgumentError("--log-timers-to-tensorboard needs --tensorboard-dir DIR")
    if args.log_timers_to_tensorboard and args.timing_log_level == 0:
        raise ArgumentError(
            "--log-timers-to-tensorboard with --timing-log-level 0 has no timers to write: "
            "pass --timing-log-level 1 (or 2 for compute, pipeline and data timers)"
        )
    if not args.profile:
        return
    start, end = args.profile_step_start, args.profile_step_end
    if start < 0 or end <= start:
        raise ArgumentError(
            f"--profile-step-start {start} / --profile-step-end {end}: need 0 <= start < end "
            "(the iterations start+1 .. end are profiled)"
        )
    bad = [r for r in args.profile_ranks if not 0 <= r < world_size]
    if bad:
        raise ArgumentError(
            f"--profile-ranks {bad} are not ranks of this run (world size {world_size}): "
            f"choose from 0..{world_size - 1}"
        )
    if not (args.profile_dir or args.tensorboard_dir):
        raise ArgumentError(
            "--profile needs a place for the trace: --profile-dir DIR or --tensorboard-dir DIR"
        )
    if args.profile_dir is None:
        args.profile_dir = args.tensorboard_dir
