"""The planner at TP=2: each rank's parameter count at TP=2 x PP=2 equals the stage model's;
the bytes autograd saves equal the activation formula exactly, for every variant, at TP=2
(sequence parallelism off and on, three recompute modes) and on both stages of TP=2 x PP=2
(the source stack received, unpacked and read across the boundary). One torchrun launch of 4
processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from fusedkv_megatron import VARIANTS
from fusedkv_megatron.planner import (
    Job,
    Layout,
    chunk_activations,
    chunk_parameters,
    chunks,
    step_bytes,
)
from fusedkv_megatron.training.model_size import ModelShape
from tests import planner_measure as pm
from tests.conftest import read_json, run_torchrun
from tests.distributed.planner_worker import (
    COMM_LAYOUTS,
    COMM_MICROBATCHES,
    CONTROL_BYTES,
    PIPELINE_RECOMPUTE,
    RECOMPUTE,
)

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


def comm_prediction(name: str, variant: str, vocab: int, pp_rank: int) -> dict[str, int]:
    """The planner's bytes per "group/op" for one rank of a COMM_LAYOUTS run."""
    _, tp, pp, sp, overlap = next(c for c in COMM_LAYOUTS if c[0] == name)
    shape = ModelShape(pm.LAYERS, pm.HIDDEN, pm.FFN, pm.HEADS, pm.groups(variant), pm.HEAD_DIM,
                       vocab, True)  # fmt: skip
    job = Job(shape, pm.kv_config(variant), pm.SEQ, "bf16", 1)
    layout = Layout(tp=tp, pp=pp, dp=4 // (tp * pp), sequence_parallel=sp,
                    micro_batch_size=pm.MBS, num_microbatches=COMM_MICROBATCHES,
                    overlap_grad_reduce=overlap)  # fmt: skip
    return {f"{g}/{op}": n for (g, op), n in step_bytes(job, layout, pp_rank).items()}


def test_communication_bytes_equal_what_the_trainer_moves(measured):
    """Every rank, every layout, every variant: bytes per group and operation of one training
    step equal the planner's; receives mirror sends; what the planner leaves out (loss, token
    count, grad norm, finite flags) is a few scalars."""
    got = measured["comm"]
    assert len(got) == len(COMM_LAYOUTS) * len(VARIANTS) * 4
    for key, rec in got.items():
        name, variant, pp_rank = key.split("/")[:3]
        moved = dict(rec["bytes"])
        received = moved.pop("pp/recv", 0)
        want = comm_prediction(name, variant, rec["vocab"], int(pp_rank.removeprefix("pp=")))
        assert moved == want, key
        assert received == want.get("pp/send", 0), key  # PP=2: each rank receives what it sends
        assert rec["control"] <= 4 * CONTROL_BYTES, key


def test_source_payload_is_in_the_pipeline_bytes(measured):
    """At PP=2 the sharing variants send the live sources with the hidden state: more bytes
    than vanilla, exactly the boundary's payload per microbatch and direction."""
    got = measured["comm"]
    hidden = pm.SEQ * pm.MBS * pm.HIDDEN * 2 * COMM_MICROBATCHES
    vanilla = got["pp2-dp2/vanilla/pp=0/tp=0/dp=0"]["bytes"]["pp/send"]
    fusedkv = got["pp2-dp2/fusedkv/pp=0/tp=0/dp=0"]["bytes"]["pp/send"]
    assert vanilla == hidden < fusedkv
