"""The microbatch iterator: a run that reads past the end of its dataset gets a DataError that
says why (batch sizes changed on resume) and what to do, not a bare RuntimeError."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusedkv_megatron.data.datasets import DataError
from fusedkv_megatron.training.batches import MicrobatchIterator


def _sample(i: int) -> dict:
    tokens = np.full(4, i, dtype=np.int64)
    return {
        "tokens": tokens,
        "labels": tokens,
        "loss_mask": np.ones(4),
        "position_ids": np.arange(4),
    }


def test_reading_past_the_end_is_a_data_error():
    dataset = [_sample(i) for i in range(6)]
    it = MicrobatchIterator(dataset, consumed_samples=2, micro_batch_size=2, data_parallel_rank=0,
                            data_parallel_size=1)  # fmt: skip
    assert next(it)["tokens"][:, 0].tolist() == [2, 3]
    assert next(it)["tokens"][:, 0].tolist() == [4, 5]
    with pytest.raises(DataError, match=r"sample 7 was requested but the dataset holds 6 samples.*"
                                         r"resume with the checkpoint's batch sizes"):  # fmt: skip
        next(it)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_worker_count_reads_megatrons_order(num_workers):
    """Rank r of D reads samples [p + r*M, p + (r+1)*M) of each M*D slice from p = consumed on,
    in order, with the loader's workers reading ahead; past the end: the same DataError."""
    dataset = [_sample(i) for i in range(22)]
    for rank in range(2):
        it = MicrobatchIterator(dataset, consumed_samples=4, micro_batch_size=3,
                                data_parallel_rank=rank, data_parallel_size=2,
                                num_workers=num_workers)  # fmt: skip
        read = [next(it)["tokens"][:, 0].tolist() for _ in range(3)]
        starts = [4 + rank * 3 + 6 * k for k in range(3)]
        assert read == [list(range(s, s + 3)) for s in starts]
        with pytest.raises(DataError, match="the data ran out"):
            next(it)
        it.close()


def test_batches_keep_the_training_dtypes():
    batch = next(MicrobatchIterator([_sample(0)], 0, 1, 0, 1))
    assert {k: v.dtype for k, v in batch.items()} == {
        "tokens": torch.long,
        "labels": torch.long,
        "loss_mask": torch.float,
        "position_ids": torch.long,
    }


def test_virtual_pipeline_chunks_read_one_loader_in_the_same_order():
    """Each model chunk sees the same microbatches, whichever chunk reads first."""
    from argparse import Namespace

    from fusedkv_megatron.training.batches import microbatch_iterators

    args = Namespace(micro_batch_size=2, data_parallel_size=1, num_workers=2)
    dataset = [_sample(i) for i in range(8)]
    first, second = microbatch_iterators(dataset, 2, 2, args, 0, "cpu")
    a = [next(first)["tokens"][:, 0].tolist() for _ in range(2)]
    b = [next(second)["tokens"][:, 0].tolist() for _ in range(3)]
    a.append(next(first)["tokens"][:, 0].tolist())
    assert a == b == [[2, 3], [4, 5], [6, 7]]
