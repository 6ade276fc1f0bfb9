"""fusedkv-pretrain's argument layer without training: the model shape and the training length
are required, --help and argument errors import neither torch nor Megatron, the schedule flags
derive Megatron-LM's sample counts, and --rampup-batch-size gives Megatron-LM's batch sizes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fusedkv_megatron.training.arguments import ArgumentError, parse_args, validate_args
from tests.integration.trainer_helpers import REPO, cli_env

SHAPE = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
         "--seq-length", "64"]  # fmt: skip


def _validate(*flags: str, world: int = 1):
    args = parse_args(["--mock-data", "--micro-batch-size", "2", *flags])
    return validate_args(args, world_size=world, cuda=False)


# A fresh interpreter: parse (or print --help) and report what got imported.
_PROBE = """
import sys, time
t0 = time.perf_counter()
from fusedkv_megatron.pretrain import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron'))
print(f"@@ {code} {time.perf_counter() - t0:.3f} {','.join(heavy[:3])}")
"""


@pytest.mark.parametrize(
    "argv,code,message",
    [
        (["--help"], 0, "--use-checkpoint-args"),
        (["--mock-data", "--train-iters", "2"], 2, "the model shape is not set: missing "
         "--num-layers, --hidden-size, --num-attention-heads, --seq-length. Pass --config FILE "
         "(examples/configs/"),
        (["--num-layers", "4", "--hidden-size", "64"], 2, "missing --num-attention-heads, "
         "--seq-length"),
        (["--kv-sharing", "fusedkvv"], 2, "invalid choice: 'fusedkvv'"),
        (["--config", "no/such.yaml"], 2, "--config no/such.yaml: file not found"),
    ],
    ids=["help", "no-shape", "half-shape", "bad-choice", "no-config"],
)  # fmt: skip
def test_help_and_argument_errors_import_neither_torch_nor_megatron(argv, code, message):
    proc = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True,
                          env=cli_env(), cwd=REPO, timeout=60)  # fmt: skip
    last = proc.stdout.strip().splitlines()[-1].split()
    assert last[0] == "@@" and int(last[1]) == code, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(last) == 3, f"imported {last[3]} before the arguments were checked"
    assert message in proc.stdout + proc.stderr
    print(f"fusedkv-pretrain {' '.join(argv)}: {float(last[2]):.3f} s in a fresh interpreter")


def test_shape_and_length_are_required_and_a_yaml_gives_them():
    with pytest.raises(ArgumentError, match="the model shape is not set: missing --seq-length"):
        _validate("--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4")
    with pytest.raises(ArgumentError, match="pass --train-iters N .* or --train-samples N"):
        _validate(*SHAPE)
    args = validate_args(
        parse_args(["--config", str(REPO / "examples/configs/tiny.yaml"), "--mock-data",
                    "--tokenizer-type", "NullTokenizer"]), 1, False
    )  # fmt: skip
    assert (args.num_layers, args.hidden_size, args.seq_length, args.train_iters) == (4, 256,
                                                                                     256, 150)  # fmt: skip


SCHEDULE_ERRORS = [
    (["--train-iters", "4", "--train-samples", "8"], "both set; choose one"),
    (["--train-samples", "64", "--lr-warmup-iters", "2"],
     "--lr-warmup-iters counts iters, but the run is given in samples (--train-samples): use "
     "--lr-warmup-samples instead"),
    (["--train-iters", "8", "--lr-decay-samples", "16"], "use --lr-decay-iters instead"),
    (["--train-iters", "8", "--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "1"],
     "--lr-warmup-fraction and --lr-warmup-iters are both set"),
    (["--train-iters", "8", "--lr-warmup-fraction", "1.5"], "must lie in [0, 1]"),
    (["--train-iters", "8", "--lr-decay-style", "WSD"],
     "--lr-decay-style WSD needs --lr-wsd-decay-iters"),
    (["--train-samples", "64", "--lr-wsd-decay-samples", "8"],
     "--lr-wsd-decay-samples is set but --lr-decay-style is cosine"),
    (["--train-iters", "8", "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "8",
      "--lr-warmup-iters", "2"], "--lr-wsd-decay-iters 8 is longer than the decay after"),
    (["--train-iters", "8", "--lr-warmup-iters", "9"],
     "--lr-warmup-iters 9 exceeds --lr-decay-iters 8"),
    (["--train-samples", "4", "--global-batch-size", "8"], "less than one global batch"),
    (["--train-iters", "8", "--global-batch-size", "8", "--rampup-batch-size", "3", "1", "8"],
     "START and INCREMENT must be multiples of micro-batch-size 2"),
    (["--train-iters", "8", "--global-batch-size", "8", "--rampup-batch-size", "2", "4", "8"],
     "minus START 2 must be a positive multiple of INCREMENT 4"),
]  # fmt: skip


@pytest.mark.parametrize("flags,message", SCHEDULE_ERRORS, ids=[m[:28] for _, m in SCHEDULE_ERRORS])
def test_schedule_flag_errors_name_the_fix(flags, message):
    with pytest.raises(ArgumentError) as err:
        _validate(*SHAPE, *flags)
    assert message in str(err.value)


def test_rampup_is_refused_with_pipeline_parallelism():
    with pytest.raises(ArgumentError, match="--rampup-batch-size with --pipeline-model-parallel"):
        _validate(*SHAPE, "--train-iters", "8", "--global-batch-size", "8",
                  "--pipeline-model-parallel-size", "2", "--rampup-batch-size", "2", "2", "8",
                  world=2)  # fmt: skip


def test_schedule_counts_samples_as_megatron_lm():
    """Megatron-LM's get_optimizer_param_scheduler: iteration flags times the global batch,
    sample flags as given, a warm-up fraction of the decay."""
    a = _validate(*SHAPE, "--global-batch-size", "8", "--train-iters", "10",
                  "--lr-warmup-iters", "2", "--lr-decay-style", "WSD",
                  "--lr-wsd-decay-iters", "3")  # fmt: skip
    assert (a.lr_warmup_steps, a.lr_decay_steps, a.lr_wsd_decay_steps) == (16, 80, 24)
    assert a.train_samples_total == 80 and a.batch_size_schedule is None
    a = _validate(*SHAPE, "--global-batch-size", "8", "--train-samples", "100",
                  "--lr-warmup-fraction", "0.25", "--lr-decay-samples", "60")  # fmt: skip
    assert (a.train_iters, a.train_samples_total) == (12, 96)  # whole batches only
    assert (a.lr_warmup_steps, a.lr_decay_steps, a.lr_wsd_decay_steps) == (15.0, 60, None)


def _megatron_lm_rampup(consumed: int, start: int, incr: int, samples: int, gbs: int) -> int:
    """Megatron-LM's RampupBatchsizeNumMicroBatchesCalculator.update, in exact arithmetic."""
    if consumed > samples:
        return gbs
    steps = (gbs - start) // incr
    return start + (consumed * steps // samples) * incr


@pytest.mark.parametrize("start,incr,samples,gbs", [(2, 2, 20, 8), (4, 2, 7, 10), (2, 6, 100, 14)])
def test_rampup_gives_megatron_lm_batch_sizes(start, incr, samples, gbs, dist_single):
    from fusedkv_megatron.training.schedule import BatchSizes

    a = _validate(*SHAPE, "--global-batch-size", str(gbs), "--train-samples", "400",
                  "--rampup-batch-size", str(start), str(incr), str(samples))  # fmt: skip
    sizes = BatchSizes(a)
    for consumed in range(samples + 2 * gbs):
        expected = _megatron_lm_rampup(consumed, start, incr, samples, gbs)
        assert sizes.at(consumed) == (expected, expected // 2), consumed
    # Megatron-LM's update_train_iters: step through the ramp, then whole global batches.
    consumed = iters = 0
    while consumed <= samples and consumed <= 400:
        consumed += _megatron_lm_rampup(consumed, start, incr, samples, gbs)
        iters += 1
    assert a.train_iters == iters + (400 - consumed) // gbs
    assert a.train_samples_total == sizes.samples_in(a.train_iters) <= 400


def test_a_sample_flag_on_the_command_line_replaces_the_yamls_iteration_flag():
    """650m.yaml gives train-iters and lr-warmup-iters; --train-samples and
    --lr-warmup-fraction on the command line replace them (one setting, two spellings)."""
    args = parse_args(["--config", str(REPO / "examples/configs/650m.yaml"), "--mock-data",
                       "--tokenizer-type", "NullTokenizer", "--vocab-size", "128000",
                       "--train-samples", "2560000", "--lr-warmup-fraction", "0.01"])  # fmt: skip
    assert (args.train_iters, args.lr_warmup_iters, args.train_samples) == (None, 0, 2560000)
    a = validate_args(args, world_size=1, cuda=False)
    assert (a.train_iters, a.lr_warmup_steps) == (10000, 25600.0)
