"""Megatron <-> Hugging Face: configurations and parameter names (pure torch, no Megatron).

Megatron names are those of a TP=1 GPTModel built by `fusedkv_megatron.build_model` with the
local backend (`model.state_dict()`); HF names are Qwen3's, plus the fusion weights of the top
layers. Per layer i (0-based in both):

    decoder.layers.i.input_layernorm.weight          model.layers.i.input_layernorm.weight
    ...self_attention.linear_qkv.weight              ...self_attn.{q,k,v}_proj.weight
        ([ng, np/ng + 2, hn, h]: per KV group its query heads, then k, then v)
    ...self_attention.linear_q.weight                ...self_attn.q_proj.weight  (top layers)
    ...self_attention.{key,value}_weight_j           ...self_attn.{key,value}_weight_j
    ...self_attention.q_layernorm / k_layernorm      ...self_attn.q_norm / k_norm
    ...self_attention.linear_proj.weight             ...self_attn.o_proj.weight
    ...pre_mlp_layernorm.weight                      ...post_attention_layernorm.weight
    ...mlp.linear_fc1.weight ([gate; up])            ...mlp.gate_proj / up_proj
    ...mlp.linear_fc2.weight                         ...mlp.down_proj.weight
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PretrainedConfig, Qwen3Config

from ..fusion import fusion_weight_name, parse_fusion_weight_name
from .configuration_fusedkv import KV_SHARING_VARIANTS, FusedKVConfig, kv_sharing_plan

STOCK_VARIANTS = ("vanilla", "gqa")

_LAYER_RENAMES = (  # (Megatron suffix, HF suffix) shared by every layer
    ("input_layernorm.weight", "input_layernorm.weight"),
    ("self_attention.q_layernorm.weight", "self_attn.q_norm.weight"),
    ("self_attention.linear_proj.weight", "self_attn.o_proj.weight"),
    ("pre_mlp_layernorm.weight", "post_attention_layernorm.weight"),
    ("mlp.linear_fc2.weight", "mlp.down_proj.weight"),
)
_GLOBAL_RENAMES = (
    ("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
    ("decoder.final_layernorm.weight", "model.norm.weight"),
    ("output_layer.weight", "lm_head.weight"),
)


class ConversionError(ValueError):
    """Inputs that cannot be converted, with the reason and the fix in the message."""


# ----------------------------------------------------------------------------- configs
def hf_config_from_run_info(info: dict[str, Any], dtype: torch.dtype) -> PretrainedConfig:
    """The HF config of a checkpoint's fusedkv_run.json: stock Qwen3Config for vanilla/gqa with
    rotate-half RoPE, FusedKVConfig (remote code) otherwise."""
    m, kv, tok = info["model"], info["kv_sharing"], info["tokenizer"]
    if m["normalization"] != "RMSNorm":
        raise ConversionError(
            f"normalization={m['normalization']!r}: the HF export is Qwen3-style and needs "
            "RMSNorm; train with --normalization RMSNorm"
        )
    eod = tok.get("eod_id")
    common = dict(
        vocab_size=m["padded_vocab_size"],
        hidden_size=m["hidden_size"],
        intermediate_size=m["ffn_hidden_size"],
        num_hidden_layers=m["num_layers"],
        num_attention_heads=m["num_attention_heads"],
        num_key_value_heads=m["num_query_groups"] or m["num_attention_heads"],
        head_dim=m["kv_channels"],
        max_position_embeddings=m["seq_length"],
        rms_norm_eps=m["layernorm_epsilon"],
        rope_parameters={"rope_type": "default", "rope_theta": float(m["rotary_base"])},
        tie_word_embeddings=bool(m["share_embeddings_and_output_weights"]),
        eos_token_id=eod,
        pad_token_id=eod,
        dtype=dtype,
    )
    variant = kv["variant"]
    if variant in STOCK_VARIANTS and not m["rotary_interleaved"]:
        return Qwen3Config(**common, architectures=["Qwen3ForCausalLM"])
    source_layers = kv["source_layers"]
    return FusedKVConfig(
        **common,
        architectures=["FusedKVForCausalLM"],
        kv_sharing=variant,
        kv_source_layers=list(source_layers) if source_layers is not None else None,
        fusion_weights_per_head=bool(kv["weights_per_head"]),
        fusion_init=kv["fusion_init"],
        rotary_interleaved=bool(m["rotary_interleaved"]),
    )


def run_info_sections_from_hf_config(cfg: PretrainedConfig) -> tuple[dict, dict]:
    """The "model" and "kv_sharing" sections of fusedkv_run.json for an HF config."""
    if cfg.model_type not in ("qwen3", FusedKVConfig.model_type):
        raise ConversionError(
            f"model_type={cfg.model_type!r} is not convertible: expected 'qwen3' (vanilla/gqa "
            f"export) or {FusedKVConfig.model_type!r} (a fusedkv-convert-hf export)"
        )
    if any(t != "full_attention" for t in cfg.layer_types) or cfg.attention_bias:
        raise ConversionError(
            "sliding-window layers and attention biases have no Megatron counterpart here; "
            "only full-attention, bias-free Qwen3 models convert"
        )
    if cfg.rope_parameters.get("rope_type", "default") != "default":
        raise ConversionError(
            f"rope_type={cfg.rope_parameters['rope_type']!r} is not supported; only plain RoPE"
        )
    fused = cfg.model_type == FusedKVConfig.model_type
    heads, groups = cfg.num_attention_heads, cfg.num_key_value_heads
    model = {
        "num_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "ffn_hidden_size": cfg.intermediate_size,
        "num_attention_heads": heads,
        "num_query_groups": groups,
        "kv_channels": cfg.head_dim,
        "padded_vocab_size": cfg.vocab_size,
        "seq_length": cfg.max_position_embeddings,
        "rotary_base": float(cfg.rope_parameters["rope_theta"]),
        "rotary_interleaved": bool(cfg.rotary_interleaved) if fused else False,
        "layernorm_epsilon": cfg.rms_norm_eps,
        "normalization": "RMSNorm",
        "share_embeddings_and_output_weights": bool(cfg.tie_word_embeddings),
    }
    if fused:
        sl = cfg.kv_source_layers
        kv = {
            "variant": cfg.kv_sharing,
            "source_layers": list(sl) if sl is not None else None,
            "weights_per_head": bool(cfg.fusion_weights_per_head),
            "fusion_init": cfg.fusion_init,
        }
    else:
        variant = "gqa" if groups < heads else "vanilla"
        kv = {
            "variant": variant,
            "source_layers": None,
            "weights_per_head": True,
            "fusion_init": "normal",
        }
    return model, kv


def layer_plans_of(cfg: PretrainedConfig):
    """Per-layer plans (None = storage layer) of an HF config, stock Qwen3 included."""
    if isinstance(cfg, FusedKVConfig) or cfg.model_type == FusedKVConfig.model_type:
        return kv_sharing_plan(cfg.kv_sharing, cfg.num_hidden_layers, cfg.kv_source_layers)
    return [None] * cfg.num_hidden_layers


# ----------------------------------------------------------------------------- tensors
def _fusion_names(plan) -> list[str]:
    names = []
    for kind, terms in (("key", plan[0]), ("value", plan[1])):
        names += [fusion_weight_name(kind, j) for j, (_, w) in enumerate(terms) if w]
    return names


def megatron_to_hf_state_dict(
    sd: dict[str, torch.Tensor], cfg: PretrainedConfig
) -> dict[str, torch.Tensor]:
    """A TP=1 Megatron state dict -> HF tensors (views where possible; no copies needed)."""
    sd = {k: v for k, v in sd.items() if not k.endswith("_extra_state")}
    out: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        return sd.pop(name)

    heads, groups, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    for mg, hf in _GLOBAL_RENAMES:
        if mg in sd:
            out[hf] = take(mg)
    for i, plan in enumerate(layer_plans_of(cfg)):
        mp, hp = f"decoder.layers.{i}.", f"model.layers.{i}."
        for mg, hf in _LAYER_RENAMES:
            out[hp + hf] = take(mp + mg)
        fc1 = take(mp + "mlp.linear_fc1.weight")
        out[hp + "mlp.gate_proj.weight"], out[hp + "mlp.up_proj.weight"] = fc1.chunk(2, dim=0)
        if plan is None:
            qkv = take(mp + "self_attention.linear_qkv.weight")
            qkv = qkv.view(groups, heads // groups + 2, d, qkv.shape[-1])
            out[hp + "self_attn.q_proj.weight"] = qkv[:, :-2].reshape(heads * d, -1)
            out[hp + "self_attn.k_proj.weight"] = qkv[:, -2].reshape(groups * d, -1)
            out[hp + "self_attn.v_proj.weight"] = qkv[:, -1].reshape(groups * d, -1)
            out[hp + "self_attn.k_norm.weight"] = take(mp + "self_attention.k_layernorm.weight")
        else:
            out[hp + "self_attn.q_proj.weight"] = take(mp + "self_attention.linear_q.weight")
            for name in _fusion_names(plan):
                out[hp + "self_attn." + name] = take(mp + "self_attention." + name)
    if sd:
        raise ConversionError(
            f"Megatron tensors left unconverted: {sorted(sd)[:8]}; the checkpoint does not "
            f"match the configuration (kv_sharing / layer count)"
        )
    return out


def hf_to_megatron_state_dict(
    sd: dict[str, torch.Tensor], cfg: PretrainedConfig
) -> dict[str, torch.Tensor]:
    """HF tensors -> a TP=1 Megatron state dict (the inverse of megatron_to_hf_state_dict)."""
    check_layer_layout(sd, cfg, "hf", "HF weights")
    sd = dict(sd)
    out: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        if name not in sd:
            raise ConversionError(
                f"HF tensor {name!r} is missing: the weights do not match config.json "
                f"({describe_config(cfg)})"
            )
        return sd.pop(name)

    heads, groups, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    for mg, hf in _GLOBAL_RENAMES:
        if hf in sd and not (hf == "lm_head.weight" and cfg.tie_word_embeddings):
            out[mg] = take(hf)
    sd.pop("lm_head.weight", None)
    for i, plan in enumerate(layer_plans_of(cfg)):
        mp, hp = f"decoder.layers.{i}.", f"model.layers.{i}."
        for mg, hf in _LAYER_RENAMES:
            out[mp + mg] = take(hp + hf)
        gate, up = take(hp + "mlp.gate_proj.weight"), take(hp + "mlp.up_proj.weight")
        out[mp + "mlp.linear_fc1.weight"] = torch.cat([gate, up], dim=0)
        q = take(hp + "self_attn.q_proj.weight")
        if plan is None:
            k, v = take(hp + "self_attn.k_proj.weight"), take(hp + "self_attn.v_proj.weight")
            h = q.shape[-1]
            qkv = torch.cat(
                [
                    q.view(groups, heads // groups, d, h),
                    k.view(groups, 1, d, h),
                    v.view(groups, 1, d, h),
                ],
                dim=1,
            )
            out[mp + "self_attention.linear_qkv.weight"] = qkv.reshape(-1, h)
            out[mp + "self_attention.k_layernorm.weight"] = take(hp + "self_attn.k_norm.weight")
        else:
            out[mp + "self_attention.linear_q.weight"] = q
            for name in _fusion_names(plan):
                out[mp + "self_attention." + name] = take(hp + "self_attn." + name)
    if sd:
        raise ConversionError(
            f"HF tensors not part of a {describe_config(cfg)} model: {sorted(sd)[:8]}"
        )
    return out


# ----------------------------------------------------------------------------- diagnostics
def describe_config(cfg: PretrainedConfig) -> str:
    variant = getattr(cfg, "kv_sharing", None) or "vanilla/gqa (qwen3)"
    return f"kv_sharing={variant!r}, {cfg.num_hidden_layers} layers"


def _layer_kinds(plans) -> list:
    """Per layer "storage" or ("top", n weighted key terms, n weighted value terms)."""
    return [
        "storage" if p is None else ("top", sum(w for _, w in p[0]), sum(w for _, w in p[1]))
        for p in plans
    ]


def variants_with_layers(kinds: list) -> list[str]:
    """The variants whose layer layout is `kinds` (vanilla and gqa differ only in shapes)."""
    return [
        v
        for v in KV_SHARING_VARIANTS
        if v != "gqa" and _layer_kinds(kv_sharing_plan(v, len(kinds))) == kinds
    ]


def layer_kinds_from_names(names, num_layers: int, side: str) -> list:
    """The layer layout a set of tensor names shows; side is "hf" or "megatron"."""
    kinds = []
    for i in range(num_layers):
        if side == "hf":
            p, own = f"model.layers.{i}.self_attn.", "k_proj.weight"
        else:
            p, own = f"decoder.layers.{i}.self_attention.", "linear_qkv.weight"
        if p + own in names:
            kinds.append("storage")
            continue
        fusion = [parse_fusion_weight_name(n) for n in names if n.startswith(p)]
        nk = sum(1 for f in fusion if f and f[0] == "key")
        nv = sum(1 for f in fusion if f and f[0] == "value")
        kinds.append(("top", nk, nv))
    return kinds


def check_layer_layout(names, cfg: PretrainedConfig, side: str, where: str) -> None:
    """Raise ConversionError if the tensors in `names` are not of the configured variant."""
    expected = _layer_kinds(layer_plans_of(cfg))
    found = layer_kinds_from_names(set(names), cfg.num_hidden_layers, side)
    if found == expected:
        return
    like = variants_with_layers(found)
    bad = [i for i, (a, b) in enumerate(zip(found, expected)) if a != b]
    raise ConversionError(
        f"{where}: the tensors do not match {describe_config(cfg)} (layers {bad} differ: "
        f"found {[found[i] for i in bad]}, expected {[expected[i] for i in bad]}); "
        + (f"they look like kv_sharing in {like}. " if like else "")
        + "The weights and the configuration come from different models: fix the "
        "configuration or point at the matching checkpoint"
    )
