"""Checkpoint saving flags of `fusedkv-pretrain` beyond --save/--load: format, memory, timing
(Megatron-LM's names where it has the flag). No torch import: `--help` stays fast."""

from __future__ import annotations

import argparse


def add_saving_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("checkpoint format, memory and timing")
    g.add_argument(
        "--dist-ckpt-optim-fully-reshardable",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="store the distributed optimizer's state per parameter (fully_reshardable), so "
        "a checkpoint loads at another TP/PP; costs host memory of the optimizer state's size "
        "during the save. Default: dp_reshardable (reloads at another DP size only, no copy)",
    )
    g.add_argument(
        "--distrib-optim-fully-reshardable-mem-efficient",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="with --dist-ckpt-optim-fully-reshardable: gather the state on data-parallel "
        "rank 0 only (over gloo) instead of on every rank",
    )
    g.add_argument(
        "--async-save",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="write checkpoints in a background process per rank while training goes on; "
        "committed (tracker moved) once every rank's files are written and fsynced",
    )
    g.add_argument(
        "--save-first",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also save after the first iteration of this run, so a save that cannot work "
        "(memory, disk, permissions) fails in minutes, not after --save-interval iterations",
    )
    g.add_argument(
        "--host-memory-check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="before building the model, estimate the node's peak host memory (training + "
        "save, all local ranks) and stop with exit 2 when it exceeds what is available "
        "(default on; --no-host-memory-check to run anyway)",
    )


def check_saving_args(args: argparse.Namespace, error: type[Exception]) -> None:
    """Combinations that cannot work; `error` is the trainer's ArgumentError."""
    if args.async_save and not args.save:
        raise error("--async-save needs --save DIR")
    if args.save_first and not args.save:
        raise error("--save-first needs --save DIR")
    if args.dist_ckpt_optim_fully_reshardable and not args.use_distributed_optimizer:
        raise error(
            "--dist-ckpt-optim-fully-reshardable selects the distributed optimizer's format; "
            "add --use-distributed-optimizer (the plain optimizer's state always reshards)"
        )
    if args.distrib_optim_fully_reshardable_mem_efficient and not (
        args.dist_ckpt_optim_fully_reshardable
    ):
        raise error(
            "--distrib-optim-fully-reshardable-mem-efficient needs "
            "--dist-ckpt-optim-fully-reshardable"
        )
