"""Top-half prefill (opt-in, CPU attention backend): the layers after the last cache-writing
layer run on the rows vLLM computes logits for only, as the paper's prefill saving.

No later layer reads a top layer's K/V, so only the rows whose logits are kept need the top
half: the last scheduled token of every request (`query_start_loc[1:] - 1` without speculative
decoding). vLLM builds one attention metadata for all scheduled tokens; this module swaps in, for
the top layers only and for one forward, the CPU backend's metadata for one query per request
(same sequence lengths and block tables, new scheduler metadata) and puts it back afterwards.

Off unless FUSEDKV_VLLM_TOP_PREFILL=1: it is tied to the CPU backend's metadata, and a request
for prompt log-probs (which reads every prompt row's hidden state) gets wrong values with it.
"""

from __future__ import annotations

import dataclasses
import os

import torch

ENV = "FUSEDKV_VLLM_TOP_PREFILL"


def wanted(vllm_config) -> bool:
    from vllm.platforms import current_platform

    return (
        os.environ.get(ENV) == "1"
        and current_platform.is_cpu()
        and vllm_config.speculative_config is None
    )


class TopRows:
    """For one forward: the rows that get logits, and the top layers' swapped metadata."""

    def __init__(self, rows: torch.Tensor, saved: dict):
        self.rows, self._saved = rows, saved

    @classmethod
    def enter(cls, layer_names: list[str], dtype: torch.dtype) -> TopRows | None:
        """Swap in one-query-per-request metadata for `layer_names`; None when there is nothing
        to save (no metadata: profiling run; one token per request: pure decode)."""
        from vllm import _custom_ops as ops
        from vllm import envs
        from vllm.forward_context import get_forward_context

        ctx = get_forward_context()
        table = ctx.attn_metadata
        if not isinstance(table, dict) or table.get(layer_names[0]) is None:
            return None
        first = table[layer_names[0]]
        num_reqs = first.query_start_loc.numel() - 1
        if first.num_actual_tokens <= num_reqs:
            return None
        rows = (first.query_start_loc[1:] - 1).long()
        built: dict[int, object] = {}
        saved = {}
        for name in layer_names:
            meta, layer = table[name], ctx.no_compile_layers[name]
            if id(meta) not in built:
                qsl = torch.arange(num_reqs + 1, dtype=meta.query_start_loc.dtype)
                scheduler = ops.cpu_attn_get_scheduler_metadata(
                    num_reqs=num_reqs,
                    num_heads=layer.num_heads,
                    num_kv_heads=layer.num_kv_heads,
                    head_dim=layer.head_size,
                    seq_lens=meta.seq_lens,
                    dtype=dtype,
                    query_start_loc=qsl,
                    causal=meta.causal,
                    sliding_window_size=-1,
                    isa=layer.isa,
                    enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
                    dynamic_causal=None,
                    kv_cache_dtype=layer.impl.kv_cache_dtype,
                )
                built[id(meta)] = dataclasses.replace(
                    meta, num_actual_tokens=num_reqs, max_query_len=1, query_start_loc=qsl,
                    scheduler_metadata=scheduler,
                )  # fmt: skip
            saved[name] = meta
            table[name] = built[id(meta)]
        return cls(rows, saved)

    def exit(self) -> None:
        from vllm.forward_context import get_forward_context

        get_forward_context().attn_metadata.update(self._saved)
