"""The training loop: microbatches through Megatron's pipeline schedules, optimizer steps with
non-finite skipping, evaluation, periodic checkpoints, signals and exit conditions.

One training iteration = one global batch: `get_forward_backward_func()` runs the microbatches
(1F1B or interleaved with PP, plain with PP=1), `finalize_model_grads` reduces gradients, then
every rank agrees (one small all-reduce) on whether the loss or any gradient is non-finite and
whether an exit signal or time limit was hit. A non-finite iteration is skipped (no optimizer
or LR step, the data is consumed) and counted; `--max-consecutive-skipped-iters` in a row stop
the run. Validation always reads the same first `eval_iters` global batches of the validation
split, so its curve compares like with like across evaluations and resumes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from ..context_parallel import batch_on_this_rank
from ..pipeline import pipeline_schedule_kwargs
from .batches import microbatch_iterators
from .checkpointing import TrainState
from .memory_report import MemoryReport
from .observe import Observer
from .reporting import fusion_weight_stats
from .schedule import BatchSizes


class TrainingDiverged(RuntimeError):
    """Too many consecutive iterations with a non-finite loss or gradient."""


def _loss_func(loss_mask: torch.Tensor, inject_nan: bool, output: torch.Tensor):
    """Megatron's 3-tuple: summed loss, token count, and [sum, count] for reporting."""
    losses = output.float().view(-1)
    mask = loss_mask.view(-1)
    loss = torch.sum(losses * mask)
    if inject_nan:
        loss = loss * float("nan")
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss.detach().clone(), num_tokens.float()])
    return loss, num_tokens, {"lm loss": report}


def _forward_step(inject_nan: bool, data_iterator, model):
    # This context-parallel rank's chunks of the sequence (all of it at CP=1).
    batch = batch_on_this_rank(next(data_iterator), parallel_state.get_context_parallel_group())
    output = model(
        batch["tokens"],
        batch["position_ids"],
        attention_mask=batch.get("attention_mask"),  # packed documents, else None
        labels=batch["labels"],
    )
    return output, partial(_loss_func, batch["loss_mask"], inject_nan)


def _reduce_losses(losses: list[dict]) -> tuple[float, float] | None:
    """(loss sum, token count) over microbatches, data- and context-parallel ranks; None off
    the last stage."""
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    total = torch.zeros(2, dtype=torch.float64)
    for item in losses:
        total += item["lm loss"].detach().to("cpu", torch.float64)
    total = total.to(torch.cuda.current_device() if torch.cuda.is_available() else "cpu")
    dp_cp = parallel_state.get_data_parallel_group(with_context_parallel=True)
    torch.distributed.all_reduce(total, group=dp_cp)
    return float(total[0]), float(total[1])


def _grads_finite(model) -> bool:
    for chunk in model:
        for buffer in chunk.buffers + chunk.expert_parallel_buffers:
            if not torch.isfinite(buffer.grad_data).all():
                return False
    return True


