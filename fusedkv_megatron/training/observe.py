"""What the log adds besides loss and speed: per-phase timers, the parameter norm, the fp16
loss scale, memory, and the profiler's schedule. One `Observer` per run, built by the Trainer.

Timers are Megatron-Core's own (`megatron.core.timers.Timers`): the schedules, the pipeline
p2p calls, `finalize_model_grads` and the optimizer time themselves when `config.timers` is
set, as in Megatron-LM; the loop adds "optimizer" (the whole step) and "batch-generator"
(waiting for the next microbatch). Level 1 (`--timing-log-level 1`): forward-backward,
all-grads-sync (the data-parallel gradient reduce), params-all-gather, optimizer and its parts;
level 2 adds forward/backward compute, the pipeline send/recv timers and batch-generator.
Evaluation and checkpoint saves run with the timers detached, so an interval counts training.

Memory is reported as the largest value over all ranks with the rank that has it, in GiB
(2**30 bytes): on CUDA the allocated and peak-allocated bytes of torch's allocator, on CPU the
peak resident set size of the process.
"""

from __future__ import annotations

import contextlib
import resource
import sys
from collections.abc import Iterator

import torch

from .profiling import StepProfiler

# Megatron-LM's list (training.py, training_log), in its order, plus nothing of ours.
TIMERS_TO_LOG = (
    "forward-backward",
    "forward-compute",
    "backward-compute",
    "batch-generator",
    "forward-recv",
    "forward-send",
    "backward-recv",
    "backward-send",
    "forward-send-forward-recv",
    "forward-send-backward-recv",
    "backward-send-forward-recv",
    "backward-send-backward-recv",
    "forward-backward-send-forward-backward-recv",
    "layernorm-grads-all-reduce",
    "embedding-grads-all-reduce",
    "all-grads-sync",
    "params-all-gather",
    "optimizer-copy-to-main-grad",
    "optimizer-unscale-and-check-inf",
    "optimizer-clip-main-grad",
    "optimizer-count-zeros",
    "optimizer-inner-step",
    "optimizer-copy-main-to-model-params",
    "optimizer",
)
GIB = float(2**30)


def _optimizer_configs(optimizer) -> list:
    parts = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [p.config for p in parts if getattr(p, "config", None) is not None]


class _TimedBatches(Iterator):
    """A microbatch iterator whose `next` is timed as "batch-generator" (level 2)."""

    def __init__(self, it, observer: Observer):
        self.it, self.observer = it, observer

    def __next__(self):
        with self.observer.timed("batch-generator", log_level=2):
            return next(self.it)


