"""Checkpoints saved at TP=2 x PP=2 (one torchrun launch, every variant) convert on one CPU
process; the exports compute the Megatron model's logits, load without this package (remote
code in a clean interpreter), and the way back writes a real TP=2 x PP=2 checkpoint.

Tolerance for logits: max |diff| <= 1e-5 * max |reference| (fp32 rounding of a different
summation order; in practice the two agree bit for bit).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusedkv_megatron import VARIANTS
from fusedkv_megatron import checkpoint_format as cf
from fusedkv_megatron.hf.convert import load_hf_tensors, main_to_megatron, megatron_to_hf
from tests.conftest import run_torchrun
from tests.integration.hf_tiny import TP_PP, build_tiny, train_sentencepiece
from tests.tiny import tiny_batch
from tests.unit.test_hf_model import assert_fp32_close

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]
WORKER = Path(__file__).with_name("convert_worker.py")
STOCK = ("vanilla", "gqa")


@pytest.fixture(scope="module")
def tp2pp2(tmp_path_factory):
    """(root, tokenizer model, {variant: HF export}) of the TP=2 x PP=2 checkpoints."""
    root = tmp_path_factory.mktemp("tp2pp2")
    tokenizer = train_sentencepiece(str(root / "sp"))
    run_torchrun(WORKER, TP_PP[0] * TP_PP[1], str(root / "ckpt"), tokenizer)
    exports = {v: megatron_to_hf(root / "ckpt" / v, root / "hf" / v) for v in VARIANTS}
    return root, tokenizer, exports


def _load_hf(variant: str, hf_dir: Path):
    from transformers import AutoModelForCausalLM, Qwen3ForCausalLM

    if variant in STOCK:
        model = Qwen3ForCausalLM.from_pretrained(hf_dir)  # plain transformers, no remote code
        assert type(AutoModelForCausalLM.from_pretrained(hf_dir)) is Qwen3ForCausalLM
        return model.eval()
    return AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True).eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_computes_the_megatron_logits(tp2pp2, megatron_tp1, monkeypatch, variant):
    from megatron.core import dist_checkpointing

    root, _, exports = tp2pp2
    ckpt = cf.latest_checkpoint_dir(root / "ckpt" / variant)
    parallel = cf.read_run_info(ckpt)["parallel"]
    assert (
        parallel["tensor_model_parallel_size"],
        parallel["pipeline_model_parallel_size"],
    ) == TP_PP
    assert len(list(ckpt.glob("*.distcp"))) == 4

    model = build_tiny(variant)  # Megatron at TP=1, resharded from the 2 x 2 checkpoint
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(ckpt))
    missing, unexpected = model.load_state_dict(loaded["model"], strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing)
    tokens, _, pos = tiny_batch()
    hf = _load_hf(variant, exports[variant])
    with torch.no_grad():
        want = model(tokens, pos, None)
        assert_fp32_close(hf(tokens, use_cache=False).logits, want)
        if variant not in STOCK:  # also the path that fuses K/V first (more than 16 queries)
            module = sys.modules[type(hf).__module__]
            monkeypatch.setattr(module, "DIRECT_ATTENTION_MAX_QUERIES", 0)
            assert_fp32_close(hf(tokens, use_cache=False).logits, want)


CLEAN_LOAD = r"""
import importlib.abc, sys

class NoPackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "fusedkv_megatron":
            raise ImportError(f"the export imported {name}")

sys.meta_path.insert(0, NoPackage())
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

dirs, tokens_file, out_file = sys.argv[1].split(","), sys.argv[2], sys.argv[3]
tokens = torch.load(tokens_file)
result = {}
for d in dirs:
    model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(tokens, use_cache=False).logits
    gen = model.generate(tokens[:, :5], max_new_tokens=4, do_sample=False)
    ids = AutoTokenizer.from_pretrained(d)("the fused café")["input_ids"]
    result[d] = dict(cls=type(model).__name__, logits=logits, gen=gen, ids=ids)
assert not [m for m in sys.modules if m.split(".")[0] == "fusedkv_megatron"]
torch.save(result, out_file)
"""


def test_exports_load_without_this_package(tp2pp2, tmp_path):
    """A copy of each export loads in a fresh interpreter where fusedkv_megatron cannot be
    imported (isolated mode, import blocker, offline, empty HF cache) and computes the same
    logits, tokens and generations as here."""
    import sentencepiece as spm

    _, tokenizer, exports = tp2pp2
    copies = [shutil.copytree(exports[v], tmp_path / "models" / v) for v in VARIANTS]
    tokens, _, _ = tiny_batch()
    torch.save(tokens, tmp_path / "tokens.pt")
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-I", "-c", CLEAN_LOAD, ",".join(map(str, copies)),
           str(tmp_path / "tokens.pt"), str(tmp_path / "out.pt")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = torch.load(tmp_path / "out.pt")
    sp_ids = spm.SentencePieceProcessor(model_file=tokenizer).encode("the fused café")
    for variant, copy in zip(VARIANTS, copies, strict=True):
        r = result[str(copy)]
        assert r["cls"] == ("Qwen3ForCausalLM" if variant in STOCK else "FusedKVForCausalLM")
        here = _load_hf(variant, exports[variant])
        with torch.no_grad():
            assert_fp32_close(r["logits"], here(tokens, use_cache=False).logits)
        assert torch.equal(
            r["gen"], here.generate(tokens[:, :5], max_new_tokens=4, do_sample=False)
        )
        assert r["ids"] == sp_ids


def test_way_back_writes_a_tp2_pp2_checkpoint(tp2pp2, tmp_path):
    _, _, exports = tp2pp2
    argv = ["--hf", str(exports["fusedkv"]), "--save", str(tmp_path / "mg"),
            "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
            "--iteration", "9"]  # fmt: skip
    assert main_to_megatron(argv) == 0
    ckpt = cf.latest_checkpoint_dir(tmp_path / "mg")
    assert ckpt.name == "iter_0000009"
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == [f"__{r}_0.distcp" for r in range(4)]
    info = json.loads((ckpt / cf.RUN_FILE).read_text())
    assert info["parallel"]["tensor_model_parallel_size"] == 2
    assert info["parallel"]["pipeline_model_parallel_size"] == 2
    again = megatron_to_hf(tmp_path / "mg", tmp_path / "hf")
    a, b = load_hf_tensors(exports["fusedkv"]), load_hf_tensors(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
