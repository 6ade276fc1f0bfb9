"""The exported HF model's Triton decode: a standalone copy of the trainer's decode kernel
(the same `@triton.jit` text and launch configurations), imported only where it can run, and
decoding to the same logits as the torch path (under Triton's interpreter on CPU)."""

from __future__ import annotations

import ast
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusedkv_megatron.hf import modeling_fusedkv
from fusedkv_megatron.hf.convert import REMOTE_CODE_FILES
from tests.unit.hf_decode_worker import CASES

triton = pytest.importorskip("triton")

from fusedkv_megatron.hf import triton_decode_fusedkv as copy  # noqa: E402
from fusedkv_megatron.kernels import HEAD_DIMS, triton_common, triton_decode  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
HF_DIR = REPO / "fusedkv_megatron" / "hf"
JIT = {
    "_weight": triton_common,
    "_load": triton_common,
    "_store": triton_common,
    "_fused": triton_common,
    "_decode_split_kernel": triton_decode,
    "_decode_combine_kernel": triton_decode,
}


@pytest.mark.parametrize("name", JIT)
def test_kernels_are_the_trainers_text(name):
    want = inspect.getsource(getattr(JIT[name], name).fn)
    assert inspect.getsource(getattr(copy, name).fn) == want


def test_launch_configurations_are_the_trainers(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert copy.HEAD_DIMS == HEAD_DIMS and copy.MAX_ROWS == triton_decode.MAX_ROWS
    assert copy.LOG2E == triton_common.LOG2E
    c = triton_decode.COMBINE_CONFIG
    assert copy.COMBINE_CONFIG == (c.num_warps, c.num_stages)
    for d in HEAD_DIMS:
        for group in (1, 2, 4, 8):
            for tokens in (1, 3, 16):
                rows = triton_decode.decode_rows(group, tokens)
                assert copy.decode_rows(group, tokens) == rows
                cfg = triton_decode.decode_config(d, rows)
                assert copy.decode_config(d, rows) == (cfg.block_n, cfg.num_warps, cfg.num_stages)
    cpu = torch.device("cpu")
    for shape in [(1, 1, 100), (2, 4, 5000), (8, 8, 70)]:
        assert copy.default_num_splits(*shape, cpu) == triton_decode.default_num_splits(*shape, cpu)


def _imports(path: Path) -> set[tuple[int, str]]:
    """(level, module) of every import statement in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            found.add((node.level, node.module or ""))
        elif isinstance(node, ast.Import):
            found.update((0, alias.name) for alias in node.names)
    return found


def test_the_remote_code_imports_only_its_own_files():
    """The export stands alone: no fusedkv_megatron import, every relative import a copied file."""
    for name in REMOTE_CODE_FILES:
        for level, module in _imports(HF_DIR / name):
            assert not module.startswith("fusedkv_megatron"), (name, module)
            if level:
                assert f"{module}.py" in REMOTE_CODE_FILES, (name, module)


def test_torch_off_cuda_unless_triton_is_forced(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for value in ("auto", "torch", ""):
        monkeypatch.setenv(modeling_fusedkv.BACKEND_ENV, value)
        assert not modeling_fusedkv.use_triton_decode(x)
    monkeypatch.setenv(modeling_fusedkv.BACKEND_ENV, "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 on CPU"):
        modeling_fusedkv.use_triton_decode(x)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert modeling_fusedkv.use_triton_decode(x)
    monkeypatch.setenv(modeling_fusedkv.BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match="not one of auto, triton, torch"):
        modeling_fusedkv.use_triton_decode(x)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "HF_MODULES_CACHE": str(tmp_path_factory.mktemp("hf_modules"))}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "tests.unit.hf_decode_worker"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_triton_decode_equals_the_torch_path(interpreted, case):
    """Prefill and three cached decode steps: the same logits through the kernel as through
    `attend_to_sources`, and the kernel ran in every reconstruction layer at every step."""
    assert interpreted[case] is None, interpreted[case]


@pytest.mark.slow
def test_an_export_loaded_as_remote_code_decodes_with_its_own_kernel(interpreted):
    """write_hf_weights' directory, loaded with trust_remote_code: the kernel comes from the
    export's own triton_decode_fusedkv.py and gives the torch path's logits."""
    assert interpreted["export"] is None, interpreted["export"]
