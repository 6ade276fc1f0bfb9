"""Preprocessing: text/jsonl -> Megatron indexed datasets, token for token."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from fusedkv_megatron.data.preprocess import (
    PreprocessError,
    iter_documents,
    preprocess_data,
    train_tokenizer,
)
from fusedkv_megatron.data.preprocess_cli import preprocess_main
from fusedkv_megatron.data.tokenizer import build_tokenizer

# Other tests in this process may have started gloo's threads (a process group); the forked
# tokenizer workers only run Python and sentencepiece, so fork's thread warning does not apply.
pytestmark = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded:DeprecationWarning"
)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCS = [
    "First document.\nIt has two lines.",
    "Second — with ünïcödé and 12345.",
    "",  # empty: skipped
    "Third document, a little longer than the others, " * 20,
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A jsonl corpus of 200 documents (~60 kB), two text keys, and a tokenizer trained on it."""
    root = tmp_path_factory.mktemp("pre")
    rng = np.random.default_rng(0)
    words = "the king and queen of england shall speak to thee my lord good night".split()
    docs = DOCS + [" ".join(rng.choice(words, size=rng.integers(5, 80))) for _ in range(196)]
    path = root / "docs.jsonl"
    with open(path, "w") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"text": doc, "title": f"doc {i}"}) + "\n")
    model = train_tokenizer([str(path)], str(root / "tok"), vocab_size=400, threads=1)
    return root, str(path), docs, model


def _documents(prefix):
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def test_bin_holds_the_tokenized_text_in_order(corpus):
    root, path, docs, model = corpus
    tok = build_tokenizer("SentencePieceTokenizer", model)
    out = preprocess_data(
        [path], str(root / "w2"), tokenizer_model=model, append_eod=True, workers=2, progress=False
    )
    assert out == {"text": str(root / "w2") + "_text_document"}
    expected = [tok.tokenize(d) + [tok.eod] for d in docs if d]
    assert _documents(out["text"]) == expected
    assert tok.detokenize(expected[1][:-1]) == DOCS[1]
    meta = json.load(open(out["text"] + ".meta.json"))
    assert meta["documents"] == len(docs) - 1 and meta["skipped_empty_documents"] == 1
    assert meta["tokenizer"]["model_sha256"] == tok.sha256
    assert np.dtype(IndexedDataset(out["text"]).index.dtype) == np.uint16  # vocab < 65500


def test_output_does_not_depend_on_workers(corpus):
    root, path, _, model = corpus
    outs = [
        preprocess_data(
            [path], str(root / f"n{n}"), tokenizer_model=model, workers=n, progress=False
        )["text"]
        for n in (1, 2)
    ]
    for suffix in (".bin", ".idx"):
        assert open(outs[0] + suffix, "rb").read() == open(outs[1] + suffix, "rb").read()


def test_several_json_keys_and_gzip(corpus):
    root, path, docs, model = corpus
    gz = root / "docs.jsonl.gz"
    gz.write_bytes(gzip.compress(open(path, "rb").read()))
    out = preprocess_data(
        [str(gz)],
        str(root / "keys"),
        tokenizer_model=model,
        json_keys=["text", "title"],
        progress=False,
    )
    tok = build_tokenizer("SentencePieceTokenizer", model)
    assert sorted(out) == ["text", "title"]
    assert _documents(out["title"])[3] == tok.tokenize("doc 3")
    assert len(_documents(out["text"])) == len(docs) - 1


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("paragraph", ["a b\nc", "d", "e f"]),
        ("line", ["a b", "c", "d", "e f"]),
        ("file", ["a b\nc\n\n\nd\n\ne f\n"]),
    ],
)
def test_plain_text_documents(tmp_path, mode, expected):
    path = tmp_path / "t.txt"
    path.write_text("a b\r\nc\n\n\nd\n\ne f\n")
    assert list(iter_documents([str(path)], text_document=mode)) == [
        e.replace("\r\n", "\n") for e in expected
    ]


def test_null_tokenizer_ids(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text("1 2 3\n\n4 5\n")
    out = preprocess_data(
        [str(path)],
        str(tmp_path / "ids"),
        tokenizer_type="NullTokenizer",
        vocab_size=10,
        append_eod=True,
        progress=False,
    )
    assert _documents(out["text"]) == [[1, 2, 3, 9], [4, 5, 9]]
    path.write_text("1 2\n\nnot ids\n")
    with pytest.raises(PreprocessError, match=r"ids.txt:3: NullTokenizer reads .* integer ids"):
        preprocess_data(
            [str(path)],
            str(tmp_path / "ids"),
            tokenizer_type="NullTokenizer",
            vocab_size=10,
            workers=2,
            progress=False,
        )


def test_bad_input_names_file_and_line_and_writes_nothing(corpus, tmp_path):
    _, _, _, model = corpus
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": broken\n')
    prefix = str(tmp_path / "bad")
    with pytest.raises(PreprocessError, match=r"bad.jsonl:3: not a JSON object"):
        preprocess_data([str(bad)], prefix, tokenizer_model=model, workers=2, progress=False)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("bad_")]  # no half dataset
    with pytest.raises(PreprocessError, match=r"bad.jsonl:1: no key 'body'"):
        preprocess_data(
            [str(bad)], prefix, tokenizer_model=model, json_keys=["body"], progress=False
        )
    with pytest.raises(PreprocessError, match="does not exist"):
        preprocess_data(
            [str(tmp_path / "none.jsonl")], prefix, tokenizer_model=model, progress=False
        )


def test_cli_errors_exit_2_with_message(corpus, tmp_path, capsys):
    root, path, _, _ = corpus
    argv = ["--input", path, "--output-prefix", str(tmp_path / "x"), "--quiet"]
    with pytest.raises(SystemExit) as exc:
        preprocess_main(argv + ["--tokenizer-model", str(root / "missing.model")])
    assert exc.value.code == 2
    assert "missing.model' does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_tools_run_from_a_checkout(corpus, tmp_path):
    """tools/preprocess_data.py as a user runs it: a separate process, Megatron-LM's flags."""
    _, path, docs, model = corpus
    cmd = [
        sys.executable,
        os.path.join(REPO, "tools", "preprocess_data.py"),
        "--input",
        path,
        "--output-prefix",
        str(tmp_path / "cli"),
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        model,
        "--json-keys",
        "text",
        "--append-eod",
        "--workers",
        "2",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{len(docs) - 1} documents" in proc.stderr
    assert len(_documents(str(tmp_path / "cli_text_document"))) == len(docs) - 1
