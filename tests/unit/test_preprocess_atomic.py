"""tools/preprocess_data.py writes all of its outputs (`.bin`, `.idx`, `.meta.json` of every
--json-keys key) or none: a failure anywhere, even at the last file, leaves nothing new and
no temporaries, and an earlier complete dataset under the same prefix stays intact."""

from __future__ import annotations

import errno
import json

import pytest

from fusedkv_megatron.data import preprocess
from fusedkv_megatron.data.preprocess_cli import preprocess_main


@pytest.fixture
def corpus(tmp_path):
    """Token ids as text (NullTokenizer: no tokenizer to train); key "empty" has no text."""
    path = tmp_path / "ids.jsonl"
    rows = [
        {"text": "1 2 3", "title": "4 5", "empty": ""},
        {"text": "6 7", "title": "8", "empty": ""},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(corpus, prefix, *keys, capsys):
    argv = ["--input", str(corpus), "--output-prefix", str(prefix), "--json-keys", *keys,
            "--tokenizer-type", "NullTokenizer", "--vocab-size", "10", "--quiet"]  # fmt: skip
    try:
        code = preprocess_main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def files(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("out"))


def test_a_later_key_without_documents_writes_nothing(corpus, tmp_path, capsys):
    code, err = run(corpus, tmp_path / "out", "text", "empty", capsys=capsys)
    assert code == 2
    assert "error: no non-empty documents under key 'empty'" in err and "nothing written" in err
    assert files(tmp_path) == []  # not even the complete "text" dataset


def test_a_failure_at_the_last_file_leaves_the_earlier_dataset(
    corpus, tmp_path, capsys, monkeypatch
):
    code, err = run(corpus, tmp_path / "out", "text", "title", capsys=capsys)
    assert code == 0, err
    assert files(tmp_path) == [
        f"out_{key}_document.{ext}"
        for key in ("text", "title")
        for ext in ("bin", "idx", "meta.json")
    ]
    before = {name: (tmp_path / name).read_bytes() for name in files(tmp_path)}
    corpus.write_text(json.dumps({"text": "9 9 9", "title": "9"}) + "\n")
    real_dump = json.dump

    def dump(obj, f, **kwargs):  # the disk fills up writing the last .meta.json
        if obj["json_key"] == "title":
            raise OSError(errno.ENOSPC, "No space left on device", f.name)
        return real_dump(obj, f, **kwargs)

    monkeypatch.setattr(preprocess.json, "dump", dump)
    code, err = run(corpus, tmp_path / "out", "text", "title", capsys=capsys)
    assert code == 2
    assert (
        f"error: --output-prefix {tmp_path / 'out'}: cannot write the outputs: No space left" in err
    )
    assert "nothing was written" in err
    assert {name: (tmp_path / name).read_bytes() for name in files(tmp_path)} == before


def test_an_output_prefix_under_a_file_is_a_clear_error(corpus, tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    code, err = run(corpus, tmp_path / "afile" / "out", "text", capsys=capsys)
    assert code == 2
    prefix, afile = tmp_path / "afile" / "out", tmp_path / "afile"
    assert f"error: --output-prefix {prefix}: {afile} is a file, not a directory" in err
