"""Tokenizer: training from text/jsonl, exact round trips, the Megatron interface, clear errors."""

from __future__ import annotations

import gzip
import itertools
import json
import pickle

import pytest

from fusedkv_megatron.data.datasets import DEFAULT_TRAIN_CORPUS
from fusedkv_megatron.data.preprocess import (
    PreprocessError,
    iter_documents,
    train_tokenizer,
)
from fusedkv_megatron.data.preprocess_cli import train_tokenizer_main
from fusedkv_megatron.data.tokenizer import (
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
        (dict(tokenizer_type="BertWordPieceLowerCase"), "unknown --tokenizer-type 'BertWord"),
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


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tests.hf_tokenizer import build_hf_tokenizer

    return build_hf_tokenizer(tmp_path_factory.mktemp("hf_tok") / "tok")


def test_hf_tokenizer_follows_megatron_lm(hf_dir):
    """vocab_size = len(tokenizer) with added tokens, eod = eos, ids = tokenizer(text)."""
    from transformers import AutoTokenizer

    from tests.hf_tokenizer import ADDED, EOS

    tok = build_tokenizer("HuggingFaceTokenizer", str(hf_dir))
    ref = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    assert tok.vocab_size == len(ref) == ref.vocab_size + 1  # the added <|extra|>
    assert tok.eod == tok.eos == ref.convert_tokens_to_ids(EOS)
    for text in [*SAMPLES, f"a {ADDED} b"]:
        ids = tok.tokenize(text)
        assert ids == ref(text)["input_ids"]
        assert tok.detokenize(ids) == text
    again = pickle.loads(pickle.dumps(tok))  # preprocessing workers reload from the directory
    assert again.tokenize(SAMPLES[0]) == tok.tokenize(SAMPLES[0])
    assert again.unique_identifiers == tok.unique_identifiers


def test_hf_tokenizer_hash_covers_its_files(hf_dir, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    for f in hf_dir.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    (other / "model.safetensors").write_bytes(b"weights are not part of the tokenizer")
    a = build_tokenizer("HuggingFaceTokenizer", str(hf_dir))
    b = build_tokenizer("HuggingFaceTokenizer", str(other))
    assert a.sha256 == b.sha256
    config = json.loads((other / "tokenizer_config.json").read_text())
    config["model_max_length"] = 99
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    assert build_tokenizer("HuggingFaceTokenizer", str(other)).sha256 != a.sha256


def test_hf_tokenizer_errors_name_the_fix(hf_dir, tmp_path):
    with pytest.raises(TokenizerError, match="needs --tokenizer-model DIR"):
        build_tokenizer("HuggingFaceTokenizer")
    with pytest.raises(TokenizerError, match="is not a directory"):
        build_tokenizer("HuggingFaceTokenizer", str(hf_dir / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="holds none of tokenizer.json"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path))
    no_eos = tmp_path / "no_eos"
    no_eos.mkdir()
    (no_eos / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    config.pop("eos_token")
    (no_eos / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match="has no eos_token"):
        build_tokenizer("HuggingFaceTokenizer", str(no_eos))
