"""The same --seed gives the same initial model at any TP/PP/VPP layout, every parameter
including the fusion weights (per-head and shared). Each layout trains one iteration at lr=0
(Adam moves nothing, weight decay is scaled by lr) and saves; the checkpoints are read back
full-size by the HF converter's reader and compared bit for bit."""

from __future__ import annotations

import pytest
import torch

from fusedkv_megatron.hf.megatron_io import load_megatron_checkpoint
from tests.integration.trainer_helpers import TINY, data_flags, default_data, run_subprocess

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return default_data(tmp_path_factory)


def _initial_state(data, out, tp=1, pp=1, vpp=None, extra=()):
    flags = [*TINY, *data_flags(data), "--kv-sharing", "fusedkv", "--lr", "0", "--min-lr", "0",
             "--train-iters", "1", "--eval-iters", "0", "--save", out,
             "--tensor-model-parallel-size", tp, "--pipeline-model-parallel-size", pp, *extra]  # fmt: skip
    if vpp:
        flags += ["--virtual-pipeline-model-parallel-size", vpp]
    proc = run_subprocess(flags, nproc=tp * pp)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return load_megatron_checkpoint(out)[2]


def _assert_same(ref: dict, other: dict, what: str):
    assert ref.keys() == other.keys(), f"{what}: {set(ref) ^ set(other)}"
    differ = [k for k in ref if not torch.equal(ref[k], other[k])]
    assert not differ, f"{what}: initial weights differ from TP=1 x PP=1 in {differ}"


def test_same_seed_same_initial_model_at_any_layout(data, tmp_path):
    ref = _initial_state(data, tmp_path / "tp1")
    assert any(k.endswith("key_weight_0") for k in ref), "no fusion weights in the model"
    # The per-parameter seeds are not degenerate: two layers' projections differ.
    qkv = [ref[f"decoder.layers.{i}.self_attention.linear_qkv.weight"] for i in (0, 1)]
    assert not torch.equal(qkv[0], qkv[1])
    for tp, pp, vpp in ((2, 1, None), (1, 2, 2)):
        state = _initial_state(data, tmp_path / f"tp{tp}pp{pp}vpp{vpp}", tp, pp, vpp)
        _assert_same(ref, state, f"TP={tp} PP={pp} VPP={vpp}")

    # A shared fusion vector is one vector at every TP size (it used to be drawn per TP rank).
    shared = ["--shared-fusion-weights"]
    ref_shared = _initial_state(data, tmp_path / "shared_tp1", extra=shared)
    _assert_same(ref_shared, _initial_state(data, tmp_path / "shared_tp2", 2, extra=shared),
                 "shared fusion weights, TP=2")  # fmt: skip