class Observer:
    """The run's timers (attached to Megatron's configs at --timing-log-level >= 1), its
    profiler, and the interval's extra log fields; the Trainer calls the hooks, the Reporter
    `interval` at each log line."""

    def __init__(self, rt):
        from megatron.core.timers import Timers

        a = rt.args
        self.args, self.rt = a, rt
        self.timers = None
        if a.timing_log_level > 0:
            self.timers = Timers(a.timing_log_level, a.timing_log_option)
        self._configs = [rt.config, *_optimizer_configs(rt.optimizer)]
        self._attach(self.timers)
        for cfg in self._configs:
            cfg.barrier_with_L1_time = a.barrier_with_level_1_timing
        self.profiler = StepProfiler(a, torch.distributed.get_rank())

    def _attach(self, timers) -> None:
        for cfg in self._configs:
            cfg.timers = timers

    # ------------------------------------------------------------------ hooks for the loop
    def before_iteration(self, finished: int) -> None:
        """Top of every training iteration (`finished` = iterations done so far)."""
        self.profiler.before(finished)

    def after_iteration(self, finished: int) -> None:
        """Right after the iteration's step (`finished` now counts it)."""
        self.profiler.after(finished)

    @contextlib.contextmanager
    def timed(self, name: str, log_level: int = 1):
        """Time a block as Megatron timer `name` while timers are attached; level-1 timers
        start and stop at a barrier (unless --no-barrier-with-level-1-timing)."""
        timers = self.rt.config.timers
        if timers is None:
            yield
            return
        barrier = log_level == 1 and self.args.barrier_with_level_1_timing
        timer = timers(name, log_level=log_level)
        timer.start(barrier=barrier)
        try:
            yield
        finally:
            timer.stop(barrier=barrier)

    def time_batches(self, iterators):
        """The loop's data iterator(s), each `next` timed as "batch-generator"."""
        if self.timers is None:
            return iterators
        if isinstance(iterators, list):
            return [_TimedBatches(it, self) for it in iterators]
        return _TimedBatches(iterators, self)

    @contextlib.contextmanager
    def detached(self):
        """Evaluation and saves: the schedules and the optimizer see no timers."""
        self._attach(None)
        try:
            yield
        finally:
            self._attach(self.timers)

    def close(self) -> None:
        self.profiler.close()

    # ------------------------------------------------------------------ interval report
    def interval(self, iterations: int) -> tuple[list[str], dict[str, float], list[str]]:
        """At a log interval, on every rank (collective): (fields for the progress line,
        scalars, extra lines) of the `iterations` since the last call. Values are meaningful
        on the log rank."""
        fields: list[str] = []
        scalars: dict[str, float] = {}
        if self.args.log_params_norm:
            norm = params_norm(self.rt.model)
            fields.append(f"params norm: {norm:.3f}")
            scalars["params-norm"] = norm
        if self.args.fp16:
            scale = float(self.rt.optimizer.get_loss_scale().item())
            fields.append(f"loss scale: {scale:.1f}")
            scalars["loss-scale"] = scale
        mem_fields, mem_scalars = memory_over_ranks()
        fields += mem_fields
        scalars.update(mem_scalars)
        lines = []
        if self.timers is not None:
            text, times = self._timer_report(max(iterations, 1))
            if text:
                lines.append(text)
            if self.args.log_timers_to_tensorboard:  # seconds, as Megatron-LM writes them
                scalars.update({f"{name}-time": sec for name, sec in times.items()})
        return fields, scalars, lines

    def _timer_report(self, iterations: int) -> tuple[str | None, dict[str, float]]:
        """The timers' text (ms per iteration) in --timing-log-option's form and {name: max
        over ranks in seconds per iteration}; resets them."""
        names = list(TIMERS_TO_LOG)
        text = self.timers.get_all_timers_string(names, normalizer=iterations, reset=False)
        min_max = self.timers._get_global_min_max_time(names, True, False, iterations)
        return text, {name: hi for name, (_, hi) in min_max.items()}


def params_norm(model_chunks) -> float:
    """L2 norm of all parameters, each counted once: tensor-parallel duplicates and the tied
    output layer left out (Megatron's rule), reduced over the model-parallel ranks."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    total = torch.zeros(1, dtype=torch.float64, device=_device())
    for chunk in model_chunks:
        for p in chunk.parameters():
            if param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p):
                total += p.detach().double().pow(2).sum()
    torch.distributed.all_reduce(total, group=parallel_state.get_model_parallel_group())
    return float(total.sqrt())


def _device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"


def memory_over_ranks() -> tuple[list[str], dict[str, float]]:
    """Collective: the largest memory figures over all ranks and the rank holding each."""
    if torch.cuda.is_available():
        kind = "cuda"
        local = [torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()]
    else:
        kind = "cpu"
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        local = [kib * (1 if sys.platform == "darwin" else 1024)]  # macOS reports bytes
    mine = torch.tensor(local, dtype=torch.float64, device=_device())
    every = [torch.zeros_like(mine) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(every, mine)
    return describe_memory(kind, torch.stack(every).cpu())


MEMORY_FIGURES = {  # kind: (log label, [(name, TensorBoard tag)])
    "cuda": (
        "memory (GiB)",
        [("allocated", "memory-allocated-gib"), ("max allocated", "memory-max-allocated-gib")],
    ),
    "cpu": ("host memory (GiB)", [("max RSS", "host-memory-max-rss-gib")]),
}


def describe_memory(kind: str, table: torch.Tensor) -> tuple[list[str], dict[str, float]]:
    """The log field and scalars of `table` [ranks, figures] (bytes): per figure its largest
    value in GiB and the rank that has it (tag ...-rank)."""
    label, figures = MEMORY_FIGURES[kind]
    best, where = table.max(dim=0)
    parts, scalars = [], {}
    for i, (name, tag) in enumerate(figures):
        gib = float(best[i]) / GIB
        parts.append(f"{gib:.2f} {name} (rank {int(where[i])})")
        scalars[tag] = gib
        scalars[tag.removesuffix("-gib") + "-rank"] = float(where[i])
    return [f"{label}: " + ", ".join(parts)], scalars
