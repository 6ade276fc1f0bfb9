"""Load a training checkpoint (see checkpoint_state for what it holds, checkpoint_format for the
layout): find the latest, check that it fits this run (tokenizer, model, optimizer kind and
format, parallel layout), read it, and restore model, optimizer, schedule, RNG and data position.

Errors reading a checkpoint (truncated files, missing shards) become CheckpointFormatError
naming the path and how to fall back to an earlier iteration. Transformer Engine's
`_extra_state` entries may be missing on either side (CPU/local <-> GPU/TE), nothing else.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.dist_checkpointing.validation import StrictHandling
from megatron.core.utils import unwrap_model
from torch.distributed.checkpoint.api import CheckpointException

from .. import checkpoint_format as fmt
from ..compat import optimizer_fixes
from . import host_rss
from .checkpoint_state import (
    DP_RESHARDABLE,
    TrainState,
    build_state_dict,
    device_kind,
    error_reason,
    log0,
    saved_device_kind,
    set_rng_state,
)

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
            f"cannot read checkpoint {ckpt}: {error_reason(e)}. Its files are damaged or "
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


def _check_optimizer_kind(ckpt: Path, optimizer, common: dict, layout_changed: str) -> None:
    """The distributed and the plain optimizer store different states: refuse a mix-up; and a
    `dp_reshardable` optimizer state loads only at the TP and PP it was saved at."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    ours = any(isinstance(o, DistributedOptimizer) for o in inner)
    sharding = _find_key(common, "param_state_sharding_type")
    theirs = sharding is not None
    if ours != theirs:
        saved_with = "with" if theirs else "without"
        raise fmt.CheckpointFormatError(
            f"{ckpt} was saved {saved_with} --use-distributed-optimizer and this run is "
            f"{'with' if ours else 'without'} it: use the same setting as the saved run, or "
            "--no-load-optim to load only the weights"
        )
    if sharding == DP_RESHARDABLE and layout_changed:
        raise fmt.CheckpointFormatError(
            f"{ckpt} stores the distributed optimizer's state as {DP_RESHARDABLE} (the default "
            f"format: it reloads at another data-parallel size, not another TP/PP), and {layout_changed}. "
            "Either resume at the saved TP/PP once with --dist-ckpt-optim-fully-reshardable and "
            "a save (e.g. --train-iters one more than the saved iteration), then change the "
            "layout; or pass --no-load-optim to load only the weights (fresh Adam moments)"
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


def _find_key(state, key: str):
    if isinstance(state, dict):
        if key in state:
            return state[key]
        for value in state.values():
            found = _find_key(value, key)
            if found is not None:
                return found
    return None


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


def _layout_change(saved: dict[str, Any], current: dict[str, Any]) -> str:
    """'' when TP and PP are as saved, else a phrase saying how they changed."""
    keys = ("tensor_model_parallel_size", "pipeline_model_parallel_size")
    before = [saved["parallel"][k] for k in keys]
    now = [current["parallel"][k] for k in keys]
    if before == now:
        return ""
    return f"this run changes TP/PP from {before[0]}/{before[1]} to {now[0]}/{now[1]}"


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
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict

    saved = fmt.read_run_info(ckpt)
    check_tokenizer(ckpt, saved, run_info, tokenizer_file)
    fmt.check_compatible(saved, run_info, where=ckpt)
    optimizer_fixes.apply()
    if finetune:
        load_optim = load_rng = False
    elif (load_optim or load_rng) and _weights_only(ckpt):
        log0(
            f"> {ckpt} holds weights only (no optimizer or RNG state, e.g. written by "
            "fusedkv-convert-variant): loading its weights; fresh optimizer and RNG, the LR "
            "schedule from the checkpoint's iteration"
        )
        load_optim = load_rng = False
    layout_changed = _layout_change(saved, run_info)
    with_rng = load_rng and not layout_changed
    phases = host_rss.Phases()
    metadata = None
    if load_optim:
        with reading_checkpoint(ckpt):
            common = load_common_state_dict(str(ckpt)).get("optimizer", {})
        _check_optimizer_kind(ckpt, optimizer, common, layout_changed)
        sharding = _find_key(common, "param_state_sharding_type")
        metadata = {"distrib_optim_sharding_type": sharding or DP_RESHARDABLE}
    with phases.phase("state dict"):
        state = build_state_dict(
            model_chunks,
            optimizer,
            scheduler,
            None,
            loading=True,
            with_optimizer=load_optim,
            with_rng=with_rng,
            metadata=metadata,
        )
    state["iteration"] = None
    state["train_state"] = None
    with reading_checkpoint(ckpt), phases.phase("read"):
        # Keys this model asks for that the checkpoint lacks come back as "unexpected" (and are
        # not loaded) instead of failing the load: TE's _extra_state is allowed to be absent.
        loaded, _, absent = dist_checkpointing.load(
            state, str(ckpt), strict=StrictHandling.RETURN_UNEXPECTED
        )
    _check_only_extra_state(ckpt, absent)
    model_chunks = unwrap_model(model_chunks)
    names = ["model"] if len(model_chunks) == 1 else [f"model{i}" for i in range(len(model_chunks))]
    with phases.phase("apply"):
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
        skipped = set_rng_state(loaded["rng_state"])
        if skipped:
            log0(
                f"RNG states of {ckpt} were saved on {saved_device_kind(loaded['rng_state'])}, "
                f"this run is on {device_kind()}: not restored: {'; '.join(skipped)} (the "
                "Python, NumPy and torch CPU generators are)"
            )
    elif load_rng:
        log0(
            f"parallel layout changed since {ckpt} was saved ({layout_changed}): RNG states "
            "not restored"
        )
    ts = loaded["train_state"] or {}
    if finetune:
        log0(
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
    memory = phases.summary()
    log0(
        f"loaded checkpoint {ckpt} (iteration {loaded['iteration']})"
        + (f"; {memory}" if memory else "")
    )
    return train_state


def _weights_only(ckpt: Path) -> bool:
    """True for a checkpoint saved without optimizer state (fusedkv-convert-variant's)."""
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict

    with reading_checkpoint(ckpt):
        return "opt_param_scheduler" not in load_common_state_dict(str(ckpt))
