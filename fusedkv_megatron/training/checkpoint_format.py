"""The on-disk checkpoint layout, shared by the trainer, the HF converter and the SLURM launcher.

Layout (as Megatron-LM's):

    DIR/latest_checkpointed_iteration.txt   the latest complete iteration, as text; written
                                            last and atomically, so a crash mid-save leaves
                                            the previous checkpoint as the latest
    DIR/iter_0000100/                       a dist_checkpointing torch_dist directory
    DIR/iter_0000100/fusedkv_run.json       model + KV-sharing + tokenizer + parallel layout
    DIR/iter_0000100/tokenizer.model        a copy of the SentencePiece model, when one is used

`fusedkv_run.json` (format_version 1):

    {"format_version": 1, "iteration": 100,
     "model": {"num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
               "num_query_groups", "kv_channels", "padded_vocab_size", "seq_length",
               "rotary_base", "rotary_interleaved", "layernorm_epsilon", "normalization",
               "share_embeddings_and_output_weights"},
     "kv_sharing": {"variant", "source_layers", "weights_per_head", "fusion_init"},
     "tokenizer": {"type", "model_file" (null without a file), "vocab_size", "eod_id"},
     "parallel": {"tensor_model_parallel_size", "pipeline_model_parallel_size",
                  "virtual_pipeline_model_parallel_size", "data_parallel_size"}}

This module has no torch/Megatron imports so that tools can read checkpoints cheaply.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
TRACKER_FILE = "latest_checkpointed_iteration.txt"
RUN_FILE = "fusedkv_run.json"
TOKENIZER_FILE = "tokenizer.model"

MODEL_KEYS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "padded_vocab_size",
    "seq_length",
    "rotary_base",
    "rotary_interleaved",
    "layernorm_epsilon",
    "normalization",
    "share_embeddings_and_output_weights",
)
KV_SHARING_KEYS = ("variant", "source_layers", "weights_per_head", "fusion_init")
TOKENIZER_KEYS = ("type", "model_file", "vocab_size", "eod_id")
PARALLEL_KEYS = (
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "virtual_pipeline_model_parallel_size",
    "data_parallel_size",
)
# Model fields that decide tensor shapes/semantics: a checkpoint that differs in any of these
# cannot be loaded into the current model. seq_length may change (RoPE has no table to resize).
ARCHITECTURE_KEYS = tuple(k for k in MODEL_KEYS if k != "seq_length")


class CheckpointFormatError(RuntimeError):
    """A checkpoint directory that is missing, incomplete, or of another architecture."""


def iteration_dir(root: str | os.PathLike, iteration: int) -> Path:
    """DIR/iter_0000100 for iteration 100."""
    return Path(root) / f"iter_{int(iteration):07d}"


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp creates 0600; make it readable like other files
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_latest_iteration(root: str | os.PathLike, iteration: int) -> None:
    """Mark `iteration` as the latest complete checkpoint (atomic: temp file + os.replace)."""
    _atomic_write_text(Path(root) / TRACKER_FILE, f"{int(iteration)}\n")


def read_latest_iteration(root: str | os.PathLike) -> int | None:
    """The latest complete iteration under `root`, or None when nothing was saved there."""
    tracker = Path(root) / TRACKER_FILE
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    try:
        return int(text)
    except ValueError:
        raise CheckpointFormatError(
            f"{tracker} holds {text!r}, not an iteration number; it should contain one integer "
            "(e.g. 100). Fix or delete it and point --load at a valid checkpoint"
        ) from None


def latest_checkpoint_dir(root: str | os.PathLike) -> Path | None:
    """DIR/iter_XXXXXXX of the latest complete checkpoint, None if `root` has none."""
    iteration = read_latest_iteration(root)
    if iteration is None:
        return None
    path = iteration_dir(root, iteration)
    if not path.is_dir():
        raise CheckpointFormatError(
            f"{Path(root) / TRACKER_FILE} says iteration {iteration}, but {path} does not exist; "
            "the checkpoint directory is incomplete (copied partially?)"
        )
    return path


def model_section(
    config: Any,
    *,
    padded_vocab_size: int,
    seq_length: int,
    rotary_base: float,
    share_embeddings_and_output_weights: bool,
) -> dict[str, Any]:
    """The "model" section of fusedkv_run.json, read off the TransformerConfig that was built
    (the other four values are GPTModel arguments, not config fields)."""
    given = {
        "padded_vocab_size": padded_vocab_size,
        "seq_length": seq_length,
        "rotary_base": float(rotary_base),
        "share_embeddings_and_output_weights": share_embeddings_and_output_weights,
    }
    return {k: given[k] if k in given else getattr(config, k) for k in MODEL_KEYS}


def make_run_info(
    iteration: int,
    model: dict[str, Any],
    kv_sharing: dict[str, Any] | Any,
    tokenizer: dict[str, Any],
    parallel: dict[str, Any],
) -> dict[str, Any]:
    """Assemble a fusedkv_run.json document, checking that every required key is present.
    `kv_sharing` is a dict or a KVSharingConfig."""
    if dataclasses.is_dataclass(kv_sharing):
        kv_sharing = dataclasses.asdict(kv_sharing)
    info = {
        "format_version": FORMAT_VERSION,
        "iteration": int(iteration),
        "model": {k: model[k] for k in MODEL_KEYS},
        "kv_sharing": {k: kv_sharing[k] for k in KV_SHARING_KEYS},
        "tokenizer": {k: tokenizer[k] for k in TOKENIZER_KEYS},
        "parallel": {k: parallel[k] for k in PARALLEL_KEYS},
    }
    sl = info["kv_sharing"]["source_layers"]
    info["kv_sharing"]["source_layers"] = list(sl) if sl is not None else None
    return info


def write_run_info(checkpoint_dir: str | os.PathLike, info: dict[str, Any]) -> Path:
    """Write fusedkv_run.json into an iteration directory (atomically)."""
    path = Path(checkpoint_dir) / RUN_FILE
    _atomic_write_text(path, json.dumps(info, indent=2, sort_keys=False) + "\n")
    return path


def read_run_info(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check fusedkv_run.json of an iteration directory."""
    path = Path(checkpoint_dir) / RUN_FILE
    if not path.is_file():
        raise CheckpointFormatError(
            f"{path} not found: {checkpoint_dir} is not a fusedkv_megatron checkpoint "
            "(expected DIR/iter_XXXXXXX/ written by fusedkv-pretrain --save DIR)"
        )
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointFormatError(f"{path} is not valid JSON ({e})") from None
    version = info.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointFormatError(
            f"{path} has format_version={version!r}; this code reads version {FORMAT_VERSION}"
        )
    for section, keys in (
        ("model", MODEL_KEYS),
        ("kv_sharing", KV_SHARING_KEYS),
        ("tokenizer", TOKENIZER_KEYS),
        ("parallel", PARALLEL_KEYS),
    ):
        missing = [k for k in keys if k not in info.get(section, {})]
        if missing:
            raise CheckpointFormatError(f"{path}: section {section!r} lacks {missing}")
    return info


