"""Microbatches for this data-parallel rank, in Megatron-LM's order, resumable by sample count.

Global batch g (g = 0, 1, ...) is samples [g*G, (g+1)*G) of the dataset (G = global batch
size); microbatch m of it is the slice [m*M*D, (m+1)*M*D) (M = micro batch size, D = data-
parallel size), and data-parallel rank r takes its M samples [r*M, (r+1)*M) of that slice. The
position is the number of consumed samples, so a resumed run (even with another DP size or
micro batch size) continues with exactly the samples an uninterrupted run would have read.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


class MicrobatchIterator(Iterator):
    """Yields dicts of [M, s] tensors (tokens, labels, loss_mask, position_ids) forever."""

    def __init__(
        self,
        dataset,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        device: torch.device | str = "cpu",
    ):
        self.dataset = dataset
        self.position = consumed_samples
        self.mbs = micro_batch_size
        self.rank = data_parallel_rank
        self.dp = data_parallel_size
        self.device = device

    def __next__(self) -> dict[str, torch.Tensor]:
        start = self.position + self.rank * self.mbs
        self.position += self.mbs * self.dp
        if start + self.mbs > len(self.dataset):
            from ..data.datasets import DataError

            raise DataError(
                f"the data ran out: sample {start + self.mbs - 1} was requested but the dataset "
                f"holds {len(self.dataset)} samples (it is built for --train-iters x "
                "--global-batch-size samples, counted from the start of training). A resumed "
                "run that changed --global-batch-size or --micro-batch-size reads past that "
                "end: resume with the checkpoint's batch sizes, or raise --train-iters"
            )
        samples = [self.dataset[i] for i in range(start, start + self.mbs)]
        batch = {}
        # Packed documents (reset_attention_mask): Megatron's [1, s, s] mask, True = masked out.
        extra = ("attention_mask",) if "attention_mask" in samples[0] else ()
        for key in BATCH_KEYS + extra:
            values = [np.asarray(s[key]) for s in samples]
            batch[key] = torch.from_numpy(np.stack(values)).to(self.device, non_blocking=True)
        batch["tokens"] = batch["tokens"].long()
        batch["labels"] = batch["labels"].long()
        batch["position_ids"] = batch["position_ids"].long()
        batch["loss_mask"] = batch["loss_mask"].float()
        return batch


def microbatch_iterators(
    dataset, consumed_samples: int, num_chunks: int, args, data_parallel_rank: int, device
) -> list[MicrobatchIterator]:
    """One iterator per model chunk (each virtual pipeline stage reads the same sequence)."""
    return [
        MicrobatchIterator(
            dataset,
            consumed_samples,
            args.micro_batch_size,
            data_parallel_rank,
            args.data_parallel_size,
            device,
        )
        for _ in range(num_chunks)
    ]
