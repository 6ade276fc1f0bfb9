"""Save training checkpoints (dist_checkpointing torch_dist; layout in checkpoint_format, contents
in checkpoint_state, loading in checkpoint_load).

A save cleans what crashed saves left, writes into DIR/iter_XXXXXXX.tmp, adds fusedkv_run.json
(+ tokenizer.model), fsyncs it, moves it into place (a rename, or an atomic exchange when the
iteration exists already) and only then updates DIR/latest_checkpointed_iteration.txt, so a
crash at any point leaves a complete checkpoint as the latest. `--keep-latest-k N` then deletes
older checkpoints, never the one the tracker names.

With `--async-save` the shards are written by a forked process per rank (Megatron-Core's
AsyncCallsQueue and its own writer, `async_strategy="mcore"`) while training goes on; the commit
above runs in the training processes once every rank's writer has finished and fsynced its
files, at the first iteration boundary after that (or before the next save, or at the end).
The writer dies with its trainer (PR_SET_PDEATHSIG), so a killed run leaves no process writing.

Each save logs its peak resident memory per phase (host_rss) and how long the loop was blocked.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import queue
import signal
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.core import CheckpointingException
from torch.distributed.checkpoint.api import CheckpointException

from .. import checkpoint_format as fmt
from ..compat import checkpoint_writer, optimizer_fixes
from . import host_rss
from .checkpoint_load import (  # noqa: F401 (the trainer's one import for checkpoints)
    load_checkpoint,
    reading_checkpoint,
    resolve_load_dir,
)
from .checkpoint_state import (  # noqa: F401
    TrainState,
    build_state_dict,
    error_reason,
    log0,
    optimizer_metadata,
    os_reason,
)


def use_in_process_write_queue() -> None:
    """Synchronous saves: the torch_dist writer's threads can report to a plain queue.

    Upstream creates a `spawn` multiprocessing Manager for that queue on the first save (meant
    for asynchronous saves in another process): it re-imports `__main__` in a new interpreter
    (seconds per rank; an unguarded entry script hangs forever, docs/upstream.md). Pre-setting the
    module's queue avoids that process.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is None:
        filesystem_async._results_queue = queue.Queue()


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the process that forked it dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _run_dying_with_parent(fn, *args, **kwargs):
    _die_with_parent()
    return fn(*args, **kwargs)


class AsyncSaves:
    """Saves in flight (`--async-save`). `poll()` at every iteration boundary commits the ones
    every rank has finished writing; `close()` waits for all. Collective (all ranks)."""

    def __init__(self):
        from multiprocessing.managers import SyncManager

        from megatron.core.dist_checkpointing.strategies import filesystem_async
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.queue = AsyncCallsQueue(persistent=False)
        # The writer process reports its results through this queue. A forked manager (not
        # upstream's spawned one, which re-imports __main__) that dies with the trainer.
        self._manager = SyncManager(ctx=mp.get_context("fork"))
        self._manager.start(_die_with_parent)
        filesystem_async._results_queue = self._manager.Queue()

    def pending(self) -> int:
        return self.queue.get_num_unfinalized_calls()

    def schedule(self, request) -> None:
        request = request._replace(async_fn=partial(_run_dying_with_parent, request.async_fn))
        self.queue.schedule_async_request(request)

    def poll(self, blocking: bool = False) -> float:
        """Commit the finished saves (all of them when `blocking`); seconds spent here."""
        start = time.perf_counter()
        if self.pending():
            try:
                self.queue.maybe_finalize_async_calls(blocking=blocking)
            except (CheckpointException, CheckpointingException, OSError) as e:
                raise fmt.CheckpointFormatError(
                    f"an asynchronous checkpoint write failed: {error_reason(e)}; free space "
                    "or fix the permissions, or save elsewhere"
                ) from None
        return time.perf_counter() - start

    def close(self) -> None:
        """Wait for and commit every save in flight, then stop the manager."""
        self.poll(blocking=True)
        self.abort()

    def abort(self) -> None:
        """Stop writers still running (no commit, no collective): a failing run."""
        if self.pending():
            self.queue.close(abort=True)
        if self._manager is not None:
            from megatron.core.dist_checkpointing.strategies import filesystem_async

            filesystem_async._results_queue = None  # the manager's queue dies with it
            self._manager.shutdown()
            self._manager = None


# Where a save can be killed on purpose (tests: --inject-kill-during-save POINT), in order.
CRASH_POINTS = (
    "before-write",  # leftovers cleaned, staging directory created
    "after-write",  # shards written, no fusedkv_run.json yet
    "before-commit",  # everything written and fsynced, nothing renamed
    "after-commit",  # the directory is in place, the tracker not yet moved
    "after-tracker",  # the tracker moved, the replaced directory not yet deleted
    "mid-retention",  # an old checkpoint renamed to *.deleting, not yet deleted
    "async-writing",  # --async-save: the writer process started, training goes on
)


