"""fusedkv-compare on event files written here with torch's SummaryWriter: the report's numbers
are those of the event files (a resumed run's two files merged), the checkpoint's run info gives
parameters and KV bytes, plots are written, and a directory without event files is one error
line (exit 2). No Megatron."""

from __future__ import annotations

import math
import statistics

import pytest

from fusedkv_megatron import KVSharingConfig
from fusedkv_megatron import checkpoint_format as cf
from fusedkv_megatron.research import compare, events
from fusedkv_megatron.training.model_size import ModelShape, parameter_count

SEQ, GBS = 32, 8
MODEL = dict(
    num_layers=4,
    hidden_size=64,
    ffn_hidden_size=128,
    num_attention_heads=4,
    num_query_groups=4,
    kv_channels=16,
    padded_vocab_size=128,
    seq_length=SEQ,
    rotary_base=10000.0,
    rotary_interleaved=False,
    layernorm_epsilon=1e-6,
    normalization="RMSNorm",
    share_embeddings_and_output_weights=False,
)


def _write(tb_dir, train: dict[int, float], valid: dict[int, float], fusion=False, tps=1000.0):
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(tb_dir))
    variant = "fusedkv" if fusion else "vanilla"
    w.add_text("arguments", f"    kv_sharing: {variant}\n    seq_length: {SEQ}")
    for step, loss in train.items():
        w.add_scalar("lm loss", loss, step)
        w.add_scalar("consumed-samples", step * GBS, step)
        w.add_scalar("tokens-per-sec", tps + step, step)
        w.add_scalar("skipped-iterations", 1 if step >= 3 else 0, step)
        if fusion:
            for top in (3, 4):
                for src in (1, 2):
                    tag = f"fusion/layer_{top}/value_from_layer_{src}/abs_mean"
                    w.add_scalar(tag, 0.1 * top + 0.01 * src * step, step)
    for step, loss in valid.items():
        w.add_scalar("validation/lm loss", loss, step)
    w.close()


def _checkpoint(root, variant: str, iteration: int):
    it = cf.iteration_dir(root, iteration)
    it.mkdir(parents=True)
    tok = dict(type="NullTokenizer", model_file=None, vocab_size=128, eod_id=0)
    par = dict(
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None,
        data_parallel_size=1,
    )
    cf.write_run_info(it, cf.make_run_info(iteration, MODEL, KVSharingConfig(variant), tok, par))
    cf.write_latest_iteration(root, iteration)


@pytest.fixture
def runs(tmp_path):
    """vanilla: trained 1..10, crashed, resumed from iteration 8 to 14 (two event files);
    fusedkv: 1..12 in one file, with fusion-weight statistics."""
    van = tmp_path / "vanilla"
    _write(van / "tensorboard", {i: 5.0 - 0.1 * i for i in range(1, 11)}, {5: 4.6, 10: 4.4})
    _write(
        van / "tensorboard",
        {i: 4.0 - 0.05 * i for i in range(9, 15)},
        {10: 3.5, 14: 3.6},
        tps=3000.0,
    )
    _checkpoint(van / "checkpoints", "vanilla", 14)
    fkv = tmp_path / "fusedkv"
    _write(fkv / "tensorboard", {i: 5.5 - 0.1 * i for i in range(1, 13)}, {12: 4.0}, fusion=True)
    _checkpoint(fkv / "checkpoints", "fusedkv", 12)
    return van, fkv


