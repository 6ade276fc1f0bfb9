"""fusedkv-convert-hf / fusedkv-convert-megatron in one process: the round trip HF -> Megatron
-> HF gives identical tensors for every variant, the exported tokenizer encodes like the
trainer's SentencePiece model, exported caches are half of the vanilla export's, and bad inputs
fail with errors that name the problem and the fix.

Checkpoints here are saved at TP=1 in this process (test_convert_parallel.py covers TP=2 x
PP=2 checkpoints and the logits parity with Megatron).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fusedkv_megatron import VARIANTS
from fusedkv_megatron import checkpoint_format as cf
from fusedkv_megatron.hf.convert import (
    REMOTE_CODE_FILES,
    hf_to_megatron,
    load_hf_tensors,
    main_to_hf,
    main_to_megatron,
    megatron_to_hf,
)
from fusedkv_megatron.hf.mapping import ConversionError
from tests.integration.hf_tiny import (
    EOD,
    build_tiny,
    randomize,
    save_checkpoint,
    train_sentencepiece,
)

TEXTS = [
    "the fused keys and values",
    "  Zürich  naïve café\tand\nnew lines ",
    "unseen ✓ characters and </s> typed as text",
    "",
]


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory):
    return train_sentencepiece(str(tmp_path_factory.mktemp("tok") / "sp"))


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tokenizer_model):
    """TP=1 checkpoints of every variant and their HF exports: {variant: (ckpt root, hf dir)}."""
    from fusedkv_megatron.hf.megatron_io import single_process_megatron

    root = tmp_path_factory.mktemp("convert")
    out = {}
    with single_process_megatron():
        for variant in VARIANTS:
            model = build_tiny(variant)
            randomize(model)
            save_checkpoint(model, root / "ckpt", variant, tokenizer_model)
    for variant in VARIANTS:
        hf_dir = megatron_to_hf(root / "ckpt" / variant, root / "hf" / variant)
        out[variant] = (root / "ckpt" / variant, hf_dir)
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_gives_identical_tensors(exports, tmp_path, variant):
    ckpt, hf_dir = exports[variant]
    back = hf_to_megatron(hf_dir, tmp_path / "mg", iteration=3)
    again = megatron_to_hf(tmp_path / "mg", tmp_path / "hf")
    a, b = load_hf_tensors(hf_dir), load_hf_tensors(again)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((hf_dir / "config.json").read_text()) == json.loads(
        (again / "config.json").read_text()
    )
    first, second = cf.read_run_info(cf.latest_checkpoint_dir(ckpt)), cf.read_run_info(back)
    for section in ("model", "kv_sharing", "tokenizer"):
        assert first[section] == second[section]
    assert second["iteration"] == 3
    assert (back / cf.TOKENIZER_FILE).read_bytes() == (hf_dir / "tokenizer.model").read_bytes()


def test_stock_and_remote_code_exports(exports):
    """vanilla/gqa: stock Qwen3 files only; KV-sharing variants: remote code and auto_map."""
    for variant, (_, hf_dir) in exports.items():
        cfg = json.loads((hf_dir / "config.json").read_text())
        code = sorted(p.name for p in hf_dir.glob("*.py"))
        if variant in ("vanilla", "gqa"):
            assert cfg["model_type"] == "qwen3" and "auto_map" not in cfg and code == []
        else:
            assert cfg["model_type"] == "fusedkv_qwen3" and cfg["kv_sharing"] == variant
            assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_fusedkv.FusedKVForCausalLM"
            assert code == sorted(REMOTE_CODE_FILES)
        gen = json.loads((hf_dir / "generation_config.json").read_text())
        assert gen["eos_token_id"] == EOD


def test_exported_tokenizer_encodes_like_sentencepiece(exports, tokenizer_model):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=tokenizer_model)
    tok = AutoTokenizer.from_pretrained(exports["fusedkv"][1])
    for text in TEXTS:
        assert tok(text)["input_ids"] == sp.encode(text), text
    assert tok.eos_token_id == EOD == sp.eos_id()
    assert tok.decode(sp.encode(TEXTS[0])) == TEXTS[0]


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "vanilla"])
def test_exported_cache_is_half_of_vanilla_export(exports, variant):
    from transformers import AutoModelForCausalLM

    from fusedkv_megatron.hf.modeling_fusedkv import cache_nbytes

    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    nbytes = {}
    for v in ("vanilla", variant):
        m = AutoModelForCausalLM.from_pretrained(exports[v][1], trust_remote_code=True)
        g = m.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        nbytes[v] = cache_nbytes(g.cache)
    assert nbytes[variant] * 2 == nbytes["vanilla"] > 0


# ----------------------------------------------------------------------------- bad inputs
def _copy_checkpoint(exports, variant, dst):
    shutil.copytree(exports[variant][0], dst)
    return dst, cf.latest_checkpoint_dir(dst)


def test_wrong_directory(tmp_path, capsys):
    with pytest.raises(ConversionError, match="no such directory"):
        megatron_to_hf(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    assert main_to_hf(["--load", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "is not a fusedkv_megatron checkpoint" in capsys.readouterr().err
    with pytest.raises(ConversionError, match="no config.json"):
        hf_to_megatron(tmp_path / "empty", tmp_path / "mg")


def test_output_directory_not_empty(exports, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep me")
    with pytest.raises(ConversionError, match="not empty"):
        megatron_to_hf(exports["fusedkv"][0], tmp_path / "out")


def test_variant_mismatch_in_run_info(exports, tmp_path):
    root, it = _copy_checkpoint(exports, "fusedkv", tmp_path / "ck")
    info = cf.read_run_info(it)
    info["kv_sharing"]["variant"] = "yoco"
    cf.write_run_info(it, info)
    with pytest.raises(
        ConversionError,
        match=r"kv_sharing='yoco'.*look like kv_sharing in \['fusedkv', 'dense_probe'\]",
    ):
        megatron_to_hf(root, tmp_path / "out")


def test_head_count_mismatch_in_run_info(exports, tmp_path):
    root, it = _copy_checkpoint(exports, "vanilla", tmp_path / "ck")
    info = cf.read_run_info(it)
    info["model"]["num_query_groups"] = 2
    cf.write_run_info(it, info)
    with pytest.raises(ConversionError, match="has shape .* in the checkpoint but"):
        megatron_to_hf(root, tmp_path / "out")


def test_variant_mismatch_in_hf_config(exports, tmp_path):
    hf_dir = shutil.copytree(exports["fusedkv_lite_learnable"][1], tmp_path / "hf")
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["kv_sharing"] = "fusedkv"
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    assert main_to_megatron(["--hf", str(hf_dir), "--save", str(tmp_path / "mg")]) == 2
    with pytest.raises(
        ConversionError, match=r"look like kv_sharing in \['fusedkv_lite_learnable'\]"
    ):
        hf_to_megatron(hf_dir, tmp_path / "mg")


def test_missing_hf_shard(exports, tmp_path):
    _, hf_dir = exports["fusedkv"]
    out = tmp_path / "sharded"
    megatron_to_hf(exports["fusedkv"][0], out, max_shard_size="40KB")
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[1].unlink()
    with pytest.raises(ConversionError, match=rf"shard\(s\) \['{shards[1].name}'\] .* missing"):
        hf_to_megatron(out, tmp_path / "mg")


def test_missing_megatron_shard(exports, tmp_path):
    root, it = _copy_checkpoint(exports, "fusedkv", tmp_path / "ck")
    next(it.glob("*.distcp")).unlink()
    with pytest.raises(ConversionError, match="incomplete or damaged"):
        megatron_to_hf(root, tmp_path / "out")


def test_missing_tokenizer(exports, tmp_path, tokenizer_model):
    root, it = _copy_checkpoint(exports, "fusedkv", tmp_path / "ck")
    (it / cf.TOKENIZER_FILE).unlink()
    with pytest.raises(ConversionError, match="--tokenizer-model PATH .* --no-tokenizer"):
        megatron_to_hf(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    megatron_to_hf(root, tmp_path / "weights", no_tokenizer=True)
    assert not (tmp_path / "weights" / "tokenizer.json").exists()
    megatron_to_hf(root, tmp_path / "with_tok", tokenizer_model=tokenizer_model)
    assert (tmp_path / "with_tok" / "tokenizer.json").is_file()


def test_parallel_layout_rejected_before_spawning(exports, tmp_path):
    with pytest.raises(ConversionError, match="num_query_groups=2 is not divisible"):
        hf_to_megatron(exports["gqa"][1], tmp_path / "mg", tp=4)


@pytest.mark.slow
def test_trained_checkpoint_round_trip_continues_in_the_trainer(tmp_path, capfd):
    """fusedkv-pretrain (tied embeddings, its defaults) -> HF -> Megatron: the HF model
    computes the trained model's logits, and the converted checkpoint evaluates to the same
    validation loss as the original when loaded with --no-load-optim --no-load-rng."""
    from transformers import AutoModelForCausalLM

    from fusedkv_megatron.hf.megatron_io import (
        build_megatron_model,
        load_megatron_checkpoint,
        single_process_megatron,
    )
    from tests.integration.trainer_helpers import TINY, run_cli
    from tests.unit.test_hf_model import assert_fp32_close

    run = [*TINY, "--kv-sharing", "fusedkv", "--mock-data", "--tokenizer-type", "NullTokenizer",
           "--vocab-size", "128", "--train-iters", "2"]  # fmt: skip
    code, _, err = run_cli([*run, "--save", tmp_path / "ck"], capfd)
    assert code == 0, err[-3000:]
    hf_dir = megatron_to_hf(tmp_path / "ck", tmp_path / "hf")
    hf_to_megatron(hf_dir, tmp_path / "back", iteration=2)

    info, _, state = load_megatron_checkpoint(tmp_path / "ck")
    assert info["model"]["share_embeddings_and_output_weights"]
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with single_process_megatron(), torch.no_grad():
        model = build_megatron_model(info, torch.float32)
        model.load_state_dict(state, strict=False)
        want = model(tokens, torch.arange(16).expand(2, 16), None)
        got = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True)(tokens).logits
    assert_fp32_close(got, want)

    losses = []
    for load in (["--load", tmp_path / "ck"],
                 ["--load", tmp_path / "back", "--no-load-optim", "--no-load-rng"]):  # fmt: skip
        code, out, err = run_cli([*run, *load, "--skip-train"], capfd)
        assert code == 0, err[-3000:]
        losses.append(
            [line.split("|")[1] for line in out.splitlines() if "validation loss" in line]
        )
    assert losses[0] == losses[1] and losses[0]


@pytest.mark.parametrize(
    "variant, kv, config",
    [
        ("fusedkv", {"weights_per_head": False}, {}),
        ("fusedkv_lite_learnable", {"fusion_init": "lite"}, {"rotary_interleaved": True}),
        ("vanilla", {}, {"rotary_interleaved": True}),  # not expressible as stock Qwen3
    ],
    ids=["shared-fusion-weights", "interleaved-rope", "vanilla-interleaved-rope"],
)
def test_other_layouts_compute_the_megatron_logits(tmp_path, tokenizer_model, variant, kv, config):
    from transformers import AutoModelForCausalLM

    from fusedkv_megatron.hf.megatron_io import single_process_megatron
    from tests.tiny import tiny_batch
    from tests.unit.test_hf_model import assert_fp32_close

    tokens, _, pos = tiny_batch()
    with single_process_megatron(), torch.no_grad():
        model = build_tiny(variant, kv_overrides=kv, **config)
        randomize(model)
        save_checkpoint(model, tmp_path / "ck", variant, tokenizer_model)
        want = model(tokens, pos, None)
    hf_dir = megatron_to_hf(tmp_path / "ck" / variant, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True)
    assert type(hf).__name__ == "FusedKVForCausalLM"
    with torch.no_grad():
        assert_fp32_close(hf(tokens, use_cache=False).logits, want)
    back = hf_to_megatron(hf_dir, tmp_path / "back")
    assert (
        cf.read_run_info(back)["kv_sharing"]
        == cf.read_run_info(cf.latest_checkpoint_dir(tmp_path / "ck" / variant))["kv_sharing"]
    )
