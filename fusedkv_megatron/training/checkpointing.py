"""Save and load training checkpoints (dist_checkpointing torch_dist; layout in checkpoint_format).

A save cleans what crashed saves left, writes into DIR/iter_XXXXXXX.tmp, adds fusedkv_run.json
(+ tokenizer.model), fsyncs it, moves it into place (a rename, or an atomic exchange when the
iteration exists already) and only then updates DIR/latest_checkpointed_iteration.txt, so a
crash at any point leaves a complete checkpoint as the latest. `--keep-latest-k N` then deletes
older checkpoints, never the one the tracker names. The state dict holds "model" (or "model0",
"model1", ... with a virtual pipeline), "optimizer" (fully_reshardable, so TP/PP/DP may change
on load), "opt_param_scheduler", "iteration", "rng_state" and "train_state" (data position and
counters). RNG states are restored only when the parallel layout is unchanged.

Transformer Engine modules carry `_extra_state` entries (FP8 scaling state) that the local
backend has not: loading tolerates those, and only those, on either side, so checkpoints move
between CPU (local) and GPU (TE) runs. Errors reading or writing a checkpoint (truncated
files, permissions, a file where a directory belongs) become CheckpointFormatError.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import queue
import random
import signal
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.validation import StrictHandling
from megatron.core.utils import unwrap_model
from torch.distributed.checkpoint.api import CheckpointException

from .. import checkpoint_format as fmt
from ..compat import optimizer_fixes

OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def use_in_process_write_queue() -> None:
    """Saves here are synchronous: the torch_dist writer's threads can report to a plain queue.

    Upstream creates a `spawn` multiprocessing Manager for that queue on the first save (meant
    for asynchronous saves in another process): it re-imports `__main__` in a new interpreter
    (seconds per rank; an unguarded entry script hangs forever, docs/upstream.md). Pre-setting the
    module's queue avoids that process.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is None:
        filesystem_async._results_queue = queue.Queue()


@dataclass
class TrainState:
    """What the loop needs to continue where it stopped (saved in every checkpoint)."""

    iteration: int = 0
    consumed_train_samples: int = 0
    skipped_iters: int = 0
    skipped_samples: int = 0  # samples of skipped iterations: the LR schedule did not move
    extra: dict[str, Any] = field(default_factory=dict)


def _log(msg: str) -> None:
    if torch.distributed.get_rank() == 0:
        print(msg, flush=True)


def _model_state(model_chunks) -> dict[str, Any]:
    """The GPTModels' sharded state (without the DDP / Float16Module wrappers), as Megatron-LM."""
    model_chunks = unwrap_model(model_chunks)
    if len(model_chunks) == 1:
        return {"model": model_chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(model_chunks)}


def _rng_state() -> dict[str, Any]:
    state = {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda_rng_state"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if torch.cuda.is_available() and "cuda_rng_state" in state:
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])


def _rng_sharded_object() -> ShardedObject:
    """One RNG state per (pipeline, tensor) rank, replicated over data-parallel ranks."""
    pp, tp = (
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_world_size(),
    )
    offset = (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
    )
    return ShardedObject(
        "rng_state",
        _rng_state(),
        (pp, tp),
        offset,
        # Context-parallel ranks hold the same state: replicas like data-parallel ones.
        replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True),
    )


def _state_dict(
    model_chunks,
    optimizer,
    scheduler,
    train_state: TrainState | None,
    *,
    loading: bool,
    with_optimizer: bool,
    with_rng: bool,
) -> dict[str, Any]:
    state = _model_state(model_chunks)
    if with_optimizer:
        state["optimizer"] = optimizer.sharded_state_dict(
            state, is_loading=loading, metadata=OPTIMIZER_METADATA
        )
        state["opt_param_scheduler"] = scheduler.state_dict()
    if with_rng:
        state["rng_state"] = _rng_sharded_object()
    if train_state is not None:
        state["iteration"] = train_state.iteration
        state["train_state"] = {
            "consumed_train_samples": train_state.consumed_train_samples,
            "skipped_iters": train_state.skipped_iters,
            "skipped_samples": train_state.skipped_samples,
            "lr_schedule_unit": "samples",
            **train_state.extra,
        }
    return state


# Where a save can be killed on purpose (tests: --inject-kill-during-save POINT), in order.
CRASH_POINTS = (
    "before-write",  # leftovers cleaned, staging directory created
    "after-write",  # shards written, no fusedkv_run.json yet
    "before-commit",  # everything written and fsynced, nothing renamed
    "after-commit",  # the directory is in place, the tracker not yet moved
    "after-tracker",  # the tracker moved, the replaced directory not yet deleted
    "mid-retention",  # an old checkpoint renamed to *.deleting, not yet deleted
)


