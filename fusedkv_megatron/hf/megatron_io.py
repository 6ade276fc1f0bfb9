"""torch_dist checkpoints <-> whole (TP=1) Megatron state dicts, without a distributed launch.

Reading: one CPU process builds the model at TP=1/PP=1 from fusedkv_run.json and lets
`dist_checkpointing.load` reshard whatever TP/PP layout the checkpoint was saved at.

Writing at TP=N/PP=M: save at TP=1 into a temporary directory, then N*M local processes
(spawned here, gloo) build their stage's model, load from it (dist_checkpointing reshards) and
save the real N x M layout. At N*M = 1 the first save is the result.

dist_checkpointing's writer starts a `spawn` helper that re-imports `__main__`: scripts that
call these functions need an `if __name__ == "__main__":` guard (console scripts have one).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .. import checkpoint_format as ckpt_format
from .. import compat
from .mapping import ConversionError, check_layer_layout, hf_config_from_run_info

_MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")
try:  # torch DCP reports read failures with a BaseException subclass
    from torch.distributed.checkpoint.api import CheckpointException as _DCPError
except ImportError:  # pragma: no cover
    _DCPError = Exception
_READ_ERRORS = (Exception, _DCPError)


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """A --save root (its latest iteration) or an iter_XXXXXXX directory itself."""
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"--load {path}: no such directory")
    if (path / ckpt_format.RUN_FILE).is_file():
        return path
    try:
        latest = ckpt_format.latest_checkpoint_dir(path)
    except ckpt_format.CheckpointFormatError as err:
        raise ConversionError(str(err)) from None
    if latest is None:
        raise ConversionError(
            f"--load {path} is not a fusedkv_megatron checkpoint: it has neither "
            f"{ckpt_format.TRACKER_FILE} (a --save directory) nor {ckpt_format.RUN_FILE} (an "
            "iter_XXXXXXX directory); point --load at the directory given to "
            "fusedkv-pretrain --save"
        )
    return latest


@contextlib.contextmanager
def single_process_megatron():
    """A 1-process gloo group and TP=PP=1 model parallel state (reused if already set up)."""
    from megatron.core import parallel_state, tensor_parallel

    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    elif dist.get_world_size() != 1:
        raise ConversionError(
            f"the converter runs in one process, but torch.distributed has "
            f"{dist.get_world_size()} ranks: run it without torchrun"
        )
    own_state = not parallel_state.model_parallel_is_initialized()
    if own_state:
        parallel_state.initialize_model_parallel(1, 1)
    compat.apply()  # before seeding: the RNG tracker needs its CPU patch without CUDA
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    try:
        yield
    finally:
        if own_state:
            parallel_state.destroy_model_parallel()
        if own_group:
            dist.destroy_process_group()


def build_megatron_model(
    info: dict[str, Any],
    dtype: torch.dtype,
    tp: int = 1,
    pp: int = 1,
    pre_process: bool | None = None,
    post_process: bool | None = None,
):
    """The (stage) GPTModel that fusedkv_run.json describes, uninitialised (to be loaded)."""
    from .. import KVSharingConfig, build_model, qwen3_config

    m, kv = info["model"], info["kv_sharing"]
    config = qwen3_config(
        m["num_layers"],
        m["hidden_size"],
        m["num_attention_heads"],
        num_query_groups=m["num_query_groups"],
        ffn_hidden_size=m["ffn_hidden_size"],
        kv_channels=m["kv_channels"],
        layernorm_epsilon=m["layernorm_epsilon"],
        rotary_interleaved=m["rotary_interleaved"],
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        use_cpu_initialization=True,
        perform_initialization=False,
    )
    sources = kv["source_layers"]
    kv_sharing = KVSharingConfig(
        kv["variant"],
        source_layers=tuple(sources) if sources is not None else None,
        weights_per_head=kv["weights_per_head"],
        fusion_init=kv["fusion_init"],
    )
    return build_model(
        config,
        kv_sharing,
        m["padded_vocab_size"],
        m["seq_length"],
        pre_process=pre_process,
        post_process=post_process,
        rotary_base=m["rotary_base"],
        share_embeddings_and_output_weights=m["share_embeddings_and_output_weights"],
        use_transformer_engine=False,
    )


def _sharded_tensors(sharded: dict) -> dict[str, Any]:
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    return {t.key: t for t in nested_values(sharded) if isinstance(t, ShardedTensor)}


def _check_against_checkpoint(expected: dict, saved: dict, info: dict, ckpt_dir: Path) -> None:
    """Name the variant/shape mismatch before dist_checkpointing fails obscurely."""
    saved_model = [k for k in saved if k.startswith(_MODEL_PREFIXES)]
    hf_cfg = hf_config_from_run_info(info, torch.float32)
    check_layer_layout(saved_model, hf_cfg, "megatron", f"{ckpt_dir}")
    missing = sorted(set(expected) - set(saved))
    if missing:
        raise ConversionError(
            f"{ckpt_dir} lacks model tensors {missing[:6]} that fusedkv_run.json implies; "
            "the checkpoint is incomplete or its fusedkv_run.json belongs to another run"
        )
    for key, t in expected.items():
        if tuple(t.global_shape) != tuple(saved[key].global_shape):
            raise ConversionError(
                f"{ckpt_dir}: tensor {key} has shape {tuple(saved[key].global_shape)} in the "
                f"checkpoint but {tuple(t.global_shape)} for the model in fusedkv_run.json "
                f"(kv_sharing={info['kv_sharing']['variant']!r}, num_query_groups="
                f"{info['model']['num_query_groups']}); the JSON and the tensors disagree"
            )


def _load_into(model, ckpt_dir: Path) -> None:
    from megatron.core import dist_checkpointing

    try:
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(ckpt_dir))
    except _READ_ERRORS as err:
        raise ConversionError(
            f"reading the tensors of {ckpt_dir} failed ({type(err).__name__}: {err}); the "
            "checkpoint is incomplete or damaged (a missing or truncated *.distcp file?)"
        ) from err
    missing, unexpected = model.load_state_dict(loaded["model"], strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ConversionError(f"{ckpt_dir}: missing {missing[:6]}, unexpected {unexpected[:6]}")


def load_megatron_checkpoint(path: str | os.PathLike):
    """(run info, checkpoint dir, TP=1 state dict) of the latest checkpoint under `path`."""
    from megatron.core import dist_checkpointing

    ckpt_dir = resolve_checkpoint_dir(path)
    try:
        info = ckpt_format.read_run_info(ckpt_dir)
    except ckpt_format.CheckpointFormatError as err:
        raise ConversionError(str(err)) from None
    try:
        saved = dist_checkpointing.load_tensors_metadata(str(ckpt_dir))
    except _READ_ERRORS as err:
        raise ConversionError(
            f"{ckpt_dir} is not a readable torch_dist checkpoint ({type(err).__name__}: {err})"
        ) from err
    emb = saved.get("embedding.word_embeddings.weight")
    dtype = emb.dtype if emb is not None else torch.float32
    with single_process_megatron():
        model = build_megatron_model(info, dtype)
        _check_against_checkpoint(
            _sharded_tensors(model.sharded_state_dict()), saved, info, ckpt_dir
        )
        _load_into(model, ckpt_dir)
    state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    return info, ckpt_dir, state


def _checkpoint_state(model, info: dict) -> dict:
    """The model plus the common entries the trainer reads on --load (training starts afresh:
    no optimizer or RNG state, so resume with --no-load-optim --no-load-rng)."""
    return {
        "model": model.sharded_state_dict(),
        "iteration": info["iteration"],
        "train_state": {"consumed_train_samples": 0, "skipped_iters": 0},
    }


def _save_tp1(state: dict[str, torch.Tensor], info: dict, dtype: torch.dtype, out: Path) -> None:
    from megatron.core import dist_checkpointing

    with single_process_megatron():
        model = build_megatron_model(info, dtype)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise ConversionError(
                f"converted tensors do not fit the Megatron model: missing {missing[:6]}, "
                f"unexpected {unexpected[:6]}"
            )
        out.mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(_checkpoint_state(model, info), str(out))


def _reshard_worker(
    rank: int,
    info: dict,
    dtype: torch.dtype,
    tp: int,
    pp: int,
    store_file: str,
    source: str,
    target: str,
) -> None:
    """One rank of the TP x PP re-save: build the stage, load (reshard) from `source`, save."""
    torch.set_num_threads(1)
    from megatron.core import dist_checkpointing, parallel_state, tensor_parallel

    dist.init_process_group(
        "gloo", init_method=f"file://{store_file}", rank=rank, world_size=tp * pp
    )
    try:
        parallel_state.initialize_model_parallel(tp, pp)
        compat.apply()  # a spawned interpreter: patch Megatron before seeding
        tensor_parallel.model_parallel_cuda_manual_seed(0)
        model = build_megatron_model(info, dtype, tp, pp)
        _load_into(model, Path(source))
        dist_checkpointing.save(_checkpoint_state(model, info), target)
    finally:
        dist.destroy_process_group()


def _check_layout(info: dict, tp: int, pp: int) -> None:
    """Reject a TP/PP layout before spawning ranks that would fail one by one."""
    from .. import KVSharingConfig, KVSharingError

    m, kv = info["model"], info["kv_sharing"]
    if tp < 1 or pp < 1:
        raise ConversionError(f"tensor/pipeline parallel sizes must be >= 1, got {tp}/{pp}")
    try:
        KVSharingConfig(kv["variant"]).validate(
            m["num_layers"], m["num_attention_heads"], m["num_query_groups"], tp
        )
    except KVSharingError as err:
        raise ConversionError(str(err)) from None
    if m["num_layers"] % pp:
        raise ConversionError(
            f"--pipeline-model-parallel-size {pp} does not divide num_layers={m['num_layers']}; "
            "choose a divisor (stages get equal layer counts)"
        )


def save_megatron_checkpoint(
    state: dict[str, torch.Tensor],
    info: dict,
    root: str | os.PathLike,
    tp: int = 1,
    pp: int = 1,
    tokenizer_file: str | os.PathLike | None = None,
) -> Path:
    """Write `state` (TP=1 names) as iteration info["iteration"] under `root` at TP=tp/PP=pp,
    with fusedkv_run.json, the tokenizer model and the latest-iteration tracker (last)."""
    import torch.multiprocessing as mp

    _check_layout(info, tp, pp)
    dtype = state["embedding.word_embeddings.weight"].dtype
    target = ckpt_format.iteration_dir(root, info["iteration"])
    if target.exists() and any(target.iterdir()):
        raise ConversionError(f"{target} already exists and is not empty; choose another --save")
    if tp * pp == 1:
        _save_tp1(state, info, dtype, target)
    else:
        with tempfile.TemporaryDirectory(prefix="fusedkv-reshard-") as tmp:
            _save_tp1(state, info, dtype, Path(tmp) / "tp1")
            target.mkdir(parents=True, exist_ok=True)
            mp.spawn(
                _reshard_worker,
                nprocs=tp * pp,
                join=True,
                args=(
                    info,
                    dtype,
                    tp,
                    pp,
                    str(Path(tmp) / "store"),
                    str(Path(tmp) / "tp1"),
                    str(target),
                ),
            )
    if tokenizer_file is not None:
        ckpt_format.copy_tokenizer(tokenizer_file, target)
    ckpt_format.write_run_info(target, info)
    ckpt_format.write_latest_iteration(root, info["iteration"])
    return target
