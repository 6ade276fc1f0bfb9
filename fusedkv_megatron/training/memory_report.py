"""The planner's memory prediction for the run's own layout, and what the run measures.

At start-up the trainer logs the per-GPU peak `fusedkv-plan` predicts for exactly this run
(layout, fusions as built, norms as they run: fused on CUDA, torch's composite RMSNorm on CPU).
During the first `MEASURE_ITERS` iterations it measures, and then logs measured against
predicted with the ratio, for the rank where the ratio is largest:

- on a GPU: `torch.cuda.max_memory_allocated()` against the predicted peak (weights,
  gradients, optimizer state, activations in flight and transient buffers);
- on CPU (no allocator statistics): the bytes of the DDP parameter and gradient buffers and the
  optimizer's tensors, plus the peak of the bytes autograd holds for backward (distinct
  storages, parameters excluded, tracked as saved tensors are packed and released), against the
  predicted static + activations (the planner's transient buffers are not measured on CPU).
"""

from __future__ import annotations

import contextlib

import torch

MEASURE_ITERS = 2


def job_and_layout(rt):
    """The planner's Job and Layout of this run as built (padded vocabulary, fusions as in the
    model's config): what the start-up predictions plan."""
    from ..planner import Fusions, Job
    from ..planner.layout import layout_from_args
    from ..training.model_size import ModelShape

    a = rt.args
    shape = ModelShape.from_args(a, rt.padded_vocab_size)
    precision = "bf16" if a.bf16 else "fp16" if a.fp16 else "fp32"
    # the vocabulary is padded already; a divisor of 1 keeps it
    job = Job(shape, rt.kv, a.seq_length, precision, 1, Fusions.from_config(rt.config))
    layout = layout_from_args(a)
    return job, layout


def predicted(rt):
    """This rank's RankMemory as the planner predicts it (None if the planner cannot model
    the layout)."""
    from megatron.core import parallel_state

    from ..planner.memory import rank_memory

    job, layout = job_and_layout(rt)
    norm_impl = "fused" if rt.device.type == "cuda" else "composite"
    try:
        return rank_memory(
            job, layout, parallel_state.get_pipeline_model_parallel_rank(), norm_impl
        )
    except ValueError:  # PlanError and the like: a layout the planner does not model
        return None


class _Saved:
    """A saved tensor, counted while autograd holds it."""

    __slots__ = ("tensor", "key", "tracker")

    def __init__(self, tensor, key, tracker):
        self.tensor, self.key, self.tracker = tensor, key, tracker

    def __del__(self):
        self.tracker.release(self.key)


class SavedBytes:
    """The peak of the bytes of distinct storages autograd holds for backward (parameters
    excluded), measured with saved-tensor hooks."""

    def __init__(self, model_chunks):
        self.params = {p.untyped_storage().data_ptr() for c in model_chunks for p in c.parameters()}
        self.live: dict[int, list[int]] = {}  # storage -> [references, bytes]
        self.current = self.peak = 0

    def pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self.params:
            return t
        entry = self.live.setdefault(key, [0, storage.nbytes()])
        if entry[0] == 0:
            self.current += entry[1]
            self.peak = max(self.peak, self.current)
        entry[0] += 1
        return _Saved(t, key, self)

    @staticmethod
    def unpack(saved):
        return saved.tensor if isinstance(saved, _Saved) else saved

    def release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self.live[key]


def _static_bytes(rt) -> int:
    """Bytes of the distinct storages of the weights, the DDP gradient buffer and the
    optimizer's tensors (fp32 main weights, moments; a view of a buffer counts once)."""
    storages: dict[int, int] = {}

    def add(t) -> None:
        if torch.is_tensor(t):
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()

    for chunk in rt.model:
        for param in chunk.parameters():  # views of the DDP parameter buffer where it has one
            add(param)
        for buf in getattr(chunk, "buffers", []):
            add(buf.param_data)
            add(buf.grad_data)
    for opt in getattr(rt.optimizer, "chained_optimizers", [rt.optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                add(p)
        for state in inner.state.values():
            for v in state.values():
                add(v)
    return sum(storages.values())


class MemoryReport:
    """Logs the prediction at start-up; measures the first MEASURE_ITERS iterations."""

    def __init__(self, rt):
        self.rt, self.done, self.steps = rt, False, 0
        self.prediction = predicted(rt)
        self.saved = None
        from .reporting import print_first

        p = self.prediction
        if p is None:
            print_first("> memory: the planner cannot model this layout; no prediction")
            return
        print_first(
            f"> memory predicted by the planner (pipeline rank {p.pp_rank}): peak "
            f"{_size(p.peak)} = weights+grads+optimizer {_size(p.static)} + activations "
            f"{_size(p.activations)} ({p.in_flight} microbatch(es) in flight) + transient "
            f"{_size(p.transient)}; measured after {MEASURE_ITERS} iterations"
        )

    @contextlib.contextmanager
    def watch(self):
        """Around one training step: measure this process's first MEASURE_ITERS steps (a
        resumed run too), then report."""
        if self.done or self.prediction is None:
            yield
            return
        cuda = self.rt.device.type == "cuda"
        if not cuda and self.saved is None:
            self.saved = SavedBytes(self.rt.model)
        hooks = (
            contextlib.nullcontext()
            if cuda
            else torch.autograd.graph.saved_tensors_hooks(self.saved.pack, self.saved.unpack)
        )
        with hooks:
            yield
        self.steps += 1
        if self.steps == MEASURE_ITERS:
            self.report()

    def report(self) -> None:
        from .reporting import print_first

        self.done = True
        p = self.prediction
        if self.rt.device.type == "cuda":
            measured, want = torch.cuda.max_memory_allocated(), p.peak
            what = "torch.cuda.max_memory_allocated"
        else:
            measured = _static_bytes(self.rt) + self.saved.peak
            want = p.static + p.activations
            what = "weights, gradient buffer, optimizer tensors + peak bytes saved for backward"
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        table = torch.zeros(world, 2, dtype=torch.float64)
        table[rank] = torch.tensor([measured, want], dtype=torch.float64)
        table = table.to(self.rt.device)
        torch.distributed.all_reduce(table)
        table = table.cpu()
        worst = max(range(world), key=lambda r: table[r, 0] / max(table[r, 1], 1.0))
        m, w = table[worst].tolist()
        print_first(
            f"> memory after {MEASURE_ITERS} iterations (rank {worst}, the largest ratio): "
            f"measured {_size(m)} ({what}), predicted {_size(w)}, ratio {m / max(w, 1.0):.3f}"
        )


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


__all__ = ["MEASURE_ITERS", "MemoryReport", "SavedBytes", "predicted"]
