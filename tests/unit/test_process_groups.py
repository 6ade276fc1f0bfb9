"""The test suite's own hygiene: parallel state built and released again and again (as every
test that uses Megatron does) leaves no process group and no thread behind."""

from __future__ import annotations

import torch

from tests.conftest import release_process_groups, thread_count


def test_released_parallel_state_leaves_no_threads(dist_single):
    from megatron.core import parallel_state as ps
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from torch.distributed.distributed_c10d import _world

    release_process_groups()
    before = thread_count()
    for _ in range(3):
        ps.initialize_model_parallel(1, 1)
        assert len(_world.pg_map) > 10  # Megatron's groups, three gloo threads each
        # Its forward is an lru_cache that keeps the module and its context-parallel group.
        RotaryEmbedding(
            8, 1.0, use_cpu_initialization=True, cp_group=ps.get_context_parallel_group()
        )(16)
        release_process_groups()
        assert len(_world.pg_map) == 1  # the world group
    assert thread_count() <= before
    assert torch.distributed.is_initialized()
