"""Command line and YAML configuration of `fusedkv-pretrain`.

Flag names follow Megatron-LM's wherever the meaning is the same; `--kv-sharing` and a few
FusedKV options are ours. `--config FILE` reads a YAML file whose keys are the same flag names
(with dashes or underscores); flags given on the command line override it. Boolean flags also
accept a `--no-` form (e.g. `--no-bf16`) so a command line can switch off what a YAML switched on.
`validate_args` checks combinations and derives sizes; every error names the value and the fix.

Flag groups with rules of their own live in `flags_<topic>.py` modules (`add_<topic>_flags`,
`check_<topic>_args`), hooked in one line each in `build_parser` and `validate_args`. Nothing
here imports torch or Megatron at module level, so `--help` and argument errors stay fast.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from pathlib import Path

import yaml

from ..config import FUSION_INITS, VARIANTS
from .flag_utils import ArgumentError, add_bool, check_positive
from .flags_checkpoint import add_checkpoint_flags, apply_checkpoint_args
from .flags_context import add_context_flags, check_context_args
from .flags_fastpath import add_fastpath_flags, check_fastpath_args
from .flags_observability import add_observability_flags, check_observability_args
from .flags_saving import add_saving_flags, check_saving_args
from .flags_schedule import ALTERNATIVES, add_schedule_flags, check_schedule_args

__all__ = ["ArgumentError", "build_parser", "parse_args", "validate_args"]

# The model shape has no default, as in Megatron-LM (a missing --config trained a toy model).
SHAPE_FLAGS = ("num_layers", "hidden_size", "num_attention_heads", "seq_length")
FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")
TRANSFORMER_IMPLS = ("transformer_engine", "local")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fusedkv-pretrain",
        description="Pretrain a FusedKV (or baseline KV-sharing) language model on Megatron-Core.",
        allow_abbrev=False,
    )
    p.add_argument(
        "--config",
        type=str,
        default=None,
        help="YAML file with defaults (keys are these flag names); flags override it",
    )

    g = p.add_argument_group("model")
    g.add_argument(
        "--kv-sharing",
        choices=VARIANTS,
        default="fusedkv",
        help="KV-sharing variant (default fusedkv)",
    )
    g.add_argument(
        "--kv-source-layers",
        type=int,
        nargs=2,
        default=None,
        metavar=("BOTTOM", "MIDDLE"),
        help="1-based source layers of the top half (default: 1 and L/2)",
    )
    g.add_argument(
        "--fusion-init",
        choices=FUSION_INITS,
        default="normal",
        help="fusion weight init: normal = N(0,1) as in the paper; lite = our Lite-equivalent "
        "start; uniform = 1/(number of sources) each (the dense_probe's start); equivalent = "
        "the paper appendix's start that reproduces iterative fusion (docs/uptraining.md)",
    )
    add_bool(
        g,
        "--shared-fusion-weights",
        "one fusion vector per head_dim shared over KV heads (default: one per KV head)",
    )
    g.add_argument("--num-layers", type=int, default=None, help="required (or --config)")
    g.add_argument("--hidden-size", type=int, default=None, help="required (or --config)")
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default 3 * hidden")
    g.add_argument("--num-attention-heads", type=int, default=None, help="required (or --config)")
    g.add_argument(
        "--num-query-groups",
        type=int,
        default=None,
        help="KV heads (default: = heads; heads/2 for --kv-sharing gqa)",
    )
    g.add_argument("--kv-channels", type=int, default=None, help="head dim (default hidden/heads)")
    g.add_argument("--seq-length", type=int, default=None, help="required (or --config)")
    g.add_argument("--max-position-embeddings", type=int, default=None)
    g.add_argument("--rotary-base", type=float, default=1_000_000.0)
    add_bool(g, "--rotary-interleaved", "interleaved RoPE pairs (2j, 2j+1)")
    g.add_argument("--norm-epsilon", type=float, default=1e-6)
    add_bool(
        g,
        "--untie-embeddings-and-output-weights",
        "separate output layer (Megatron's flag; default: tied to the input embedding)",
    )
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=None)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    g.add_argument(
        "--num-layers-in-first-pipeline-stage",
        type=int,
        default=None,
        help="uneven stages: layers of the first stage (the rest split evenly)",
    )
    g.add_argument(
        "--num-layers-in-last-pipeline-stage",
        type=int,
        default=None,
        help="uneven stages: layers of the last stage (the rest split evenly)",
    )
    add_bool(g, "--sequence-parallel", "sequence parallelism (needs TP > 1)")
    add_bool(g, "--use-distributed-optimizer", "shard optimizer state over data-parallel ranks")
    add_bool(g, "--overlap-grad-reduce", "overlap the data-parallel gradient reduce with backward")
    g.add_argument(
        "--distributed-backend",
        choices=("nccl", "gloo"),
        default=None,
        help="default: nccl with CUDA, gloo without",
    )
    g.add_argument("--distributed-timeout-minutes", type=int, default=10)

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=2)
    g.add_argument(
        "--global-batch-size",
        type=int,
        default=None,
        help="default micro-batch-size * data-parallel size",
    )
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    add_bool(g, "--bf16", "bfloat16 parameters and compute (fp32 main weights in the optimizer)")
    add_bool(g, "--fp16", "float16 with dynamic loss scaling")
    g.add_argument("--loss-scale", type=float, default=None, help="fp16: a static loss scale")
    g.add_argument("--initial-loss-scale", type=float, default=2.0**32)
    g.add_argument("--min-loss-scale", type=float, default=1.0)
    g.add_argument("--loss-scale-window", type=float, default=1000)
    g.add_argument("--hysteresis", type=int, default=2)
    g.add_argument(
        "--fp8-format",
        choices=FP8_FORMATS,
        default=None,
        help="FP8 through Transformer Engine (needs TE and a GPU)",
    )
    g.add_argument("--fp8-recipe", choices=FP8_RECIPES, default="delayed")
    g.add_argument(
        "--transformer-impl",
        choices=TRANSFORMER_IMPLS,
        default=None,
        help="Megatron-LM's flag: transformer_engine (its default, needs TE and CUDA) or local "
        "(torch modules, SDPA attention); default transformer_engine with CUDA, local without",
    )
    g.add_argument("--recompute-granularity", choices=("full", "selective"), default=None)
    g.add_argument("--recompute-method", choices=("uniform", "block"), default=None)
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument(
        "--max-consecutive-skipped-iters",
        type=int,
        default=5,
        help="stop after this many iterations in a row with a NaN/inf loss or grad norm",
    )
    g.add_argument("--exit-duration-in-mins", type=float, default=None)
    g.add_argument(
        "--exit-interval",
        type=int,
        default=None,
        help="save and exit when iteration %% exit-interval == 0",
    )
    g.add_argument(
        "--inject-nan-iters", type=int, nargs="+", default=None, help=argparse.SUPPRESS
    )  # fault injection for tests: NaN loss at these iters
    g.add_argument(
        "--inject-kill-during-save",
        nargs="?",
        const="before-commit",
        default=None,
        help=argparse.SUPPRESS,
    )  # fault injection for tests: SIGKILL at this point of a save (checkpointing.CRASH_POINTS)
    add_bool(g, "--skip-train", "no training: load, evaluate validation (and test) and exit")

    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=10)
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--tensorboard-dir", type=str, default=None)
    g.add_argument(
        "--wandb-project",
        type=str,
        default=None,
        help="also log every TensorBoard scalar to this Weights & Biases project "
        "(pip install 'fusedkv_megatron[wandb]'; WANDB_MODE=offline logs without a network)",
    )
    g.add_argument("--wandb-exp-name", type=str, default=None, help="the W&B run name")
    g.add_argument(
        "--wandb-save-dir",
        type=str,
        default=None,
        help="where W&B writes its files (default: SAVE/wandb with --save, else ./wandb)",
    )

    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", type=str, default=None)
    g.add_argument("--load", type=str, default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument(
        "--keep-latest-k",
        type=int,
        default=0,
        help="after each save delete all but the K newest checkpoints (the latest is never "
        "deleted); 0 keeps all (default)",
    )
    g.add_argument(
        "--no-load-optim",
        action="store_true",
        help="load weights, iteration and data position only (fresh Adam moments)",
    )
    g.add_argument("--no-load-rng", action="store_true", help="do not restore RNG states")
    add_saving_flags(p)

    g = p.add_argument_group("data")
    g.add_argument(
        "--data-path",
        nargs="+",
        default=None,
        help="prefix of .bin/.idx, or a weighted blend: 0.7 A 0.3 B",
    )
    for which in ("train", "valid", "test"):
        g.add_argument(
            f"--{which}-data-path",
            nargs="+",
            default=None,
            help=f"the {which} split's own prefix(es)/blend (instead of --data-path + --split)",
        )
    g.add_argument("--split", type=str, default="969,30,1")
    g.add_argument("--data-cache-path", type=str, default=None)
    add_bool(g, "--mock-data", "train on generated tokens (no dataset needed)")
    g.add_argument(
        "--tokenizer-type",
        choices=("SentencePieceTokenizer", "HuggingFaceTokenizer", "NullTokenizer"),
        default=None,
        help="default with --tokenizer-model: HuggingFaceTokenizer for a directory, "
        "SentencePieceTokenizer for a file; NullTokenizer without it",
    )
    g.add_argument(
        "--tokenizer-model",
        type=str,
        default=None,
        help="a SentencePiece .model file, or a local Hugging Face tokenizer directory",
    )
    g.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer vocabulary size")

    # Flag modules, one line each (flags_<topic>.py: add_<topic>_flags).
    add_schedule_flags(p)
    add_checkpoint_flags(p)
    add_context_flags(p)
    add_observability_flags(p)
    add_fastpath_flags(p)
    return p


def _yaml_argv(
    path: str, parser: argparse.ArgumentParser, replaced: set[str] = frozenset()
) -> list[str]:
    """Turn a YAML config into argv tokens (so argparse checks types and choices), leaving out
    the keys in `replaced`."""
    file = Path(path)
    if not file.is_file():
        raise ArgumentError(f"--config {path}: file not found; see examples/configs/ for examples")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as e:
        raise ArgumentError(f"--config {path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ArgumentError(f"--config {path}: expected a mapping of flag names to values")
    known = {a.dest: a for a in parser._actions}
    argv: list[str] = []
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in known or dest in ("config", "help"):
            raise ArgumentError(
                f"--config {path}: unknown key {key!r}; keys are the flag names of "
                "fusedkv-pretrain --help (without the leading dashes)"
            )
        flag = "--" + dest.replace("_", "-")
        if dest in replaced:
            continue
        if isinstance(known[dest], argparse.BooleanOptionalAction):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(known[dest], argparse._StoreTrueAction):
            argv += [flag] if value else []
        elif value is None:
            continue
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def parse_args(
    argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None
) -> argparse.Namespace:
    """Parse YAML (--config) then the command line; flags override the YAML, and a flag
    replaces the YAML's other spellings of the same setting (ALTERNATIVES: --train-samples
    replaces a YAML train-iters). `parser` is build_parser() or an extension of it
    (fusedkv-plan adds its machine flags)."""
    parser = parser or build_parser()
    first, _ = parser.parse_known_args(argv)
    cli = list(argv) if argv is not None else sys.argv[1:]
    if first.config:
        on_cli = _given(parser, cli)
        replaced = {d for group in ALTERNATIVES if on_cli & set(group) for d in group} - on_cli
        cli = _yaml_argv(first.config, parser, replaced) + cli
    args = parser.parse_args(cli)
    args.given_flags = sorted(_given(parser, cli))
    return args


def _given(parser: argparse.ArgumentParser, cli: list[str]) -> set[str]:
    """The dests set on the command line or in --config (what a checkpoint may not override)."""
    defaults = {a.dest: a.default for a in parser._actions}
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        return set(vars(parser.parse_args(cli)))
    finally:
        for action in parser._actions:
            action.default = defaults[action.dest]


def check_model_shape(args: argparse.Namespace) -> None:
    """The shape flags are required (Megatron-LM's rule); no torch needed to say so."""
    missing = [name for name in SHAPE_FLAGS if getattr(args, name, None) is None]
    if missing:
        raise ArgumentError(
            "the model shape is not set: missing "
            + ", ".join("--" + m.replace("_", "-") for m in missing)
            + ". Pass --config FILE (examples/configs/: tiny.yaml for a CPU try, 332m, 650m, "
            "1.5b, 4b) or --num-layers, --hidden-size, --num-attention-heads and --seq-length "
            "(or --use-checkpoint-args with --load to take them from a checkpoint)"
        )


def _check_transformer_impl(args: argparse.Namespace, cuda: bool) -> None:
    """Resolve the default (Megatron-LM's transformer_engine where CUDA is; local without) and
    refuse Transformer Engine where it cannot run, naming the import error."""
    if args.transformer_impl is None:
        args.transformer_impl = "transformer_engine" if cuda else "local"
        given = "the default with CUDA"
    else:
        given = "asked for"
    if args.transformer_impl != "transformer_engine":
        return
    if not cuda:
        raise ArgumentError(
            "--transformer-impl transformer_engine needs a CUDA GPU and none is visible; use "
            "--transformer-impl local"
        )
    from ..spec import transformer_engine_import_error

    error = transformer_engine_import_error()
    if error is not None:
        raise ArgumentError(
            f"--transformer-impl transformer_engine ({given}), but 'import "
            f"transformer_engine.pytorch' fails: {error}. Install a working Transformer Engine "
            "(pip install -e '.[te]') or pass --transformer-impl local"
        )


def validate_args(args: argparse.Namespace, world_size: int, cuda: bool) -> argparse.Namespace:
    """Check flag combinations against the world size; fill derived values in place."""
    apply_checkpoint_args(args)  # first: the model shape may come from the checkpoint
    check_model_shape(args)
    check_positive(
        args,
        "num_layers",
        "hidden_size",
        "num_attention_heads",
        "seq_length",
        "micro_batch_size",
        "global_batch_size",
        "eval_interval",
        "log_interval",
        "save_interval",
        "tensor_model_parallel_size",
        "pipeline_model_parallel_size",
        "exit_interval",
        "max_consecutive_skipped_iters",
    )
    if args.keep_latest_k < 0:
        raise ArgumentError(f"--keep-latest-k={args.keep_latest_k} must be >= 0 (0 keeps all)")
    if args.eval_iters < 0:
        raise ArgumentError(f"--eval-iters={args.eval_iters} must be >= 0 (0 disables evaluation)")
    if args.bf16 and args.fp16:
        raise ArgumentError("--bf16 and --fp16 are both set; choose one")
    check_fastpath_args(args, cuda)
    _check_transformer_impl(args, cuda)
    if args.fp8_format is not None:
        if args.transformer_impl != "transformer_engine":
            raise ArgumentError(
                f"--fp8-format {args.fp8_format} needs Transformer Engine (--transformer-impl "
                f"transformer_engine on a CUDA GPU; cuda available: {cuda}); drop "
                "--fp8-format/--fp8-recipe otherwise"
            )
        if not (args.bf16 or args.fp16):
            raise ArgumentError("--fp8-format needs --bf16 (or --fp16) for the non-FP8 parts")

    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if world_size % (tp * pp):
        raise ArgumentError(
            f"world size {world_size} is not divisible by tensor-model-parallel-size {tp} x "
            f"pipeline-model-parallel-size {pp}; launch a multiple of {tp * pp} processes"
        )
    args.data_parallel_size = world_size // (tp * pp)
    check_context_args(args, world_size)  # divides the data-parallel size by CP
    if args.sequence_parallel and tp == 1:
        raise ArgumentError("--sequence-parallel needs --tensor-model-parallel-size > 1")

    if args.kv_sharing == "gqa" and args.num_query_groups is None:
        args.num_query_groups = args.num_attention_heads // 2  # the paper's half-cache GQA
    if args.num_query_groups is None:
        args.num_query_groups = args.num_attention_heads
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = 3 * args.hidden_size
    if args.kv_channels is None:
        if args.hidden_size % args.num_attention_heads:
            raise ArgumentError(
                f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads "
                f"{args.num_attention_heads}; set --kv-channels explicitly"
            )
        args.kv_channels = args.hidden_size // args.num_attention_heads
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length

    vpp = args.virtual_pipeline_model_parallel_size
    if args.num_layers_per_virtual_pipeline_stage is not None:
        per = args.num_layers_per_virtual_pipeline_stage
        if vpp is not None:
            raise ArgumentError(
                "set only one of --num-layers-per-virtual-pipeline-stage and "
                "--virtual-pipeline-model-parallel-size"
            )
        if args.num_layers % (pp * per):
            raise ArgumentError(
                f"--num-layers {args.num_layers} is not divisible by pipeline size {pp} x "
                f"--num-layers-per-virtual-pipeline-stage {per}"
            )
        vpp = args.num_layers // (pp * per)
    if vpp is not None and vpp <= 1:
        vpp = None
    if vpp is not None and pp == 1:
        raise ArgumentError("a virtual pipeline needs --pipeline-model-parallel-size > 1")
    args.virtual_pipeline_model_parallel_size = vpp
    # How layers split over (uneven) stages, the sequence over TP/CP ranks and microbatches
    # over the interleaved schedule are the library's rules (pipeline.check_layout, run at
    # start-up); KV heads over TP are KVSharingConfig.validate's.

    dp = args.data_parallel_size
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    if args.global_batch_size % (args.micro_batch_size * dp):
        raise ArgumentError(
            f"--global-batch-size {args.global_batch_size} is not a multiple of "
            f"--micro-batch-size {args.micro_batch_size} x data-parallel size {dp}"
        )
    args.num_microbatches = args.global_batch_size // (args.micro_batch_size * dp)

    if args.recompute_method is not None and args.recompute_granularity != "full":
        raise ArgumentError("--recompute-method needs --recompute-granularity full")
    if args.recompute_granularity == "full" and (
        args.recompute_method is None or args.recompute_num_layers is None
    ):
        raise ArgumentError(
            "--recompute-granularity full needs --recompute-method "
            "(uniform|block) and --recompute-num-layers"
        )

    if args.skip_train and args.load is None:
        raise ArgumentError("--skip-train evaluates a checkpoint: it needs --load DIR")

    per_split = args.train_data_path or args.valid_data_path or args.test_data_path
    if args.mock_data and (args.data_path or per_split):
        raise ArgumentError("--mock-data and a data path are both set; choose one")
    if args.data_path and per_split:
        raise ArgumentError(
            "--data-path (cut by --split) and --train/valid/test-data-path are both set; "
            "choose one way to give the data"
        )
    if per_split and not args.train_data_path and not args.skip_train:
        raise ArgumentError("--valid/test-data-path without --train-data-path: no training data")
    if not args.mock_data and not args.data_path and not per_split:
        raise ArgumentError(
            "no data: pass --data-path PREFIX (see tools/preprocess_data.py) "
            "or --mock-data for generated tokens"
        )
    if args.tokenizer_type is None:
        if not args.tokenizer_model:
            args.tokenizer_type = "NullTokenizer"
        elif os.path.isdir(args.tokenizer_model):
            args.tokenizer_type = "HuggingFaceTokenizer"
        else:
            args.tokenizer_type = "SentencePieceTokenizer"
    if args.tokenizer_type != "NullTokenizer" and not args.tokenizer_model:
        what = "DIR" if args.tokenizer_type == "HuggingFaceTokenizer" else "PATH"
        raise ArgumentError(
            f"--tokenizer-type {args.tokenizer_type} needs --tokenizer-model {what}"
        )
    if args.tokenizer_type == "NullTokenizer":
        if args.tokenizer_model:
            raise ArgumentError("--tokenizer-model is set but --tokenizer-type is NullTokenizer")
        if args.vocab_size is None:
            if not args.mock_data:
                raise ArgumentError("NullTokenizer needs --vocab-size (the largest token id + 1)")
            args.vocab_size = 512
    if (args.wandb_exp_name or args.wandb_save_dir) and not args.wandb_project:
        raise ArgumentError("--wandb-exp-name/--wandb-save-dir need --wandb-project NAME")
    if args.wandb_project and importlib.util.find_spec("wandb") is None:
        raise ArgumentError(
            f"--wandb-project {args.wandb_project} needs the wandb package, which is not "
            "installed: pip install 'fusedkv_megatron[wandb]' (or pip install wandb), or drop "
            "--wandb-project"
        )
    if args.exit_duration_in_mins is not None and not math.isfinite(args.exit_duration_in_mins):
        raise ArgumentError(f"--exit-duration-in-mins={args.exit_duration_in_mins} must be finite")

    # Flag-module checks, one line each (flags_<topic>.py: check_<topic>_args); they run after
    # the derivations above (data-parallel size, batch sizes, tokenizer type).
    check_schedule_args(args)
    check_observability_args(args, world_size, cuda)
    check_saving_args(args, ArgumentError)
    return args
