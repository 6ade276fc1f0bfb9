"""Flags of the training length, the learning-rate schedule and the batch-size ramp-up.

Megatron-LM's names and meanings: train for `--train-iters` iterations or `--train-samples`
sequences; the LR warms up for `--lr-warmup-iters`/`--lr-warmup-samples` (or a
`--lr-warmup-fraction` of the decay) and decays over `--lr-decay-iters`/`--lr-decay-samples`
(default: the whole run) by `--lr-decay-style`; WSD holds the peak and anneals over the last
`--lr-wsd-decay-iters`/`--lr-wsd-decay-samples` by `--lr-wsd-decay-style`. As in Megatron-LM
the schedule counts samples whichever way the run is given (an iteration is global-batch-size
samples), so `--rampup-batch-size` moves the schedule by the samples actually read.

`check_schedule_args` derives `train_iters`, `train_samples_total` (what the training split
must hold), `lr_warmup_steps`, `lr_decay_steps`, `lr_wsd_decay_steps` (samples) and
`batch_size_schedule` (Megatron-Core's step schedule string, or None); training/schedule.py
builds the scheduler and the batch sizes from them. No torch or Megatron import at module level.
"""

from __future__ import annotations

import argparse

from .flag_utils import ArgumentError, check_positive, flag

# Spellings of one setting: given on the command line, one replaces the others from --config.
ALTERNATIVES = (
    ("train_iters", "train_samples"),
    ("lr_warmup_iters", "lr_warmup_samples", "lr_warmup_fraction"),
    ("lr_decay_iters", "lr_decay_samples"),
    ("lr_wsd_decay_iters", "lr_wsd_decay_samples"),
)
DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
WSD_DECAY_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")


def add_schedule_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training length and learning-rate schedule")
    g.add_argument("--train-iters", type=int, default=None, help="iterations to train")
    g.add_argument(
        "--train-samples",
        type=int,
        default=None,
        help="sequences to train on, instead of --train-iters (the schedule is then in samples)",
    )
    g.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=3e-5)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-samples", type=int, default=0)
    g.add_argument(
        "--lr-warmup-fraction",
        type=float,
        default=None,
        help="warm-up as a fraction of the decay (instead of --lr-warmup-iters/samples)",
    )
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default --train-iters")
    g.add_argument("--lr-decay-samples", type=int, default=None, help="default --train-samples")
    g.add_argument("--lr-decay-style", choices=DECAY_STYLES, default="cosine")
    g.add_argument(
        "--lr-wsd-decay-style",
        choices=WSD_DECAY_STYLES,
        default="exponential",
        help="WSD: the shape of the final anneal (Megatron-LM's default exponential)",
    )
    g.add_argument(
        "--lr-wsd-decay-iters", type=int, default=None, help="WSD: iterations of the anneal"
    )
    g.add_argument(
        "--lr-wsd-decay-samples", type=int, default=None, help="WSD: samples of the anneal"
    )
    g.add_argument(
        "--rampup-batch-size",
        type=int,
        nargs=3,
        default=None,
        metavar=("START", "INCREMENT", "SAMPLES"),
        help="grow the global batch from START by INCREMENT, in equal steps over SAMPLES "
        "samples, up to --global-batch-size (not with pipeline parallelism)",
    )


