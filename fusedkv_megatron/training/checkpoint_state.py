"""What a training checkpoint holds, shared by saving (checkpointing) and loading (checkpoint_load).

The state dict holds "model" (or "model0", "model1", ... with a virtual pipeline), "optimizer",
"opt_param_scheduler", "iteration", "rng_state" and "train_state" (data position and counters).

The distributed optimizer's state is stored in one of Megatron-Core's two formats:
`dp_reshardable` (the default, as in Megatron-LM: each rank writes its own shard as it lies in
memory, no copy; reloads at any DP size but the same TP and PP) or `fully_reshardable`
(`--dist-ckpt-optim-fully-reshardable`: the state is gathered and re-laid out per parameter, so
TP, PP and DP may all change at load; it costs host memory of the size of the optimizer state
during the save). The plain optimizer's state is always stored per parameter.

RNG states record the device kind they were taken on: CUDA generator states (and Megatron's
tracker states, which are CUDA states on a GPU and CPU states here) are restored only on the
same kind of device.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.utils import unwrap_model
from torch.distributed.checkpoint.api import CheckpointException

DP_RESHARDABLE = "dp_reshardable"
FULLY_RESHARDABLE = "fully_reshardable"


@dataclass
class TrainState:
    """What the loop needs to continue where it stopped (saved in every checkpoint)."""

    iteration: int = 0
    consumed_train_samples: int = 0
    skipped_iters: int = 0
    skipped_samples: int = 0  # samples of skipped iterations: the LR schedule did not move
    extra: dict[str, Any] = field(default_factory=dict)


def log0(msg: str) -> None:
    if torch.distributed.get_rank() == 0:
        print(msg, flush=True)


def optimizer_metadata(fully_reshardable: bool = False, mem_efficient: bool = False) -> dict:
    """Megatron-Core's metadata choosing the distributed optimizer's checkpoint format."""
    return {
        "distrib_optim_sharding_type": FULLY_RESHARDABLE if fully_reshardable else DP_RESHARDABLE,
        "distrib_optim_fully_reshardable_mem_efficient": mem_efficient,
    }


def _model_state(model_chunks) -> dict[str, Any]:
    """The GPTModels' sharded state (without the DDP / Float16Module wrappers), as Megatron-LM."""
    model_chunks = unwrap_model(model_chunks)
    if len(model_chunks) == 1:
        return {"model": model_chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(model_chunks)}


def device_kind() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def rng_state() -> dict[str, Any]:
    state = {
        "device_kind": device_kind(),
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda_rng_state"] = torch.cuda.get_rng_state()
    return state


def saved_device_kind(state: dict[str, Any]) -> str:
    """The device kind an RNG state was taken on (checkpoints before the field: a CUDA
    generator state means a GPU)."""
    return state.get("device_kind") or ("cuda" if "cuda_rng_state" in state else "cpu")


def set_rng_state(state: dict[str, Any], here: str | None = None) -> list[str]:
    """Restore the RNG states that belong to this kind of device; return what was skipped.
    Python, NumPy and torch's CPU generator are the same everywhere and always restored."""
    here = here or device_kind()
    saved = saved_device_kind(state)
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    skipped = []
    if "cuda_rng_state" in state:
        if here == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng_state"])
        else:
            skipped.append("the CUDA generator state")
    if saved == here:
        tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])
    else:
        skipped.append(f"Megatron's model-parallel RNG tracker states ({saved} states)")
    return skipped


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
        rng_state(),
        (pp, tp),
        offset,
        # Context-parallel ranks hold the same state: replicas like data-parallel ones.
        replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True),
    )


def build_state_dict(
    model_chunks,
    optimizer,
    scheduler,
    train_state: TrainState | None,
    *,
    loading: bool,
    with_optimizer: bool,
    with_rng: bool,
    metadata: dict | None = None,
) -> dict[str, Any]:
    state = _model_state(model_chunks)
    if with_optimizer:
        state["optimizer"] = optimizer.sharded_state_dict(
            state, is_loading=loading, metadata=metadata or optimizer_metadata()
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


def os_reason(e: OSError) -> str:
    where = f" ({e.filename})" if e.filename else ""
    if isinstance(e, PermissionError):
        return f"permission denied{where}"
    if isinstance(e, NotADirectoryError | FileExistsError):
        return f"a path component is a file, not a directory{where}"
    return f"{e.strerror or e}{where}"


def error_reason(e: BaseException) -> str:
    """One line about what went wrong, from the first failing rank of a CheckpointException."""
    if isinstance(e, CheckpointException) and e.failures:
        rank, (inner, _) = next(iter(sorted(e.failures.items())))
        return f"rank {rank}: {error_reason(inner)}"
    if isinstance(e, OSError):
        return os_reason(e)
    if isinstance(e, EOFError):
        return "a file ends early (truncated)"
    text = str(e).strip().splitlines()
    return (f"{type(e).__name__}: {text[-1]}" if text else type(e).__name__)[:400]


__all__ = [
    "DP_RESHARDABLE",
    "FULLY_RESHARDABLE",
    "TrainState",
    "build_state_dict",
    "device_kind",
    "error_reason",
    "log0",
    "optimizer_metadata",
    "os_reason",
    "rng_state",
    "saved_device_kind",
    "set_rng_state",
]
