"""The microbatch iterator: a run that reads past the end of its dataset gets a DataError that
says why (batch sizes changed on resume) and what to do, not a bare RuntimeError."""

from __future__ import annotations

import numpy as np
import pytest

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