def check_schedule_args(args: argparse.Namespace) -> None:
    """Check the length and schedule flags and derive their sample counts (after the batch
    sizes and the data-parallel size are known)."""
    check_positive(
        args,
        "train_iters",
        "train_samples",
        "lr_decay_iters",
        "lr_decay_samples",
        "lr_wsd_decay_iters",
        "lr_wsd_decay_samples",
    )
    for name in ("lr_warmup_iters", "lr_warmup_samples"):
        if getattr(args, name) < 0:
            raise ArgumentError(f"{flag(name)}={getattr(args, name)} must be >= 0")
    if args.train_iters is not None and args.train_samples is not None:
        raise ArgumentError("--train-iters and --train-samples are both set; choose one")
    if args.train_iters is None and args.train_samples is None:
        raise ArgumentError(
            "how long to train is not set: pass --train-iters N (iterations) or --train-samples "
            "N (sequences), as in Megatron-LM"
        )
    by_iters = args.train_iters is not None
    unit, other = ("iters", "samples") if by_iters else ("samples", "iters")
    for stem in ("lr_warmup", "lr_decay", "lr_wsd_decay"):
        name = f"{stem}_{other}"
        if getattr(args, name):
            raise ArgumentError(
                f"{flag(name)} counts {other}, but the run is given in {unit} "
                f"({flag('train_' + unit)}): use {flag(stem + '_' + unit)} instead"
            )
    warmup_flag = flag(f"lr_warmup_{unit}")
    if args.lr_warmup_fraction is not None:
        if getattr(args, f"lr_warmup_{unit}"):
            raise ArgumentError(f"--lr-warmup-fraction and {warmup_flag} are both set; choose one")
        if not 0.0 <= args.lr_warmup_fraction <= 1.0:
            raise ArgumentError(
                f"--lr-warmup-fraction={args.lr_warmup_fraction} must lie in [0, 1]"
            )
    if args.min_lr > args.lr:
        raise ArgumentError(f"--min-lr {args.min_lr} is larger than --lr {args.lr}")
    wsd_flag = flag(f"lr_wsd_decay_{unit}")
    wsd = getattr(args, f"lr_wsd_decay_{unit}")
    if args.lr_decay_style == "WSD" and wsd is None:
        raise ArgumentError(f"--lr-decay-style WSD needs {wsd_flag} (the length of the anneal)")
    if args.lr_decay_style != "WSD" and wsd is not None:
        raise ArgumentError(f"{wsd_flag} is set but --lr-decay-style is {args.lr_decay_style}")

    args.batch_size_schedule = _rampup_schedule(args)
    gbs = args.global_batch_size
    if by_iters:
        if args.lr_decay_iters is None:
            args.lr_decay_iters = args.train_iters
        decay = args.lr_decay_iters * gbs
        warmup = args.lr_warmup_iters * gbs
        args.lr_wsd_decay_steps = wsd * gbs if wsd is not None else None
    else:
        if args.lr_decay_samples is None:
            args.lr_decay_samples = args.train_samples
        decay, warmup = args.lr_decay_samples, args.lr_warmup_samples
        args.lr_wsd_decay_steps = wsd
    if args.lr_warmup_fraction is not None:
        warmup = args.lr_warmup_fraction * decay  # a float, as Megatron-LM's
    args.lr_decay_steps, args.lr_warmup_steps = decay, warmup
    if warmup > decay:
        decay_flag = flag(f"lr_decay_{unit}")
        raise ArgumentError(
            f"{warmup_flag} {getattr(args, f'lr_warmup_{unit}')} exceeds {decay_flag} "
            f"{getattr(args, f'lr_decay_{unit}')}; shorten the warm-up or train longer"
        )
    if args.lr_wsd_decay_steps is not None and args.lr_wsd_decay_steps > decay - warmup:
        raise ArgumentError(
            f"{wsd_flag} {wsd} is longer than the decay after the warm-up "
            f"({decay - warmup:g} samples); shorten the anneal"
        )
    _derive_length(args, by_iters)


def _rampup_schedule(args: argparse.Namespace) -> str | None:
    """Megatron-LM's --rampup-batch-size as Megatron-Core 0.19's step schedule ("samples:batch
    ..."; core dropped its ramp-up calculator): batch START + k*INCREMENT from the first sample
    at which int(consumed / (SAMPLES / n)) = k, n = (global - START) / INCREMENT, as
    Megatron-LM's ramp-up computed it."""
    if args.rampup_batch_size is None:
        return None
    start, incr, samples = args.rampup_batch_size
    gbs, unit = args.global_batch_size, args.micro_batch_size * args.data_parallel_size
    if args.pipeline_model_parallel_size > 1:
        raise ArgumentError(
            "--rampup-batch-size with --pipeline-model-parallel-size "
            f"{args.pipeline_model_parallel_size}: a changing number of microbatches per "
            "pipeline flush is not supported here; drop the ramp-up or train without PP"
        )
    if min(start, incr, samples) <= 0:
        raise ArgumentError(f"--rampup-batch-size {start} {incr} {samples}: all must be > 0")
    if start >= gbs or (gbs - start) % incr:
        raise ArgumentError(
            f"--rampup-batch-size {start} {incr} {samples}: --global-batch-size {gbs} minus "
            f"START {start} must be a positive multiple of INCREMENT {incr}"
        )
    if start % unit or incr % unit:
        raise ArgumentError(
            f"--rampup-batch-size {start} {incr} {samples}: START and INCREMENT must be "
            f"multiples of micro-batch-size {args.micro_batch_size} x data-parallel size "
            f"{args.data_parallel_size} = {unit}, so every batch splits into whole microbatches"
        )
    steps = (gbs - start) // incr
    if samples < steps:
        raise ArgumentError(
            f"--rampup-batch-size {start} {incr} {samples}: {steps} increments need at least "
            f"{steps} SAMPLES"
        )
    return " ".join(f"{-(-k * samples // steps)}:{start + k * incr}" for k in range(steps + 1))


def _derive_length(args: argparse.Namespace, by_iters: bool) -> None:
    """train_iters (for --train-samples) and the samples the training split must hold."""
    gbs = args.global_batch_size
    if args.batch_size_schedule is None:
        if not by_iters:
            args.train_iters = args.train_samples // gbs
            if args.train_iters == 0:
                raise ArgumentError(
                    f"--train-samples {args.train_samples} is less than one global batch ({gbs})"
                )
        args.train_samples_total = args.train_iters * gbs
        return
    from .schedule import BatchSizes  # Megatron-Core's calculator (imports torch)

    sizes = BatchSizes(args)
    if not by_iters:
        args.train_iters = sizes.iterations_for(args.train_samples)
    args.train_samples_total = sizes.samples_in(args.train_iters)