def _crash_hook(kill_at: str | None) -> Callable[[str], None]:
    if kill_at is not None and kill_at not in CRASH_POINTS:
        raise ValueError(f"unknown crash point {kill_at!r}; one of {CRASH_POINTS}")

    def hook(point: str) -> None:
        if point == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def _os_reason(e: OSError) -> str:
    where = f" ({e.filename})" if e.filename else ""
    if isinstance(e, PermissionError):
        return f"permission denied{where}"
    if isinstance(e, NotADirectoryError | FileExistsError):
        return f"a path component is a file, not a directory{where}"
    return f"{e.strerror or e}{where}"


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
            f"--save {save}: cannot write checkpoints there: {_os_reason(e)}; choose a "
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
            error = f"{what}: {_os_reason(e)}{fix}"
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
) -> Path:
    """Write DIR/iter_XXXXXXX atomically and mark it as the latest. Collective (all ranks).

    `keep_latest_k` > 0 then deletes all but that many newest checkpoints (never the latest).
    `kill_at` (tests only) SIGKILLs rank 0 at that point of CRASH_POINTS."""
    optimizer_fixes.apply()
    use_in_process_write_queue()
    crash = _crash_hook(kill_at)
    iteration = train_state.iteration
    staged = fmt.staging_dir(root, iteration)

    def prepare() -> None:
        Path(root).mkdir(parents=True, exist_ok=True)
        fmt.remove_leftovers(root)
        staged.mkdir()
        crash("before-write")

    fix = "; free space or fix the permissions, or save elsewhere"
    _on_rank0(f"--save {root}: cannot prepare {staged.name}", prepare, fix)
    state = _state_dict(
        model_chunks,
        optimizer,
        scheduler,
        train_state,
        loading=False,
        with_optimizer=True,
        with_rng=True,
    )
    try:
        dist_checkpointing.save(state, str(staged))
    except (CheckpointException, CheckpointingException, OSError) as e:
        raise fmt.CheckpointFormatError(
            f"--save {root}: writing {staged} failed: {_error_reason(e)}{fix}"
        ) from None

    def commit() -> list[int]:
        crash("after-write")
        fmt.write_run_info(staged, {**run_info, "iteration": iteration})
        if tokenizer_file:
            fmt.copy_tokenizer(tokenizer_file, staged)
        fmt.fsync_tree(staged)
        crash("before-commit")
        fmt.commit_iteration(root, iteration, crash)
        return fmt.prune_iterations(root, keep_latest_k, crash)

    pruned = _on_rank0(f"--save {root}: cannot commit iteration {iteration}", commit, fix)
    final = fmt.iteration_dir(root, iteration)
    _log(f"saved checkpoint of iteration {iteration} to {final}")
    if pruned:
        _log(f"deleted checkpoints of iterations {pruned} (--keep-latest-k {keep_latest_k})")
    return final


def _error_reason(e: BaseException) -> str:
    """One line about what went wrong, from the first failing rank of a CheckpointException."""
    if isinstance(e, CheckpointException) and e.failures:
        rank, (inner, _) = next(iter(sorted(e.failures.items())))
        return f"rank {rank}: {_error_reason(inner)}"
    if isinstance(e, OSError):
        return _os_reason(e)
    if isinstance(e, EOFError):
        return "a file ends early (truncated)"
    text = str(e).strip().splitlines()
    return (f"{type(e).__name__}: {text[-1]}" if text else type(e).__name__)[:400]


# What reading a damaged checkpoint raises (torch wraps per-rank errors in CheckpointException).
_READ_ERRORS = (
    CheckpointException,
    CheckpointingException,
    OSError,
    EOFError,
    pickle.UnpicklingError,
)


@contextlib.contextmanager
def reading_checkpoint(ckpt: str | os.PathLike):
    """Turn the errors of reading a damaged or incomplete checkpoint into CheckpointFormatError.
    torch's reader logs each failed metadata read with its traceback on the root logger; the
    error below says it in one line, so those tracebacks are dropped."""
    root_logger = logging.getLogger()
    root_logger.addFilter(_drop_dcp_tracebacks)
    try:
        yield
    except _READ_ERRORS as e:
        ckpt = Path(ckpt)
        raise fmt.CheckpointFormatError(
            f"cannot read checkpoint {ckpt}: {_error_reason(e)}. Its files are damaged or "
            "incomplete (a partial copy, a full disk?): copy it again, or resume from an "
            f"earlier iter_* by writing its iteration into {ckpt.parent / fmt.TRACKER_FILE}"
        ) from None
    finally:
        root_logger.removeFilter(_drop_dcp_tracebacks)


def _drop_dcp_tracebacks(record: logging.LogRecord) -> bool:
    if record.exc_info and f"{os.sep}checkpoint{os.sep}" in record.pathname:
        record.exc_info, record.exc_text = None, None
    return True


