"""Run under TRITON_INTERPRET=1 (Triton decides interpreter vs compiler at import): decode an
HF FusedKV model with the cache through the exported Triton kernel and through torch, and print
one JSON line {case: None | error} for tests/unit/test_hf_triton_decode.py."""

from __future__ import annotations

import json
import os
import tempfile
import traceback
from pathlib import Path

import torch
from transformers import DynamicCache

from fusedkv_megatron.hf import modeling_fusedkv
from tests.unit.test_hf_model import assert_fp32_close, model, prompt

# variant, head dim, query heads / KV heads. The prefill (9 causal queries against the cache)
# and 3 one-token decode steps.
CASES = {
    "fusedkv-d16-mha": ("fusedkv", 16, 4, 4),
    "fusedkv-d32-gqa2": ("fusedkv", 32, 4, 2),
    "fusedkv_lite_learnable-d16": ("fusedkv_lite_learnable", 16, 4, 4),
}


@torch.no_grad()
def decode_logits(m, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Prefill all but the last `steps` tokens, then feed them one at a time."""
    cut = ids.shape[1] - steps
    cache = DynamicCache(config=m.config)
    outs = [m(ids[:, :cut], past_key_values=cache, use_cache=True).logits]
    for i in range(cut, ids.shape[1]):
        outs.append(m(ids[:, i : i + 1], past_key_values=cache, use_cache=True).logits)
    return torch.cat(outs, dim=1)


def run_case(variant, head_dim, heads, kv_heads) -> None:
    m = model(variant, head_dim=head_dim, num_attention_heads=heads, num_key_value_heads=kv_heads)
    with torch.no_grad():  # fusion weights away from their init: every channel matters
        for name, p in m.named_parameters():
            if "_weight_" in name:
                p.normal_(1.0, 0.3)
    ids = prompt(batch=2, length=12)
    calls = []
    original = modeling_fusedkv.triton_attend_to_sources

    def counted(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(out is not None)  # None: the kernel declined these tensors
        return out

    modeling_fusedkv.triton_attend_to_sources = counted
    try:
        os.environ[modeling_fusedkv.BACKEND_ENV] = "triton"
        fused = decode_logits(m, ids, 3)
        n_triton = len(calls)
        os.environ[modeling_fusedkv.BACKEND_ENV] = "torch"
        plain = decode_logits(m, ids, 3)
    finally:
        modeling_fusedkv.triton_attend_to_sources = original
    reconstruction_layers = sum(p is not None for p in m.config.layer_plans())
    # the prefill and 3 decode steps in every reconstruction layer; none on the torch run
    assert n_triton == len(calls) == 4 * reconstruction_layers and all(calls), calls
    assert_fp32_close(fused, plain)


def run_export() -> None:
    """An export written by the converter and loaded as remote code (its own copy of the
    kernel, imported relative to the export) decodes to the package model's torch logits."""
    from transformers import AutoModelForCausalLM

    from fusedkv_megatron.hf.convert import write_hf_weights

    m = model("fusedkv", head_dim=16)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "_weight_" in name:
                p.normal_(1.0, 0.3)
    ids = prompt(batch=2, length=12)
    os.environ[modeling_fusedkv.BACKEND_ENV] = "torch"
    want = decode_logits(m, ids, 3)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        write_hf_weights(m.config, dict(m.state_dict()), out, torch.float32)
        remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
        code = __import__(type(remote).__module__, fromlist=["_triton_decode"])
        assert code is not modeling_fusedkv and "transformers_modules" in code.__name__
        os.environ[modeling_fusedkv.BACKEND_ENV] = "triton"
        got = decode_logits(remote, ids, 3)
        kernel_module = code._triton_decode()[1].__module__
    assert "transformers_modules" in kernel_module and "triton_decode_fusedkv" in kernel_module
    assert_fp32_close(got, want)


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    results = {}
    for name, run in [*((n, lambda c=c: run_case(*c)) for n, c in CASES.items()),
                      ("export", run_export)]:  # fmt: skip
        try:
            run()
            results[name] = None
        except Exception:
            results[name] = traceback.format_exc()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
