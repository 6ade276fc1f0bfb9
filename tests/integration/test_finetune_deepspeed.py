"""fusedkv-finetune-hf: an HF export of a tiny fusedkv model trains under DeepSpeed ZeRO-2 and
ZeRO-3 on 2 CPU processes (one torchrun launch runs both), the runs agree step for step, and
the saved directory goes back to Megatron with the same logits and resumes in fusedkv-pretrain.

ZeRO-3 runs with stage3_param_persistence_threshold=0, so every parameter of the tiny model,
the fusion weights included, is partitioned (the default keeps small tensors whole).

Tolerance ZeRO-3 vs ZeRO-2 (same data and seed, fp32): per-step loss and gradient norm within
1e-5 relative, final weights within 1e-4 * max |w| per tensor. The two stages hold gradients in
different layouts (ZeRO-2: flat buckets in backward order; ZeRO-3: each parameter's
partitions), so the average over ranks and the global gradient norm (clipping at 1.0 is active
here) are computed in different orders and differ by fp32 rounding (~1e-7 relative); Adam
divides each update by the running gradient scale, so a rounding difference in a small
gradient can move that element by much more than 1e-7 of its value. Measured over 6 steps: losses and gradient norms 2e-7,
weights 1e-5 (up_proj of layer 1).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fusedkv_megatron.fusion import parse_fusion_weight_name
from tests.conftest import REPO, run_torchrun
from tests.integration.hf_tiny import build_tiny, randomize, save_checkpoint, train_sentencepiece
from tests.unit.test_hf_model import assert_fp32_close

WORKER = Path(__file__).with_name("finetune_worker.py")
STEPS, SEQ_LENGTH = 6, 32  # > 16 queries: top layers build fused K/V (the training path)
WORDS = "the fused keys and values of the middle layer feed the top half of the model".split()


def _write_jsonl(path: Path, documents: int = 64) -> Path:
    with open(path, "w") as f:
        for i in range(documents):
            text = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(20))
            f.write(json.dumps({"text": text}) + "\n")
    return path


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """(root, HF export of a randomised tiny fusedkv checkpoint, jsonl data)."""
    from fusedkv_megatron.hf.convert import megatron_to_hf
    from fusedkv_megatron.hf.megatron_io import single_process_megatron

    root = tmp_path_factory.mktemp("finetune")
    tokenizer = train_sentencepiece(str(root / "sp"))
    with single_process_megatron():
        model = build_tiny("fusedkv")
        randomize(model)
        save_checkpoint(model, root / "ckpt", "fusedkv", tokenizer)
    hf = megatron_to_hf(root / "ckpt" / "fusedkv", root / "hf")
    return root, hf, _write_jsonl(root / "data.jsonl")


@pytest.fixture(scope="module")
def runs(export):
    """{stage: (output directory, losses)} of ZeRO-2 and ZeRO-3 runs, and the worker's log."""
    root, hf, data = export
    zero3 = json.loads((REPO / "examples/deepspeed/zero3.json").read_text())
    zero3["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (root / "zero3_all.json").write_text(json.dumps(zero3))
    configs = {2: REPO / "examples/deepspeed/zero2.json", 3: root / "zero3_all.json"}
    common = (f"--model {hf} --data-path {data} --seq-length {SEQ_LENGTH} --micro-batch-size 2 "
              f"--max-steps {STEPS} --lr 3e-3 --seed 3")  # fmt: skip
    argv = [f"{common} --deepspeed {configs[s]} --out {root / f'zero{s}'}" for s in (2, 3)]
    log = run_torchrun(WORKER, 2, *argv, timeout=1200)
    return {
        s: (root / f"zero{s}", json.loads((root / f"zero{s}" / "train_losses.json").read_text()))
        for s in (2, 3)
    }, log


def _weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    from fusedkv_megatron.hf.convert import load_hf_tensors

    return load_hf_tensors(hf_dir)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_loss_falls_under_zero2_and_zero3(runs):
    for stage, (_, losses) in runs[0].items():
        loss = [e["loss"] for e in losses]
        assert [e["step"] for e in losses] == list(range(1, STEPS + 1)), stage
        assert sum(loss[-2:]) / 2 < sum(loss[:2]) / 2 - 1.0, (stage, loss)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_zero3_agrees_with_zero2_step_for_step(runs, export):
    (dir2, losses2), (dir3, losses3) = runs[0][2], runs[0][3]
    # ZeRO-3 really partitioned everything, fusion weights included (8 in a 4-layer fusedkv).
    assert "ZeRO stage 3: 49 of 49 parameters partitioned, fusion weights 8 of 8" in runs[1]
    for a, b in zip(losses2, losses3, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * a["loss"], (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * a["grad_norm"], (a, b)
    start, w2, w3 = _weights(export[1]), _weights(dir2), _weights(dir3)
    assert w2.keys() == w3.keys() == start.keys()
    for name in w2:
        gap, scale = (w2[name] - w3[name]).abs().max().item(), w2[name].abs().max().item()
        assert gap <= 1e-4 * scale, (name, gap, scale)
    fusion = [n for n in w3 if parse_fusion_weight_name(n)]
    assert len(fusion) == 8
    assert all((w3[n] - start[n]).abs().max() > 1e-3 for n in fusion)  # trained under ZeRO-3


@pytest.mark.multiprocess
@pytest.mark.slow
def test_saved_directory_is_a_complete_export(runs, export):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = runs[0][3][0]
    for name in ("configuration_fusedkv.py", "modeling_fusedkv.py", "triton_decode_fusedkv.py",
                 "tokenizer.model", "tokenizer.json", "generation_config.json"):  # fmt: skip
        assert (out / name).read_bytes() == (export[1] / name).read_bytes(), name
    assert json.loads((out / "config.json").read_text())["auto_map"]
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(model).__name__ == "FusedKVForCausalLM" and model.dtype == torch.float32
    ids = AutoTokenizer.from_pretrained(out)("the fused keys", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


@pytest.mark.multiprocess
@pytest.mark.slow
def test_way_back_reproduces_the_finetuned_logits(runs, megatron_tp1, tmp_path):
    """ZeRO-3 output -> fusedkv-convert-megatron -> the Megatron model computes the finetuned
    HF model's logits (the test_convert_parallel tolerance)."""
    from megatron.core import dist_checkpointing
    from transformers import AutoModelForCausalLM

    from fusedkv_megatron import checkpoint_format as cf
    from fusedkv_megatron.hf.convert import main_to_megatron

    out = runs[0][3][0]
    assert main_to_megatron(["--hf", str(out), "--save", str(tmp_path / "mg")]) == 0
    model = build_tiny("fusedkv")
    ckpt = cf.latest_checkpoint_dir(tmp_path / "mg")
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(ckpt))
    missing, unexpected = model.load_state_dict(loaded["model"], strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing)
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    tokens = torch.randint(0, 120, (2, SEQ_LENGTH), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(SEQ_LENGTH).expand(2, SEQ_LENGTH)
    with torch.no_grad():
        assert_fp32_close(hf(tokens, use_cache=False).logits, model(tokens, pos, None))


@pytest.mark.slow
def test_pretrain_resumes_from_the_way_back(runs, export, tmp_path, capfd):
    """The converted checkpoint has weights only: fusedkv-pretrain continues from it with
    --no-load-optim --no-load-rng, on an indexed dataset that fusedkv-finetune-hf reads as the
    same tokens as the jsonl it came from."""
    from transformers import AutoTokenizer

    from fusedkv_megatron.data.preprocess import preprocess_data
    from fusedkv_megatron.hf.convert import hf_to_megatron
    from fusedkv_megatron.hf.finetune import load_tokens
    from tests.integration.trainer_helpers import run_cli

    root, hf, data = export
    back = hf_to_megatron(runs[0][3][0], tmp_path / "mg").parent
    sp = str(hf / "tokenizer.model")
    prefix = preprocess_data([str(data)], str(tmp_path / "idx"), tokenizer_model=sp,
                             append_eod=True, progress=False)["text"]  # fmt: skip
    tok = AutoTokenizer.from_pretrained(hf)
    assert torch.equal(torch.from_numpy(load_tokens(prefix, None)),
                       torch.from_numpy(load_tokens(str(data), tok)))  # fmt: skip
    argv = ["--kv-sharing", "fusedkv", "--num-layers", "4", "--hidden-size", "64",
            "--ffn-hidden-size", "128", "--num-attention-heads", "4", "--seq-length", "16",
            "--micro-batch-size", "2", "--global-batch-size", "2", "--lr", "1e-3",
            "--train-iters", "2", "--rotary-base", "10000", "--untie-embeddings-and-output-weights",
            "--data-path", prefix, "--tokenizer-model", sp, "--load", back,
            "--no-load-optim", "--no-load-rng", "--eval-iters", "0", "--log-interval", "1",
            "--save", tmp_path / "resumed"]  # fmt: skip
    code, out, err = run_cli(argv, capfd)
    assert code == 0, err[-3000:]
    assert f"loaded checkpoint {back / 'iter_0000000'}" in out + err
    assert "iteration        2/       2" in out
