"""--tokenizer-type HuggingFaceTokenizer end to end: a tokenizer built here with the `tokenizers`
library (no download) goes through tools/preprocess_data.py, a short fusedkv-pretrain run with a
checkpoint, the HF export, and AutoTokenizer + generate from the export alone; the checkpoint
stores the tokenizer's files, resuming compares them, and the way back to Megatron keeps them.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fusedkv_megatron import checkpoint_format as cf
from tests.hf_tokenizer import ADDED, EOS, build_hf_tokenizer, corpus_texts
from tests.integration.trainer_helpers import TINY, run_cli

pytestmark = pytest.mark.slow

TEXT = "To be, or not to be: that is the question."


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Tokenizer, preprocessed data, and a 3-iteration run with a checkpoint."""
    from fusedkv_megatron.data.preprocess_cli import preprocess_main
    from fusedkv_megatron.pretrain import main

    root = tmp_path_factory.mktemp("hf_tok")
    tok_dir = build_hf_tokenizer(root / "tokenizer")
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts(40)))
    prefix = root / "data" / "corpus"
    argv = ["--input", docs, "--output-prefix", prefix, "--tokenizer-type",
            "HuggingFaceTokenizer", "--tokenizer-model", tok_dir, "--append-eod", "--quiet"]  # fmt: skip
    assert preprocess_main([str(a) for a in argv]) == 0
    flags = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tok_dir,
             "--data-path", f"{prefix}_text_document"]  # fmt: skip
    argv = [*TINY, *flags, "--train-iters", "3", "--save", root / "ckpt"]
    assert main([str(a) for a in argv]) == 0
    return {"root": root, "tok_dir": tok_dir, "prefix": f"{prefix}_text_document", "flags": flags}


def test_preprocess_writes_the_tokenizers_ids_ending_in_its_eos(run):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run["tok_dir"], local_files_only=True)
    data = IndexedDataset(run["prefix"])
    first = corpus_texts(1)[0]
    assert data[0].tolist() == tok(first)["input_ids"] + [tok.convert_tokens_to_ids(EOS)]
    meta = json.loads(open(run["prefix"] + ".meta.json").read())["tokenizer"]
    assert meta["class"] == "HuggingFaceTokenizer" and meta["vocab_size"] == len(tok) == 601


def test_checkpoint_records_and_stores_the_tokenizer(run):
    ckpt = cf.latest_checkpoint_dir(run["root"] / "ckpt")
    info = cf.read_run_info(ckpt)
    # Megatron-LM's rules: vocab = len(tokenizer) with added tokens, eod = eos, padded to 128.
    assert info["tokenizer"] == {
        "type": "HuggingFaceTokenizer",
        "model_file": cf.TOKENIZER_DIR,
        "vocab_size": 601,
        "eod_id": 0,
    }
    assert info["model"]["padded_vocab_size"] == 640
    stored = ckpt / cf.TOKENIZER_DIR
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (stored / name).read_bytes() == (run["tok_dir"] / name).read_bytes()
    assert cf.tokenizer_differences(stored, run["tok_dir"]) == []


def test_resume_compares_the_tokenizer_files(run, tmp_path, capfd):
    other = tmp_path / "other"
    shutil.copytree(run["tok_dir"], other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    config["model_max_length"] = 77  # same vocabulary and eos, another file
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    ckpt_root = run["root"] / "ckpt"
    flags = [a if a != run["tok_dir"] else other for a in run["flags"]]
    argv = [*TINY, *flags, "--train-iters", "4", "--load", ckpt_root]
    code, _, err = run_cli(argv, capfd)
    assert code == 2
    assert "differs from the tokenizer stored" in err and "tokenizer_config.json" in err
    # The checkpoint's own copy resumes.
    stored = cf.latest_checkpoint_dir(ckpt_root) / cf.TOKENIZER_DIR
    flags = [a if a != run["tok_dir"] else stored for a in run["flags"]]
    code, out, err = run_cli([*TINY, *flags, "--train-iters", "4", "--load", ckpt_root], capfd)
    assert code == 0, err
    assert "iteration        4/" in out


def test_export_loads_with_autotokenizer_and_generates(run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fusedkv_megatron.data.tokenizer import build_tokenizer
    from fusedkv_megatron.hf.convert import hf_to_megatron, megatron_to_hf

    out = megatron_to_hf(run["root"] / "ckpt", tmp_path / "hf")
    trainer_tok = build_tokenizer("HuggingFaceTokenizer", str(run["tok_dir"]))
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tok(TEXT + " " + ADDED)["input_ids"] == trainer_tok.tokenize(TEXT + " " + ADDED)
    assert len(tok) == 601 and tok.eos_token_id == 0
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, local_files_only=True)
    batch = tok([TEXT], return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=0)
    new = ids[0, batch["input_ids"].shape[1] :]
    assert 1 <= new.numel() <= 6 and int(new.max()) < 640
    assert isinstance(tok.decode(new), str)
    # The way back keeps the tokenizer: the run info's section and the files.
    back = hf_to_megatron(out, tmp_path / "mg")
    info = cf.read_run_info(back)
    saved = cf.read_run_info(cf.latest_checkpoint_dir(run["root"] / "ckpt"))
    assert info["tokenizer"] == saved["tokenizer"]
    assert cf.tokenizer_differences(back / cf.TOKENIZER_DIR, run["tok_dir"]) == []