def tokenizer_path(checkpoint_dir: str | os.PathLike, info: dict[str, Any]) -> Path | None:
    """The tokenizer model file stored with the checkpoint, or None (NullTokenizer/mock)."""
    name = info["tokenizer"]["model_file"]
    return None if name is None else Path(checkpoint_dir) / name


def architecture_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences that make `saved` unloadable into `current` (run infos)."""
    diffs = []
    for key in KV_SHARING_KEYS:
        a, b = saved["kv_sharing"][key], current["kv_sharing"][key]
        if key == "source_layers":
            a, b = (list(a) if a else None), (list(b) if b else None)
        if a != b:
            diffs.append(f"kv_sharing.{key}: checkpoint {a!r}, this run {b!r}")
    for key in ARCHITECTURE_KEYS:
        a, b = saved["model"][key], current["model"][key]
        if a != b:
            diffs.append(f"model.{key}: checkpoint {a!r}, this run {b!r}")
    return diffs


def check_compatible(
    saved: dict[str, Any], current: dict[str, Any], where: str | os.PathLike = "checkpoint"
) -> None:
    """Raise CheckpointFormatError naming every architecture field that differs."""
    diffs = architecture_differences(saved, current)
    if diffs:
        raise CheckpointFormatError(
            f"{where} was trained with another architecture:\n  "
            + "\n  ".join(diffs)
            + "\nUse the same --kv-sharing/model flags (or --config) as the run that saved it, "
            "or start from scratch without --load"
        )
