"""Context parallelism gives the same loss and the same gradient for every parameter as the
single-process model, for every variant: CP=2 (with DP=2), CP=2 x TP=2 with sequence
parallelism (and without it, for two variants), CP=2 x PP=2 (sources crossing the stage boundary, s/2 rows of them), and
packed-document masks under CP (document boundaries inside and across the load-balanced
chunks). Under CP each rank attends with its own chunks' queries to the all-gathered K/V.

Model: 8 layers, hidden 16, 4 heads (2 KV heads, head dim 8), fp32, 2 microbatches of 2 x 16
tokens, through Megatron's DDP and schedules. Tolerance: per tensor, max |diff| <= 1e-5 *
max |reference|. All cases run in one torchrun launch of 4 processes (cp_worker.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fusedkv_megatron import VARIANTS
from tests.conftest import run_torchrun

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

WORKER = Path(__file__).with_name("cp_worker.py")


def case(name: str, variant: str, **kw) -> dict:
    return dict(name=f"{name}-{variant}", variant=variant, layers=8, cp=2, pp=kw.pop("pp", 1), **kw)


CASES = [
    *[case("cp2", v) for v in VARIANTS],
    *[case("cp2-tp2", v, tp=2) for v in ("gqa", "fusedkv")],
    *[case("cp2-tp2-sp", v, tp=2, sp=True) for v in VARIANTS],
    *[case("cp2-pp2", v, pp=2) for v in VARIANTS],
    *[case("cp2-documents", v, documents=True) for v in ("vanilla", "fusedkv", "fusedkv_lite")],
    case("cp2-pp2-documents", "fusedkv", pp=2, documents=True),
    case("cp2-pp2-recompute", "fusedkv", pp=2, recompute="uniform"),
    case("cp2-tp2-sp-documents", "cla", tp=2, sp=True, documents=True),
]


def test_context_parallel_matches_single_process(tmp_path: Path):
    cases_file, results_file = tmp_path / "cases.json", tmp_path / "results.json"
    cases_file.write_text(json.dumps(CASES))
    run_torchrun(WORKER, 4, str(cases_file), str(results_file))
    results = json.loads(results_file.read_text())
    assert sorted(results) == sorted(c["name"] for c in CASES)
    failed = {name: r["errors"] for name, r in results.items() if r["errors"]}
    assert not failed, json.dumps(failed, indent=1)[:8000]
    for name, r in results.items():
        assert r["checked"] > 0, name
