"""Data-parallel overlap changes when communication happens, never what is computed: the
trainer with --overlap-grad-reduce and --overlap-param-gather gives the losses, validation
losses, saved weights and final weights of the runs without it, at DP=2 with TP=2 and
at DP=2 with an interleaved PP=2 (where the gather is aligned over stages). All six runs in
one torchrun launch (overlap_worker.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_torchrun
from tests.distributed.overlap_worker import LAYOUTS, MODES

WORKER = Path(__file__).with_name("overlap_worker.py")
pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("overlap") / "results.json"
    run_torchrun(WORKER, 4, str(out))
    return json.loads(out.read_text())


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_overlap_on_equals_off(results, layout):
    for rank, per_rank in enumerate(results):
        runs = {m: per_rank[f"{layout}/{m}"] for m in MODES}
        for mode, r in runs.items():
            assert "error" not in r, f"rank {rank} {layout}/{mode}:\n{r['error']}"
        off = runs["off"]
        last_stage = off["loss"][0] is not None  # losses live on the last pipeline stage
        assert len(off["loss"]) == 4 and len(off["valid"]) == 2 * last_stage, rank
        assert off["saves"] == 1
        on, grad = runs["on"], runs["grad"]
        # The parameter gather only copies: overlapped, it changes nothing at all.
        assert on["loss"] == grad["loss"] and on["valid"] == grad["valid"], rank
        assert on["saved_vs_grad"] == 0.0, rank  # what the save saw
        assert on["final_vs_grad"] == 0.0, rank
        # Overlapping the reduce splits the gradients into buckets, which also re-cuts the
        # distributed optimizer's shards: the grad norm sums its squares in another order
        # (a last-bit difference in the clipping factor), so weights agree to a few fp32 ulps.
        if last_stage:
            assert on["loss"] == pytest.approx(off["loss"], rel=1e-6, abs=0), rank
            assert on["valid"] == pytest.approx(off["valid"], rel=1e-6, abs=0), rank
        assert on["saved_vs_off"] <= 1e-6 and on["final_vs_off"] <= 1e-6, rank
        assert not off["stale_before_gather"] and not grad["stale_before_gather"]
        # Overlapped: after a step this rank's copy lags until the next forward's gather.
        assert on["stale_before_gather"], rank
        assert on["align"] == layout.endswith("vpp2")
