"""The one vLLM internal the FusedKV family needs changed.

With mixed head sizes (the 2d cache next to head-size-d caches), vLLM puts every layer of the
model in one KV-cache group whose spec is a `UniformTypeKVCacheSpecs` (one spec per layer
name). `add_kv_sharing_layers_to_kv_cache_groups` adds the layers that read another layer's
cache to that group, but not to its per-layer specs, and the model runner's
`get_attn_backends_for_group` then raises KeyError for them. The patch wraps the function: after
it, each such group's spec table answers a reading layer with its target's spec. The table's
contents (and so the page size and capacity) are unchanged.
"""

from __future__ import annotations

_PATCHED = "_fusedkv_patched"


class _SpecsWithReaders(dict):
    """A per-layer spec table that answers a reading layer with its target's spec."""

    def __init__(self, specs: dict, readers: dict[str, str]):
        super().__init__(specs)
        self.readers = readers

    def __missing__(self, layer_name):
        if layer_name in self.readers:
            return self[self.readers[layer_name]]
        raise KeyError(layer_name)


def _wrap(original):
    def add_kv_sharing_layers_to_kv_cache_groups(shared_kv_cache_layers, kv_cache_groups,
                                                 runner_only_attn_layers=None):  # fmt: skip
        original(shared_kv_cache_layers, kv_cache_groups, runner_only_attn_layers)
        from vllm.v1.kv_cache_interface import UniformTypeKVCacheSpecs

        for group in kv_cache_groups:
            spec = group.kv_cache_spec
            if isinstance(spec, UniformTypeKVCacheSpecs) and not isinstance(
                spec.kv_cache_specs, _SpecsWithReaders
            ):
                table = _SpecsWithReaders(spec.kv_cache_specs, dict(shared_kv_cache_layers))
                object.__setattr__(spec, "kv_cache_specs", table)

    setattr(add_kv_sharing_layers_to_kv_cache_groups, _PATCHED, True)
    return add_kv_sharing_layers_to_kv_cache_groups


def apply() -> None:
    """Patch the model runners' imported name (idempotent)."""
    import importlib

    for module_name in ("vllm.v1.worker.gpu_model_runner", "vllm.v1.worker.gpu.attn_utils"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        fn = getattr(module, "add_kv_sharing_layers_to_kv_cache_groups", None)
        if fn is not None and not getattr(fn, _PATCHED, False):
            module.add_kv_sharing_layers_to_kv_cache_groups = _wrap(fn)
