"""Datasets: real GPTDataset / BlendedDataset samples, split checks, clear errors, default data."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from fusedkv_megatron.data.datasets import (
    DEFAULT_HELDOUT_CORPUS,
    DataError,
    build_train_valid_test_datasets,
    parse_data_path,
    prepare_default_data,
)
from fusedkv_megatron.data.preprocess import preprocess_data, train_tokenizer
from fusedkv_megatron.data.tokenizer import build_tokenizer

VOCAB = 60000  # NullTokenizer: eod = 59999
SEQ = 32


def _id_corpus(root, name, n_docs, first_id, doc_len=50):
    """Documents of consecutive ids (doc d = first_id + d*doc_len ...), so every window of the
    token stream can be traced back to its documents."""
    path = root / f"{name}.txt"
    docs = [
        " ".join(str(first_id + d * doc_len + j) for j in range(doc_len)) for d in range(n_docs)
    ]
    path.write_text("\n\n".join(docs) + "\n")
    out = preprocess_data(
        [str(path)],
        str(root / name),
        tokenizer_type="NullTokenizer",
        vocab_size=VOCAB,
        append_eod=True,
        progress=False,
    )
    return out["text"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    return {
        "root": root,
        "a": _id_corpus(root, "a", 100, first_id=1),  # ids 1..5000
        "b": _id_corpus(root, "b", 100, first_id=20001),  # ids 20001..25000
        "small": _id_corpus(root, "small", 40, first_id=1),
        "tok": build_tokenizer("NullTokenizer", vocab_size=VOCAB),
    }


def _build(data, data_path, split="90,10,0", sizes=(100, 10, 0), **kw):
    kw.setdefault("data_cache_path", str(data["root"] / "cache"))
    return build_train_valid_test_datasets(data_path, split, SEQ, 1234, sizes, data["tok"], **kw)


def _documents_of(tokens, doc_len=50, first_id=1):
    return {(int(t) - first_id) // doc_len for t in tokens if t != VOCAB - 1}


def test_gpt_samples_are_windows_of_the_document_stream(data):
    train, valid, test = _build(data, [data["a"]])
    assert test is None and len(train) >= 100 and len(valid) >= 10
    eod = data["tok"].eod
    for i in range(len(train)):
        s = train[i]
        tokens, labels = s["tokens"].numpy(), s["labels"].numpy()
        assert tokens.shape == (SEQ,) and s["attention_mask"].shape == (1, SEQ, SEQ)
        assert (labels[:-1] == tokens[1:]).all()
        for a, b in zip(tokens[:-1], tokens[1:]):  # within a document, or across an eod
            assert b == a + 1 or b == eod or a == eod
        # --split 90,10,0 on 100 documents: train reads documents 0..89 only.
        assert _documents_of(tokens) <= set(range(90))
    assert all(_documents_of(valid[i]["tokens"]) <= set(range(90, 100)) for i in range(len(valid)))
    assert (train[0]["loss_mask"] == 1).all()


def test_weighted_blend_follows_the_weights(data):
    train, _, _ = _build(
        data, ["0.7", data["a"], "0.3", data["b"]], split="100,0,0", sizes=(200, 0, 0)
    )
    ids = np.array([int(train[i]["dataset_id"]) for i in range(len(train))])
    assert len(train) == 200 and (ids == 0).sum() == 140 and (ids == 1).sum() == 60
    for i in range(0, 200, 7):
        tokens = train[i]["tokens"].numpy()
        tokens = tokens[tokens != data["tok"].eod]
        in_b = tokens > 20000
        assert in_b.all() if ids[i] == 1 else not in_b.any()


def test_unweighted_blend_and_per_split_paths(data):
    train, _, _ = _build(data, [data["a"], data["b"]], split="100,0,0", sizes=(50, 0, 0))
    assert len(train) >= 50
    train, valid, test = _build(
        data, None, train_data_path=[data["a"]], valid_data_path=[data["b"]], sizes=(20, 8, 0)
    )
    assert test is None
    assert all((valid[i]["tokens"].numpy() > 20000).any() for i in range(len(valid)))


def test_mock_data(data):
    train, valid, test = build_train_valid_test_datasets(
        None, "", SEQ, 1, (16, 4, 4), data["tok"], mock=True
    )
    assert len(train) >= 16 and len(valid) >= 4 and train[3]["tokens"].shape == (SEQ,)


@pytest.mark.timeout(120)  # upstream would loop forever here
def test_empty_split_with_samples_is_an_error_not_a_hang(data):
    # 40 documents, split 99,1,0: valid gets round(0.99*40)=40 .. 40, no document.
    with pytest.raises(DataError, match=r"--split 99,1,0 gives the valid split 0 of the 40 doc"):
        _build(data, [data["small"]], split="99,1,0", sizes=(10, 5, 0))
    with pytest.raises(DataError, match="valid split 0 of the 40 documents"):
        _build(data, ["1", data["a"], "1", data["small"]], split="99,1,0", sizes=(10, 5, 0))
    # Asked for no valid samples: the empty split is not built (upstream would hang even then).
    train, valid, test = _build(data, [data["small"]], split="99,1,0", sizes=(10, 0, 0))
    assert len(train) >= 10 and valid is None and test is None


@pytest.mark.parametrize("split", ["a,b", "1,2,3,4", "0,0,0", "-1,2"])
def test_bad_split_string(data, split):
    with pytest.raises(DataError, match="--split"):
        _build(data, [data["a"]], split=split)


def test_data_path_parsing():
    assert parse_data_path(["x"]) == (["x"], None)
    assert parse_data_path("0.7 A 0.3 B") == (["A", "B"], [0.7, 0.3])
    with pytest.raises(DataError, match="weights must be > 0"):
        parse_data_path(["0", "A", "1", "B"])
    with pytest.raises(DataError, match="cannot tell weights from prefixes"):
        parse_data_path(["0.5", "A", "B"])


def test_missing_dataset_names_the_path_and_the_fix(data):
    missing = str(data["root"] / "nope")
    with pytest.raises(DataError, match=rf"{missing}'.*not found.*tools/preprocess_data.py"):
        _build(data, [missing])
    with pytest.raises(DataError, match=r"did you mean .*a_text_document"):
        _build(data, [str(data["root"] / "a")])
    with pytest.raises(DataError, match="without .bin"):
        _build(data, [data["a"] + ".bin"])


def _copy(prefix, dst):
    for suffix in (".bin", ".idx"):
        shutil.copy(prefix + suffix, str(dst) + suffix)
    return str(dst)


def test_corrupt_index_is_reported(data, tmp_path):
    bad = _copy(data["a"], tmp_path / "header")
    with open(bad + ".idx", "r+b") as f:
        f.write(b"NOTANIDX!")
    with pytest.raises(DataError, match=r"header.idx is not a Megatron index.*preprocess_data"):
        _build(data, [bad])
    bad = _copy(data["a"], tmp_path / "short")
    os.truncate(bad + ".idx", os.path.getsize(bad + ".idx") - 100)
    with pytest.raises(DataError, match="short.idx is truncated"):
        _build(data, [bad])
    bad = _copy(data["a"], tmp_path / "bin")
    os.truncate(bad + ".bin", 1000)
    with pytest.raises(DataError, match=r"the .idx does not describe the .bin"):
        _build(data, [bad])
    bad = _copy(data["a"], tmp_path / "half")
    os.remove(bad + ".idx")
    with pytest.raises(DataError, match=r"half.bin exists but .*half.idx is missing"):
        _build(data, [bad])


def test_wrong_tokenizer_is_reported(data):
    small = build_tokenizer("NullTokenizer", vocab_size=1000)
    with pytest.raises(DataError, match=r"tokenized with another tokenizer.*vocab_size"):
        build_train_valid_test_datasets([data["a"]], "90,10,0", SEQ, 1, (10, 1, 0), small)
    os.rename(data["a"] + ".meta.json", data["a"] + ".meta.bak")  # data from upstream tools
    try:
        with pytest.raises(DataError, match="holds token id 59999 but the tokenizer has vocab"):
            build_train_valid_test_datasets([data["a"]], "90,10,0", SEQ, 1, (10, 1, 0), small)
    finally:
        os.rename(data["a"] + ".meta.bak", data["a"] + ".meta.json")


@pytest.mark.slow
def test_default_data_is_built_once_and_trains(tmp_path):
    out = tmp_path / "default"
    paths = prepare_default_data(str(out), vocab_size=4000)
    stamp = os.path.getmtime(paths["train_data_prefix"] + ".bin")
    assert prepare_default_data(str(out), vocab_size=4000) == paths  # reused, not rebuilt
    assert os.path.getmtime(paths["train_data_prefix"] + ".bin") == stamp

    tok = build_tokenizer("SentencePieceTokenizer", paths["tokenizer_model"])
    assert tok.vocab_size == 4000
    train, valid, _ = build_train_valid_test_datasets(
        None,
        "",
        128,
        1234,
        (64, 16, 0),
        tok,
        train_data_path=[paths["train_data_prefix"]],
        valid_data_path=[paths["heldout_data_prefix"]],
        data_cache_path=str(tmp_path / "c"),
    )
    text = " ".join(tok.detokenize(train[i]["tokens"]) for i in range(8))
    assert sum(text.count(w) for w in (" the ", " and ", " my ")) > 10
    assert valid.dataset.path_prefix == paths["heldout_data_prefix"] and len(valid) >= 16

    # Data tokenized with the default tokenizer, loaded with another one of the same size.
    other = train_tokenizer([str(DEFAULT_HELDOUT_CORPUS)], str(tmp_path / "other"), 4000, threads=1)
    other = build_tokenizer("SentencePieceTokenizer", other)
    with pytest.raises(DataError, match="tokenized with another tokenizer.*model_sha256"):
        build_train_valid_test_datasets(
            [paths["train_data_prefix"]], "98,2,0", 128, 1, (8, 1, 0), other
        )


def test_blend_builds_under_a_process_group(data, dist_single, tmp_path):
    """With torch.distributed up, upstream builds on rank 0 first, behind barriers."""
    train, _, _ = _build(
        data,
        ["0.5", data["a"], "0.5", data["b"]],
        split="100,0,0",
        sizes=(20, 0, 0),
        data_cache_path=str(tmp_path / "pg-cache"),
    )
    assert len(train) == 20 and len(os.listdir(tmp_path / "pg-cache")) > 0
