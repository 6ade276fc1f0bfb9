"""fusedkv-convert-variant on a vanilla model trained here (the embedded text, 12 iterations):
every variant and fusion initialisation gives a valid model whose lower layers compute what the
original's did, whose reconstruction layers read exactly the original's source K/V at the
`lite` start, and whose parameters are the original's minus K/V (plus fusion weights by rule);
`--eval-data` prints the trainer's validation loss; uptraining at TP=2 x PP=2 lowers the loss.
"""

from __future__ import annotations

import re

import pytest
import torch

from fusedkv_megatron import KVSharingConfig
from fusedkv_megatron import checkpoint_format as cf
from fusedkv_megatron.fusion import equivalent_fusion_weight, init_fusion_weight, layer_plans
from fusedkv_megatron.hf.mapping import ConversionError
from tests.integration.trainer_helpers import (
    SHAPE_FLAGS,
    TINY,
    data_flags,
    default_data,
    run_cli,
    scalars,
    without,
)
from tests.tiny import tiny_batch
from tests.unit.test_hf_model import assert_fp32_close

L = 4  # TINY's layers
SEED = 7  # TINY's --seed: the fusion draws of a fresh run of the same flags
CONVERSIONS = [
    ("cla", "normal"),
    ("yoco", "normal"),
    ("fusedkv_lite", "normal"),
    ("fusedkv", "normal"),
    ("fusedkv", "lite"),
    ("fusedkv", "equivalent"),
    ("fusedkv_lite_learnable", "normal"),
    ("fusedkv_lite_learnable", "lite"),
    ("fusedkv_lite_learnable", "equivalent"),
    ("dense_probe", "uniform"),
]
# Which original layer's K and V each reconstruction layer reads, at a `lite` (or no) start.
LITE_READS = {"fusedkv_lite": (2, 1), "fusedkv": (2, 1), "fusedkv_lite_learnable": (2, 1),
              "yoco": (2, 2)}  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return default_data(tmp_path_factory)


def _train_flags(data) -> list[str]:
    flags = [*TINY, *data_flags(data), "--valid-data-path", data["heldout_data_prefix"]]
    flags[flags.index("--data-path")] = "--train-data-path"
    return flags


@pytest.fixture(scope="module")
def vanilla(data, tmp_path_factory):
    """A vanilla run of 12 iterations validated on the held-out text: (ckpt root, tb dir)."""
    from fusedkv_megatron.pretrain import main

    root = tmp_path_factory.mktemp("vanilla")
    argv = [*_train_flags(data), "--kv-sharing", "vanilla", "--train-iters", "12",
            "--eval-interval", "12", "--eval-iters", "2", "--save", root / "ckpt",
            "--tensorboard-dir", root / "tb"]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    return root / "ckpt", root / "tb"


@pytest.fixture(scope="module")
def source(vanilla):
    from fusedkv_megatron.uptrain import load_source

    return load_source(vanilla[0])


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    """{(variant, init): (converted Model, saved checkpoint root)} for every conversion."""
    from fusedkv_megatron.hf.megatron_io import save_megatron_checkpoint
    from fusedkv_megatron.uptrain import convert_model, target_config

    root = tmp_path_factory.mktemp("converted")
    out = {}
    for variant, init in CONVERSIONS:
        kv = target_config(source, variant, init, weights_per_head=True)
        model = convert_model(source, kv, SEED)
        save = root / f"{variant}-{init}"
        save_megatron_checkpoint(
            model.state, model.info, save, tokenizer_file=source.tokenizer_file
        )
        out[variant, init] = (model, save)
    return out


def _megatron(model):
    from fusedkv_megatron.hf.megatron_io import build_megatron_model

    net = build_megatron_model(model.info, torch.float32)
    missing, unexpected = net.load_state_dict(model.state, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing)
    return net.eval()


def _trace(net, tokens, pos):
    """Logits, every layer's output and every layer's (key, value) into core attention."""
    outputs, kv, hooks = {}, {}, []
    for i, layer in enumerate(net.decoder.layers):
        hooks.append(
            layer.register_forward_hook(
                lambda m, a, out, i=i: outputs.__setitem__(i, out[0].detach().clone())
            )
        )
        hooks.append(
            layer.self_attention.core_attention.register_forward_pre_hook(
                lambda m, a, i=i: kv.__setitem__(i, (a[1].detach().clone(), a[2].detach().clone()))
            )
        )
    with torch.no_grad():
        logits = net(tokens, pos, None)
    for h in hooks:
        h.remove()
    return logits, outputs, kv


