"""The learning-rate schedule and the global batch size of every iteration, in samples.

Both are Megatron-Core's: `OptimizerParamScheduler` (warm-up, cosine/linear/WSD/... decay)
stepped by the samples of each optimizer step, as Megatron-LM's trainer does, and
`StepBatchsizeNumMicroBatchesCalculator` for a batch-size ramp-up. Both are functions of the
consumed samples alone, so a resumed run continues exactly where it stopped. The flags and
their derived sample counts are training/flags_schedule.py's.
"""

from __future__ import annotations

from megatron.core.num_microbatches_calculator import StepBatchsizeNumMicroBatchesCalculator
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler


def build_scheduler(args, optimizer) -> OptimizerParamScheduler:
    """Megatron-Core's scheduler, in samples (flags_schedule derived the step counts)."""
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if args.lr_warmup_steps else args.lr,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_steps,
        lr_decay_steps=args.lr_decay_steps,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_samples_total,
        wd_incr_style="constant",
        wsd_decay_steps=args.lr_wsd_decay_steps,
        lr_wsd_decay_style=args.lr_wsd_decay_style,
    )


class BatchSizes:
    """The global batch size and microbatch count at a number of consumed samples."""

    def __init__(self, args):
        self.global_batch_size = args.global_batch_size
        self.per_microbatch = args.micro_batch_size * args.data_parallel_size
        self.calculator = None
        if args.batch_size_schedule is not None:
            self.calculator = StepBatchsizeNumMicroBatchesCalculator(
                micro_batch_size=args.micro_batch_size,
                data_parallel_size=args.data_parallel_size,
                decrease_batch_size_if_needed=False,
                rank=0 if _is_rank0() else 1,
                schedule=args.batch_size_schedule,
            )
            self.ramp_end = self.calculator.schedule[-1][0]

    def at(self, consumed_samples: int) -> tuple[int, int]:
        """(global batch size, microbatches per data-parallel rank) of the next iteration."""
        if self.calculator is None:
            gbs = self.global_batch_size
        else:
            self.calculator.update(consumed_samples, consistency_check=True)
            gbs = self.calculator.get_current_global_batch_size()
        return gbs, gbs // self.per_microbatch

    def samples_in(self, iterations: int) -> int:
        """Samples read by the first `iterations` iterations."""
        consumed = 0
        for done in range(iterations):
            if self.calculator is None or consumed >= self.ramp_end:
                return consumed + (iterations - done) * self.global_batch_size
            consumed += self.at(consumed)[0]
        return consumed

    def iterations_for(self, samples: int) -> int:
        """Iterations whose batches fit in `samples` (Megatron-LM's rule: whole batches only)."""
        consumed = iterations = 0
        while self.calculator is not None and consumed < self.ramp_end:
            gbs = self.at(consumed)[0]
            if consumed + gbs > samples:
                return iterations
            consumed, iterations = consumed + gbs, iterations + 1
        return iterations + (samples - consumed) // self.global_batch_size


def _is_rank0() -> bool:
    import torch

    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
