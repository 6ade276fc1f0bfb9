"""Patches to Megatron-Core, applied on request and never by importing this package.

- `cpu.py`: redirects Megatron's hard-coded CUDA calls to the CPU when CUDA is absent (a no-op
  on a GPU), so the same code runs under gloo.
- `upstream.py`: fixes for Megatron-Core bugs that are not CPU-specific.

`apply()` applies both, once. Entry points call it before they seed Megatron's RNG tracker or
build a model: `fusedkv-pretrain`, the Hugging Face converters, the tools that build models, the
test fixtures and test workers; `build_model` calls it too. docs/upstream.md lists every patch
and the test that notices when upstream no longer needs it.
"""

from __future__ import annotations


def apply() -> bool:
    """Apply the CPU patches (only when CUDA is absent) and the upstream fixes; safe to call
    any number of times. Imports Megatron. Returns True when the CPU patches are active."""
    from . import cpu, upstream

    on_cpu = cpu.apply()
    upstream.apply()
    return on_cpu
