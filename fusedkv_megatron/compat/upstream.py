"""Fixes for Megatron-Core bugs that are not CPU-specific (they hit GPU runs without TE too).

`apply()` installs each fix once (through `fusedkv_megatron.compat.apply()`, which entry points
and `build_model` call); tests/unit/test_cpu_compat.py fails when upstream fixes the bug (so the
fix can go).
"""

from __future__ import annotations

from megatron.core.tensor_parallel import random as mrandom

_original_cwo_init = mrandom.CheckpointWithoutOutput.__init__


def checkpoint_without_output_fp8_bug_present() -> bool:
    """0.19: CheckpointWithoutOutput(fp8=False) sets self.fp8 = (False is not None) = True and
    then calls Transformer Engine's FP8GlobalStateManager, a NameError without TE. The stock
    TransformerLayer uses it for selective recompute of "layernorm"."""
    probe = object.__new__(mrandom.CheckpointWithoutOutput)
    _original_cwo_init(probe)
    return probe.fp8 is True


def _fixed_cwo_init(self, fp8=False):
    _original_cwo_init(self, fp8)
    self.fp8 = fp8 not in (None, False)


def apply() -> bool:
    """Install the fix when the bug is present; idempotent. Returns True if the fix is active."""
    if mrandom.CheckpointWithoutOutput.__init__ is _fixed_cwo_init:
        return True
    if not checkpoint_without_output_fp8_bug_present():
        return False
    mrandom.CheckpointWithoutOutput.__init__ = _fixed_cwo_init
    return True
