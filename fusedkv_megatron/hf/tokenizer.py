"""The trainer's tokenizer written next to an HF export, so `AutoTokenizer.from_pretrained(DIR)`
works from the export alone, offline.

A Hugging Face tokenizer (--tokenizer-type HuggingFaceTokenizer) is copied as it is: its
tokenizer files from the checkpoint's `tokenizer/` directory. A SentencePiece model's export is a `tokenizers` tokenizer (tokenizer.json) built from the SentencePiece model's
own settings (normalizer, dummy prefix, BPE or unigram, byte fallback), so it needs neither
sentencepiece nor this package to load, and it encodes text exactly as the trainer did
(`SentencePieceProcessor.EncodeAsIds`: no BOS/EOS added). The .model file is copied alongside so
the way back (fusedkv-convert-megatron) can hand it to the trainer again.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .mapping import ConversionError

SP_MODEL_FILE = "tokenizer.model"
# An HF export carries tokenizer.json; a tokenizer.model beside it marks a SentencePiece export
# (the way back reads it as one), so an HF tokenizer's own sentencepiece files are left out.
_SP_FILES = (SP_MODEL_FILE, "spiece.model")


def _load_proto(model_file: Path):
    from transformers.convert_slow_tokenizer import import_protobuf

    proto = import_protobuf().ModelProto()
    try:
        proto.ParseFromString(model_file.read_bytes())
    except Exception as err:  # protobuf raises DecodeError, a plain Exception subclass
        raise ConversionError(f"{model_file} is not a SentencePiece model: {err}") from None
    if not proto.pieces:
        raise ConversionError(f"{model_file} is not a SentencePiece model (no pieces)")
    return proto


def export_sentencepiece(model_file: str | Path, out_dir: str | Path, eod_id: int):
    """Write tokenizer.json + tokenizer_config.json (+ the .model copy) into `out_dir`; return
    the tokenizer. `eod_id` (the trainer's end-of-document id) becomes the EOS token."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter

    model_file = Path(model_file)
    if not model_file.is_file():
        raise ConversionError(
            f"tokenizer model {model_file} not found: the checkpoint's fusedkv_run.json names a "
            "SentencePiece tokenizer; pass --tokenizer-model PATH, or --no-tokenizer to export "
            "weights only"
        )
    proto = _load_proto(model_file)
    pieces = [p.piece for p in proto.pieces]
    if proto.trainer_spec.model_type == 2:  # BPE: vocab as a dict, merges from piece scores
        vocab = {piece: i for i, piece in enumerate(pieces)}
    else:
        vocab = [(p.piece, p.score) for p in proto.pieces]
    # legacy=True: the dummy prefix exactly where SentencePiece puts it (checked by tests).
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
    if backend is None:
        raise ConversionError(f"{model_file}: unsupported SentencePiece model type")
    if not 0 <= eod_id < len(pieces):
        raise ConversionError(f"eod_id={eod_id} is outside the tokenizer's {len(pieces)} pieces")
    spec = proto.trainer_spec
    specials = {"eos_token": pieces[eod_id]}
    if spec.bos_id >= 0:
        specials["bos_token"] = pieces[spec.bos_id]
    if spec.unk_id >= 0:
        specials["unk_token"] = pieces[spec.unk_id]
    specials["pad_token"] = pieces[spec.pad_id] if spec.pad_id >= 0 else pieces[eod_id]
    # split_special_tokens: "</s>" typed in text is text, as SentencePiece treats it.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, split_special_tokens=True, **specials
    )
    out_dir = Path(out_dir)
    tokenizer.save_pretrained(out_dir)
    shutil.copyfile(model_file, out_dir / SP_MODEL_FILE)
    return tokenizer


def export_hf_tokenizer(source_dir: str | Path, out_dir: str | Path, eod_id: int):
    """Copy a Hugging Face tokenizer's files from `source_dir` (the checkpoint's tokenizer/
    directory) into `out_dir`; return the tokenizer loaded back from `out_dir`. The trainer's
    end-of-document id `eod_id` must be the tokenizer's EOS."""
    from transformers import AutoTokenizer

    from ..data.tokenizer import hf_tokenizer_files

    source_dir, out_dir = Path(source_dir), Path(out_dir)
    files = hf_tokenizer_files(source_dir) if source_dir.is_dir() else []
    if not files:
        raise ConversionError(
            f"no Hugging Face tokenizer files (tokenizer.json, tokenizer_config.json) in "
            f"{source_dir}; pass --tokenizer-model DIR, or --no-tokenizer to export weights only"
        )
    fast = any(f.name == "tokenizer.json" for f in files)
    for f in files:
        if not (fast and f.name in _SP_FILES):
            shutil.copyfile(f, out_dir / f.name)
    tokenizer = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    if tokenizer.eos_token_id != eod_id:
        raise ConversionError(
            f"the tokenizer in {source_dir} has eos_token_id={tokenizer.eos_token_id}, but the "
            f"checkpoint was trained with eod_id={eod_id}; pass the training run's tokenizer "
            "directory with --tokenizer-model"
        )
    return tokenizer


def hf_tokenizer_run_info(hf_dir: str | Path, padded_vocab_size: int) -> dict | None:
    """The run info's "tokenizer" section of an HF export whose tokenizer is a Hugging Face one
    (no tokenizer.model; tokenizer.json or tokenizer_config.json), or None without one."""
    from transformers import AutoTokenizer

    from ..checkpoint_format import TOKENIZER_DIR
    from ..data.tokenizer import hf_tokenizer_files

    hf_dir = Path(hf_dir)
    names = {f.name for f in hf_tokenizer_files(hf_dir)}
    has_hf_tokenizer = bool(names & {"tokenizer.json", "tokenizer_config.json"})
    if (hf_dir / SP_MODEL_FILE).is_file() or not has_hf_tokenizer:
        return None
    tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    if tokenizer.eos_token_id is None or len(tokenizer) > padded_vocab_size:
        raise ConversionError(
            f"the tokenizer in {hf_dir} (vocab {len(tokenizer)}, eos {tokenizer.eos_token_id}) "
            f"does not fit the model's {padded_vocab_size} embeddings with an eos token; "
            "remove its files to convert the weights alone"
        )
    return {
        "type": "HuggingFaceTokenizer",
        "model_file": TOKENIZER_DIR,
        "vocab_size": len(tokenizer),
        "eod_id": tokenizer.eos_token_id,
    }
