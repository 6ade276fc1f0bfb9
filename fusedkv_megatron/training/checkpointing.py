"""Save and load training checkpoints (dist_checkpointing torch_dist; layout in checkpoint_format).

A save writes into DIR/iter_XXXXXXX.tmp, adds fusedkv_run.json (+ tokenizer.model), renames the
directory to DIR/iter_XXXXXXX and only then updates DIR/latest_checkpointed_iteration.txt, so a
crash at any point leaves the previous checkpoint as the latest. The state dict holds "model"
(or "model0", "model1", ... with a virtual pipeline), "optimizer" (fully_reshardable, so TP/PP/DP
may change on load), "opt_param_scheduler", "iteration", "rng_state" and "train_state" (data
position and counters). RNG states are restored only when the parallel layout is unchanged.
"""

from __future__ import annotations

import os
import queue
import random
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.utils import unwrap_model

from . import checkpoint_format as fmt
from . import optimizer_fixes

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
    extra: dict[str, Any] = field(default_factory=dict)


def _log(msg: str) -> None:
    if torch.distributed.get_rank() == 0:
        print(msg, flush=True)


def _barrier() -> None:
    torch.distributed.barrier()


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
        replica_id=parallel_state.get_data_parallel_rank(),
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
            **train_state.extra,
        }
    return state


def save_checkpoint(
    root: str,
    model_chunks,
    optimizer,
    scheduler,
    train_state: TrainState,
    run_info: dict[str, Any],
    tokenizer_file: str | None,
    *,
    kill_before_commit: bool = False,
) -> Path:
    """Write DIR/iter_XXXXXXX atomically and mark it as the latest. Collective (all ranks).

    `kill_before_commit` (tests only) SIGKILLs the process once everything is written but
    before the rename: the worst moment for a crash."""
    optimizer_fixes.apply()
    use_in_process_write_queue()
    iteration = train_state.iteration
    final = fmt.iteration_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    rank0 = torch.distributed.get_rank() == 0
    if rank0:
        if tmp.exists():
            shutil.rmtree(tmp)  # left over by a save that crashed
        tmp.mkdir(parents=True)
    _barrier()
    state = _state_dict(
        model_chunks,
        optimizer,
        scheduler,
        train_state,
        loading=False,
        with_optimizer=True,
        with_rng=True,
    )
    dist_checkpointing.save(state, str(tmp))
    _barrier()
    if rank0:
        fmt.write_run_info(tmp, {**run_info, "iteration": iteration})
        if tokenizer_file:
            shutil.copyfile(tokenizer_file, tmp / fmt.TOKENIZER_FILE)
        if kill_before_commit:
            os.kill(os.getpid(), signal.SIGKILL)
        if final.exists():  # the same iteration saved again (e.g. after a resume): replace it
            old = final.with_name(final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        fmt.write_latest_iteration(root, iteration)
    _barrier()
    _log(f"saved checkpoint of iteration {iteration} to {final}")
    return final


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
                f"eod={b['eod_id']}). Use the checkpoint's tokenizer: --tokenizer-model "
                f"{ckpt / fmt.TOKENIZER_FILE}"
            )
    stored = fmt.tokenizer_path(ckpt, saved)
    if stored is not None and tokenizer_file and stored.is_file():
        if stored.read_bytes() != Path(tokenizer_file).read_bytes():
            raise fmt.CheckpointFormatError(
                f"--tokenizer-model {tokenizer_file} differs from the tokenizer stored with the "
                f"checkpoint ({stored}); resume with --tokenizer-model {stored}"
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
) -> TrainState:
    """Load `ckpt` (an iteration directory) into the model/optimizer/scheduler. Collective."""
    saved = fmt.read_run_info(ckpt)
    check_tokenizer(ckpt, saved, run_info, tokenizer_file)
    fmt.check_compatible(saved, run_info, where=ckpt)
    optimizer_fixes.apply()
    same_layout = all(
        saved["parallel"][k] == run_info["parallel"][k]
        for k in ("tensor_model_parallel_size", "pipeline_model_parallel_size")
    )
    with_rng = load_rng and same_layout
    if load_optim:
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
    loaded = dist_checkpointing.load(state, str(ckpt))
    model_chunks = unwrap_model(model_chunks)
    if len(model_chunks) == 1:
        model_chunks[0].load_state_dict(loaded["model"])
    else:
        for i, chunk in enumerate(model_chunks):
            chunk.load_state_dict(loaded[f"model{i}"])
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
    train_state = TrainState(
        iteration=int(loaded["iteration"]),
        consumed_train_samples=int(ts.get("consumed_train_samples", 0)),
        skipped_iters=int(ts.get("skipped_iters", 0)),
    )
    if not load_optim:  # fresh optimizer moments; the LR schedule continues where it was
        scheduler.step(increment=train_state.iteration - train_state.skipped_iters)
    _log(f"loaded checkpoint {ckpt} (iteration {loaded['iteration']})")
    return train_state
