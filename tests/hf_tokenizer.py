"""A small Hugging Face tokenizer built locally for the tests: byte-level BPE trained with the
`tokenizers` library on the embedded corpus, saved with `PreTrainedTokenizerFast.save_pretrained`
(no download). One added special token sits past the BPE vocabulary, so `len(tokenizer)` (the
trainer's vocab size, as in Megatron-LM) differs from the backend's base vocabulary."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

EOS = "<|endoftext|>"
ADDED = "<|extra|>"  # an added special token: counted by len(tokenizer)


def corpus_texts(max_docs: int = 120) -> list[str]:
    from fusedkv_megatron.data.datasets import DEFAULT_TRAIN_CORPUS

    with gzip.open(DEFAULT_TRAIN_CORPUS, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for _, line in zip(range(max_docs), f)]


def build_hf_tokenizer(out_dir: str | Path, vocab_size: int = 600) -> Path:
    """Train and save the tokenizer into `out_dir`; returns the directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus_texts(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS)
    tokenizer.add_special_tokens({"additional_special_tokens": [ADDED]})
    out_dir = Path(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
