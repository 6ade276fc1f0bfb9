"""fusedkv_megatron: FusedKV (arXiv 2512.03870) pretraining on Megatron-Core.

Public API:
    KVSharingConfig, VARIANTS            the configuration (config.py)
    get_fusedkv_decoder_block_spec       Megatron block spec of this pipeline stage (spec.py)
    build_model, qwen3_config            a Qwen3-style GPTModel in one call (model.py)
    layer_plans, live_sources            which layer reads which source (fusion.py)
    kv_cache_bytes_per_token, fusion_parameter_count   accounting (fusion.py)
"""

from .compat import cpu as _cpu
from .compat import upstream as _upstream

_cpu.apply()  # no-op when CUDA is present
_upstream.apply()

from .config import VARIANTS, KVSharingConfig, KVSharingError  # noqa: E402
from .fusion import (  # noqa: E402
    fusion_parameter_count,
    kv_cache_bytes_per_token,
    layer_plans,
    live_sources,
)
from .model import build_model, count_parameters, qwen3_config  # noqa: E402
from .spec import (  # noqa: E402
    get_fusedkv_decoder_block_spec,
    get_fusedkv_decoder_layer_specs,
    transformer_engine_available,
)

__all__ = [
    "VARIANTS",
    "KVSharingConfig",
    "KVSharingError",
    "build_model",
    "count_parameters",
    "fusion_parameter_count",
    "get_fusedkv_decoder_block_spec",
    "get_fusedkv_decoder_layer_specs",
    "kv_cache_bytes_per_token",
    "layer_plans",
    "live_sources",
    "qwen3_config",
    "transformer_engine_available",
]