def _table(report: str) -> dict[str, dict[str, str]]:
    lines = [ln for ln in report.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for ln in lines[1:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if len(cells) == len(header):
            rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


def test_resumed_run_merges_its_event_files(runs):
    """Iterations 9..10 of the first process are dropped (redone after the resume)."""
    ev = events.read_run_events(runs[0] / "tensorboard")
    assert len(ev.files) == 2
    loss = ev.scalars["lm loss"]
    assert loss.steps == list(range(1, 15))
    assert loss.values[:8] == pytest.approx([5.0 - 0.1 * i for i in range(1, 9)])
    assert loss.values[8:] == pytest.approx([4.0 - 0.05 * i for i in range(9, 15)])
    valid = ev.scalars["validation/lm loss"]
    assert (valid.steps, valid.values) == ([5, 10, 14], pytest.approx([4.6, 3.5, 3.6]))
    assert ev.arguments()["seq_length"] == str(SEQ)


def test_report_numbers_are_the_event_files(runs, tmp_path):
    out = tmp_path / "cmp"
    assert compare.main([str(runs[0]), str(runs[1]), "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    rows = _table(report)
    van, fkv = rows["vanilla"], rows["fusedkv"]
    assert van["variant"] == "vanilla" and fkv["variant"] == "fusedkv"
    assert van["iterations"] == "14" and fkv["iterations"] == "12"
    assert van["tokens seen"] == f"{14 * GBS * SEQ:,}"
    assert float(van["final val loss"]) == pytest.approx(3.6, abs=1e-4)
    assert float(van["best val loss"]) == pytest.approx(3.5, abs=1e-4)
    assert float(van["best val ppl"]) == pytest.approx(math.exp(3.5), abs=0.01)
    assert float(van["train loss (end)"]) == pytest.approx(4.0 - 0.05 * 14, abs=1e-4)
    tps = [1000.0 + i for i in range(1, 9)] + [3000.0 + i for i in range(9, 15)]
    assert van["median tokens/s"] == f"{statistics.median(tps):,.0f}"
    assert van["skipped iters"] == "1" and fkv["final val loss"] == "4.0000"
    # From the run info: parameters and KV bytes (4 layers x K,V x 4 heads x 16 x 2 bytes).
    shape = ModelShape(4, 64, 128, 4, 4, 16, 128, False)
    for row, variant in ((van, "vanilla"), (fkv, "fusedkv")):
        kv = KVSharingConfig(variant)
        assert row["parameters"] == f"{parameter_count(shape, kv):,}"
        assert row["without embeddings"] == f"{parameter_count(shape, kv, False):,}"
    assert (van["KV bytes/token"], van["KV vs vanilla"]) == ("1,024", "1.00")
    assert (fkv["KV bytes/token"], fkv["KV vs vanilla"]) == ("512", "0.50")
    assert "baseline for differences: `vanilla`" in report
    for png in ("loss.png", "loss_difference.png", "fusion_fusedkv.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"({png})" in report
    assert not (out / "fusion_vanilla.png").exists()


def test_fusion_curves_and_tokens_axis(runs):
    run = compare.locate_run(str(runs[1]))
    from fusedkv_megatron.research.plots import fusion_curves, smooth

    curves = fusion_curves(run)
    assert sorted(curves) == [("value", t, s) for t in (3, 4) for s in (1, 2)]
    steps, values = curves[("value", 4, 2)]
    assert steps == list(range(1, 13)) and values == pytest.approx([0.4 + 0.02 * i for i in steps])
    assert run.tokens_at([6, 12]) == [6 * GBS * SEQ, 12 * GBS * SEQ]
    assert smooth([1.0, 3.0], 0.5) == pytest.approx([1.0, (0.25 + 1.5) / 0.75])


def test_tensorboard_and_checkpoint_given_apart(runs, tmp_path):
    van = runs[0]
    spec = f"{van / 'tensorboard'},{van / 'checkpoints'}"
    assert compare.main([spec, "--out", str(tmp_path / "o"), "--no-plots"]) == 0
    row = _table((tmp_path / "o" / "report.md").read_text())["vanilla"]
    assert row["parameters"] != "n/a" and row["final val loss"] == "3.6000"


def test_tensorboard_directory_alone(runs, tmp_path):
    """Without a checkpoint: the variant and tokens from the logged arguments, no counts."""
    assert compare.main([str(runs[1] / "tensorboard"), "--out", str(tmp_path), "--no-plots"]) == 0
    row = _table((tmp_path / "report.md").read_text())["fusedkv"]
    assert (row["variant"], row["parameters"], row["KV bytes/token"]) == ("fusedkv", "n/a", "n/a")
    assert row["tokens seen"] == f"{12 * GBS * SEQ:,}" and row["final val loss"] == "4.0000"


def test_directory_without_event_files_is_one_error_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert compare.main([str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no TensorBoard event files" in err


def test_unknown_baseline_is_an_error(runs, tmp_path, capsys):
    assert compare.main([*map(str, runs), "--baseline", "gqa", "--out", str(tmp_path)]) == 2
    assert "--baseline 'gqa' is not a run label" in capsys.readouterr().err
