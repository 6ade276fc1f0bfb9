"""fusedkv_vllm: a vLLM plugin that serves FusedKV, FusedKV-Lite, YOCO, CLA and GQA exports of
fusedkv_megatron (model_type fusedkv_qwen3) with the shared KV cache, and so about twice the
cached tokens of a vanilla model at the same memory.

Registered through the `vllm.general_plugins` entry point; vLLM calls `register()` in every
process. Imports nothing from fusedkv_megatron.
"""

from __future__ import annotations

ARCHITECTURE = "FusedKVForCausalLM"


def register() -> None:
    import os

    import vllm
    from vllm.model_executor.models import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig
    from vllm.transformers_utils.config import _CONFIG_REGISTRY

    from . import patches
    from .checks import ALLOW_UNTESTED_ENV, check_setup, check_vllm_version
    from .config import MODEL_TYPE, FusedKVServeConfig

    check_vllm_version(vllm.__version__, os.environ.get(ALLOW_UNTESTED_ENV) == "1")
    _CONFIG_REGISTRY[MODEL_TYPE] = FusedKVServeConfig
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "fusedkv_vllm.model:FusedKVForCausalLM")

    class FusedKVSetupCheck(VerifyAndUpdateConfig):
        @staticmethod
        def verify_and_update_config(vllm_config) -> None:
            check_setup(vllm_config)

    MODELS_CONFIG_MAP[ARCHITECTURE] = FusedKVSetupCheck
    patches.apply()
