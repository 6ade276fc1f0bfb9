"""Long-context flags: context parallelism and packed documents, named as in Megatron-LM.

`--context-parallel-size N` splits each sequence over N ranks (2N load-balanced chunks); the
data-parallel size becomes world / (TP x PP x CP). `--cp-comm-type` is Transformer Engine's
exchange (the local SDPA path always all-gathers K/V). `--reset-position-ids`,
`--reset-attention-mask` and `--eod-mask-loss` are Megatron's GPTDataset options for packed
documents: position ids restart, attention stays within a document (a block-diagonal causal
mask), the loss skips EOD tokens. No torch or Megatron import here (--help stays fast).
"""

from __future__ import annotations

import argparse

CP_COMM_TYPES = ("p2p", "a2a", "allgather", "all_gather", "a2a+p2p")


def add_context_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("long context (context parallelism, packed documents)")
    g.add_argument(
        "--context-parallel-size",
        type=int,
        default=1,
        help="split each sequence over this many ranks (2N load-balanced chunks); the local "
        "attention all-gathers K/V over them, Transformer Engine uses --cp-comm-type",
    )
    g.add_argument(
        "--cp-comm-type",
        choices=CP_COMM_TYPES,
        default="p2p",
        help="Transformer Engine's context-parallel exchange (allgather = all_gather); the "
        "local SDPA attention always all-gathers K/V",
    )
    g.add_argument(
        "--reset-position-ids",
        action="store_true",
        help="position ids restart after each EOD (packed documents); RoPE is relative, so "
        "with --reset-attention-mask a document attends as if it were alone",
    )
    g.add_argument(
        "--reset-attention-mask",
        action="store_true",
        help="no attention across an EOD: a block-diagonal causal mask per packed batch "
        "(local SDPA path; reconstruction layers read their own document's sources only)",
    )
    g.add_argument(
        "--eod-mask-loss", action="store_true", help="no loss on EOD tokens (packed documents)"
    )


def check_context_args(args: argparse.Namespace, world_size: int) -> None:
    """CP's share of the layout: data-parallel size over CP, the sequence over 2N chunks, and the
    combinations that would silently attend across documents. Raises ArgumentError."""
    from .flag_utils import ArgumentError

    cp = args.context_parallel_size
    if cp < 1:
        raise ArgumentError(f"--context-parallel-size={cp} must be >= 1")
    if args.cp_comm_type == "allgather":
        args.cp_comm_type = "all_gather"  # Transformer Engine's spelling
    model_parallel = args.tensor_model_parallel_size * args.pipeline_model_parallel_size
    if world_size % (model_parallel * cp):
        raise ArgumentError(
            f"world size {world_size} is not divisible by tensor x pipeline x context parallel "
            f"size {model_parallel} x {cp}; launch a multiple of {model_parallel * cp} processes"
        )
    args.data_parallel_size = world_size // (model_parallel * cp)
    if cp > 1 and args.seq_length % (2 * cp):
        raise ArgumentError(
            f"--seq-length {args.seq_length} is not divisible by 2 x --context-parallel-size "
            f"{cp} = {2 * cp}: the sequence is split into {2 * cp} load-balanced chunks; use "
            f"a multiple of {2 * cp}"
        )
    if args.reset_attention_mask and args.transformer_impl == "transformer_engine":
        raise ArgumentError(
            "--reset-attention-mask with --transformer-impl transformer_engine: TE's causal "
            "attention ignores a dense attention mask (documents would attend to each other); "
            "use --transformer-impl local for packed documents"
        )