def _is_extra_state(key: str) -> bool:
    return key.rsplit(".", 1)[-1] == "_extra_state"


def _check_only_extra_state(ckpt: Path, keys, *, everywhere: bool = True) -> None:
    """Refuse a mismatch between checkpoint and model other than TE's `_extra_state` entries.
    With `everywhere`, ranks agree first (each rank sees only the keys it loads)."""
    bad = sorted(k for k in keys if not _is_extra_state(k))
    if everywhere and torch.distributed.get_world_size() > 1:
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, bad[:5])
        bad = sorted({k for part in gathered for k in part})
    if bad:
        raise fmt.CheckpointFormatError(
            f"{ckpt} does not match this model: {len(bad)} entries differ (e.g. "
            f"{', '.join(bad[:5])}); it was written by another version of the model code. "
            "Load it with the code that saved it, or start from scratch without --load"
        )


def resolve_load_dir(load: str, save: str | None) -> Path | None:
    """The checkpoint to resume from, None to start from scratch (clear errors otherwise)."""
    root = Path(load)
    if not root.exists():
        same_as_save = save is not None and Path(save).resolve() == root.resolve()
        if same_as_save:  # first launch of a requeued job: nothing saved yet
            return None
        raise fmt.CheckpointFormatError(
            f"--load {load}: directory not found; check the path (to start from scratch, drop "
            "--load, or use the same directory for --load and --save)"
        )
    ckpt = fmt.latest_checkpoint_dir(root)
    if ckpt is None:
        if (root / fmt.RUN_FILE).is_file():
            raise fmt.CheckpointFormatError(
                f"--load {load} is an iteration directory; pass its parent "
                f"({root.parent}), which holds {fmt.TRACKER_FILE}"
            )
        if any(root.iterdir()) and not (save and Path(save).resolve() == root.resolve()):
            raise fmt.CheckpointFormatError(
                f"--load {load} has no {fmt.TRACKER_FILE}: not a checkpoint directory written "
                "by fusedkv-pretrain --save"
            )
        return None
    return ckpt


def check_tokenizer(
    ckpt: Path, saved: dict[str, Any], current: dict[str, Any], tokenizer_file: str | None
) -> None:
    """Refuse a checkpoint trained with another tokenizer."""
    a, b = saved["tokenizer"], current["tokenizer"]
    for key in ("type", "vocab_size", "eod_id"):
        if a[key] != b[key]:
            raise fmt.CheckpointFormatError(
                f"{ckpt} was trained with tokenizer {a['type']} (vocab_size={a['vocab_size']}, "
                f"eod={a['eod_id']}); this run uses {b['type']} (vocab_size={b['vocab_size']}, "
                f"eod={b['eod_id']}). Use the checkpoint's tokenizer: --tokenizer-type "
                f"{a['type']} --tokenizer-model {fmt.tokenizer_path(ckpt, saved)}"
            )
    stored = fmt.tokenizer_path(ckpt, saved)
    if stored is not None and tokenizer_file and stored.exists():
        differ = fmt.tokenizer_differences(stored, tokenizer_file)
        if differ:
            raise fmt.CheckpointFormatError(
                f"--tokenizer-model {tokenizer_file} differs from the tokenizer stored with the "
                f"checkpoint ({stored}; differing: {', '.join(differ)}); resume with "
                f"--tokenizer-model {stored}"
            )


def _check_optimizer_kind(ckpt: Path, optimizer) -> None:
    """The distributed and the plain optimizer store different states: refuse a mix-up."""
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    ours = any(isinstance(o, DistributedOptimizer) for o in inner)
    common = load_common_state_dict(str(ckpt)).get("optimizer", {})
    theirs = "param_state_sharding_type" in common
    if ours != theirs:
        saved_with = "with" if theirs else "without"
        raise fmt.CheckpointFormatError(
            f"{ckpt} was saved {saved_with} --use-distributed-optimizer and this run is "
            f"{'with' if ours else 'without'} it: use the same setting as the saved run, or "
            "--no-load-optim to load only the weights"
        )
    # Megatron matches parameter groups by their learning rates and weight-decay multiplier.
    saved = {_group_key(g) for g in _find_param_groups(common)}
    current = {_group_key(g) for g in optimizer.param_groups}
    if saved and saved != current:
        raise fmt.CheckpointFormatError(
            f"the optimizer in {ckpt} has parameter groups (max_lr, min_lr, wd_mult) "
            f"{sorted(saved)}, this run {sorted(current)}: resume with the saved run's "
            "--lr/--min-lr, or pass --no-load-optim to load only the weights (fresh optimizer "
            "and LR schedule)"
        )


def _group_key(group: dict) -> tuple:
    return (group.get("max_lr"), group.get("min_lr"), group.get("wd_mult"))


