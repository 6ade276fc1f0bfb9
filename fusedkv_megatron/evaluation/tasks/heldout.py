"""Documents and per-document counts of the fusedkv_heldout lm-eval task (its YAML names these
functions with `!function heldout.NAME`)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

HELDOUT = Path(__file__).resolve().parents[2] / "data" / "heldout.jsonl.gz"


def read_documents(path: str | Path = HELDOUT) -> list[dict]:
    """The held-out documents in file order: {"text", "title", "source", "part"} each."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_heldout(**_metadata):
    """lm-eval's `custom_dataset` hook: the documents as a one-split DatasetDict, built in memory
    from the package's file (no Hub lookup, no datasets cache)."""
    from datasets import Dataset, DatasetDict

    docs = [{"text": d["text"], "title": d.get("title", "")} for d in read_documents()]
    return DatasetDict({"test": Dataset.from_list(docs)})


def count_words(text: str) -> int:
    """Words are whitespace-separated pieces (wikitext's rule, without its empty pieces at the
    ends of a document)."""
    return len(text.split())


def process_results(doc: dict, results: list) -> dict:
    """The document's total log-likelihood weighted by its words and UTF-8 bytes."""
    (loglikelihood,) = results
    words, n_bytes = count_words(doc["text"]), len(doc["text"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, n_bytes),
        "bits_per_byte": (loglikelihood, n_bytes),
    }
