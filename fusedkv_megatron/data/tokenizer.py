"""Tokenizers the trainer and the data tools share.

`build_tokenizer` takes Megatron-LM's names (`--tokenizer-type`, `--tokenizer-model`,
`--vocab-size`) and returns an object with what `megatron.core.datasets` needs (`vocab_size`,
`eod`, `unique_identifiers`) plus `tokenize` / `detokenize`.

- "SentencePieceTokenizer": a sentencepiece model trained by tools/train_tokenizer.py. Like
  Megatron-LM's GPTSentencePieceTokenizer, the end-of-document id is the model's `</s>` id and
  no extra special tokens are appended to the vocabulary.
- "HuggingFaceTokenizer": a Hugging Face tokenizer directory (tokenizer.json,
  tokenizer_config.json, ...: Llama 3, Qwen, Mistral, or one saved with `save_pretrained`), read
  with `AutoTokenizer.from_pretrained(DIR, local_files_only=True)` -- never downloaded. As in
  Megatron-LM's _HuggingFaceTokenizer: `vocab_size` is `len(tokenizer)` (added tokens included),
  `eod` is the tokenizer's EOS id, and `tokenize` is `tokenizer(text).input_ids`, so special
  tokens the tokenizer adds by itself (Llama's BOS) are kept.
- "NullTokenizer": no text, ids only (mock data, benchmarks). As in
  megatron.core's NullTokenizer, `vocab_size` is exactly the given size and `eod` is its last id.
  (Megatron-LM's legacy NullTokenizer adds one id for eod; we do not.)
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path

TOKENIZER_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer", "NullTokenizer")
# The files of a Hugging Face tokenizer directory (fast and slow tokenizers, chat templates);
# weights and model configs that often sit next to them are not part of the tokenizer.
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)
# Megatron-LM's name for the same GPT-style sentencepiece behaviour.
_ALIASES = {"GPTSentencePieceTokenizer": "SentencePieceTokenizer"}


class TokenizerError(ValueError):
    """A tokenizer cannot be built from the given type, model file or vocabulary size."""


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class SentencePieceTokenizer:
    """A sentencepiece model; `eod` is its end-of-sentence (`</s>`) id."""

    tokenizer_type = "SentencePieceTokenizer"

    def __init__(self, model_path: str) -> None:
        self.model_path = os.path.abspath(model_path)
        self._load()

    def _load(self) -> None:
        import sentencepiece

        path = self.model_path
        if not os.path.isfile(path):
            raise TokenizerError(
                f"tokenizer model {path!r} does not exist: pass the .model file written by "
                "tools/train_tokenizer.py (--output-prefix PREFIX writes PREFIX.model), "
                "or train one with: python tools/train_tokenizer.py --input FILE "
                "--vocab-size 32000 --output-prefix PREFIX"
            )
        processor = sentencepiece.SentencePieceProcessor()
        try:
            processor.Load(path)
        except (RuntimeError, OSError) as err:
            hint = (
                " (this is the .vocab text file; pass the .model next to it)"
                if path.endswith(".vocab")
                else ""
            )
            raise TokenizerError(
                f"tokenizer model {path!r} is not a sentencepiece model{hint}: {err}. "
                "Pass the .model file written by tools/train_tokenizer.py."
            ) from err
        if processor.eos_id() < 0:
            raise TokenizerError(
                f"tokenizer model {path!r} has no end-of-sentence token (eos_id=-1), which "
                "the data pipeline uses as the end-of-document id; retrain it with "
                "tools/train_tokenizer.py (it keeps </s> at id 2)"
            )
        self._sp = processor
        self._sha256 = _file_sha256(path)

    # Pickling reloads from the file (sentencepiece processors are not picklable everywhere);
    # data-loader workers and preprocessing workers rely on this.
    def __getstate__(self) -> dict:
        return {"model_path": self.model_path}

    def __setstate__(self, state: dict) -> None:
        self.model_path = state["model_path"]
        self._load()

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    @property
    def eod(self) -> int:
        return self._sp.eos_id()

    @property
    def eos(self) -> int:
        return self._sp.eos_id()

    @property
    def bos(self) -> int:
        return self._sp.bos_id()

    @property
    def pad(self) -> int:
        return self._sp.pad_id()

    @property
    def sha256(self) -> str:
        """Content hash of the model file: two files with equal hashes tokenize alike."""
        return self._sha256

    @property
    def unique_identifiers(self) -> OrderedDict:
        """Keys megatron.core.datasets hashes into its index-cache names."""
        return OrderedDict([("class", type(self).__name__), ("model_sha256", self._sha256)])

    def tokenize(self, text: str) -> list[int]:
        return self._sp.EncodeAsIds(text)

    def detokenize(self, ids) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.IdToPiece(int(token_id))

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.model_path!r}, vocab_size={self.vocab_size})"


def hf_tokenizer_files(directory: str | os.PathLike) -> list[Path]:
    """The files of `directory` that belong to its Hugging Face tokenizer (HF_TOKENIZER_FILES)."""
    directory = Path(directory)
    return [directory / name for name in HF_TOKENIZER_FILES if (directory / name).is_file()]


class HuggingFaceTokenizer:
    """A local Hugging Face tokenizer directory; `eod` is its EOS id (see the module docstring)."""

    tokenizer_type = "HuggingFaceTokenizer"

    def __init__(self, model_dir: str) -> None:
        self.model_path = os.path.abspath(model_dir)
        self._load()

    def _load(self) -> None:
        path = self.model_path
        fix = (
            "pass a local directory holding tokenizer.json/tokenizer_config.json (a model's "
            "Hugging Face directory, or one written by tokenizer.save_pretrained(DIR)); "
            "nothing is downloaded"
        )
        if not os.path.isdir(path):
            raise TokenizerError(
                f"--tokenizer-type HuggingFaceTokenizer: --tokenizer-model {path!r} is not a "
                f"directory; {fix}"
            )
        files = hf_tokenizer_files(path)
        if not files:
            raise TokenizerError(
                f"--tokenizer-model {path!r} holds none of {', '.join(HF_TOKENIZER_FILES[:3])} "
                f"...; {fix}"
            )
        # The Rust tokenizer's own thread pool does not survive the fork of preprocessing workers.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, TypeError) as err:
            raise TokenizerError(
                f"--tokenizer-model {path!r} is not a loadable Hugging Face tokenizer: {err}; {fix}"
            ) from err
        if tokenizer.eos_token_id is None:
            raise TokenizerError(
                f"the Hugging Face tokenizer in {path!r} has no eos_token, which the data "
                "pipeline uses as the end-of-document id; set one (tokenizer.eos_token = ...; "
                "tokenizer.save_pretrained(DIR)) or use a tokenizer that has one"
            )
        self._tok = tokenizer
        digest = hashlib.sha256()
        for f in files:
            digest.update(f"{f.name}:{_file_sha256(str(f))}\n".encode())
        self._sha256 = digest.hexdigest()

    def __getstate__(self) -> dict:
        return {"model_path": self.model_path}

    def __setstate__(self, state: dict) -> None:
        self.model_path = state["model_path"]
        self._load()

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def eod(self) -> int:
        return self._tok.eos_token_id

    @property
    def eos(self) -> int:
        return self._tok.eos_token_id

    @property
    def bos(self) -> int:
        return -1 if self._tok.bos_token_id is None else self._tok.bos_token_id

    @property
    def pad(self) -> int:
        return -1 if self._tok.pad_token_id is None else self._tok.pad_token_id

    @property
    def sha256(self) -> str:
        """Hash over the tokenizer files' names and contents."""
        return self._sha256

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict([("class", type(self).__name__), ("model_sha256", self._sha256)])

    def tokenize(self, text: str) -> list[int]:
        # verbose=False: no warning for documents longer than the tokenizer's model_max_length.
        return self._tok(text, verbose=False)["input_ids"]

    def detokenize(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._tok.convert_ids_to_tokens(int(token_id))

    def __repr__(self) -> str:
        return f"HuggingFaceTokenizer({self.model_path!r}, vocab_size={self.vocab_size})"


class NullTokenizer:
    """Ids without text: `tokenize("3 5 7") == [3, 5, 7]`; `eod` is `vocab_size - 1`."""

    tokenizer_type = "NullTokenizer"
    bos = -1
    pad = -1

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = int(vocab_size)
        self.eod = self.vocab_size - 1

    @property
    def eos(self) -> int:
        return self.eod

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict([("class", type(self).__name__), ("vocab_size", self.vocab_size)])

    def tokenize(self, text: str) -> list[int]:
        try:
            ids = [int(x) for x in text.split()]
        except ValueError:
            raise TokenizerError(
                f"NullTokenizer reads whitespace-separated integer ids, got {text[:40]!r}; "
                "use --tokenizer-type SentencePieceTokenizer for text"
            ) from None
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(
                f"NullTokenizer(vocab_size={self.vocab_size}) got ids {bad[:5]} outside "
                f"[0, {self.vocab_size}); it reads whitespace-separated ids, not text"
            )
        return ids

    def detokenize(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)

    def __repr__(self) -> str:
        return f"NullTokenizer(vocab_size={self.vocab_size})"


def build_tokenizer(
    tokenizer_type: str,
    tokenizer_model: str | None = None,
    vocab_size: int | None = None,
):
    """The tokenizer named by Megatron-LM's `--tokenizer-type` (see the module docstring).

    `tokenizer_model` is required for SentencePieceTokenizer (a .model file) and
    HuggingFaceTokenizer (a directory); their vocabulary comes from it and `vocab_size` is then
    ignored. NullTokenizer needs `vocab_size`.
    """
    kind = _ALIASES.get(tokenizer_type, tokenizer_type)
    if kind == "SentencePieceTokenizer":
        if not tokenizer_model:
            raise TokenizerError(
                "--tokenizer-type SentencePieceTokenizer needs --tokenizer-model PATH (a .model "
                "file); train one with tools/train_tokenizer.py"
            )
        return SentencePieceTokenizer(tokenizer_model)
    if kind == "HuggingFaceTokenizer":
        if not tokenizer_model:
            raise TokenizerError(
                "--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model DIR (a local "
                "directory with tokenizer.json/tokenizer_config.json)"
            )
        return HuggingFaceTokenizer(tokenizer_model)
    if kind == "NullTokenizer":
        if vocab_size is None or int(vocab_size) < 2:
            raise TokenizerError(
                f"--tokenizer-type NullTokenizer needs --vocab-size N with N >= 2 "
                f"(got {vocab_size!r})"
            )
        return NullTokenizer(int(vocab_size))
    raise TokenizerError(
        f"unknown --tokenizer-type {tokenizer_type!r}; supported: {', '.join(TOKENIZER_TYPES)} "
        "(train a SentencePiece model with tools/train_tokenizer.py)"
    )
