"""fusedkv_megatron: FusedKV (arXiv 2512.03870) pretraining on Megatron-Core.

Public API:
    KVSharingConfig, VARIANTS            the configuration (config.py)
    get_fusedkv_decoder_block_spec       Megatron block spec of this pipeline stage (spec.py)
    build_model, qwen3_config            a Qwen3-style GPTModel in one call (model.py)
    layer_plans, live_sources            which layer reads which source (fusion.py)
    kv_cache_bytes_per_token, fusion_parameter_count   accounting (fusion.py)

Importing the package has no side effects. Megatron-Core needs a few patches on a machine
without CUDA (and one bug fix everywhere): `fusedkv_megatron.compat.apply()` installs them.
`build_model` calls it; call it yourself before seeding Megatron's RNG tracker
(`model_parallel_cuda_manual_seed`) in your own script.
"""

from __future__ import annotations

import importlib

# Public name -> the submodule that defines it. Importing this package imports nothing else:
# a name's module (and with it Megatron, for model.py and spec.py) loads on first access.
_EXPORTS = {
    "VARIANTS": "config",
    "KVSharingConfig": "config",
    "KVSharingError": "config",
    "fusion_parameter_count": "fusion",
    "kv_cache_bytes_per_token": "fusion",
    "layer_plans": "fusion",
    "live_sources": "fusion",
    "build_model": "model",
    "count_parameters": "model",
    "qwen3_config": "model",
    "get_fusedkv_decoder_block_spec": "spec",
    "get_fusedkv_decoder_layer_specs": "spec",
    "transformer_engine_available": "spec",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