def _find_param_groups(state) -> list[dict]:
    if isinstance(state, dict):
        if isinstance(state.get("param_groups"), list):
            return state["param_groups"]
        for value in state.values():
            found = _find_param_groups(value)
            if found:
                return found
    return []


def load_checkpoint(
    ckpt: Path,
    model_chunks,
    optimizer,
    scheduler,
    run_info: dict[str, Any],
    tokenizer_file: str | None,
    *,
    load_optim: bool = True,
    load_rng: bool = True,
    finetune: bool = False,
) -> TrainState:
    """Load `ckpt` (an iteration directory) into the model/optimizer/scheduler. Collective.

    `finetune` loads the weights only and starts at iteration 0 (fresh optimizer, LR schedule,
    RNG and data position), as Megatron-LM's --finetune. A checkpoint that holds weights only
    (fusedkv-convert-variant's) loads its weights whatever the flags, saying so in one line."""
    saved = fmt.read_run_info(ckpt)
    check_tokenizer(ckpt, saved, run_info, tokenizer_file)
    fmt.check_compatible(saved, run_info, where=ckpt)
    optimizer_fixes.apply()
    if finetune:
        load_optim = load_rng = False
    elif (load_optim or load_rng) and _weights_only(ckpt):
        _log(
            f"> {ckpt} holds weights only (no optimizer or RNG state, e.g. written by "
            "fusedkv-convert-variant): loading its weights; fresh optimizer and RNG, the LR "
            "schedule from the checkpoint's iteration"
        )
        load_optim = load_rng = False
    same_layout = all(
        saved["parallel"][k] == run_info["parallel"][k]
        for k in ("tensor_model_parallel_size", "pipeline_model_parallel_size")
    )
    with_rng = load_rng and same_layout
    if load_optim:
        with reading_checkpoint(ckpt):
            _check_optimizer_kind(ckpt, optimizer)
    state = _state_dict(
        model_chunks,
        optimizer,
        scheduler,
        None,
        loading=True,
        with_optimizer=load_optim,
        with_rng=with_rng,
    )
    state["iteration"] = None
    state["train_state"] = None
    with reading_checkpoint(ckpt):
        # Keys this model asks for that the checkpoint lacks come back as "unexpected" (and are
        # not loaded) instead of failing the load: TE's _extra_state is allowed to be absent.
        loaded, _, absent = dist_checkpointing.load(
            state, str(ckpt), strict=StrictHandling.RETURN_UNEXPECTED
        )
    _check_only_extra_state(ckpt, absent)
    model_chunks = unwrap_model(model_chunks)
    names = ["model"] if len(model_chunks) == 1 else [f"model{i}" for i in range(len(model_chunks))]
    for name, chunk in zip(names, model_chunks, strict=True):
        # strict=False only for _extra_state (absent in a checkpoint of the other backend)
        result = chunk.load_state_dict(loaded[name], strict=False)
        _check_only_extra_state(
            ckpt, result.missing_keys + result.unexpected_keys, everywhere=False
        )
    if load_optim:
        optimizer.load_state_dict(loaded["optimizer"])
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if with_rng:
        _set_rng_state(loaded["rng_state"])
    elif load_rng:
        _log(
            f"parallel layout changed since {ckpt} was saved (TP/PP "
            f"{saved['parallel']['tensor_model_parallel_size']}/"
            f"{saved['parallel']['pipeline_model_parallel_size']}): RNG states not restored"
        )
    ts = loaded["train_state"] or {}
    if finetune:
        _log(
            f"loaded the weights of {ckpt} (iteration {loaded['iteration']}) to fine-tune: "
            "iteration 0, fresh optimizer, LR schedule, RNG and data position"
        )
        return TrainState()
    if load_optim and ts.get("lr_schedule_unit") != "samples":
        raise fmt.CheckpointFormatError(
            f"{ckpt} was saved when the LR schedule counted iterations (it now counts samples, "
            "as Megatron-LM's): resume with --no-load-optim (fresh Adam moments; the schedule "
            "continues from the data position)"
        )
    train_state = TrainState(
        iteration=int(loaded["iteration"]),
        consumed_train_samples=int(ts.get("consumed_train_samples", 0)),
        skipped_iters=int(ts.get("skipped_iters", 0)),
        skipped_samples=int(ts.get("skipped_samples", 0)),
    )
    if not load_optim:  # fresh optimizer moments; the LR schedule continues where it was
        steps = train_state.consumed_train_samples - train_state.skipped_samples
        if steps:
            scheduler.step(increment=steps)
    _log(f"loaded checkpoint {ckpt} (iteration {loaded['iteration']})")
    return train_state


def _weights_only(ckpt: Path) -> bool:
    """True for a checkpoint saved without optimizer state (fusedkv-convert-variant's)."""
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict

    with reading_checkpoint(ckpt):
        return "opt_param_scheduler" not in load_common_state_dict(str(ckpt))