@pytest.fixture(scope="module")
def traces(source, converted, megatron_patches):
    from fusedkv_megatron.hf.megatron_io import single_process_megatron

    tokens, _, pos = tiny_batch()
    with single_process_megatron():
        out = {"original": _trace(_megatron(source), tokens, pos)}
        for key, (model, _) in converted.items():
            out[key] = _trace(_megatron(model), tokens, pos)
    return out


@pytest.mark.parametrize("variant, init", CONVERSIONS)
def test_export_computes_the_converted_logits(converted, traces, tmp_path, variant, init):
    from transformers import AutoModelForCausalLM

    from fusedkv_megatron.hf.convert import megatron_to_hf

    hf_dir = megatron_to_hf(converted[variant, init][1], tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True).eval()
    tokens, _, _ = tiny_batch()
    with torch.no_grad():
        assert_fp32_close(hf(tokens, use_cache=False).logits, traces[variant, init][0])


@pytest.mark.parametrize("variant, init", CONVERSIONS)
def test_layers_below_the_first_reconstruction_layer_are_unchanged(traces, variant, init):
    _, want, _ = traces["original"]
    _, got, _ = traces[variant, init]
    first = 1 if variant == "cla" else L // 2  # 0-based index of the first reconstruction layer
    for i in range(first):
        assert torch.equal(got[i], want[i]), f"layer {i + 1} output changed"
    assert not torch.equal(got[L - 1], want[L - 1])  # the model did change above


