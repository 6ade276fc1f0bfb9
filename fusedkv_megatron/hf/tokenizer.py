"""The trainer's SentencePiece model as a Hugging Face tokenizer that loads offline.

The export is a `tokenizers` tokenizer (tokenizer.json) built from the SentencePiece model's
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
