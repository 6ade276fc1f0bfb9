"""Flags that start a run from a checkpoint: its run info as arguments, fine-tuning, a
pretrained start (Megatron-LM's `--use-checkpoint-args`, `--finetune`, `--pretrained-checkpoint`).

`--use-checkpoint-args` reads `fusedkv_run.json` of the checkpoint the run will load (the
latest under `--load`, else under `--pretrained-checkpoint`) and takes the model shape, the KV
sharing and the tokenizer from it; a flag given on the command line or in `--config` that
disagrees is refused with both values. Not taken or compared: `--seq-length` when given (RoPE
has no table, so it may change), `--fusion-init` (it only decides weights that the checkpoint
replaces) and `--tokenizer-model` when given (the load compares the files themselves).
No torch or Megatron import at module level.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .flag_utils import ArgumentError, add_bool, flag

# Flags whose value a given flag may override without a refusal (see the docstring).
_MAY_DIFFER = ("seq_length", "fusion_init", "tokenizer_model")


def add_checkpoint_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("starting from a checkpoint")
    add_bool(
        g,
        "--use-checkpoint-args",
        "take the model shape, KV sharing and tokenizer from the checkpoint's fusedkv_run.json",
    )
    add_bool(
        g,
        "--finetune",
        "load only the weights: iteration 0, fresh optimizer, LR schedule, RNG and data position",
    )
    g.add_argument(
        "--pretrained-checkpoint",
        type=str,
        default=None,
        help="the weights to start from when --load holds no checkpoint yet (loaded as "
        "--finetune), so a preempted fine-tune resumes from its own saves",
    )


def checkpoint_values(ckpt: Path, info: dict) -> dict:
    """fusedkv-pretrain's argument values that the run info of `ckpt` fixes."""
    from .. import checkpoint_format as fmt

    m, kv, tok = info["model"], info["kv_sharing"], info["tokenizer"]
    stored = fmt.tokenizer_path(ckpt, info)
    values = {
        "num_layers": m["num_layers"],
        "hidden_size": m["hidden_size"],
        "ffn_hidden_size": m["ffn_hidden_size"],
        "num_attention_heads": m["num_attention_heads"],
        "num_query_groups": m["num_query_groups"],
        "kv_channels": m["kv_channels"],
        "seq_length": m["seq_length"],
        "rotary_base": float(m["rotary_base"]),
        "rotary_interleaved": bool(m["rotary_interleaved"]),
        "norm_epsilon": float(m["layernorm_epsilon"]),
        "untie_embeddings_and_output_weights": not m["share_embeddings_and_output_weights"],
        "kv_sharing": kv["variant"],
        "kv_source_layers": list(kv["source_layers"]) if kv["source_layers"] else None,
        "shared_fusion_weights": not kv["weights_per_head"],
        "fusion_init": kv["fusion_init"],
        "tokenizer_type": tok["type"],
        "tokenizer_model": str(stored) if stored is not None else None,
    }
    if tok["type"] == "NullTokenizer":
        values["vocab_size"] = tok["vocab_size"]
    return values


def checkpoint_to_load(args: argparse.Namespace) -> tuple[Path | None, str]:
    """The iteration directory a run will load and the flag that names it: the latest under
    --load, else under --pretrained-checkpoint; (None, "") when neither holds one."""
    from .checkpointing import resolve_load_dir

    if args.load:
        ckpt = resolve_load_dir(args.load, args.save)
        if ckpt is not None:
            return ckpt, "--load"
    if args.pretrained_checkpoint:
        ckpt = resolve_load_dir(args.pretrained_checkpoint, None)
        if ckpt is None:
            raise ArgumentError(
                f"--pretrained-checkpoint {args.pretrained_checkpoint} holds no checkpoint; pass "
                "a directory written by fusedkv-pretrain --save or fusedkv-convert-variant --save"
            )
        return ckpt, "--pretrained-checkpoint"
    return None, ""


def apply_checkpoint_args(args: argparse.Namespace) -> None:
    """--use-checkpoint-args: fill the model and tokenizer flags from the checkpoint to load;
    also checks --finetune/--pretrained-checkpoint combinations."""
    if args.finetune and not (args.load or args.pretrained_checkpoint):
        raise ArgumentError("--finetune loads weights: it needs --load or --pretrained-checkpoint")
    if not args.use_checkpoint_args:
        return
    from .. import checkpoint_format as fmt

    ckpt, _ = checkpoint_to_load(args)
    if ckpt is None:
        raise ArgumentError(
            f"--use-checkpoint-args: no checkpoint under --load {args.load}"
            + ("" if args.pretrained_checkpoint else " and no --pretrained-checkpoint")
            + "; pass the model flags (or --config) instead"
        )
    given = set(getattr(args, "given_flags", ()))
    conflicts = []
    for dest, value in checkpoint_values(ckpt, fmt.read_run_info(ckpt)).items():
        mine = getattr(args, dest)
        if dest in given:
            if dest not in _MAY_DIFFER and _normal(mine) != _normal(value):
                conflicts.append(f"{flag(dest)} {_show(mine)} (the checkpoint: {_show(value)})")
            continue
        setattr(args, dest, value)
    if conflicts:
        raise ArgumentError(
            f"--use-checkpoint-args: flags disagree with {ckpt / fmt.RUN_FILE}: "
            + "; ".join(conflicts)
            + ". Drop them to use the checkpoint's values"
        )


def _normal(value):
    if isinstance(value, tuple | list):
        return [_normal(v) for v in value]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return value


def _show(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list | tuple):
        return " ".join(map(str, value))
    return str(value)