@pytest.mark.parametrize(
    "variant, init",
    [("fusedkv", "lite"), ("fusedkv_lite_learnable", "lite"), ("fusedkv_lite", "normal"),
     ("yoco", "normal"), ("cla", "normal")],
)  # fmt: skip
def test_reconstruction_layers_read_the_original_sources_exactly(traces, variant, init):
    """At a `lite` start (and in the weightless variants) a top layer's K/V are the original's
    K of layer L/2 and V of layer 1 (YOCO: K and V of L/2; CLA: layer i-1's), bit for bit."""
    _, _, want = traces["original"]
    _, _, got = traces[variant, init]
    if variant == "cla":  # layer 2 reads the original layer 1; layer 4 its own new layer 3
        assert torch.equal(got[1][0], want[0][0]) and torch.equal(got[1][1], want[0][1])
        assert torch.equal(got[3][0], got[2][0]) and torch.equal(got[3][1], got[2][1])
        return
    k_from, v_from = (layer - 1 for layer in LITE_READS[variant])
    for i in range(L // 2, L):
        assert torch.equal(got[i][0], want[k_from][0]), f"layer {i + 1} K"
        assert torch.equal(got[i][1], want[v_from][1]), f"layer {i + 1} V"


def _expected_fusion(kv: KVSharingConfig, plan, term, j, shape) -> torch.Tensor:
    if kv.fusion_init == "equivalent":
        return equivalent_fusion_weight(shape, term, plan, SEED)
    want = torch.empty(shape)
    init_fusion_weight(want, kv, term, plan)  # lite: the constants
    return want


@pytest.mark.parametrize("variant, init", CONVERSIONS)
def test_parameters_are_the_originals_minus_kv_plus_fusion(source, converted, variant, init):
    model, _ = converted[variant, init]
    src, got = source.state, model.state
    kv = KVSharingConfig(variant, fusion_init=init)
    info = cf.read_run_info(cf.latest_checkpoint_dir(converted[variant, init][1]))
    assert info["iteration"] == 0 and info["kv_sharing"]["variant"] == variant
    assert info["kv_sharing"]["fusion_init"] == init and info["model"] == source.info["model"]
    heads, d = 4, 16
    for plan in layer_plans(kv, L):
        p = f"decoder.layers.{plan.layer_number - 1}."
        own = {k: v for k, v in src.items() if k.startswith(p) and "_extra" not in k}
        mine = {k: v for k, v in got.items() if k.startswith(p) and "_extra" not in k}
        if not plan.is_reconstruction:
            assert own.keys() == mine.keys() and all(torch.equal(own[k], mine[k]) for k in own)
            continue
        qkv = own.pop(p + "self_attention.linear_qkv.weight").view(heads, 3, d, -1)
        assert torch.equal(mine.pop(p + "self_attention.linear_q.weight"),
                           qkv[:, 0].reshape(heads * d, -1))  # fmt: skip
        assert own.pop(p + "self_attention.k_layernorm.weight") is not None
        fusion = {k: mine.pop(k) for k in list(mine) if "_weight_" in k.rsplit(".", 1)[-1]}
        assert own.keys() == mine.keys() and all(torch.equal(own[k], mine[k]) for k in own)
        for kind, terms in (("key", plan.key), ("value", plan.value)):
            for j, term in enumerate(terms):
                name = f"{p}self_attention.{kind}_weight_{j}"
                assert (name in fusion) == term.weighted
                if term.weighted and init != "normal":
                    w = fusion.pop(name)
                    assert torch.equal(w, _expected_fusion(kv, plan, term, j, tuple(w.shape)))
        if init == "normal":
            assert all(w.std() > 0.3 for w in fusion.values())  # drawn, checked below
        else:
            assert not fusion


@pytest.mark.parametrize("variant", ["fusedkv", "fusedkv_lite_learnable"])
def test_normal_start_is_what_a_fresh_run_draws(converted, megatron_tp1, variant):
    """`normal` gives the fusion vectors a fresh fusedkv-pretrain --seed 7 would have."""
    from fusedkv_megatron import build_model
    from fusedkv_megatron.hf.megatron_io import build_megatron_model

    model, _ = converted[variant, "normal"]
    shell = build_megatron_model(model.info, torch.float32)
    fresh = build_model(shell.config, KVSharingConfig(variant), 2048, 64, init_seed=SEED)
    fusion = {k: v for k, v in fresh.named_parameters() if "_weight_" in k.rsplit(".", 1)[-1]}
    assert fusion and all(torch.equal(model.state[k], v) for k, v in fusion.items())


def test_lite_start_computes_fusedkv_lite(traces):
    want = traces["fusedkv_lite", "normal"][0]
    for variant in ("fusedkv", "fusedkv_lite_learnable"):
        assert torch.equal(traces[variant, "lite"][0], want), variant


def test_hf_directory_converts_like_the_checkpoint(vanilla, source, converted, tmp_path):
    from fusedkv_megatron.hf.convert import megatron_to_hf
    from fusedkv_megatron.uptrain import convert_model, load_source, target_config

    hf_dir = megatron_to_hf(vanilla[0], tmp_path / "qwen3")  # a stock Qwen3ForCausalLM
    from_hf = load_source(hf_dir)
    kv = target_config(from_hf, "fusedkv", "equivalent", weights_per_head=True)
    got = convert_model(from_hf, kv, SEED)
    want, _ = converted["fusedkv", "equivalent"]
    assert got.state.keys() == want.state.keys()
    assert all(torch.equal(got.state[k], want.state[k]) for k in want.state)
    assert got.info == want.info


def test_bad_sources_and_targets_name_the_fix(vanilla, converted, source, tmp_path):
    from fusedkv_megatron.uptrain import convert_variant, load_source, target_config

    with pytest.raises(ConversionError, match="full-cache model"):
        load_source(converted["fusedkv", "lite"][1])
    with pytest.raises(ConversionError, match="nothing to convert"):
        target_config(source, "gqa", "normal", True)
    with pytest.raises(ConversionError, match="not divisible by tensor_model_parallel_size"):
        convert_variant(vanilla[0], tmp_path / "x", "fusedkv", tp=3)
    with pytest.raises(ConversionError, match="no such directory"):
        load_source(tmp_path / "missing")


def test_eval_data_prints_the_trainers_validation_loss(data, vanilla, tmp_path, capsys):
    """The original's loss equals the trainer's last validation loss (same data, seed, samples
    and micro batches); the converted loss is printed next to it."""
    from fusedkv_megatron.uptrain import main

    code = main([
        "--load", str(vanilla[0]), "--save", str(tmp_path / "out"), "--kv-sharing", "yoco",
        "--eval-data", data["heldout_data_prefix"], "--eval-samples", "16",
        "--eval-micro-batch-size", "4", "--seed", str(SEED),
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    original = float(re.search(r"original\s+vanilla\s+([0-9.]+)", out).group(1))
    after = re.search(r"converted\s+yoco \(normal\)\s+([0-9.]+)\s+\(([+-][0-9.]+)\)", out)
    trainer = scalars(vanilla[1], "validation/lm loss")[12]
    assert abs(original - trainer) < 6e-5, (original, trainer)
    assert abs(float(after.group(1)) - original - float(after.group(2))) < 2e-4
    assert "--use-checkpoint-args --pretrained-checkpoint" in out
    assert cf.read_latest_iteration(tmp_path / "out") == 0


@pytest.mark.multiprocess
@pytest.mark.slow
def test_uptraining_at_tp2_pp2_lowers_the_loss(data, converted, tmp_path):
    """fusedkv-pretrain --load CONVERTED (saved at TP=1) at TP=2 x PP=2 with a fresh optimizer
    and a new warm-up: the iteration count starts at 0 and the loss falls."""
    from tests.integration.trainer_helpers import run_subprocess

    tb = tmp_path / "tb"
    argv = [*_train_flags(data), "--kv-sharing", "fusedkv", "--fusion-init", "equivalent",
            "--load", converted["fusedkv", "equivalent"][1], "--no-load-optim", "--no-load-rng",
            "--train-iters", "10", "--lr-warmup-iters", "2", "--tensor-model-parallel-size", "2",
            "--pipeline-model-parallel-size", "2", "--tensorboard-dir", tb,
            "--save", tmp_path / "up"]  # fmt: skip
    proc = run_subprocess(argv, nproc=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loaded checkpoint" in proc.stdout + proc.stderr
    loss = scalars(tb, "lm loss")
    assert sorted(loss) == list(range(1, 11))
    first, last = sum(loss[i] for i in (1, 2, 3)) / 3, sum(loss[i] for i in (8, 9, 10)) / 3
    assert last < first - 0.1, f"loss {first:.3f} -> {last:.3f}"
    assert scalars(tb, "learning-rate")[1] < scalars(tb, "learning-rate")[2]  # warming up again


def test_a_converted_checkpoint_loads_its_weights_without_extra_flags(data, converted, capfd):
    """--load CONVERTED with neither --no-load-optim/--no-load-rng nor --fusion-init: the
    weights load with one log line (no traceback), the converter's fusion_init is not
    compared (it only decided the start), and the model comes from the checkpoint."""
    flags = without(_train_flags(data), *SHAPE_FLAGS)
    code, out, err = run_cli([*flags, "--use-checkpoint-args", "--load",
                              converted["fusedkv", "lite"][1], "--train-iters", "2"], capfd)  # fmt: skip
    assert code == 0, err[-3000:]
    assert "holds weights only" in out and "Traceback" not in err
    assert "> model: fusedkv, 4 layers, hidden 64, ffn 128" in out
    assert "training from iteration 0 to 2" in out


def test_pretrained_checkpoint_then_resume_from_own_saves(data, converted, tmp_path, capfd):
    """--pretrained-checkpoint CONVERTED --load OWN --save OWN: the first launch starts from the
    converted weights at iteration 0; a second launch after an exit resumes from its own save.
    An explicit --fusion-init that differs from the checkpoint's is accepted (init only); a
    shape flag that differs is refused with both values."""
    own = tmp_path / "own"
    flags = [*without(_train_flags(data), *SHAPE_FLAGS), "--use-checkpoint-args",
             "--pretrained-checkpoint", converted["fusedkv", "lite"][1], "--load", own,
             "--save", own, "--train-iters", "4", "--fusion-init", "normal"]  # fmt: skip
    code, out, err = run_cli([*flags, "--exit-interval", "2"], capfd)
    assert code == 0, err[-3000:]
    assert "starting from" in out and "training from iteration 0 to 4" in out
    assert "loaded the weights of" in out and "exiting at iteration 2" in out
    code, out, err = run_cli(flags, capfd)
    assert code == 0, err[-3000:]
    assert "training from iteration 2 to 4" in out and cf.read_latest_iteration(own) == 4
    code, _, err = run_cli([*flags, "--hidden-size", "128"], capfd)
    assert code == 2 and "--hidden-size 128 (the checkpoint: 64)" in err, err[-2000:]
