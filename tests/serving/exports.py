"""Tiny Hugging Face exports of every variant and their reference outputs (the project's venv).

Exports are written by the project's own export writer (`write_hf_weights`: config.json,
safetensors, the remote code with `auto_map`; vanilla/gqa as stock Qwen3ForCausalLM). The
reference is the exported model itself, loaded with `trust_remote_code=True`, in float32:
greedy continuation by full recomputation each step, and the log-prob of every chosen token.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch

VARIANTS = ("vanilla", "gqa", "cla", "yoco", "fusedkv", "fusedkv_lite", "fusedkv_lite_learnable")
# d = 32: the CPU attention kernel's smallest head size, and 2d = 64 for the FusedKV family.
SHAPE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=512,
    rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
    tie_word_embeddings=False,
    initializer_range=0.3,  # peaked logits: greedy choices are far from ties
)


def hf_configs(variant: str, **overrides):
    """(the export's config, the FusedKV config the weights are made with): vanilla and gqa
    export as stock Qwen3 (as the converter does), with the FusedKV model's vanilla names."""
    from transformers import Qwen3Config

    from fusedkv_megatron.hf.configuration_fusedkv import FusedKVConfig

    fields = dict(SHAPE) | overrides
    if variant == "vanilla":
        fields["num_key_value_heads"] = fields["num_attention_heads"]
    fused = FusedKVConfig(kv_sharing="vanilla" if variant == "gqa" else variant, **fields)
    fused.architectures = ["FusedKVForCausalLM"]
    if variant in ("vanilla", "gqa") and not fields.get("rotary_interleaved"):
        stock = Qwen3Config(**fields)
        stock.architectures = ["Qwen3ForCausalLM"]
        return stock, fused
    return fused, fused


def build_export(out: Path, variant: str, seed: int = 0, tokenizer_model: Path | None = None,
                 **overrides) -> Path:  # fmt: skip
    """A seeded tiny export of `variant` in `out` (norms away from 1, fusion weights N(0,1))."""
    from fusedkv_megatron.hf.convert import write_hf_weights
    from fusedkv_megatron.hf.modeling_fusedkv import FusedKVForCausalLM

    cfg, model_cfg = hf_configs(variant, **overrides)
    torch.manual_seed(seed)
    model = FusedKVForCausalLM(model_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                g = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}".encode()))
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
    out.mkdir(parents=True, exist_ok=True)
    write_hf_weights(cfg, dict(model.state_dict()), out, torch.float32)
    if tokenizer_model is not None:
        from fusedkv_megatron.hf.tokenizer import export_sentencepiece

        export_sentencepiece(tokenizer_model, out, eod_id=2)
    return out


def load_reference(export: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        export, trust_remote_code=True, dtype=torch.float32
    ).eval()


@torch.no_grad()
def greedy_reference(model, prompt: list[int], steps: int) -> dict:
    """Tokens chosen greedily and their log-probs, recomputing the whole sequence each step."""
    ids = torch.tensor([prompt])
    tokens, logprobs = [], []
    for _ in range(steps):
        logits = model(ids, use_cache=False).logits[0, -1].float()
        lp = torch.log_softmax(logits, dim=-1)
        nxt = int(lp.argmax())
        tokens.append(nxt)
        logprobs.append(float(lp[nxt]))
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return {"tokens": tokens, "logprobs": logprobs}


def prompts(
    count: int, length: int, vocab: int = SHAPE["vocab_size"], seed: int = 3
) -> list[list[int]]:
    """Prompts sharing a first half (so a second request can hit the prefix cache), token ids
    3..vocab-1 (0-2 are the tokenizer's special ids)."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(3, vocab, (length // 2,), generator=g).tolist()
    return [shared + torch.randint(3, vocab, (length - length // 2,), generator=g).tolist()
            for _ in range(count)]  # fmt: skip


def write_json(path: Path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)
