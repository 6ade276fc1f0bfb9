"""`--profile`: a torch.profiler trace of a few training iterations on chosen ranks.

The profiler starts before iteration `--profile-step-start + 1` and stops after iteration
`--profile-step-end` (Megatron-LM's step numbers: the count of finished iterations), so a
resumed run profiles the same iterations. Each profiled iteration is an `iteration N` span, N
the iteration number of the log. The trace is written by torch's TensorBoard handler as
`rank{R}.{time}.pt.trace.json` (Chrome trace format): TensorBoard's profiler plugin
(torch-tb-profiler) reads the directory, https://ui.perfetto.dev opens the file.
"""

from __future__ import annotations

import torch


def _window(warmup: int, active: int):
    """A torch.profiler schedule: `warmup` steps, then `active` recorded ones, then nothing."""
    from torch.profiler import ProfilerAction

    def action(step: int) -> ProfilerAction:
        if step < warmup:
            return ProfilerAction.WARMUP
        if step < warmup + active - 1:
            return ProfilerAction.RECORD
        if step == warmup + active - 1:
            return ProfilerAction.RECORD_AND_SAVE
        return ProfilerAction.NONE

    return action


class StepProfiler:
    """Drive a torch.profiler.profile from the training loop: `before(finished)` at the top of
    every iteration and `after(finished)` right after its step (`finished`: the iterations
    done at that moment); `close()` stops a recording that the run's end cut short. The
    iteration before the window is the profiler's warm-up (when the run has one)."""

    def __init__(self, args, rank: int):
        self.enabled = bool(args.profile) and rank in args.profile_ranks
        self.start, self.end = args.profile_step_start, args.profile_step_end
        self.dir, self.rank = args.profile_dir, rank
        self.prof = None
        self.span = None
        self.done = False

    def before(self, finished: int) -> None:
        if not self.enabled or self.done:
            return
        if self.prof is None and self.start - 1 <= finished < self.end:
            warmup = 1 if finished < self.start else 0
            self._begin(warmup, self.end - max(finished, self.start))
        if self.prof is not None and finished >= self.start:
            self.span = torch.profiler.record_function(f"iteration {finished + 1}")
            self.span.__enter__()

    def after(self, finished: int) -> None:
        if self.prof is None:
            return
        if self.span is not None:
            self.span.__exit__(None, None, None)
            self.span = None
        self.prof.step()
        if finished >= self.end:
            self.close()

    def _begin(self, warmup: int, active: int) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(
            activities=activities,
            schedule=_window(warmup, active),
            on_trace_ready=torch.profiler.tensorboard_trace_handler(
                self.dir, worker_name=f"rank{self.rank}"
            ),
            record_shapes=True,
        )
        self.prof.start()

    def close(self) -> None:
        """Stop (writing the trace if still recording); later iterations are not profiled."""
        if self.span is not None:
            self.span.__exit__(None, None, None)
            self.span = None
        if self.prof is not None:
            self.prof.stop()
            self.prof = None
            self.done = True
