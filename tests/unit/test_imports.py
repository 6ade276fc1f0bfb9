"""Importing is free of side effects: the package and its light modules load without Megatron,
nothing is patched until `fusedkv_megatron.compat.apply()` is called, and applying twice is the
same as applying once. Each check runs in a fresh interpreter (this pytest process has long
imported Megatron and applied the patches)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Modules whose docstrings promise an import without Megatron (and, for the checkpoint format,
# without torch), so that tools and the HF side stay cheap.
MEGATRON_FREE = {
    "fusedkv_megatron": ("megatron",),
    "fusedkv_megatron.config": ("megatron",),
    "fusedkv_megatron.fusion": ("megatron",),
    "fusedkv_megatron.compat": ("megatron",),
    "fusedkv_megatron.hf.mapping": ("megatron",),
    "fusedkv_megatron.checkpoint_format": ("megatron", "torch"),
    "fusedkv_megatron.research": ("megatron", "torch"),
    "fusedkv_megatron.research.compare": ("megatron", "torch"),
    "fusedkv_megatron.research.probe": ("megatron", "torch"),
}


def _run(code: str) -> dict:
    """Run `code` in a fresh interpreter; it prints one JSON line, which is returned."""
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def light_imports() -> dict:
    """{module: [forbidden modules loaded by importing it]}, from one fresh interpreter per
    forbidden set: the modules are imported one after the other, each checked right after its
    import, so a module that loads Megatron (or torch) is named, and every module imported
    after it is checked in a process that had not loaded it either (or the first one fails)."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for module, forbidden in sorted(MEGATRON_FREE.items()):
        groups.setdefault(forbidden, []).append(module)
    found: dict[str, list[str]] = {}
    for forbidden, modules in groups.items():
        found.update(
            _run(
                f"""
                import importlib, json, sys
                out = {{}}
                for module in {modules!r}:
                    importlib.import_module(module)
                    out[module] = [m for m in {list(forbidden)!r} if m in sys.modules]
                    if out[module]:
                        break
                print(json.dumps(out))
                """
            )
        )
    return found


@pytest.mark.parametrize("module", sorted(MEGATRON_FREE))
def test_light_module_imports_without_megatron(module, light_imports):
    assert module in light_imports, f"not checked: an earlier module loaded {light_imports}"
    assert light_imports[module] == [], f"importing {module} loads {light_imports[module]}"


@pytest.fixture(scope="module")
def fresh_interpreter() -> dict:
    """One fresh interpreter: the lazy public names, then (without CUDA) compat.apply() twice."""
    return _run(
        """
        import json, sys
        import torch
        original_device = torch.cuda.current_device
        import fusedkv_megatron as fk
        out = {"dir_has_all": set(fk.__all__) <= set(dir(fk))}
        out["config_without_megatron"] = (
            fk.KVSharingConfig("fusedkv").variant == "fusedkv" and "megatron" not in sys.modules
        )
        fk.build_model  # loads model.py and Megatron, but patches nothing
        out["megatron_after_build_model_access"] = "megatron" in sys.modules
        out["unpatched_after_import"] = torch.cuda.current_device is original_device
        try:
            fk.no_such_name
            out["unknown_name_raises"] = False
        except AttributeError:
            out["unknown_name_raises"] = True
        lazy = out
        apply = None
        if not torch.cuda.is_available():  # the CPU patches apply only without CUDA
            from fusedkv_megatron import compat
            from fusedkv_megatron.compat import cpu, upstream
            from megatron.core.tensor_parallel import random as mrandom
            first = compat.apply()
            state = (torch.cuda.current_device, mrandom.CheckpointWithoutOutput.__init__,
                     dict(cpu.ORIGINALS), len(torch.overrides._get_current_function_mode_stack()))
            second = compat.apply()
            again = (torch.cuda.current_device, mrandom.CheckpointWithoutOutput.__init__,
                     dict(cpu.ORIGINALS), len(torch.overrides._get_current_function_mode_stack()))
            apply = {
                "first": first, "second": second, "same_state": state == again,
                "originals_kept": cpu.ORIGINALS["current_device"] is original_device,
                "upstream_fixed": mrandom.CheckpointWithoutOutput.__init__ is upstream._fixed_cwo_init,
                "one_mode": again[3],
            }
        print(json.dumps({"lazy": lazy, "apply": apply}))
        """
    )


def test_public_names_are_lazy_and_patches_wait_for_apply(fresh_interpreter):
    assert fresh_interpreter["lazy"] == {
        "dir_has_all": True,
        "config_without_megatron": True,
        "megatron_after_build_model_access": True,
        "unpatched_after_import": True,
        "unknown_name_raises": True,
    }


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="the CPU patches apply only without CUDA"
)
def test_apply_is_idempotent(fresh_interpreter):
    assert fresh_interpreter["apply"] == {
        "first": True,
        "second": True,
        "same_state": True,
        "originals_kept": True,
        "upstream_fixed": True,
        "one_mode": 1,
    }
