"""Microbatches for this data-parallel rank, in Megatron-LM's order, resumable by sample count.

Global batch g (g = 0, 1, ...) is samples [g*G, (g+1)*G) of the dataset (G = global batch
size); microbatch m of it is the slice [m*M*D, (m+1)*M*D) (M = micro batch size, D = data-
parallel size), and data-parallel rank r takes its M samples [r*M, (r+1)*M) of that slice. The
position is the number of consumed samples, so a resumed run (even with another DP size or
micro batch size) continues with exactly the samples an uninterrupted run would have read.

The samples are read and stacked by a torch DataLoader: with `num_workers` > 0 in worker
processes that run ahead of the training step (each keeps `prefetch_factor` microbatches in
flight), into pinned memory when the batches go to a GPU. The index order is fixed by
`MicrobatchSampler` in this process, and a DataLoader returns batches in sampler order whatever
the worker count, so the samples, the losses and a resume are the same with any `num_workers`.
What a checkpoint records is the trainer's consumed-sample count, never the loader's read-ahead.
"""

from __future__ import annotations

import itertools
import signal
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from .signals import EXIT_SIGNALS

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
_DTYPES = {
    "tokens": torch.long,
    "labels": torch.long,
    "position_ids": torch.long,
    "loss_mask": torch.float,
}


class MicrobatchSampler:
    """Batch sampler: the M sample indices of each microbatch of one data-parallel rank,
    from `consumed_samples` on, while the dataset has them (then it ends: running out is
    reported by the iterator when a batch past the end is asked for, not when a worker reads
    ahead)."""

    def __init__(self, size: int, consumed_samples: int, mbs: int, rank: int, dp: int):
        self.size, self.consumed, self.mbs, self.rank, self.dp = (
            size,
            consumed_samples,
            mbs,
            rank,
            dp,
        )

    def __iter__(self) -> Iterator[list[int]]:
        position = self.consumed
        while (start := position + self.rank * self.mbs) + self.mbs <= self.size:
            yield list(range(start, start + self.mbs))
            position += self.mbs * self.dp


def ignore_exit_signals(worker_id: int) -> None:
    """Loader workers ignore SIGTERM/SIGUSR1: SLURM signals every process of a job, and a worker
    that died of it would fail the step instead of letting the trainer save and exit."""
    for sig in EXIT_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def collate_microbatch(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack M samples into a dict of [M, s] CPU tensors (runs in the loader's workers)."""
    batch = {
        key: torch.from_numpy(np.stack([np.asarray(s[key]) for s in samples])).to(_DTYPES[key])
        for key in BATCH_KEYS
    }
    # Packed documents (reset_attention_mask): Megatron's [1, s, s] mask, True = masked out.
    if "attention_mask" in samples[0]:
        batch["attention_mask"] = torch.from_numpy(
            np.stack([np.asarray(s["attention_mask"]) for s in samples])
        )
    return batch


class MicrobatchIterator(Iterator):
    """Yields dicts of [M, s] tensors (tokens, labels, loss_mask, position_ids) on `device`
    until the dataset is used up, then raises DataError."""

    def __init__(
        self,
        dataset,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        device: torch.device | str = "cpu",
        num_workers: int = 0,
        prefetch_factor: int | None = None,
    ):
        self.dataset = dataset
        self.position = consumed_samples
        self.mbs = micro_batch_size
        self.rank = data_parallel_rank
        self.dp = data_parallel_size
        self.device = torch.device(device)
        sampler = MicrobatchSampler(
            len(dataset), consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size
        )
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collate_microbatch,
            num_workers=num_workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            worker_init_fn=ignore_exit_signals,
        )
        self._batches = iter(loader)

    def __next__(self) -> dict[str, torch.Tensor]:
        start = self.position + self.rank * self.mbs
        self.position += self.mbs * self.dp
        batch = next(self._batches, None)
        if batch is None:
            from ..data.datasets import DataError

            raise DataError(
                f"the data ran out: sample {start + self.mbs - 1} was requested but the dataset "
                f"holds {len(self.dataset)} samples (it is built for --train-iters x "
                "--global-batch-size samples, counted from the start of training). A resumed "
                "run that changed --global-batch-size or --micro-batch-size reads past that "
                "end: resume with the checkpoint's batch sizes, or raise --train-iters"
            )
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def close(self) -> None:
        """Stop the loader's worker processes now (dropping the loader's iterator stops them)."""
        self._batches = iter(())


def microbatch_iterators(
    dataset, consumed_samples: int, num_chunks: int, args, data_parallel_rank: int, device
) -> list[Iterator]:
    """One iterator per model chunk (each virtual pipeline stage reads the same sequence):
    one loader, its batches shared by the chunks (`itertools.tee` keeps each batch until the
    last chunk has read it)."""
    it = MicrobatchIterator(
        dataset,
        consumed_samples,
        args.micro_batch_size,
        data_parallel_rank,
        args.data_parallel_size,
        device,
        num_workers=getattr(args, "num_workers", 0),
    )
    return [it] if num_chunks == 1 else list(itertools.tee(it, num_chunks))
