"""Train/valid/test datasets for the trainer: Megatron indexed datasets through
`BlendedMegatronDatasetBuilder` and `GPTDataset` (or `MockGPTDataset` for `--mock-data`), with
the checks upstream lacks, plus `prepare_default_data` for the embedded English corpus.

Checks made before Megatron sees the data, each failing with the path and the fix:
- `.bin`/`.idx` present, the index readable and consistent with the `.bin`;
- the data's token ids fit the tokenizer (and match the tokenizer recorded by
  tools/preprocess_data.py, when that record exists);
- every split that is built gets at least one document. Upstream, a split with 0 documents
  loops forever in `GPTDataset._get_num_epochs` whenever it is asked for samples (even 0: it
  still wants one token). An empty split that is asked for 0 samples is not built (None).

Distributed use: call on every rank. With torch.distributed initialised, upstream builds on
rank 0 first (writing the index cache), then on the other ranks where `is_built_on_rank()` is
True (Megatron-LM builds on tensor-parallel rank 0 of the first and last pipeline stages).
Blends with a `data_cache_path` need no process group in megatron-core 0.19 (they did in 0.16).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLIT_NAMES = ("train", "valid", "test")
_INDEX_HEADER = b"MMIDIDX\x00\x00"
_INDEX_DTYPES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}  # megatron's DType codes
_MAX_TOKENS_CHECKED = 16 * 1024 * 1024  # token-id range check reads at most this many tokens
_PREPROCESS_HINT = (
    "build it with: python tools/preprocess_data.py --input FILE.jsonl --output-prefix OUT "
    "--tokenizer-model TOKENIZER.model --append-eod  (then pass OUT_text_document)"
)

DATA_DIR = Path(__file__).resolve().parent  # the embedded corpus sits next to this module
DEFAULT_TRAIN_CORPUS = DATA_DIR / "shakespeare.jsonl.gz"
DEFAULT_HELDOUT_CORPUS = DATA_DIR / "heldout.jsonl.gz"


class DataError(ValueError):
    """A dataset, a data path or a split cannot be used as given."""


# ---------------------------------------------------------------------------------------------
# Data paths and index files


def parse_data_path(data_path: Sequence[str] | str) -> tuple[list[str], list[float] | None]:
    """Megatron-LM's `--data-path`: `PREFIX [PREFIX..]` or `W1 PREFIX1 W2 PREFIX2 ..`."""
    items = data_path.split() if isinstance(data_path, str) else [str(x) for x in data_path]
    if not items:
        raise DataError("--data-path is empty: pass PREFIX or a blend 'W1 PREFIX1 W2 PREFIX2'")

    def number(s: str) -> float | None:
        try:
            return float(s)
        except ValueError:
            return None

    if len(items) % 2 == 0 and all(number(w) is not None for w in items[::2]):
        weights = [float(w) for w in items[::2]]
        bad = [w for w in weights if not (w > 0 and math.isfinite(w))]
        if bad:
            raise DataError(f"--data-path {' '.join(items)}: blend weights must be > 0, got {bad}")
        return items[1::2], weights
    numeric = [s for s in items if number(s) is not None and not os.path.exists(s + ".idx")]
    if numeric:
        raise DataError(
            f"--data-path {' '.join(items)}: cannot tell weights from prefixes ({numeric} look "
            "like weights); a blend is 'W1 PREFIX1 W2 PREFIX2 ...' with a weight before every "
            "prefix"
        )
    return items, None


@dataclass
class IndexInfo:
    """What the `.idx` of an indexed dataset says, checked against its `.bin`."""

    prefix: str
    dtype: type
    sequence_lengths: np.ndarray
    num_documents: int

    @property
    def num_sequences(self) -> int:
        return len(self.sequence_lengths)


def _missing_dataset_message(prefix: str) -> str:
    have = [s for s in (".bin", ".idx") if os.path.exists(prefix + s)]
    msg = f"no indexed dataset at prefix {prefix!r}"
    if have:
        missing = ".idx" if have == [".bin"] else ".bin"
        return f"{msg}: {prefix}{have[0]} exists but {prefix}{missing} is missing; rebuild it ({_PREPROCESS_HINT})"
    for suffix in (".bin", ".idx"):
        if prefix.endswith(suffix) and os.path.exists(prefix[: -len(suffix)] + ".idx"):
            return f"{msg}: pass the prefix without {suffix}: {prefix[: -len(suffix)]!r}"
    if os.path.exists(prefix + "_text_document.idx"):
        return f"{msg}: did you mean {prefix + '_text_document'!r}?"
    return f"{msg} ({prefix}.bin and {prefix}.idx not found); {_PREPROCESS_HINT}"


