"""The planner at TP=2: each rank's parameter count at TP=2 x PP=2 equals the stage model's;
the bytes autograd saves equal the activation formula exactly, for every variant, at TP=2
(sequence parallelism off and on, three recompute modes) and on both stages of TP=2 x PP=2
(the source stack received, unpacked and read across the boundary). One torchrun launch of 4
processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from fusedkv_megatron import VARIANTS
from fusedkv_megatron.planner import chunk_activations, chunk_parameters, chunks
from tests import planner_measure as pm
from tests.conftest import read_json, run_torchrun
from tests.distributed.planner_worker import PIPELINE_RECOMPUTE, RECOMPUTE

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("planner") / "measured.json"
    run_torchrun(Path(__file__).with_name("planner_worker.py"), 4, str(out))
    return read_json(out)


def test_parameters_per_rank_at_tp2_pp2(measured):
    got = measured["parameters"]
    assert len(got) == len(VARIANTS) * 2 * 4
    for variant in VARIANTS:
        for tied in (True, False):
            job = pm.planner_job(variant, tied)
            layout = pm.planner_layout("none", tp=2, pp=2)
            for chunk in chunks(pm.LAYERS, layout):
                want = chunk_parameters(job, layout, chunk)
                for tp in (0, 1):
                    key = f"{variant}/tied={tied}/pp={chunk.pp_rank}/tp={tp}"
                    assert got[key] == want, key


def test_saved_activations_at_tp2_with_and_without_sp(measured):
    got = measured["saved"]
    assert len(got) == len(VARIANTS) * 2 * len(RECOMPUTE) * 4
    for variant in VARIANTS:
        for sp in (False, True):
            for recompute in RECOMPUTE:
                layout = pm.planner_layout(recompute, tp=2, sp=sp)
                chunk = chunks(pm.LAYERS, layout)[0]
                want = chunk_activations(pm.planner_job(variant), layout, chunk, "composite")
                for rank in ("dp=0/tp=0", "dp=0/tp=1", "dp=1/tp=0", "dp=1/tp=1"):
                    key = f"{variant}/sp={sp}/{recompute}/{rank}"
                    assert got[key] == want.saved, key


def test_saved_activations_of_both_pipeline_stages(measured):
    got = measured["stages"]
    assert len(got) == len(VARIANTS) * 2 * len(PIPELINE_RECOMPUTE) * 4
    for variant in VARIANTS:
        for sp in (False, True):
            for recompute in PIPELINE_RECOMPUTE:
                layout = pm.planner_layout(recompute, tp=2, pp=2, sp=sp)
                for chunk in chunks(pm.LAYERS, layout):
                    want = chunk_activations(pm.planner_job(variant), layout, chunk, "composite")
                    # Where autograd keeps the received tensor too, the planner counts it
                    # once, as the payload the schedule holds.
                    kept = want.payload_in if want.keeps_received else 0
                    for tp in (0, 1):
                        key = f"{variant}/sp={sp}/{recompute}/pp={chunk.pp_rank}/tp={tp}"
                        assert got[key] == want.saved + kept, key
