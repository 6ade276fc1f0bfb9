"""The on-disk checkpoint layout, shared by the trainer, the HF converter and the SLURM launcher.

Layout (as Megatron-LM's):

    DIR/latest_checkpointed_iteration.txt   the latest complete iteration, as text; written
                                            last and atomically, so a crash mid-save leaves
                                            the previous checkpoint as the latest
    DIR/iter_0000100/                       a dist_checkpointing torch_dist directory
    DIR/iter_0000100/fusedkv_run.json       model + KV-sharing + tokenizer + parallel layout
    DIR/iter_0000100/tokenizer.model        a copy of the SentencePiece model, when one is used
    DIR/iter_0000100/tokenizer/             a copy of the Hugging Face tokenizer's files
                                            (tokenizer.json, tokenizer_config.json, ...)

`fusedkv_run.json` (format_version 1):

    {"format_version": 1, "iteration": 100,
     "model": {"num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
               "num_query_groups", "kv_channels", "padded_vocab_size", "seq_length",
               "rotary_base", "rotary_interleaved", "layernorm_epsilon", "normalization",
               "share_embeddings_and_output_weights"},
     "kv_sharing": {"variant", "source_layers", "weights_per_head", "fusion_init"},
     "tokenizer": {"type", "model_file" ("tokenizer.model", "tokenizer" or null), "vocab_size",
                   "eod_id"},
     "parallel": {"tensor_model_parallel_size", "pipeline_model_parallel_size",
                  "virtual_pipeline_model_parallel_size", "data_parallel_size",
                  "context_parallel_size" (optional: absent means 1)}}

Crash safety (the commit protocol of `commit_iteration`): everything is written and fsynced
under DIR/iter_XXXXXXX.tmp, which then becomes DIR/iter_XXXXXXX by one rename (or, when that
iteration exists already, by one atomic exchange of the two directories); the tracker moves
last. At every instant the tracker names a complete directory. Leftovers of a crash
(`*.tmp`, `*.old`, `*.deleting`) are cleaned by `remove_leftovers` at the next save.

This module has no torch/Megatron imports so that tools can read checkpoints cheaply.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
TRACKER_FILE = "latest_checkpointed_iteration.txt"
RUN_FILE = "fusedkv_run.json"
TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_DIR = "tokenizer"

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
# Recorded when known; checkpoints written before context parallelism lack it (CP 1).
OPTIONAL_PARALLEL_KEYS = ("context_parallel_size",)
# Model fields that decide tensor shapes/semantics: a checkpoint that differs in any of these
# cannot be loaded into the current model. seq_length may change (RoPE has no table to resize).
ARCHITECTURE_KEYS = tuple(k for k in MODEL_KEYS if k != "seq_length")
# KV-sharing fields that only decide how weights start: not compared once weights load.
INIT_ONLY_KEYS = ("fusion_init",)


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
        fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the entries of directory `path` (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems cannot fsync a directory; nothing more to do
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync every file under `path`, then every directory bottom-up (rank 0, before a commit;
    the torch_dist writer has already fsynced the shards each rank wrote)."""
    for dirpath, _, files in os.walk(path, topdown=False):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def exchange_dirs(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two directories in one atomic step (Linux renameat2 RENAME_EXCHANGE). Returns
    False where the platform or file system cannot (the caller then uses two renames)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    done = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if done == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


_ITER_RE = re.compile(r"^iter_(\d{7,})$")
_LEFTOVER_RE = re.compile(r"^iter_(\d{7,})\.(tmp|old|deleting)$")


def complete_iterations(root: str | os.PathLike) -> list[int]:
    """Iterations with a committed DIR/iter_XXXXXXX directory, ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = (_ITER_RE.match(p.name) for p in root.iterdir() if p.is_dir())
    return sorted(int(m.group(1)) for m in found if m)


def staging_dir(root: str | os.PathLike, iteration: int) -> Path:
    """DIR/iter_XXXXXXX.tmp: where a save writes before its commit."""
    final = iteration_dir(root, iteration)
    return final.with_name(final.name + ".tmp")


def remove_leftovers(root: str | os.PathLike) -> list[Path]:
    """Clean what crashed saves left (one process only, while no save is running): staging
    directories, half-deleted ones, tracker temp files; an `iter_N.old` whose `iter_N` is
    missing (a crash between the two renames of the fallback commit) is moved back."""
    root = Path(root)
    removed = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        m = _LEFTOVER_RE.match(path.name)
        if m and path.is_dir():
            final = iteration_dir(root, int(m.group(1)))
            if m.group(2) == "old" and not final.exists():
                os.replace(path, final)
                continue
            shutil.rmtree(path)
            removed.append(path)
        elif path.name.startswith(f".{TRACKER_FILE}.") and path.name.endswith(".tmp"):
            path.unlink()
            removed.append(path)
    fsync_dir(root)
    return removed


def commit_iteration(root: str | os.PathLike, iteration: int, crash_point=None) -> Path:
    """Move the fsynced staging directory of `iteration` into place, then the tracker.

    A new iteration takes one rename. An existing one (the same iteration saved again) is
    swapped with the staging directory atomically, so the tracker never names a missing
    directory; without RENAME_EXCHANGE the tracker first falls back to the newest older
    checkpoint while two renames replace the directory. `crash_point(name)` is a test hook."""
    hook = crash_point or (lambda name: None)
    root = Path(root)
    final, staged = iteration_dir(root, iteration), staging_dir(root, iteration)
    replaced = None
    if not final.exists():
        os.replace(staged, final)
    elif exchange_dirs(staged, final):
        replaced = staged  # now holds the previous content
    else:
        older = [i for i in complete_iterations(root) if i < iteration]
        if read_latest_iteration(root) == iteration and older:
            write_latest_iteration(root, older[-1])
        replaced = final.with_name(final.name + ".old")
        os.replace(final, replaced)  # a crash here: latest_checkpoint_dir falls back to .old
        os.replace(staged, final)
    fsync_dir(root)
    hook("after-commit")
    write_latest_iteration(root, iteration)
    hook("after-tracker")
    if replaced is not None:
        shutil.rmtree(replaced)
    return final


def prune_iterations(root: str | os.PathLike, keep_latest_k: int, crash_point=None) -> list[int]:
    """Delete all but the newest `keep_latest_k` checkpoints at or below the tracker's
    iteration (0 keeps all). The tracker's checkpoint is always kept; directories of higher
    iterations (a run that was rolled back) are left alone. Returns the deleted iterations."""
    latest = read_latest_iteration(root)
    if keep_latest_k <= 0 or latest is None:
        return []
    candidates = [i for i in complete_iterations(root) if i <= latest]
    doomed = candidates[:-keep_latest_k] if latest in candidates else []
    for i in doomed:
        path = iteration_dir(root, i)
        trash = path.with_name(path.name + ".deleting")  # never half-deleted under its name
        os.replace(path, trash)
        if crash_point is not None:
            crash_point("mid-retention")
        shutil.rmtree(trash)
    if doomed:
        fsync_dir(root)
    return doomed


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
    old = path.with_name(path.name + ".old")
    if not path.is_dir() and (old / RUN_FILE).is_file():
        return old  # a crash inside the two-rename commit (file systems without exchange)
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
        "parallel": {
            k: parallel[k] for k in PARALLEL_KEYS + OPTIONAL_PARALLEL_KEYS if k in parallel
        },
    }
    sl = info["kv_sharing"]["source_layers"]
    info["kv_sharing"]["source_layers"] = list(sl) if sl is not None else None
    return info


def training_run_info(
    args: Any, config: Any, kv_sharing: Any, padded_vocab_size: int, tokenizer: Any
) -> dict[str, Any]:
    """The run info a `fusedkv-pretrain` run keeps with every checkpoint (iteration 0 here; the
    save fills it in): from its arguments, the built TransformerConfig and KVSharingConfig, the
    padded vocabulary and the tokenizer (vocab_size, eod)."""
    stored_as = tokenizer_entry(args.tokenizer_type)  # a file or directory kept with checkpoints
    return make_run_info(
        0,
        model=model_section(
            config,
            padded_vocab_size=padded_vocab_size,
            seq_length=args.seq_length,
            rotary_base=args.rotary_base,
            share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        ),
        kv_sharing=kv_sharing,
        tokenizer=dict(
            type=args.tokenizer_type,
            model_file=stored_as if stored_as and args.tokenizer_model else None,
            vocab_size=tokenizer.vocab_size,
            eod_id=tokenizer.eod,
        ),
        parallel=dict(
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
            data_parallel_size=args.data_parallel_size,
            context_parallel_size=getattr(args, "context_parallel_size", 1),
        ),
    )


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


def tokenizer_entry(tokenizer_type: str) -> str | None:
    """The run info's "model_file" for a tokenizer type: what the checkpoint stores of it."""
    return {"SentencePieceTokenizer": TOKENIZER_FILE, "HuggingFaceTokenizer": TOKENIZER_DIR}.get(
        tokenizer_type
    )


def copy_tokenizer(source: str | os.PathLike, checkpoint_dir: str | os.PathLike) -> Path:
    """Store the tokenizer with a checkpoint: a SentencePiece .model file as TOKENIZER_FILE, a
    Hugging Face tokenizer directory's tokenizer files (not its weights) under TOKENIZER_DIR."""
    from .data.tokenizer import hf_tokenizer_files

    source = Path(source)
    if not source.is_dir():
        target = Path(checkpoint_dir) / TOKENIZER_FILE
        shutil.copyfile(source, target)
        return target
    target = Path(checkpoint_dir) / TOKENIZER_DIR
    target.mkdir(exist_ok=True)
    for f in hf_tokenizer_files(source):
        shutil.copyfile(f, target / f.name)
    return target


def tokenizer_differences(stored: str | os.PathLike, source: str | os.PathLike) -> list[str]:
    """The tokenizer files in which a checkpoint's stored tokenizer and `source` differ (a file
    for SentencePiece, a directory's tokenizer files for Hugging Face); empty when alike."""
    from .data.tokenizer import hf_tokenizer_files

    stored, source = Path(stored), Path(source)
    if stored.is_dir() != source.is_dir():
        return [f"{stored.name} vs {source.name}"]
    if not stored.is_dir():
        return [] if stored.read_bytes() == source.read_bytes() else [stored.name]
    a = {f.name: f.read_bytes() for f in hf_tokenizer_files(stored)}
    b = {f.name: f.read_bytes() for f in hf_tokenizer_files(source)}
    return sorted(name for name in a.keys() | b.keys() if a.get(name) != b.get(name))


def architecture_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences that make `saved` unloadable into `current` (run infos)."""
    diffs = []
    for key in (k for k in KV_SHARING_KEYS if k not in INIT_ONLY_KEYS):
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
