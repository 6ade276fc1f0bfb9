"""The configuration class vLLM reads an export's config.json with (model_type fusedkv_qwen3).

Registered in vLLM's config registry by the plugin, so an export loads without
`--trust-remote-code` and without importing the export's own (newer-transformers) code: a
Qwen3Config with the KV-sharing fields of the exported configuration.
"""

from __future__ import annotations

from transformers.models.qwen3.configuration_qwen3 import Qwen3Config

from .layout import layout_from_config

MODEL_TYPE = "fusedkv_qwen3"


class FusedKVServeConfig(Qwen3Config):
    model_type = MODEL_TYPE

    kv_sharing: str = "fusedkv"
    kv_source_layers: list[int] | None = None
    fusion_weights_per_head: bool = True
    fusion_init: str = "normal"
    rotary_interleaved: bool = False

    def serving_layout(self):
        return layout_from_config(self)
