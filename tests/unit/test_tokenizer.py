"""Tokenizer: training from text/jsonl, exact round trips, the Megatron interface, clear errors."""

from __future__ import annotations

import gzip
import itertools
import json
import pickle

import pytest

from fusedkv_megatron.training.data import DEFAULT_TRAIN_CORPUS
from fusedkv_megatron.training.preprocess import (
    PreprocessError,
    iter_documents,
    train_tokenizer,
)
from fusedkv_megatron.training.preprocess_cli import train_tokenizer_main
from fusedkv_megatron.training.tokenizer import (
    NullTokenizer,
    SentencePieceTokenizer,
    TokenizerError,
    build_tokenizer,
)

SAMPLES = [
    "To be, or not to be: that is the question.",
    " leading space, trailing space ",
    "two  spaces\nnew line\n\n\ttab and 12345 digits",
    "ünïcödé — “quotes” 😀 東京",
    "",
]


def _write_jsonl(path, docs):
    with open(path, "w") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc, "id": len(doc)}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def small_jsonl(tmp_path_factory):
    """The first 40 documents of the embedded corpus (~300 kB)."""
    with gzip.open(DEFAULT_TRAIN_CORPUS, "rt") as f:
        docs = [json.loads(line)["text"] for line in itertools.islice(f, 40)]
    return _write_jsonl(tmp_path_factory.mktemp("tok") / "small.jsonl", docs)


@pytest.fixture(scope="module")
def sp_model(small_jsonl, tmp_path_factory):
    prefix = tmp_path_factory.mktemp("tok") / "sp"
    return train_tokenizer([small_jsonl], str(prefix), vocab_size=1000, threads=1)


def test_trained_model_round_trips_any_text(sp_model):
    tok = build_tokenizer("SentencePieceTokenizer", sp_model)
    assert tok.vocab_size == 1000
    for text in SAMPLES:
        ids = tok.tokenize(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.detokenize(ids) == text
    # BPE learned English: common words are single pieces, unseen characters are bytes.
    assert len(tok.tokenize("the")) == 1
    emoji = [tok.id_to_piece(i) for i in tok.tokenize("😀")]
    assert [p[:3] for p in emoji[-4:]] == ["<0x"] * 4  # its 4 UTF-8 bytes


def test_megatron_interface(sp_model):
    tok = build_tokenizer("SentencePieceTokenizer", sp_model)
    assert (tok.eod, tok.eos, tok.bos, tok.pad) == (2, 2, 1, -1)
    ident = tok.unique_identifiers
    assert ident["class"] == "SentencePieceTokenizer" and len(ident["model_sha256"]) == 64
    clone = pickle.loads(pickle.dumps(tok))  # data-loader / preprocessing workers
    assert clone.tokenize(SAMPLES[0]) == tok.tokenize(SAMPLES[0])
    assert build_tokenizer("GPTSentencePieceTokenizer", sp_model).vocab_size == 1000


def test_training_is_deterministic(small_jsonl, sp_model, tmp_path):
    again = train_tokenizer([small_jsonl], str(tmp_path / "again"), vocab_size=1000, threads=1)
    # Compare vocabularies: the model file also records its own output path.
    pieces = [
        [t.id_to_piece(i) for i in range(t.vocab_size)]
        for t in map(SentencePieceTokenizer, (again, sp_model))
    ]
    assert pieces[0] == pieces[1]


def test_cli_trains_from_text_and_jsonl(small_jsonl, tmp_path):
    text = tmp_path / "plain.txt"
    text.write_text("\n\n".join(itertools.islice(iter_documents([small_jsonl]), 10)))
    prefix = tmp_path / "cli"
    argv = [
        "--input",
        str(text),
        small_jsonl,
        "--vocab-size",
        "600",
        "--output-prefix",
        str(prefix),
        "--threads",
        "1",
    ]
    assert train_tokenizer_main(argv) == 0
    assert (tmp_path / "cli.vocab").is_file()
    tok = SentencePieceTokenizer(str(prefix) + ".model")
    assert tok.vocab_size == 600 and tok.detokenize(tok.tokenize(SAMPLES[2])) == SAMPLES[2]


def test_training_errors_are_clear(small_jsonl, tmp_path):
    with pytest.raises(PreprocessError, match="too small"):
        train_tokenizer([small_jsonl], str(tmp_path / "x"), vocab_size=100)
    with pytest.raises(PreprocessError, match="lower --vocab-size"):
        train_tokenizer([small_jsonl], str(tmp_path / "x"), vocab_size=500_000, threads=1)
    with pytest.raises(PreprocessError, match="does not exist"):
        train_tokenizer([str(tmp_path / "nope.jsonl")], str(tmp_path / "x"), vocab_size=1000)
    bad = _write_jsonl(tmp_path / "bad.jsonl", ["fine"])
    with open(bad, "a") as f:
        f.write('{"content": "no text key"}\n')
    with pytest.raises(PreprocessError, match=r"bad.jsonl:2: no key 'text'.*--json-keys"):
        train_tokenizer([bad], str(tmp_path / "x"), vocab_size=1000)


def test_null_tokenizer():
    tok = build_tokenizer("NullTokenizer", vocab_size=128)
    assert isinstance(tok, NullTokenizer)
    assert (tok.vocab_size, tok.eod) == (128, 127)
    assert tok.tokenize("3 5 7") == [3, 5, 7] and tok.detokenize([3, 5, 7]) == "3 5 7"
    with pytest.raises(TokenizerError, match=r"outside \[0, 128\)"):
        tok.tokenize("3 500")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(tokenizer_type="HuggingFaceTokenizer"),
            "unknown --tokenizer-type 'HuggingFaceTokenizer'",
        ),
        (dict(tokenizer_type="SentencePieceTokenizer"), "needs --tokenizer-model"),
        (dict(tokenizer_type="NullTokenizer"), "needs --vocab-size"),
        (
            dict(tokenizer_type="SentencePieceTokenizer", tokenizer_model="/no/such.model"),
            "'/no/such.model' does not exist.*tools/train_tokenizer.py",
        ),
    ],
)
def test_bad_tokenizer_arguments(kwargs, match):
    with pytest.raises(TokenizerError, match=match):
        build_tokenizer(**kwargs)


def test_corrupt_or_wrong_model_file(sp_model, tmp_path):
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_bytes(open(sp_model, "rb").read()[:500])
    with pytest.raises(TokenizerError, match="corrupt.model' is not a sentencepiece model"):
        build_tokenizer("SentencePieceTokenizer", str(corrupt))
    vocab = sp_model[: -len(".model")] + ".vocab"  # the text file written next to the model
    with pytest.raises(TokenizerError, match=r"the \.vocab text file; pass the \.model"):
        build_tokenizer("SentencePieceTokenizer", vocab)