def _crash_hook(kill_at: str | None) -> Callable[[str], None]:
    if kill_at is not None and kill_at not in CRASH_POINTS:
        raise ValueError(f"unknown crash point {kill_at!r}; one of {CRASH_POINTS}")

    def hook(point: str) -> None:
        if point == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def check_save_dir(save: str) -> None:
    """Fail at start-up, not after hours of training, when --save cannot hold checkpoints:
    create it if missing and try writing a file in it (every rank: each node must see it)."""
    path = Path(save)
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            what = "is a file" if p == path else f"is inside {p}, which is a file"
            raise fmt.CheckpointFormatError(
                f"--save {save} {what}, not a directory; pass a directory (created if missing)"
            )
    try:
        path.mkdir(parents=True, exist_ok=True)
        try:
            fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        except OSError as e:
            e.filename = None  # the probe's random name would only confuse
            raise
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise fmt.CheckpointFormatError(
            f"--save {save}: cannot write checkpoints there: {os_reason(e)}; choose a "
            "directory this job can create and write, or fix its permissions"
        ) from None


def _on_rank0(what: str, step: Callable[[], Any], fix: str) -> Any:
    """Run `step` on rank 0 only (it owns the directory layout); an OSError there becomes a
    CheckpointFormatError on every rank. Also a barrier."""
    result, error = None, None
    if torch.distributed.get_rank() == 0:
        try:
            result = step()
        except OSError as e:
            error = f"{what}: {os_reason(e)}{fix}"
    message = [error]
    torch.distributed.broadcast_object_list(message, src=0)
    if message[0]:
        raise fmt.CheckpointFormatError(message[0])
    return result


def save_checkpoint(
    root: str,
    model_chunks,
    optimizer,
    scheduler,
    train_state: TrainState,
    run_info: dict[str, Any],
    tokenizer_file: str | None,
    *,
    keep_latest_k: int = 0,
    kill_at: str | None = None,
    metadata: dict | None = None,
    async_saves: AsyncSaves | None = None,
) -> Path:
    """Write DIR/iter_XXXXXXX atomically and mark it as the latest. Collective (all ranks).

    `keep_latest_k` > 0 then deletes all but that many newest checkpoints (never the latest).
    `metadata` chooses the distributed optimizer's format (checkpoint_state.optimizer_metadata).
    With `async_saves` the shards are written in the background and the commit happens in a
    later `async_saves.poll()`. `kill_at` (tests only) SIGKILLs rank 0 at that point of
    CRASH_POINTS."""
    start = time.perf_counter()
    optimizer_fixes.apply()
    if async_saves is None:
        use_in_process_write_queue()
    else:
        async_saves.poll(blocking=True)  # one save in flight: its staging directory is ours
    crash = _crash_hook(kill_at)
    iteration = train_state.iteration
    staged = fmt.staging_dir(root, iteration)
    final = fmt.iteration_dir(root, iteration)
    phases = host_rss.Phases()

    def prepare() -> None:
        Path(root).mkdir(parents=True, exist_ok=True)
        fmt.remove_leftovers(root)
        staged.mkdir()
        crash("before-write")

    fix = "; free space or fix the permissions, or save elsewhere"
    _on_rank0(f"--save {root}: cannot prepare {staged.name}", prepare, fix)
    blocked = [0.0]

    def commit() -> list[int]:
        crash("after-write")
        fmt.write_run_info(staged, {**run_info, "iteration": iteration})
        if tokenizer_file:
            fmt.copy_tokenizer(tokenizer_file, staged)
        fmt.fsync_tree(staged)
        crash("before-commit")
        fmt.commit_iteration(root, iteration, crash)
        return fmt.prune_iterations(root, keep_latest_k, crash)

    def finish() -> None:
        with phases.phase("commit"):
            pruned = _on_rank0(f"--save {root}: cannot commit iteration {iteration}", commit, fix)
        took = time.perf_counter() - start
        how = f"in {took:.1f} s"
        if async_saves is not None:
            how += f", in the background; the loop was blocked {blocked[0]:.1f} s"
        memory = phases.summary()
        log0(
            f"saved checkpoint of iteration {iteration} to {final} ({how})"
            + (f"; {memory}" if memory else "")
        )
        if pruned:
            log0(f"deleted checkpoints of iterations {pruned} (--keep-latest-k {keep_latest_k})")

    with phases.phase("state dict"):
        state = build_state_dict(
            model_chunks,
            optimizer,
            scheduler,
            train_state,
            loading=False,
            with_optimizer=True,
            with_rng=True,
            metadata=metadata,
        )
    try:
        stage = "write" if async_saves is None else "stage"
        with phases.phase(stage), checkpoint_writer.streaming_views():
            request = dist_checkpointing.save(
                state,
                str(staged),
                async_sharded_save=async_saves is not None,
                async_strategy="mcore",
            )
            del state
            if async_saves is not None:
                request.add_finalize_fn(finish)
                async_saves.schedule(request)  # forks the writer
    except (CheckpointException, CheckpointingException, OSError) as e:
        raise fmt.CheckpointFormatError(
            f"--save {root}: writing {staged} failed: {error_reason(e)}{fix}"
        ) from None
    blocked[0] = time.perf_counter() - start
    if async_saves is None:
        finish()
        return final
    log0(
        f"writing checkpoint of iteration {iteration} in the background (the loop was blocked "
        f"{blocked[0]:.1f} s)"
    )
    crash("async-writing")
    return final
