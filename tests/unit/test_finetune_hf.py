"""fusedkv-finetune-hf without training: environment checks that run before DeepSpeed starts,
the data readers and the DeepSpeed config handling (tests/integration/test_finetune_deepspeed.py
trains)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from fusedkv_megatron.hf import finetune as ft

ARGV = ["--model", "m", "--out", "o", "--deepspeed", "ds.json", "--data-path", "d.jsonl",
        "--max-steps", "1"]  # fmt: skip


def test_missing_compiler_is_reported_before_deepspeed_starts(monkeypatch, capsys):
    pytest.importorskip("deepspeed")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CXX", "no-such-compiler-fusedkv")
    monkeypatch.setattr(ft, "read_deepspeed_config", pytest.fail)  # never reached
    assert ft.main(ARGV) == 2
    err = capsys.readouterr().err
    assert "no C++ compiler 'no-such-compiler-fusedkv'" in err and "apt install g++" in err


def test_missing_deepspeed_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import raises ImportError
    assert ft.main(ARGV) == 2
    assert "pip install -e '.[deepspeed]'" in capsys.readouterr().err


def test_zero3_config_always_gathers_weights_on_save(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert ft.read_deepspeed_config(str(path))["zero_optimization"] == {
        "stage": 3,
        "stage3_gather_16bit_weights_on_model_save": True,
    }
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    assert "stage3_gather_16bit_weights_on_model_save" not in json.dumps(
        ft.read_deepspeed_config(str(path))
    )
    with pytest.raises(ft.FinetuneError, match="no such file; examples/deepspeed/ has"):
        ft.read_deepspeed_config(str(tmp_path / "missing.json"))


class _Tokenizer:
    eos_token_id = 9

    def __call__(self, text, add_special_tokens=True):
        assert not add_special_tokens
        return {"input_ids": [len(w) for w in text.split()]}


def test_jsonl_documents_end_with_eos_and_empty_ones_are_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [{"text": "ab c"}, {"text": ""}, {"text": "def", "other": 1}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert ft.load_tokens(str(path), _Tokenizer()).tolist() == [2, 1, 9, 3, 9]
    path.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(ft.FinetuneError, match=r"d.jsonl:2: expected a JSON object with a 'text'"):
        ft.load_tokens(str(path), _Tokenizer())
    with pytest.raises(ft.FinetuneError, match="neither a file nor an indexed dataset prefix"):
        ft.load_tokens(str(tmp_path / "nope"), _Tokenizer())


def test_blocks_cut_the_stream_and_label_themselves():
    blocks = ft.TokenBlocks(np.arange(10), 4)
    assert len(blocks) == 2  # the 2 tokens left over are dropped
    assert blocks[1]["input_ids"].tolist() == [4, 5, 6, 7]
    assert torch.equal(blocks[1]["labels"], blocks[1]["input_ids"])  # the model shifts
