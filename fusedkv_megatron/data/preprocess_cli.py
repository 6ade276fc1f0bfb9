"""Command lines of tools/train_tokenizer.py and tools/preprocess_data.py (Megatron-LM's flag
names); the work is done in preprocess.py."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from .preprocess import (
    TEXT_DOCUMENT_MODES,
    PreprocessError,
    preprocess_data,
    train_tokenizer,
)
from .tokenizer import TOKENIZER_TYPES, build_tokenizer


def _add_input_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("input")
    group.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="FILE",
        help="jsonl or text files, optionally .gz",
    )
    group.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        metavar="KEY",
        help="JSON keys holding the text (default: text)",
    )
    group.add_argument(
        "--input-format",
        choices=["auto", "jsonl", "text"],
        default="auto",
        help="auto: .jsonl/.json/.ndjson[.gz] are jsonl, anything else text",
    )
    group.add_argument(
        "--text-document",
        choices=TEXT_DOCUMENT_MODES,
        default="paragraph",
        help="how plain text is cut into documents (default: at blank lines)",
    )


def train_tokenizer_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="train_tokenizer.py",
        description="Train a sentencepiece tokenizer (BPE with byte fallback) from text/jsonl. "
        "Writes PREFIX.model (pass to --tokenizer-model) and PREFIX.vocab.",
    )
    _add_input_args(parser)
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.model/.vocab")
    parser.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    parser.add_argument(
        "--no-byte-fallback",
        action="store_true",
        help="map unseen characters to <unk> instead of UTF-8 bytes",
    )
    parser.add_argument("--character-coverage", type=float, default=0.9995)
    parser.add_argument(
        "--max-sentences",
        type=int,
        default=5_000_000,
        help="train on a random sample of this many lines (0: all)",
    )
    parser.add_argument(
        "--max-sentence-length",
        type=int,
        default=16384,
        help="longer lines are cut at spaces (bytes)",
    )
    parser.add_argument(
        "--user-defined-symbols", nargs="*", default=[], help="pieces kept whole, e.g. <|im_start|>"
    )
    parser.add_argument(
        "--workers",
        "--threads",
        dest="threads",
        type=int,
        default=None,
        help="training threads (default: CPU count, at most 16)",
    )
    parser.add_argument("--verbose", action="store_true", help="sentencepiece's own log")
    args = parser.parse_args(argv)
    t0 = time.time()
    try:
        path = train_tokenizer(
            args.input,
            args.output_prefix,
            args.vocab_size,
            json_keys=args.json_keys,
            model_type=args.model_type,
            byte_fallback=not args.no_byte_fallback,
            character_coverage=args.character_coverage,
            max_sentences=args.max_sentences,
            max_sentence_length=args.max_sentence_length,
            threads=args.threads,
            input_format=args.input_format,
            user_defined_symbols=args.user_defined_symbols,
            verbose=args.verbose,
        )
    except PreprocessError as err:
        parser.exit(2, f"error: {err}\n")
    tok = build_tokenizer("SentencePieceTokenizer", path)
    print(
        f"[train_tokenizer] wrote {path} (vocab_size={tok.vocab_size}, eod={tok.eod}) "
        f"in {time.time() - t0:.1f} s; use --tokenizer-type SentencePieceTokenizer "
        f"--tokenizer-model {path}"
    )
    return 0


def preprocess_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="preprocess_data.py",
        description="Tokenize jsonl/text into Megatron indexed datasets "
        "(OUTPUT_PREFIX_{key}_document.bin/.idx, one per JSON key).",
    )
    _add_input_args(parser)
    parser.add_argument("--output-prefix", required=True)
    group = parser.add_argument_group("tokenizer")
    group.add_argument(
        "--tokenizer-type",
        default=None,
        choices=TOKENIZER_TYPES,
        help="default: HuggingFaceTokenizer when --tokenizer-model is a directory, "
        "SentencePieceTokenizer otherwise",
    )
    group.add_argument(
        "--tokenizer-model",
        help="the .model from tools/train_tokenizer.py, or a local Hugging Face tokenizer "
        "directory (tokenizer.json, tokenizer_config.json, ...; never downloaded)",
    )
    group.add_argument("--vocab-size", type=int, help="NullTokenizer only")
    group.add_argument(
        "--append-eod",
        action="store_true",
        help="end every document with the eod token (recommended for GPT)",
    )
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    args = parser.parse_args(argv)
    if args.tokenizer_type is None:
        is_dir = bool(args.tokenizer_model) and os.path.isdir(args.tokenizer_model)
        args.tokenizer_type = "HuggingFaceTokenizer" if is_dir else "SentencePieceTokenizer"
    if not args.append_eod and not args.quiet:
        print(
            "[preprocess] note: without --append-eod documents run together with no "
            "end-of-document token",
            file=sys.stderr,
        )
    try:
        preprocess_data(
            args.input,
            args.output_prefix,
            tokenizer_type=args.tokenizer_type,
            tokenizer_model=args.tokenizer_model,
            vocab_size=args.vocab_size,
            json_keys=args.json_keys,
            append_eod=args.append_eod,
            workers=args.workers,
            input_format=args.input_format,
            text_document=args.text_document,
            progress=not args.quiet,
        )
    except ValueError as err:  # PreprocessError, TokenizerError
        parser.exit(2, f"error: {err}\n")
    return 0