def _agree(flags: list[float]) -> list[float]:
    """Element-wise max over all ranks (any rank's True becomes everyone's)."""
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    t = torch.tensor(flags, dtype=torch.float32, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.tolist()


def gather_params(model) -> None:
    """Make every rank's weights current. With --overlap-param-gather the distributed
    optimizer's step leaves the updated weights to be all-gathered by the next forward's hooks
    (overlapped with compute), so until then each rank holds only its own shard's update;
    evaluation, checkpoints and weight statistics gather them first, synchronously (as
    Megatron-LM does before it evaluates or saves). The next forward then skips that gather.
    No-op without the flag."""
    with torch.no_grad():
        for chunk in model:
            if chunk.ddp_config.overlap_param_gather:
                chunk.start_param_sync(force_sync=True)


@dataclass(frozen=True)
class StepResult:
    """What one training step did. The flags are agreed over all ranks."""

    loss: float | None  # mean token loss (None off the last pipeline stage)
    grad_norm: float | None  # None when the step was skipped
    skipped: bool  # no optimizer/LR step (non-finite values, or the fp16 loss scaler)
    non_finite: bool  # the loss or a gradient was NaN/inf
    signal: bool  # an exit signal was received
    time_up: bool  # --exit-duration-in-mins has passed


class Trainer:
    def __init__(
        self, rt, train_ds, valid_ds, test_ds, reporter, signals, save_fn, async_saves=None
    ):
        self.rt, self.args = rt, rt.args
        self.train_ds, self.valid_ds, self.test_ds = train_ds, valid_ds, test_ds
        self.reporter, self.signals, self.save_fn = reporter, signals, save_fn
        self.async_saves = async_saves  # --async-save: commit finished saves between steps
        self.forward_backward = get_forward_backward_func()
        self.schedule_kwargs = pipeline_schedule_kwargs(
            rt.config,
            rt.kv,
            seq_length=self.args.seq_length,
            num_microbatches=self.args.num_microbatches,
        )
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.batch_sizes = BatchSizes(self.args)
        self.inject_nan_iters = set(self.args.inject_nan_iters or ())
        self.memory = MemoryReport(rt)  # the planner's peak, then measured against it
        self.observer = Observer(rt)  # timers, profiler, memory, params norm (observe.py)
        if reporter is not None:  # a caller may drive train_step without logging
            reporter.attach(self.observer)

    def _data(self, dataset, consumed: int):
        its = microbatch_iterators(
            dataset, consumed, len(self.rt.model), self.args, self.dp_rank, self.rt.device
        )
        return self.observer.time_batches(its[0] if len(its) == 1 else its)

    def _run_schedule(
        self, data, forward_only: bool, inject_nan: bool = False, num_microbatches=None
    ):
        a = self.args
        return self.forward_backward(
            forward_step_func=partial(_forward_step, inject_nan),
            data_iterator=data,
            model=self.rt.model if len(self.rt.model) > 1 else self.rt.model[0],
            num_microbatches=num_microbatches or a.num_microbatches,
            seq_length=a.seq_length,
            micro_batch_size=a.micro_batch_size,
            decoder_seq_length=a.seq_length,
            forward_only=forward_only,
            **self.schedule_kwargs,
        )

    def train_step(self, state: TrainState, data, time_up: bool, batch: tuple[int, int]):
        """One global batch of `batch` = (samples, microbatches): forward/backward, then the
        optimizer step (the LR schedule moves by the samples) unless a loss or gradient is not
        finite. Returns a StepResult."""
        rt = self.rt
        for chunk in rt.model:
            chunk.zero_grad_buffer()
        rt.optimizer.zero_grad()
        inject = (state.iteration + 1) in self.inject_nan_iters
        losses = self._run_schedule(data, False, inject_nan=inject, num_microbatches=batch[1])
        reduced = _reduce_losses(losses)
        loss = reduced[0] / max(reduced[1], 1.0) if reduced else None
        bad_loss = loss is not None and not math.isfinite(loss)
        # fp16: the dynamic loss scaler detects overflowing grads itself (and skips).
        bad_grad = not self.args.fp16 and not _grads_finite(rt.model)
        signal = self.signals.received is not None
        bad_loss, bad_grad, signal, time_up = (
            bool(x) for x in _agree([bad_loss, bad_grad, signal, time_up])
        )
        grad_norm, skipped = None, True
        if not (bad_loss or bad_grad):
            with self.observer.timed("optimizer"):
                ok, grad_norm, _ = rt.optimizer.step()
            if ok:
                rt.scheduler.step(increment=batch[0])
                skipped = False
        return StepResult(loss, grad_norm, skipped, bad_loss or bad_grad, signal, time_up)

    def evaluate(self, dataset, name: str, iteration: int) -> float | None:
        """Mean token loss over the first eval_iters global batches of `dataset`."""
        a = self.args
        if dataset is None or a.eval_iters == 0:
            return None
        gather_params(self.rt.model)
        for chunk in self.rt.model:
            chunk.eval()
        data = self._data(dataset, 0)
        total_loss = total_tokens = 0.0
        with torch.no_grad():
            for _ in range(a.eval_iters):
                reduced = _reduce_losses(self._run_schedule(data, forward_only=True))
                if reduced:
                    total_loss += reduced[0]
                    total_tokens += reduced[1]
        for chunk in self.rt.model:
            chunk.train()
        loss = total_loss / max(total_tokens, 1.0)
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            self.reporter.log_eval(name, iteration, loss)
        return loss

    def train(self, state: TrainState) -> tuple[TrainState, str]:
        """Train until train_iters or an exit condition. Returns the state and why it stopped."""
        a, rt = self.args, self.rt
        start_time = getattr(a, "start_time", time.time())
        data = self._data(self.train_ds, state.consumed_train_samples)
        in_a_row, first = 0, state.iteration
        for chunk in rt.model:
            chunk.train()
        self.reporter.start()
        while state.iteration < a.train_iters:
            self.observer.before_iteration(state.iteration)
            time_up = (
                a.exit_duration_in_mins is not None
                and (time.time() - start_time) / 60.0 > a.exit_duration_in_mins
            )
            batch = self.batch_sizes.at(state.consumed_train_samples)
            with self.memory.watch():
                step = self.train_step(state, data, time_up, batch)
            state.iteration += 1
            self.observer.after_iteration(state.iteration)
            state.consumed_train_samples += batch[0]
            state.skipped_iters += int(step.skipped)
            state.skipped_samples += batch[0] if step.skipped else 0
            if self.async_saves is not None:
                with self.reporter.excluded():
                    self.async_saves.poll()
            in_a_row = in_a_row + 1 if step.non_finite else 0
            self.reporter.record(None if step.non_finite else step.loss, step.grad_norm, batch[0])
            if state.iteration % a.log_interval == 0:
                gather_params(rt.model)
                stats = fusion_weight_stats(rt.model)
                self.reporter.log(
                    state.iteration,
                    state.consumed_train_samples,
                    rt.optimizer.param_groups[0]["lr"],
                    state.skipped_iters,
                    in_a_row,
                    stats,
                )
            if in_a_row >= a.max_consecutive_skipped_iters:
                raise TrainingDiverged(
                    f"{in_a_row} iterations in a row (up to iteration {state.iteration}) had a "
                    f"non-finite loss or gradient and were skipped "
                    f"(--max-consecutive-skipped-iters {a.max_consecutive_skipped_iters}); the "
                    "run diverged: lower --lr, raise --lr-warmup-iters, use --clip-grad, or "
                    "resume from an earlier checkpoint"
                )
            if (
                a.eval_interval
                and state.iteration % a.eval_interval == 0
                and state.iteration < a.train_iters
            ):
                with self.reporter.excluded():  # throughput counts training only
                    self.evaluate(self.valid_ds, "validation", state.iteration)
            periodic = a.save_interval and state.iteration % a.save_interval == 0
            periodic = periodic or (a.save_first and state.iteration == first + 1)
            exit_iter = a.exit_interval and state.iteration % a.exit_interval == 0
            reason = (
                "signal"
                if step.signal
                else "time"
                if step.time_up
                else "exit-interval"
                if exit_iter
                else None
            )
            if a.save and (periodic or reason):
                with self.reporter.excluded():
                    gather_params(rt.model)
                    self.save_fn(state)
            if reason:
                return state, reason
        gather_params(rt.model)  # for the caller's final save and evaluation
        return state, "done"
