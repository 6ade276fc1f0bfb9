"""TP=2, and TP=2 with sequence parallelism, compute the same loss and (gathered) gradients as
TP=1 for every variant."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fusedkv_megatron import VARIANTS
from tests.conftest import run_torchrun
from tests.tiny import L, tiny_batch, tiny_model

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

CASES = {v: {"variant": v, "kv": {}} for v in VARIANTS}
CASES["fusedkv-shared-weights"] = {"variant": "fusedkv", "kv": {"weights_per_head": False}}
# The probe at 8 layers: four sources per K/V (at the default 4 layers it has two).
CASES["dense_probe-8-layers"] = {"variant": "dense_probe", "kv": {}, "layers": 8}


def _tp1_reference(case):
    model = tiny_model(case["variant"], case.get("layers", L), kv_overrides=case["kv"])
    tokens, labels, pos = tiny_batch()
    loss = model(tokens, pos, None, labels=labels)
    loss.sum().backward()
    return {
        "case": case,
        "state": {n: p.detach().clone() for n, p in model.named_parameters()},
        "loss": loss.detach(),
        "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
    }


def test_tp2_and_sequence_parallel_match_tp1(megatron_tp1, tmp_path: Path):
    refs = {key: _tp1_reference(case) for key, case in CASES.items()}
    torch.save(refs, tmp_path / "ref.pt")
    run_torchrun(
        Path(__file__).with_name("tp_worker.py"),
        2,
        str(tmp_path / "ref.pt"),
        str(tmp_path / "out.pt"),
    )
    results = torch.load(tmp_path / "out.pt")
    assert len(results) == 2 * len(CASES)
    for key, (loss, grads) in results.items():
        ref = refs[key.split("/")[0]]
        torch.testing.assert_close(loss, ref["loss"], rtol=1e-5, atol=1e-5, msg=key)
        assert grads.keys() == ref["grads"].keys(), key
        for name, g in grads.items():
            torch.testing.assert_close(
                g, ref["grads"][name], rtol=1e-4, atol=1e-5, msg=f"{key}: {name}"
            )
