"""Raw text -> tokenizer and Megatron indexed datasets: the work behind
tools/train_tokenizer.py and tools/preprocess_data.py (their flags: preprocess_cli.py).

Inputs are jsonl (one JSON object per line, text under `--json-keys`) or plain text, either
optionally gzipped. Plain text is cut into documents at blank lines (`--text-document
paragraph`, the default), at every line, or one document per file.

`preprocess_data` writes `{output_prefix}_{key}_document.{bin,idx}` per JSON key, the names
Megatron-LM's tools/preprocess_data.py uses, through megatron.core's IndexedDatasetBuilder,
plus a small `.meta.json` recording the tokenizer, which `data.py` checks at load time. Worker
processes tokenize batches in order, so the output does not depend on `--workers`.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from .tokenizer import TokenizerError, build_tokenizer

TEXT_DOCUMENT_MODES = ("paragraph", "line", "file")
_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


class PreprocessError(ValueError):
    """Bad input or arguments for tokenizer training or preprocessing."""


# ---------------------------------------------------------------------------------------------
# Reading inputs


def input_format_of(path: str) -> str:
    """Return "jsonl" for .jsonl/.json/.ndjson (optionally .gz), else "text"."""
    name = path[:-3] if path.endswith(".gz") else path
    return "jsonl" if name.endswith(_JSONL_SUFFIXES) else "text"


def _open_binary(path: str):
    if not os.path.isfile(path):
        raise PreprocessError(f"input file {path!r} does not exist")
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _decode(raw: bytes, path: str, line_no: int) -> str:
    try:
        return raw.decode("utf-8").replace("\r\n", "\n")
    except UnicodeDecodeError as err:
        raise PreprocessError(f"{path}:{line_no}: not UTF-8 text ({err})") from None


def iter_records(
    paths: Sequence[str], input_format: str = "auto", text_document: str = "paragraph"
) -> Iterator[tuple[str, str, str, int]]:
    """Yield (format, where, raw, nbytes): a JSON line, or a plain-text document.

    `where` is "file:line" for error messages; `nbytes` is what was consumed (progress).
    """
    if text_document not in TEXT_DOCUMENT_MODES:
        raise PreprocessError(
            f"--text-document {text_document!r} is not one of {', '.join(TEXT_DOCUMENT_MODES)}"
        )
    for path in paths:
        fmt = input_format_of(path) if input_format == "auto" else input_format
        if fmt not in ("jsonl", "text"):
            raise PreprocessError(f"--input-format {input_format!r}: use auto, jsonl or text")
        with _open_binary(path) as f:
            if fmt == "jsonl":
                for line_no, raw in enumerate(f, 1):
                    if raw.strip():
                        yield fmt, f"{path}:{line_no}", _decode(raw, path, line_no), len(raw)
                continue
            if text_document == "file":
                data = f.read()
                yield fmt, f"{path}:1", _decode(data, path, 1), len(data)
                continue
            lines: list[str] = []
            nbytes, start = 0, 1
            for line_no, raw in enumerate(f, 1):
                nbytes += len(raw)
                line = _decode(raw, path, line_no)
                if text_document == "line":
                    if line.strip():
                        yield fmt, f"{path}:{line_no}", line.rstrip("\n"), nbytes
                    nbytes = 0
                elif line.strip():
                    if not lines:
                        start = line_no
                    lines.append(line)
                elif lines:
                    yield fmt, f"{path}:{start}", "".join(lines).rstrip("\n"), nbytes
                    lines, nbytes = [], 0
            if lines:
                yield fmt, f"{path}:{start}", "".join(lines).rstrip("\n"), nbytes


def _texts_of(fmt: str, where: str, raw: str, json_keys: Sequence[str]) -> dict[str, str]:
    if fmt == "text":
        return {json_keys[0]: raw}
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as err:
        raise PreprocessError(f"{where}: not a JSON object ({err})") from None
    if not isinstance(obj, dict):
        raise PreprocessError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    texts = {}
    for key in json_keys:
        if key not in obj:
            raise PreprocessError(
                f"{where}: no key {key!r} (keys: {sorted(obj)[:10]}); pass --json-keys NAME"
            )
        if not isinstance(obj[key], str):
            raise PreprocessError(f"{where}: {key!r} is {type(obj[key]).__name__}, not a string")
        texts[key] = obj[key]
    return texts


def iter_documents(
    paths: Sequence[str],
    json_keys: Sequence[str] = ("text",),
    input_format: str = "auto",
    text_document: str = "paragraph",
) -> Iterator[str]:
    """The text of every document (every key of every JSON object) in `paths`."""
    for fmt, where, raw, _ in iter_records(paths, input_format, text_document):
        yield from _texts_of(fmt, where, raw, json_keys).values()


# ---------------------------------------------------------------------------------------------
# Tokenizer training


def _sentences(documents: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Lines of the documents; sentencepiece drops lines over max_bytes, so cut those at spaces."""
    for doc in documents:
        for line in doc.split("\n"):
            if not line.strip():
                continue
            if len(line.encode("utf-8")) <= max_bytes:
                yield line
                continue
            piece: list[str] = []
            size = 0
            for word in line.split(" "):
                n = len(word.encode("utf-8")) + 1
                if piece and size + n > max_bytes:
                    yield " ".join(piece)
                    piece, size = [], 0
                piece.append(word[: max_bytes // 4])
                size += n
            if piece:
                yield " ".join(piece)


def train_tokenizer(
    inputs: Sequence[str],
    output_prefix: str,
    vocab_size: int,
    json_keys: Sequence[str] = ("text",),
    model_type: str = "bpe",
    byte_fallback: bool = True,
    character_coverage: float = 0.9995,
    max_sentences: int = 5_000_000,
    max_sentence_length: int = 16384,
    threads: int | None = None,
    input_format: str = "auto",
    user_defined_symbols: Sequence[str] = (),
    verbose: bool = False,
) -> str:
    """Train a sentencepiece model (BPE with byte fallback by default); returns PREFIX.model.

    Text is kept byte-exact (identity normalization, whitespace preserved, digits split), so
    `detokenize(tokenize(s)) == s` for any string. Ids: unk 0, bos 1, eos 2 (the eod); no pad.
    """
    import sentencepiece

    if vocab_size < 300 and byte_fallback:
        raise PreprocessError(
            f"--vocab-size {vocab_size} is too small: byte fallback alone needs 256 ids + 3 "
            "specials; use >= 1000 (32000-128000 for real models)"
        )
    _make_output_dir(output_prefix)
    sentences = _sentences(iter_documents(inputs, json_keys, input_format), max_sentence_length)
    try:
        sentencepiece.SentencePieceTrainer.Train(
            sentence_iterator=sentences,
            model_prefix=output_prefix,
            model_type=model_type,
            vocab_size=vocab_size,
            byte_fallback=byte_fallback,
            character_coverage=character_coverage,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=max_sentence_length,
            num_threads=threads or min(16, os.cpu_count() or 1),
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            user_defined_symbols=list(user_defined_symbols),
            minloglevel=0 if verbose else 2,
        )
    except RuntimeError as err:
        msg = str(err)
        hint = ""
        if "Vocabulary size too high" in msg:
            hint = " The corpus is too small for this vocabulary: lower --vocab-size."
        elif "Vocabulary size is smaller than required_chars" in msg:
            hint = " Raise --vocab-size or lower --character-coverage."
        raise PreprocessError(f"sentencepiece training failed: {msg}.{hint}") from None
    return output_prefix + ".model"


# ---------------------------------------------------------------------------------------------
# Preprocessing into indexed datasets

_worker: dict = {}


def _init_worker(tokenizer_args: dict, json_keys: Sequence[str], append_eod: bool) -> None:
    tokenizer = build_tokenizer(**tokenizer_args)
    _worker.update(tokenizer=tokenizer, json_keys=list(json_keys), append_eod=append_eod)


def _encode_batch(batch: list[tuple[str, str, str, int]]) -> list[tuple[int, dict]]:
    tokenizer = _worker["tokenizer"]
    out = []
    for fmt, where, raw, nbytes in batch:
        ids = {}
        for key, text in _texts_of(fmt, where, raw, _worker["json_keys"]).items():
            try:
                tokens = tokenizer.tokenize(text)
            except TokenizerError as err:
                raise PreprocessError(f"{where}: {err}") from None
            if tokens and _worker["append_eod"]:  # an empty document stays empty (skipped)
                tokens.append(tokenizer.eod)
            ids[key] = tokens
        out.append((nbytes, ids))
    return out


def _batches(records: Iterator, max_chars: int = 1 << 18) -> Iterator[list]:
    batch: list = []
    size = 0
    for record in records:
        batch.append(record)
        size += len(record[2])
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _progress_bar_class():
    from tqdm import tqdm

    class ProgressBar(tqdm):
        monitor_interval = 0  # no monitor thread: a later fork() must not inherit one

    return ProgressBar


def output_prefix_for(output_prefix: str, key: str) -> str:
    """Megatron-LM's naming: `{output_prefix}_{key}_document`."""
    return f"{output_prefix}_{key}_document"


def preprocess_data(
    inputs: Sequence[str],
    output_prefix: str,
    tokenizer_type: str = "SentencePieceTokenizer",
    tokenizer_model: str | None = None,
    vocab_size: int | None = None,
    json_keys: Sequence[str] = ("text",),
    append_eod: bool = False,
    workers: int = 1,
    input_format: str = "auto",
    text_document: str = "paragraph",
    progress: bool = True,
) -> dict[str, str]:
    """Tokenize `inputs` into one indexed dataset per JSON key; returns {key: dataset prefix}.

    Empty documents are skipped (a zero-length document has nothing to train on). The outputs
    (`.bin`, `.idx` and `.meta.json` of every key) appear together or not at all: they are
    written and fsynced under temporary names and renamed only once all are complete; on any
    failure the temporaries are removed.
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    if workers < 1:
        raise PreprocessError(f"--workers {workers} must be >= 1")
    if not inputs:
        raise PreprocessError("no --input files given")
    json_keys = list(json_keys)
    tokenizer_args = dict(
        tokenizer_type=tokenizer_type, tokenizer_model=tokenizer_model, vocab_size=vocab_size
    )
    tokenizer = build_tokenizer(**tokenizer_args)  # fail here, not in a worker
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    prefixes = {key: output_prefix_for(output_prefix, key) for key in json_keys}
    outputs = [p + ext for ext in _OUTPUT_EXTENSIONS for p in prefixes.values()]
    counts = {k: [0, 0, 0] for k in json_keys}  # documents, tokens, skipped empty
    builders: dict = {}
    t0 = time.time()
    _make_output_dir(output_prefix)
    try:
        for key, prefix in prefixes.items():
            builders[key] = IndexedDatasetBuilder(prefix + ".bin" + _TMP, dtype=dtype)
        records = iter_records(inputs, input_format, text_document)
        init_args = (tokenizer_args, json_keys, append_eod)
        with (
            _encoded_batches(records, workers, init_args) as results,
            _progress_bar(inputs, progress) as bar,
        ):
            for batch in results:
                for nbytes, ids in batch:
                    for key, tokens in ids.items():
                        if not tokens:
                            counts[key][2] += 1
                            continue
                        builders[key].add_document(np.asarray(tokens, dtype=dtype), [len(tokens)])
                        counts[key][0] += 1
                        counts[key][1] += len(tokens)
                    bar.update(nbytes)
        for key in json_keys:
            if counts[key][0] == 0:
                raise PreprocessError(
                    f"no non-empty documents under key {key!r} in {list(inputs)}; nothing written"
                )
        meta_tokenizer = dict(tokenizer.unique_identifiers)
        if getattr(tokenizer, "model_path", None):
            meta_tokenizer["model_path"] = tokenizer.model_path
        meta_tokenizer["vocab_size"] = tokenizer.vocab_size
        for key, prefix in prefixes.items():
            builders[key].finalize(prefix + ".idx" + _TMP)
            n_docs, n_tokens, n_empty = counts[key]
            meta = {
                "tokenizer": meta_tokenizer,
                "documents": n_docs,
                "tokens": n_tokens,
                "skipped_empty_documents": n_empty,
                "append_eod": append_eod,
                "json_key": key,
                "inputs": [os.path.abspath(p) for p in inputs],
            }
            with open(prefix + ".meta.json" + _TMP, "w") as f:
                json.dump(meta, f, indent=2)
        for path in outputs:
            _fsync(path + _TMP)
        # Every file of every key is complete and durable: only now do they take their names,
        # all .idx files last (a dataset is found by its .idx).
        for path in outputs:
            os.replace(path + _TMP, path)
        _fsync(os.path.dirname(os.path.abspath(output_prefix)))
    except BaseException as err:
        for builder in builders.values():
            builder.data_file.close()
        for path in outputs:
            _remove(path + _TMP)
        if isinstance(err, OSError):
            raise PreprocessError(
                f"--output-prefix {output_prefix}: cannot write the outputs: "
                f"{err.strerror or err} ({err.filename}); choose a directory with space that "
                "this user can write; nothing was written"
            ) from None
        raise
    if progress:
        rate = sum(c[1] for c in counts.values()) / max(time.time() - t0, 1e-9)
        for key, prefix in prefixes.items():
            n_docs, n_tokens, n_empty = counts[key]
            print(
                f"[preprocess] {prefix}.bin/.idx: {n_docs} documents, {n_tokens} tokens "
                f"({rate:,.0f} tokens/s, {workers} worker(s))"
                + (f", {n_empty} empty documents skipped" if n_empty else ""),
                file=sys.stderr,
            )
    return prefixes


_TMP = ".tmp"
_OUTPUT_EXTENSIONS = (".bin", ".meta.json", ".idx")  # renamed in this order


@contextlib.contextmanager
def _encoded_batches(records: Iterator, workers: int, init_args: tuple):
    """Batches of (nbytes, {key: token ids}), in input order, from `workers` processes."""
    batches = _batches(records)
    if workers == 1:
        _init_worker(*init_args)
        yield map(_encode_batch, batches)
        return
    # fork: workers inherit the imported modules instead of re-importing Megatron (s).
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = multiprocessing.get_context(method).Pool(
        workers, initializer=_init_worker, initargs=init_args
    )
    try:
        yield pool.imap(_encode_batch, batches)
    finally:
        pool.terminate()
        pool.join()


def _progress_bar(inputs: Sequence[str], progress: bool):
    total = None
    if not any(p.endswith(".gz") for p in inputs) and all(os.path.isfile(p) for p in inputs):
        total = sum(os.path.getsize(p) for p in inputs)
    return _progress_bar_class()(
        total=total,
        unit="B",
        unit_scale=True,
        desc="tokenizing",
        disable=not progress,
        file=sys.stderr,
        mininterval=0.5,
    )


def _make_output_dir(output_prefix: str) -> None:
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    for parent in (out_dir, *map(str, Path(out_dir).parents)):
        if os.path.exists(parent) and not os.path.isdir(parent):
            raise PreprocessError(
                f"--output-prefix {output_prefix}: {parent} is a file, not a directory; "
                "choose a prefix inside a directory"
            )
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as err:
        raise PreprocessError(
            f"--output-prefix {output_prefix}: cannot create {out_dir} ({err.strerror}); "
            "choose a directory this user can write"
        ) from None


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except (FileNotFoundError, NotADirectoryError):
        pass


__all__ = [
    "PreprocessError",
    "iter_documents",
    "iter_records",
    "output_prefix_for",
    "preprocess_data",
    "train_tokenizer",
]