def read_index(prefix: str) -> IndexInfo:
    """Read and check `prefix.idx` against `prefix.bin` (raises DataError naming the problem)."""
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    if not (os.path.isfile(idx_path) and os.path.isfile(bin_path)):
        raise DataError(_missing_dataset_message(prefix))
    rebuild = f"rebuild it with tools/preprocess_data.py ({_PREPROCESS_HINT})"
    idx_size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        head = f.read(34)
    if len(head) < 34 or head[:9] != _INDEX_HEADER:
        raise DataError(
            f"{idx_path} is not a Megatron index (bad header {head[:9]!r}, expected "
            f"{_INDEX_HEADER!r}): the file is corrupt or of another format; {rebuild}"
        )
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:34])
    if version != 1 or code not in _INDEX_DTYPES:
        raise DataError(
            f"{idx_path}: unsupported index version {version} or dtype code {code}; {rebuild}"
        )
    expected = 34 + n_seq * (4 + 8) + n_doc * 8
    if idx_size < expected:
        raise DataError(
            f"{idx_path} is truncated: {idx_size} bytes, but its header promises {n_seq} "
            f"sequences and {n_doc} document offsets ({expected} bytes); {rebuild}"
        )
    lengths = np.memmap(idx_path, dtype=np.int32, mode="r", offset=34, shape=(n_seq,))
    pointers = np.memmap(idx_path, dtype=np.int64, mode="r", offset=34 + 4 * n_seq, shape=(n_seq,))
    doc_index = np.memmap(
        idx_path, dtype=np.int64, mode="r", offset=34 + 12 * n_seq, shape=(n_doc,)
    )
    if n_seq == 0 or n_doc < 2:
        raise DataError(f"{prefix} holds no documents; {rebuild}")
    itemsize = np.dtype(_INDEX_DTYPES[code]).itemsize
    bin_needed = int(pointers[-1]) + int(lengths[-1]) * itemsize
    bin_size = os.path.getsize(bin_path)
    if doc_index[-1] != n_seq or (lengths < 0).any() or bin_needed != bin_size:
        raise DataError(
            f"{prefix}: the .idx does not describe the .bin ({bin_path} has {bin_size} bytes, "
            f"the index describes {bin_needed}); the files are corrupt or come from different "
            f"runs; {rebuild}"
        )
    return IndexInfo(prefix, _INDEX_DTYPES[code], np.asarray(lengths), n_doc - 1)


def check_tokenizer_matches(info: IndexInfo, tokenizer) -> None:
    """The data must have been tokenized with this tokenizer (or at least fit its vocabulary)."""
    meta_path = info.prefix + ".meta.json"
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            recorded = json.load(f).get("tokenizer", {})
        ours = dict(tokenizer.unique_identifiers)
        mismatch = [
            k
            for k in ("class", "model_sha256", "vocab_size")
            if k in recorded and k in ours and recorded[k] != ours[k]
        ]
        if mismatch:
            raise DataError(
                f"{info.prefix} was tokenized with another tokenizer ({recorded.get('class')} "
                f"{recorded.get('model_path', '')}, {mismatch[0]} "
                f"{recorded[mismatch[0]]!r} != {ours[mismatch[0]]!r}); pass that tokenizer "
                "(--tokenizer-model) or re-run tools/preprocess_data.py with this one"
            )
    count = min(int(info.sequence_lengths.sum()), _MAX_TOKENS_CHECKED)
    tokens = np.memmap(info.prefix + ".bin", dtype=info.dtype, mode="r", shape=(count,))
    top = int(tokens.max()) if count else 0
    if top >= tokenizer.vocab_size:
        raise DataError(
            f"{info.prefix} holds token id {top} but the tokenizer has vocab_size "
            f"{tokenizer.vocab_size}: the data was tokenized with another tokenizer; pass that "
            "one (--tokenizer-model) or re-run tools/preprocess_data.py with this one"
        )


# ---------------------------------------------------------------------------------------------
# Splits


