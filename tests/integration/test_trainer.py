"""fusedkv-pretrain end to end, in this process (world size 1, gloo, CPU), on the embedded
corpus: every variant learns, TensorBoard holds the scalars, resuming is bit-exact, non-finite
iterations are skipped and counted, and bad inputs fail with errors that name the fix.

Multi-process behaviour (resharding, signals, a kill during a save) is in
test_trainer_multiprocess.py.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from fusedkv_megatron import VARIANTS
from fusedkv_megatron import checkpoint_format as cf
from tests.integration.trainer_helpers import (
    TINY,
    data_flags,
    default_data,
    run_cli,
    scalar_tags,
    scalars,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return default_data(tmp_path_factory)


@pytest.fixture(scope="module")
def fusedkv_run(data, tmp_path_factory):
    """One fusedkv run with validation, TensorBoard and a checkpoint, shared by several tests."""
    root = tmp_path_factory.mktemp("fusedkv_run")
    from fusedkv_megatron.pretrain import main

    argv = [
        *TINY,
        *data_flags(data),
        "--kv-sharing",
        "fusedkv",
        "--train-iters",
        "6",
        "--eval-interval",
        "3",
        "--save",
        root / "ckpt",
        "--tensorboard-dir",
        root / "tb",
    ]
    assert main([str(a) for a in argv]) == 0
    return root


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_trains_and_its_loss_goes_down(variant, data, tmp_path, capfd):
    tb = tmp_path / "tb"
    argv = [*TINY, *data_flags(data), "--kv-sharing", variant, "--train-iters", "12",
            "--tensorboard-dir", tb]  # fmt: skip
    code, out, err = run_cli(argv, capfd)
    assert code == 0, err[-3000:]
    loss = scalars(tb, "lm loss")
    assert sorted(loss) == list(range(1, 13))
    first, last = sum(loss[i] for i in (1, 2, 3)) / 3, sum(loss[i] for i in (10, 11, 12)) / 3
    assert first - last > 0.5, f"{variant}: loss {first:.3f} -> {last:.3f}"
    assert scalars(tb, "skipped-iterations")[12] == 0
    fusion = [t for t in scalar_tags(tb) if t.startswith("fusion/")]
    learnable = variant in ("fusedkv", "fusedkv_lite_learnable", "dense_probe")
    assert bool(fusion) == learnable
    assert "> parameters:" in out and "validation loss at iteration 12" in out
    # Every half-cache variant stores half of vanilla's 4 layers x K,V x 4 heads x 16 x 2 bytes.
    assert f"KV cache: {1024 if variant == 'vanilla' else 512:,} bytes per token" in out


def test_tensorboard_holds_training_validation_and_fusion_scalars(fusedkv_run):
    tb = fusedkv_run / "tb"
    tags = set(scalar_tags(tb))
    for tag in (
        "lm loss",
        "learning-rate",
        "grad-norm",
        "tokens-per-sec",
        "iteration-time-ms",
        "consumed-samples",
        "skipped-iterations",
        "validation/lm loss",
        "validation/ppl",
    ):
        assert tag in tags, tag
    # Layers 3 and 4 reconstruct K from layers 1 and 2 (weights per RoPE pair) and V likewise.
    for layer in (3, 4):
        for kind in ("key", "value"):
            for src in (1, 2):
                for stat in ("mean", "std", "abs_mean", "min", "max"):
                    assert f"fusion/layer_{layer}/{kind}_from_layer_{src}/{stat}" in tags
    val = scalars(tb, "validation/lm loss")
    ppl = scalars(tb, "validation/ppl")
    assert sorted(val) == [3, 6]
    assert ppl[6] == pytest.approx(torch.tensor(val[6]).exp().item(), rel=1e-6)
    assert scalars(tb, "consumed-samples")[6] == 48  # 6 iterations x global batch 8
    # N(0,1) init: the fusion weights' spread is about 1.
    assert 0.5 < scalars(tb, "fusion/layer_3/value_from_layer_1/std")[1] < 1.5


def test_checkpoint_layout_and_run_info(fusedkv_run, data):
    root = fusedkv_run / "ckpt"
    assert cf.read_latest_iteration(root) == 6
    ckpt = cf.latest_checkpoint_dir(root)
    info = cf.read_run_info(ckpt)
    assert info["iteration"] == 6
    assert info["kv_sharing"] == {
        "variant": "fusedkv",
        "source_layers": None,
        "weights_per_head": True,
        "fusion_init": "normal",
    }
    assert info["model"]["num_layers"] == 4 and info["model"]["padded_vocab_size"] == 2048
    assert info["tokenizer"]["model_file"] == "tokenizer.model"
    assert (ckpt / "tokenizer.model").read_bytes() == open(data["tokenizer_model"], "rb").read()
    assert info["parallel"]["tensor_model_parallel_size"] == 1
    assert not list(root.glob("*.tmp"))


def _plain_tensors(ckpt_dir):
    from megatron.core.dist_checkpointing.serialization import load_plain_tensors

    return load_plain_tensors(str(ckpt_dir))


@pytest.mark.parametrize("optimizer", ["distributed", "plain"])
def test_resume_is_bit_exact(optimizer, data, tmp_path, capfd, dist_single):
    """8 iterations straight == 4, exit, resume, 4: same losses and grad norms bit for bit, and
    the same final weights and optimizer state (catches the shared-`step` bug, docs/upstream.md)."""
    flags = [*TINY, *data_flags(data), "--kv-sharing", "fusedkv", "--train-iters", "8",
             "--lr-warmup-iters", "2"]  # fmt: skip
    # The resume reads the default format; the final checkpoints are compared in the
    # per-parameter one (the default's buckets hold uninitialised padding).
    final_format = []
    if optimizer == "distributed":
        flags.append("--use-distributed-optimizer")
        final_format = ["--dist-ckpt-optim-fully-reshardable"]
    straight, parts = tmp_path / "straight", tmp_path / "parts"
    code, _, err = run_cli([*flags, "--save", straight / "ckpt", "--tensorboard-dir",
                            straight / "tb", *final_format], capfd)  # fmt: skip
    assert code == 0, err[-3000:]
    code, out, err = run_cli([*flags, "--save", parts / "ckpt", "--exit-interval", "4",
                              "--tensorboard-dir", parts / "tb1"], capfd)  # fmt: skip
    assert code == 0, err[-3000:]
    assert "exiting at iteration 4" in out and cf.read_latest_iteration(parts / "ckpt") == 4
    code, out, err = run_cli([*flags, "--save", parts / "ckpt", "--load", parts / "ckpt",
                              "--tensorboard-dir", parts / "tb2", *final_format], capfd)  # fmt: skip
    assert code == 0, err[-3000:]
    assert "training from iteration 4 to 8" in out

    for tag in ("lm loss", "grad-norm", "learning-rate"):
        a, b = scalars(straight / "tb", tag), scalars(parts / "tb2", tag)
        assert [b[i] for i in range(5, 9)] == [a[i] for i in range(5, 9)], tag
        assert [scalars(parts / "tb1", tag)[i] for i in range(1, 5)] == [a[i] for i in range(1, 5)]
    final_a = _plain_tensors(cf.iteration_dir(straight / "ckpt", 8))
    final_b = _plain_tensors(cf.iteration_dir(parts / "ckpt", 8))
    assert final_a.keys() == final_b.keys()
    tensors = [k for k, v in final_a.items() if isinstance(v, torch.Tensor)]
    assert any("key_weight" in k for k in tensors) and any("optimizer" in k for k in tensors)
    for key in tensors:
        assert torch.equal(final_a[key], final_b[key]), key


def test_exit_duration_saves_and_exits_cleanly(data, tmp_path, capfd):
    argv = [*TINY, *data_flags(data), "--train-iters", "50", "--exit-duration-in-mins", "0",
            "--save", tmp_path / "ckpt"]  # fmt: skip
    code, out, err = run_cli(argv, capfd)
    assert code == 0, err[-3000:]
    assert "exiting at iteration 1: time; checkpoint saved" in out
    assert cf.read_latest_iteration(tmp_path / "ckpt") == 1


def test_a_nan_iteration_is_skipped_and_counted(data, tmp_path, capfd):
    tb = tmp_path / "tb"
    argv = [*TINY, *data_flags(data), "--train-iters", "6", "--inject-nan-iters", "3",
            "--tensorboard-dir", tb]  # fmt: skip
    code, out, err = run_cli(argv, capfd)
    assert code == 0, err[-3000:]
    skipped = scalars(tb, "skipped-iterations")
    assert [skipped[i] for i in range(1, 7)] == [0, 0, 1, 1, 1, 1]
    assert 3 not in scalars(tb, "lm loss")  # no loss is reported for the skipped iteration
    assert "non-finite in a row: 1" in out


def test_consecutive_non_finite_iterations_stop_the_run(data, tmp_path, capfd):
    argv = [*TINY, *data_flags(data), "--train-iters", "8", "--inject-nan-iters", "2", "3", "4",
            "--max-consecutive-skipped-iters", "3"]  # fmt: skip
    code, _, err = run_cli(argv, capfd)
    assert code == 3
    assert "3 iterations in a row (up to iteration 4)" in err and "lower --lr" in err


def _another_tokenizer(tmp_path) -> str:
    import sentencepiece as spm

    text = tmp_path / "other.txt"
    text.write_text("\n".join(f"another tokenizer line {i} with words {i * 7}" for i in range(300)))
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(tmp_path / "other"),
        vocab_size=300,
        model_type="bpe",
        byte_fallback=True,
    )
    return str(tmp_path / "other.model")


def _corrupt_copy(prefix: str, tmp_path) -> str:
    copy = str(tmp_path / "corrupt")
    shutil.copyfile(prefix + ".bin", copy + ".bin")
    shutil.copyfile(prefix + ".idx", copy + ".idx")
    with open(copy + ".idx", "r+b") as f:
        f.write(b"garbage!!")
    return copy


BAD_FLAGS = [
    (["--bf16", "--fp16"], "--bf16 and --fp16 are both set"),
    (["--sequence-parallel"], "--sequence-parallel needs --tensor-model-parallel-size > 1"),
    (["--fp8-format", "hybrid", "--bf16"], "needs Transformer Engine"),
    (["--num-layers", "5"], "num_layers=5 must be even for fusedkv"),
    (
        ["--global-batch-size", "6"],
        "--global-batch-size 6 is not a multiple of --micro-batch-size 4",
    ),
    (["--kv-sharing", "gqa", "--num-query-groups", "4"], "set num_query_groups=2"),
    (["--lr-warmup-iters", "100"], "--lr-warmup-iters 100 exceeds --lr-decay-iters 4"),
    (["--tensor-model-parallel-size", "2"], "world size 1 is not divisible"),
    (["--mock-data"], "--mock-data and a data path are both set"),
    (["--skip-train"], "--skip-train evaluates a checkpoint: it needs --load DIR"),
    (["--load", "/nonexistent/ckpt"], "--load /nonexistent/ckpt: directory not found"),
    (["--recompute-granularity", "full"], "needs --recompute-method"),
]


@pytest.mark.parametrize("extra,message", BAD_FLAGS, ids=[m[:30] for _, m in BAD_FLAGS])
def test_nonsense_flag_combinations_fail_clearly(extra, message, data, capfd):
    code, _, err = run_cli([*TINY, *data_flags(data), "--train-iters", "4", *extra], capfd)
    assert code == 2 and message in err, err[-2000:]


def test_bad_data_and_tokenizer_fail_clearly(data, tmp_path, capfd):
    base = [*TINY, "--train-iters", "4"]
    cases = [
        (["--data-path", tmp_path / "missing", "--tokenizer-model", data["tokenizer_model"]],
         "no indexed dataset at prefix"),
        (["--data-path", _corrupt_copy(data["train_data_prefix"], tmp_path),
          "--tokenizer-model", data["tokenizer_model"]], "is not a Megatron index"),
        (["--data-path", data["train_data_prefix"], "--tokenizer-model",
          _another_tokenizer(tmp_path)], "was tokenized with another tokenizer"),
        (["--data-path", data["train_data_prefix"], "--tokenizer-model", tmp_path / "no.model"],
         "does not exist"),
    ]  # fmt: skip
    for extra, message in cases:
        code, _, err = run_cli([*base, *extra], capfd)
        assert code == 2 and message in err, (message, err[-2000:])


def test_yaml_config_unknown_key_fails_clearly(data, tmp_path, capfd):
    config = tmp_path / "bad.yaml"
    config.write_text("num-layers: 4\nhidden_sise: 64\n")
    code, _, err = run_cli(["--config", config, *data_flags(data)], capfd)
    assert code == 2 and "unknown key 'hidden_sise'" in err


def test_checkpoint_of_another_variant_or_tokenizer_is_refused(fusedkv_run, data, tmp_path, capfd):
    ckpt = fusedkv_run / "ckpt"
    code, _, err = run_cli([*TINY, *data_flags(data), "--train-iters", "8", "--kv-sharing",
                            "yoco", "--load", ckpt], capfd)  # fmt: skip
    assert code == 2
    assert "kv_sharing.variant: checkpoint 'fusedkv', this run 'yoco'" in err
    code, _, err = run_cli([*TINY, *data_flags(data), "--train-iters", "8", "--hidden-size",
                            "128", "--load", ckpt], capfd)  # fmt: skip
    assert code == 2 and "model.hidden_size: checkpoint 64, this run 128" in err
    code, _, err = run_cli([*TINY, "--mock-data", "--tokenizer-model", _another_tokenizer(tmp_path),
                            "--train-iters", "8", "--load", ckpt], capfd)  # fmt: skip
    assert code == 2 and "was trained with tokenizer" in err and "--tokenizer-model" in err


def test_optimizer_state_mismatches_are_refused_unless_no_load_optim(fusedkv_run, data, capfd):
    ckpt = fusedkv_run / "ckpt"
    flags = [*TINY, *data_flags(data), "--train-iters", "8", "--load", ckpt]
    code, _, err = run_cli([*flags, "--use-distributed-optimizer"], capfd)
    assert code == 2 and "was saved without --use-distributed-optimizer" in err
    code, _, err = run_cli([*flags, "--lr", "1e-3"], capfd)
    assert code == 2 and "resume with the saved run's --lr/--min-lr" in err
    code, out, err = run_cli([*flags, "--lr", "1e-3", "--no-load-optim"], capfd)
    assert code == 0, err[-3000:]
    assert "training from iteration 6 to 8" in out
