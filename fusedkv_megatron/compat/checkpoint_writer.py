"""Megatron-Core's torch_dist writer copies every CPU tensor that is a view of a larger storage
before it writes anything (`FileSystemWriterAsync.prepare_write_data`; torch.save of a view
would write the whole storage). On CPU the weights are views of the DDP parameter buffer, and
with the distributed optimizer in fp32 its main-parameter shards are views of the same buffer:
a save then holds a second copy of the weights (and of the shards) at once, +30-40% of the
training state (docs/checkpoints.md). `streaming_views()` defers each copy to the moment its
tensor is written, so at most one copy per writer thread exists at a time.

How: while a save is prepared, the planner hands the writer a one-byte stand-in for each such
view (which the writer does not copy); the writer's per-file loop gets the real view back,
copied just before it is written. A forked asynchronous writer inherits the table, so it
copies from its own snapshot of memory. GPU tensors and non-views are untouched. Scoped to
one save (a context manager), so nothing stays patched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

# storage address of a stand-in -> (the stand-in, the view it stands for)
_VIEWS: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _is_cpu_view(t) -> bool:
    return (
        isinstance(t, torch.Tensor)
        and t.device.type == "cpu"
        and t.untyped_storage().size() != t.numel() * t.element_size()
    )


class _CopyOnWrite(Iterable):
    """The (item, tensor) pairs of one file, stand-ins replaced by copies made one at a time."""

    def __init__(self, pairs):
        self.pairs = pairs

    def __iter__(self) -> Iterator:
        for item, tensor in self.pairs:
            entry = _VIEWS.get(tensor.untyped_storage().data_ptr())
            yield (item, entry[1].clone()) if entry is not None else (item, tensor)

    def __len__(self) -> int:
        return len(self.pairs)


@contextlib.contextmanager
def streaming_views():
    """Within this block, dist_checkpointing saves copy CPU views one by one while writing."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import (
        FileSystemWriterAsync as Writer,
    )

    prepare, write = Writer.prepare_write_data, Writer.write_preloaded_data

    def prepare_write_data(self, plan, planner):
        resolve = planner.resolve_data

        def resolve_data(item):
            data = resolve(item)
            if not _is_cpu_view(data):
                return data
            stand_in = torch.empty(1, dtype=torch.uint8)
            _VIEWS[stand_in.untyped_storage().data_ptr()] = (stand_in, data.detach())
            return stand_in

        planner.resolve_data = resolve_data
        try:
            return prepare(self, plan, planner)
        finally:
            del planner.resolve_data

    def write_preloaded_data(transform_list, local_proc_idx, write_bucket, *args, **kwargs):
        file_name, storage_key, (bytes_data, tensor_data) = write_bucket
        bucket = (file_name, storage_key, (bytes_data, _CopyOnWrite(tensor_data)))
        return write(transform_list, local_proc_idx, bucket, *args, **kwargs)

    Writer.prepare_write_data = prepare_write_data
    Writer.write_preloaded_data = staticmethod(write_preloaded_data)
    try:
        yield
    finally:
        Writer.prepare_write_data = prepare
        Writer.write_preloaded_data = staticmethod(write)
        _VIEWS.clear()