def split_matrix(split: str) -> list[tuple[float, float] | None]:
    """Megatron's book-ends per split for a `--split` like "969,30,1" (checked first)."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    parts = [p.strip() for p in str(split).split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if not 1 <= len(values) <= 3 or any(not (v >= 0) for v in values) or sum(values) <= 0:
        raise DataError(
            f"--split {split!r}: expected up to 3 non-negative comma-separated weights for "
            "train,valid,test with a positive sum, e.g. 969,30,1"
        )
    return convert_split_vector_to_split_matrix(parse_and_normalize_split(str(split)))


def _samples_per_prefix(
    sizes: Sequence[int], weights: list[float] | None, n_prefixes: int, surplus: float
) -> list[list[int | None]]:
    """Samples upstream requests from each prefix per split (mirrors the builder's arithmetic)."""
    if weights is None:
        return [list(sizes) if n_prefixes == 1 else [None] * 3 for _ in range(n_prefixes)]
    normalized = (np.asarray(weights, dtype=np.float64) / np.sum(weights)).tolist()
    return [
        [int(math.ceil(math.ceil(size * w) * (1 + surplus))) for size in sizes] for w in normalized
    ]


def _check_split_sizes(
    infos: dict[str, IndexInfo],
    blend: tuple[list[str], list[float] | None],
    matrix: list[tuple[float, float] | None],
    sizes: Sequence[int],
    surplus: float,
    split: str | None,
) -> list[int]:
    """Raise for a split that would get 0 documents yet is asked for samples; return the splits
    that are empty and asked for none (to be skipped)."""
    prefixes, weights = blend
    requested = _samples_per_prefix(sizes, weights, len(prefixes), surplus)
    skip = []
    for i, bookends in enumerate(matrix):
        if bookends is None:
            continue
        for prefix, wanted in zip(prefixes, requested):
            lengths = infos[prefix].sequence_lengths
            n = len(lengths)
            beg, end = int(round(bookends[0] * n)), int(round(bookends[1] * n))
            if end > beg and int(lengths[beg:end].sum()) > 0:
                continue
            if wanted[i] == 0:
                skip.append(i)
                continue
            share = (
                f"--split {split} gives the {SPLIT_NAMES[i]} split"
                if split
                else (f"the {SPLIT_NAMES[i]} data path")
            )
            asked = (
                f"{wanted[i]} samples were requested"
                if wanted[i] is not None
                else "an unweighted blend needs every part non-empty"
            )
            raise DataError(
                f"{share} 0 of the {n} documents of {prefix} (documents {beg}..{end}), but "
                f"{asked}; Megatron's GPTDataset would loop forever. Give that split a larger "
                f"share (at least 1/{n} of the weights), use more documents, or request no "
                f"{SPLIT_NAMES[i]} samples"
            )
    return sorted(set(skip))


# ---------------------------------------------------------------------------------------------
# The builder


def build_train_valid_test_datasets(
    data_path: list[str] | None,
    split: str,
    seq_length: int,
    seed: int,
    num_samples: tuple[int, int, int],
    tokenizer,
    mock: bool = False,
    data_cache_path: str | None = None,
    *,
    train_data_path: list[str] | None = None,
    valid_data_path: list[str] | None = None,
    test_data_path: list[str] | None = None,
    is_built_on_rank: Callable[[], bool] | None = None,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
    create_attention_mask: bool = True,
    num_dataset_builder_threads: int = 1,
):
    """(train, valid, test) Megatron datasets; an entry is None where the split is not built.

    `data_path` is Megatron-LM's `--data-path` (a prefix, or `W1 P1 W2 P2 ...`), cut by
    `split` ("969,30,1"). Alternatively `train_data_path` / `valid_data_path` /
    `test_data_path` give each split its own prefixes (used whole; `split` is ignored), e.g.
    the held-out corpus as the validation set. `num_samples` are the samples each split must
    provide (more than one epoch is drawn when needed). Samples are dicts of `tokens`,
    `labels`, `loss_mask`, `position_ids` (and `attention_mask` when `create_attention_mask`;
    at long sequence lengths that [1, s, s] mask is large: pass False when the attention
    kernel builds its own causal mask).
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    sizes = [int(n) for n in num_samples]
    if len(sizes) != 3 or any(n < 0 for n in sizes):
        raise DataError(
            f"num_samples {tuple(num_samples)} must be 3 counts >= 0 (train, valid, test)"
        )
    if int(seq_length) < 1:
        raise DataError(f"seq_length {seq_length} must be >= 1")
    for attr in ("vocab_size", "eod", "unique_identifiers"):
        if not hasattr(tokenizer, attr):
            raise DataError(
                f"tokenizer {tokenizer!r} lacks {attr!r}; build it with build_tokenizer"
            )
    per_split = [train_data_path, valid_data_path, test_data_path]
    common = dict(
        random_seed=int(seed),
        sequence_length=int(seq_length),
        tokenizer=tokenizer,
        path_to_cache=data_cache_path,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=create_attention_mask,
        num_dataset_builder_threads=num_dataset_builder_threads,
    )
    is_built_on_rank = is_built_on_rank or (lambda: True)

    if mock:
        config = GPTDatasetConfig(blend=None, split="1,1,1", **common)
        return tuple(
            BlendedMegatronDatasetBuilder(MockGPTDataset, sizes, is_built_on_rank, config).build()
        )

    if data_path and any(per_split):
        raise DataError(
            "pass either --data-path (cut by --split) or per-split "
            "--train/valid/test-data-path, not both"
        )
    if not data_path and not any(per_split):
        raise DataError(f"no data: pass --data-path PREFIX ({_PREPROCESS_HINT}) or use mock data")

    blends = [parse_data_path(p) if p else None for p in ([data_path] if data_path else per_split)]
    infos = {}
    for blend in blends:
        for prefix in blend[0] if blend else []:
            if prefix not in infos:
                infos[prefix] = read_index(prefix)
                check_tokenizer_matches(infos[prefix], tokenizer)

    surplus = GPTDatasetConfig.mid_level_dataset_surplus
    if data_path:
        matrix = split_matrix(split)
        skip = _check_split_sizes(infos, blends[0], matrix, sizes, surplus, split)
        config = GPTDatasetConfig(blend=blends[0], split=split, **common)
        for i in skip:  # empty and asked for nothing: do not build (upstream would hang)
            config.split_matrix[i] = None
    else:
        for i, blend in enumerate(blends):
            if blend is not None:
                spoof = [None] * 3
                spoof[i] = (0.0, 1.0)
                only = [0] * 3
                only[i] = sizes[i]
                _check_split_sizes(infos, blend, spoof, only, surplus, None)
        config = GPTDatasetConfig(blend_per_split=blends, **common)
    builder = BlendedMegatronDatasetBuilder(GPTDataset, sizes, is_built_on_rank, config)
    return tuple(builder.build())


# ---------------------------------------------------------------------------------------------
# The embedded corpus, ready to train on


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare_default_data(out_dir: str, vocab_size: int = 8000, force: bool = False) -> dict:
    """Train a tokenizer on the embedded corpus and build its indexed datasets in `out_dir`.

    Idempotent: reuses what an earlier call built with the same corpus and vocabulary size
    (a manifest records them); concurrent callers (e.g. every rank of a job) wait on a lock.
    Takes a few seconds. Returns paths:
      tokenizer_model      out_dir/tokenizer.model
      train_data_prefix    the 42 works of Shakespeare (--data-path; cut it with --split)
      heldout_data_prefix  Milton + the 1911 Britannica article (e.g. --valid-data-path)
    """
    from .preprocess import preprocess_data, train_tokenizer

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "tokenizer_model": str(out / "tokenizer.model"),
        "train_data_prefix": str(out / "shakespeare_text_document"),
        "heldout_data_prefix": str(out / "heldout_text_document"),
    }
    corpora = {"train": DEFAULT_TRAIN_CORPUS, "heldout": DEFAULT_HELDOUT_CORPUS}
    for path in corpora.values():
        if not path.is_file():
            raise DataError(
                f"the embedded corpus {path} is missing: reinstall the package or "
                "restore fusedkv_megatron/data/ from git"
            )
    manifest_path = out / "manifest.json"
    want = {
        "format": 1,
        "vocab_size": int(vocab_size),
        "corpus_sha256": {k: _sha256(p) for k, p in corpora.items()},
        "paths": paths,
    }
    with open(out / ".prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and manifest_path.is_file():
            try:
                have = json.loads(manifest_path.read_text())
            except ValueError:
                have = None
            files = [paths["tokenizer_model"]] + [
                paths[k] + s
                for k in ("train_data_prefix", "heldout_data_prefix")
                for s in (".bin", ".idx")
            ]
            if have == want and all(os.path.isfile(f) for f in files):
                return dict(paths)
        manifest_path.unlink(missing_ok=True)
        model = train_tokenizer(
            [str(corpora["train"])], str(out / "tokenizer"), vocab_size, threads=1
        )
        for key, prefix in (("train", out / "shakespeare"), ("heldout", out / "heldout")):
            preprocess_data(
                [str(corpora[key])],
                str(prefix),
                tokenizer_model=model,
                append_eod=True,
                workers=1,
                progress=False,
            )
        manifest_path.write_text(json.dumps(want, indent=2))
    return dict(paths)


__all__ = [
    "DataError",
    "build_train_valid_test_datasets",
    "check_tokenizer_matches",
    "parse_data_path",
    "prepare_default_data",
    "read_index",
    "split_matrix",
]


def main(argv: list[str] | None = None) -> int:
    """`python -m fusedkv_megatron.data.datasets OUT_DIR`: prepare the embedded corpus in OUT_DIR
    and print its paths as shell assignments (TOKENIZER_MODEL=..., TRAIN_DATA_PREFIX=...,
    HELDOUT_DATA_PREFIX=...) for the example scripts to `eval`."""
    import shlex
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m fusedkv_megatron.data.datasets OUT_DIR", file=sys.stderr)
        return 2
    for key, value in prepare_default_data(args[0]).items():
        print(f"{key.upper()}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
