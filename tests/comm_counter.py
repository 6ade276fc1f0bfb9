"""Count what a process hands to torch.distributed: every collective and point-to-point call
is wrapped (the `torch.distributed` functions, the copies Megatron-Core binds at import, and the
`isend`/`irecv` that `P2POp` checks against), and while counting each outermost call records
(operation, group ranks, bytes). Bytes follow the planner's convention (planner/comm.py): the
tensor of an all-reduce, broadcast or send, the gathered output of an all-gather, the
unscattered input of a reduce-scatter."""

from __future__ import annotations

import functools
import inspect
from collections import Counter

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

# name -> (operation, how to get the bytes from the bound arguments)
_OPS = {
    "all_reduce": ("all_reduce", lambda a: a["tensor"].nbytes),
    "broadcast": ("broadcast", lambda a: a["tensor"].nbytes),
    "all_gather": ("all_gather", lambda a: a["tensor"].nbytes * len(a["tensor_list"])),
    "all_gather_into_tensor": ("all_gather", lambda a: a["output_tensor"].nbytes),
    "_all_gather_base": ("all_gather", lambda a: a["output_tensor"].nbytes),
    "reduce_scatter": ("reduce_scatter", lambda a: sum(t.nbytes for t in a["input_list"])),
    "reduce_scatter_tensor": ("reduce_scatter", lambda a: a["input"].nbytes),
    "_reduce_scatter_base": ("reduce_scatter", lambda a: a["input"].nbytes),
    "send": ("send", lambda a: a["tensor"].nbytes),
    "isend": ("send", lambda a: a["tensor"].nbytes),
    "recv": ("recv", lambda a: a["tensor"].nbytes),
    "irecv": ("recv", lambda a: a["tensor"].nbytes),
}
# Megatron-Core modules that bind an all-gather / reduce-scatter function at import
_BOUND = (
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.distributed.param_and_grad_buffer",
)


class CollectiveCounter:
    def __init__(self):
        self.calls: list[tuple[str, tuple[int, ...], int]] = []
        self.counting = False
        self._depth = 0
        self._undo: list[tuple[object, str, object]] = []

    def _wrap(self, name: str, original):
        op, size = _OPS[name]
        signature = inspect.signature(original)

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            if self.counting and self._depth == 0:
                bound = signature.bind(*args, **kwargs).arguments
                group = bound.get("group")
                ranks = tuple(dist.get_process_group_ranks(group or dist.group.WORLD))
                self.calls.append((op, ranks, int(size(bound))))
            self._depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self._depth -= 1

        return wrapper

    def _patch(self, owner, attr: str, wrapper) -> None:
        self._undo.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, wrapper)

    def install(self) -> CollectiveCounter:
        import importlib

        wrappers = {name: self._wrap(name, getattr(dist, name)) for name in _OPS}
        for name, wrapper in wrappers.items():
            self._patch(dist, name, wrapper)
        for name in ("isend", "irecv"):  # P2POp accepts only c10d's own isend/irecv
            self._patch(c10d, name, wrappers[name])
        for module_name in _BOUND:
            module = importlib.import_module(module_name)
            for attr in ("dist_all_gather_func", "dist_reduce_scatter_func"):
                original = getattr(module, attr, None)
                if original is not None:
                    name = original.__name__
                    self._patch(module, attr, self._wrap(name, original))
        return self

    def uninstall(self) -> None:
        while self._undo:
            owner, attr, original = self._undo.pop()
            setattr(owner, attr, original)

    def totals(self, names: dict[tuple[int, ...], str]) -> Counter:
        """Bytes per (group name, operation); groups not in `names` are named by their size."""
        out: Counter = Counter()
        for op, ranks, nbytes in self.calls:
            out[(names.get(ranks, f"group of {len(ranks)}"), op)] += nbytes
        return out
