"""The research tools on real trainer output: an 8-layer dense_probe run (4 iterations, then
resumed to 6, so two event files) and a vanilla run in the quickstart's layout. fusedkv-compare's
numbers equal what tensorboard's own reader finds in the event files; fusedkv-probe-report's
heatmap numbers equal the checkpoint's fusion weights and the trainer's logged statistics."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from fusedkv_megatron.research import compare, events, probe
from tests.integration.trainer_helpers import TINY, data_flags, default_data, scalars

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return default_data(tmp_path_factory)


def _train(root, variant: str, iters: int, data, *extra):
    from fusedkv_megatron.pretrain import main

    argv = [*TINY, *data_flags(data), "--num-layers", "8", "--kv-sharing", variant,
            "--train-iters", iters, "--eval-interval", "2", "--save", root / "checkpoints",
            "--load", root / "checkpoints", "--tensorboard-dir", root / "tensorboard", *extra]  # fmt: skip
    assert main([str(a) for a in argv]) == 0


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("research")
    probe_run, vanilla = root / "probe", root / "vanilla"
    _train(probe_run, "dense_probe", 4, data, "--fusion-init", "uniform")
    _train(probe_run, "dense_probe", 6, data, "--fusion-init", "uniform")  # resumed at 4
    _train(vanilla, "vanilla", 6, data)
    return probe_run, vanilla


def _rows(report: str) -> dict[str, dict[str, str]]:
    lines = [ln for ln in report.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return {
        cells[0]: dict(zip(header, cells, strict=True))
        for ln in lines[1:]
        if len(cells := [c.strip() for c in ln.strip("|").split("|")]) == len(header)
    }


def test_compare_report_equals_the_event_files(runs, tmp_path):
    probe_run, vanilla = runs
    files = events.read_run_events(probe_run / "tensorboard").files
    assert [sorted(events._read_file(f)[1]["lm loss"]) for f in files] == [[1, 2, 3, 4], [5, 6]]
    out = tmp_path / "cmp"
    assert compare.main([str(probe_run), str(vanilla), "--out", str(out)]) == 0
    rows = _rows((out / "report.md").read_text())
    for run_dir in runs:
        row, tb = rows[run_dir.name], run_dir / "tensorboard"
        valid, loss = scalars(tb, "validation/lm loss"), scalars(tb, "lm loss")
        assert row["iterations"] == "6" and sorted(loss) == list(range(1, 7))
        assert row["tokens seen"] == f"{6 * 8 * 64:,}"  # iterations x global batch x seq
        assert row["final val loss"] == f"{valid[6]:.4f}"
        assert row["best val loss"] == f"{min(valid.values()):.4f}"
        assert row["final val ppl"] == f"{math.exp(valid[6]):.2f}"
        assert row["train loss (end)"] == f"{loss[6]:.4f}"
        tps = scalars(tb, "tokens-per-sec")
        assert row["median tokens/s"] == f"{statistics.median(tps.values()):,.0f}"
        assert row["skipped iters"] == "0"
    # 8 layers x K,V x 4 heads x 16 x 2 bytes for vanilla; the probe stores the bottom half.
    assert rows["vanilla"]["KV bytes/token"] == "2,048"
    assert (rows["probe"]["KV bytes/token"], rows["probe"]["KV vs vanilla"]) == ("1,024", "0.50")
    assert (out / "fusion_probe.png").is_file() and not (out / "fusion_vanilla.png").exists()


def test_probe_report_equals_the_checkpoint_weights(runs, tmp_path):
    from fusedkv_megatron.hf.megatron_io import load_megatron_checkpoint

    probe_run = runs[0]
    report = probe.write_probe_report(probe_run, tmp_path / "probe")
    assert (tmp_path / "probe" / "probe_heatmap.png").is_file()
    kv, layers, weights = probe.load_fusion_weights(probe_run)
    tops, sources, m = probe.fusion_matrices(kv, layers, weights)
    assert (tops, sources) == ([5, 6, 7, 8], [1, 2, 3, 4])
    _, _, state = load_megatron_checkpoint(probe_run / "checkpoints")
    logged = probe_run / "tensorboard"
    for r, top in enumerate(tops):
        for c, src in enumerate(sources):
            for kind, letter in (("key", "K"), ("value", "V")):
                w = state[f"decoder.layers.{top - 1}.self_attention.{kind}_weight_{c}"].numpy()
                assert m[f"{letter} mean |w|"][r, c] == pytest.approx(np.abs(w).mean(), rel=1e-6)
                assert m[f"{letter} signed mean"][r, c] == pytest.approx(w.mean(), abs=1e-7)
                # Trained away from the uniform start 1/4, and equal to what the trainer logged.
                assert not np.allclose(w, 0.25)
                tag = f"fusion/layer_{top}/{kind}_from_layer_{src}/abs_mean"
                assert scalars(logged, tag)[6] == pytest.approx(np.abs(w).mean(), rel=1e-5)
    table = report.read_text()
    assert "| 5 | " in table and f"{m['V mean |w|'][0, 0]:.4f}" in table


def test_probe_report_rejects_a_variant_without_fusion_weights(runs, tmp_path, capsys):
    assert probe.main([str(runs[1]), "--out", str(tmp_path / "p")]) == 2
    assert "has no learnable fusion weights" in capsys.readouterr().err


def test_probe_report_without_a_checkpoint_is_one_error_line(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert probe.main([str(tmp_path / "run"), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no checkpoint" in err
