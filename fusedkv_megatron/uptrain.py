"""Uptraining: turn a full-cache (vanilla or GQA) model into a KV-sharing variant.

    fusedkv-convert-variant --load CKPT_OR_HF_DIR --kv-sharing fusedkv \\
        --fusion-init equivalent --save OUT [--eval-data PREFIX]

The source is a `fusedkv-pretrain --save` directory (any TP/PP) or a Hugging Face directory of
a stock `Qwen3ForCausalLM` (or a fusedkv-convert-hf export of a vanilla/gqa run). The result
is a checkpoint of the chosen variant at iteration 0 without optimizer or RNG state:

- storage layers keep every weight;
- reconstruction layers (the top half; CLA: the even layers) keep W_Q, q-norm, W_O, the MLP
  and their norms, and drop W_K, W_V and the k-norm;
- fusion weights (fusedkv, fusedkv_lite_learnable) start by `--fusion-init`: `normal` and
  `lite` give exactly what a fresh `fusedkv-pretrain --seed SEED` run would draw, `equivalent`
  the paper appendix's start that reproduces iterative fusion (fusion.equivalent_fusion_weight).

Continue with `fusedkv-pretrain --use-checkpoint-args --pretrained-checkpoint OUT --load RUN
--save RUN`: the model flags come from the checkpoint, the iteration count starts at 0, so the
LR schedule warms up again and the data are read from their start (docs/uptraining.md).

The conversion works on Hugging Face tensor names (hf/mapping.py owns the Megatron layout), in
one process on the CPU; only the final TP x PP re-save spawns processes.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import FUSION_INITS, VARIANTS, KVSharingConfig, KVSharingError
from .data.datasets import DataError
from .fusion import LayerPlan, Term, fusion_weight_name, init_fusion_weight, layer_plans
from .hf.mapping import ConversionError

log = logging.getLogger(__name__)
FULL_CACHE = ("vanilla", "gqa")
# Per-layer tensors a reconstruction layer does not have (HF names under model.layers.i.).
_KV_TENSORS = ("self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.k_norm.weight")


@dataclass
class Model:
    """A model as the converter handles it: run info, TP=1 Megatron tensors, tokenizer file."""

    info: dict
    state: dict[str, torch.Tensor]
    tokenizer_file: Path | None
    where: str


def _is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def load_source(path: str | Path) -> Model:
    """The full-cache model at `path`: a fusedkv-pretrain checkpoint or an HF directory."""
    from . import checkpoint_format as ckpt_format
    from .hf.convert import hf_tokenizer_section, load_hf_config, load_hf_tensors
    from .hf.mapping import hf_to_megatron_state_dict, run_info_sections_from_hf_config
    from .hf.megatron_io import load_megatron_checkpoint

    path = Path(path)
    if _is_hf_dir(path):
        cfg = load_hf_config(path)
        model, kv = run_info_sections_from_hf_config(cfg)
        tokenizer, sp_file = hf_tokenizer_section(path, cfg)
        state = hf_to_megatron_state_dict(load_hf_tensors(path), cfg)
        parallel = {
            "tensor_model_parallel_size": 1,
            "pipeline_model_parallel_size": 1,
            "virtual_pipeline_model_parallel_size": None,
            "data_parallel_size": 1,
        }
        info = ckpt_format.make_run_info(0, model, kv, tokenizer, parallel)
        source = Model(info, state, sp_file, str(path))
    else:
        info, ckpt_dir, state = load_megatron_checkpoint(path)
        source = Model(info, state, ckpt_format.tokenizer_path(ckpt_dir, info), str(ckpt_dir))
    variant = source.info["kv_sharing"]["variant"]
    if variant not in FULL_CACHE:
        raise ConversionError(
            f"--load {path} holds a {variant!r} model; the conversion starts from a full-cache "
            f"model ({' or '.join(FULL_CACHE)}), where every layer has its own K/V projections"
        )
    return source


def target_config(
    source: Model, variant: str, fusion_init: str, weights_per_head: bool, tp: int = 1
) -> KVSharingConfig:
    """The target's KV-sharing configuration, validated against the source's shape."""
    if variant in FULL_CACHE:
        raise ConversionError(
            f"--kv-sharing {variant} keeps a full cache: nothing to convert; choose one of "
            f"{', '.join(v for v in VARIANTS if v not in FULL_CACHE)}"
        )
    kv = KVSharingConfig(variant, weights_per_head=weights_per_head, fusion_init=fusion_init)
    m = source.info["model"]
    try:
        kv.validate(m["num_layers"], m["num_attention_heads"], m["num_query_groups"], tp)
    except KVSharingError as err:
        raise ConversionError(str(err)) from None
    return kv


def fusion_weight(
    kv: KVSharingConfig, plan: LayerPlan, term: Term, index: int, shape, seed: int
) -> torch.Tensor:
    """One fusion vector of layer `plan.layer_number`, full size (fp32), as a fresh run at
    `--seed seed` initialises it: its generator seeded by (seed, the parameter's global name)."""
    from .initialization import seeded_full_tensor

    kind = "key" if term.source[1] == "k" else "value"
    name = (
        f"decoder.layers.{plan.layer_number - 1}.self_attention.{fusion_weight_name(kind, index)}"
    )
    return seeded_full_tensor(
        seed, name, shape, lambda t: init_fusion_weight(t, kv, term, plan, seed=seed)
    )


def convert_hf_tensors(
    tensors: dict[str, torch.Tensor], model: dict, kv: KVSharingConfig, seed: int
) -> dict[str, torch.Tensor]:
    """HF tensors of a full-cache model -> HF tensors of variant `kv` (see the module doc).
    `model` is the run info's model section (for the head counts)."""
    out = dict(tensors)
    groups = model["num_query_groups"] if kv.weights_per_head else 1
    d = model["kv_channels"]
    dtype = tensors["model.embed_tokens.weight"].dtype
    for plan in layer_plans(kv, model["num_layers"]):
        if not plan.is_reconstruction:
            continue
        prefix = f"model.layers.{plan.layer_number - 1}."
        for name in _KV_TENSORS:
            del out[prefix + name]
        for kind, j, term in plan.fusion_terms():
            width = d // 2 if kind == "key" else d
            w = fusion_weight(kv, plan, term, j, (groups, width), seed)
            out[f"{prefix}self_attn.{fusion_weight_name(kind, j)}"] = w.to(dtype)
    return out


def convert_model(source: Model, kv: KVSharingConfig, seed: int, tp: int = 1, pp: int = 1):
    """The converted Model (run info at iteration 0, TP=1 Megatron tensors)."""
    from . import checkpoint_format as ckpt_format
    from .hf.mapping import (
        hf_config_from_run_info,
        hf_to_megatron_state_dict,
        megatron_to_hf_state_dict,
    )

    dtype = source.state["embedding.word_embeddings.weight"].dtype
    tensors = megatron_to_hf_state_dict(source.state, hf_config_from_run_info(source.info, dtype))
    converted = convert_hf_tensors(tensors, source.info["model"], kv, seed)
    parallel = {
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "virtual_pipeline_model_parallel_size": None,
        "data_parallel_size": 1,
    }
    info = ckpt_format.make_run_info(
        0, source.info["model"], kv, source.info["tokenizer"], parallel
    )
    state = hf_to_megatron_state_dict(converted, hf_config_from_run_info(info, dtype))
    return Model(info, state, source.tokenizer_file, "converted")


def convert_variant(
    load: str | Path,
    save: str | Path,
    variant: str,
    fusion_init: str = "normal",
    *,
    weights_per_head: bool = True,
    seed: int = 1234,
    tp: int = 1,
    pp: int = 1,
    eval_data: str | None = None,
    eval_samples: int = 16,
    eval_micro_batch_size: int = 4,
) -> dict:
    """Convert the full-cache model at `load` into `variant` and save it under `save`.

    Returns {"checkpoint": iteration dir, "source_variant", "source_loss": float | None,
    "converted_loss": float | None};
    the losses are measured on `eval_data` (an indexed-dataset prefix) when given.
    """
    from .hf.megatron_io import save_megatron_checkpoint

    source = load_source(load)
    kv = target_config(source, variant, fusion_init, weights_per_head, tp)
    log.info(
        "converting %s (%s, iteration %s) into %s (fusion_init=%s)",
        source.where,
        source.info["kv_sharing"]["variant"],
        source.info["iteration"],
        variant,
        fusion_init,
    )
    converted = convert_model(source, kv, seed, tp, pp)
    result = {
        "checkpoint": None,
        "source_variant": source.info["kv_sharing"]["variant"],
        "source_loss": None,
        "converted_loss": None,
    }
    if eval_data is not None:
        from .uptrain_eval import validation_loss

        common = dict(samples=eval_samples, micro_batch_size=eval_micro_batch_size, seed=seed)
        result["source_loss"] = validation_loss(source, eval_data, **common)
        result["converted_loss"] = validation_loss(converted, eval_data, **common)
    result["checkpoint"] = save_megatron_checkpoint(
        converted.state, converted.info, save, tp=tp, pp=pp, tokenizer_file=source.tokenizer_file
    )
    return result


def _report(result: dict, a: argparse.Namespace) -> None:
    source_variant = result["source_variant"]
    print(f"converted {a.load} ({source_variant}) -> {result['checkpoint']} ({a.kv_sharing})")
    if result["source_loss"] is not None:
        before, after = result["source_loss"], result["converted_loss"]
        print(f"validation loss on {a.eval_data} ({a.eval_samples} sequences):")
        print(f"  original   {source_variant:<24} {before:.4f}")
        label = f"{a.kv_sharing} ({a.fusion_init})"
        print(f"  converted  {label:<24} {after:.4f}  ({after - before:+.4f})")
    print(
        f"continue with: fusedkv-pretrain --use-checkpoint-args --pretrained-checkpoint {a.save} "
        "--load RUN --save RUN [training and data flags] ..."
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fusedkv-convert-variant", description=__doc__.split("\n")[0])
    p.add_argument(
        "--load",
        required=True,
        help="a full-cache model: a fusedkv-pretrain --save directory (its latest checkpoint, "
        "any TP/PP), one iter_XXXXXXX directory, or a Hugging Face Qwen3 directory",
    )
    p.add_argument("--save", required=True, help="new checkpoint root for fusedkv-pretrain --load")
    p.add_argument(
        "--kv-sharing",
        required=True,
        choices=[v for v in VARIANTS if v not in FULL_CACHE],
        help="the variant to convert into",
    )
    p.add_argument(
        "--fusion-init",
        choices=FUSION_INITS,
        default="normal",
        help="fusion weights' start (fusedkv, fusedkv_lite_learnable): normal = N(0,1) (the "
        "paper); lite = 1 on the Lite source, 0 elsewhere (starts as fusedkv_lite); "
        "equivalent = the paper appendix's start reproducing iterative fusion",
    )
    p.add_argument(
        "--shared-fusion-weights",
        action="store_true",
        help="one fusion vector per head_dim shared over KV heads (default: one per KV head)",
    )
    p.add_argument("--seed", type=int, default=1234, help="seed of the fusion weights' draws")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument(
        "--eval-data",
        help="indexed-dataset prefix (tools/preprocess_data.py output): print the validation "
        "loss of the original and of the converted model on it",
    )
    p.add_argument("--eval-samples", type=int, default=16, help="sequences to evaluate")
    p.add_argument("--eval-micro-batch-size", type=int, default=4)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Console script fusedkv-convert-variant."""
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
    logging.getLogger("fusedkv_megatron").setLevel(logging.INFO)  # Megatron's INFO is noise here
    a = parse_args(argv)
    try:
        result = convert_variant(
            a.load,
            a.save,
            a.kv_sharing,
            a.fusion_init,
            weights_per_head=not a.shared_fusion_weights,
            seed=a.seed,
            tp=a.tensor_model_parallel_size,
            pp=a.pipeline_model_parallel_size,
            eval_data=a.eval_data,
            eval_samples=a.eval_samples,
            eval_micro_batch_size=a.eval_micro_batch_size,
        )
    except (ConversionError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _report(result, a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
