"""Flags of the GPU fast path: Megatron's fusion opt-outs, data-parallel overlap, and the
start-up checks that keep a GPU job from silently running somewhere slower (or failing late).

No torch or megatron import at module level (--help stays fast).
"""

from __future__ import annotations

import argparse

from ..fastpath import FUSIONS, opt_out_dest


def add_fastpath_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "fast path",
        "Megatron's fusions are on where they can run (CUDA, and Transformer Engine or apex "
        "where the fused op needs them); each flag below turns one off, as in Megatron-LM. "
        "The start-up report lists which are on and why any is off.",
    )
    for f in FUSIONS:
        g.add_argument(
            f.flag,
            dest=opt_out_dest(f),
            action="store_true",
            help=f"TransformerConfig.{f.field}=False",
        )
    g.add_argument(
        "--overlap-param-gather",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="overlap the distributed optimizer's parameter all-gather with the next forward "
        "(needs --use-distributed-optimizer and --overlap-grad-reduce)",
    )
    g.add_argument(
        "--align-param-gather",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="launch every pipeline stage's parameter all-gathers together from the schedule "
        "(Megatron's setting for an interleaved pipeline; on by itself with "
        "--overlap-param-gather and a virtual pipeline)",
    )
    g.add_argument(
        "--ddp-bucket-size",
        type=int,
        default=None,
        help="elements per gradient-reduce / param-gather bucket (default Megatron's: "
        "max(40M, 1M x data-parallel size) with --overlap-grad-reduce, one bucket without)",
    )
    g.add_argument(
        "--allow-cpu",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="train on the CPU even though GPUs are visible to the system (nvidia-smi, "
        "CUDA_VISIBLE_DEVICES, SLURM_*GPUS*) but torch cannot use them; without it that "
        "is an error",
    )


def disabled_fusions(args: argparse.Namespace) -> set[str]:
    """TransformerConfig fields whose opt-out flag is set."""
    return {f.field for f in FUSIONS if getattr(args, opt_out_dest(f), False)}


def check_fastpath_args(args: argparse.Namespace, cuda: bool) -> None:
    """Combinations of the fast-path flags, and the start-up checks of the GPU fast path.
    Raises ArgumentError naming the value and the fix."""
    from .arguments import ArgumentError

    if args.overlap_param_gather:
        if not args.use_distributed_optimizer:
            raise ArgumentError(
                "--overlap-param-gather needs --use-distributed-optimizer (only the distributed "
                "optimizer gathers parameters); add it or drop --overlap-param-gather"
            )
        if not args.overlap_grad_reduce:
            raise ArgumentError(
                "--overlap-param-gather needs --overlap-grad-reduce (Megatron overlaps the "
                "gather only together with the reduce); add it"
            )
        vpp = args.virtual_pipeline_model_parallel_size
        if (vpp or 1) > 1 or args.num_layers_per_virtual_pipeline_stage is not None:
            args.align_param_gather = True  # as Megatron-Bridge sets for an interleaved pipeline
    if args.align_param_gather and not args.overlap_param_gather:
        raise ArgumentError("--align-param-gather needs --overlap-param-gather")
    if args.ddp_bucket_size is not None and args.ddp_bucket_size <= 0:
        raise ArgumentError(f"--ddp-bucket-size={args.ddp_bucket_size} must be > 0 (elements)")
    _check_fp8_recipe(args, cuda)
    _check_forced_triton(args)


def check_gpus_usable(args: argparse.Namespace) -> None:
    """The trainer's first check on every rank: GPUs the system shows but torch cannot use
    are an error (exit 2, with the fix) unless --allow-cpu. Not part of validate_args, which
    also serves fusedkv-plan (planning on a machine without GPUs is normal)."""
    import torch

    from .arguments import ArgumentError

    if args.allow_cpu or torch.cuda.is_available():
        return
    from .gpu_visibility import gpus_visible_but_unusable

    message = gpus_visible_but_unusable()
    if message:
        raise ArgumentError(message)


def _check_fp8_recipe(args: argparse.Namespace, cuda: bool) -> None:
    """MXFP8 needs Blackwell (compute capability 10.0+); say so at start-up, not mid-step."""
    from .arguments import ArgumentError

    if args.fp8_format is None or args.fp8_recipe != "mxfp8" or not cuda:
        return
    import torch

    major, minor = torch.cuda.get_device_capability()
    if major < 10:
        raise ArgumentError(
            f"--fp8-recipe mxfp8 needs a GPU with MXFP8 support (compute capability 10.0 or "
            f"newer, Blackwell); this {torch.cuda.get_device_name()} is {major}.{minor}. Use "
            "--fp8-recipe delayed or tensorwise (Hopper), or drop --fp8-format"
        )


def _check_forced_triton(args: argparse.Namespace) -> None:
    """FUSEDKV_ATTENTION_BACKEND=triton in fp32 would make every reconstruction layer's dots
    TF32 (auto keeps fp32 on the exact materialising path): refuse at start-up."""
    import os

    from .arguments import ArgumentError

    # kernels.BACKEND_ENV, not imported: validate_args runs without torch (fusedkv-plan and
    # slurm/submit.py on a login node)
    BACKEND_ENV = "FUSEDKV_ATTENTION_BACKEND"
    if os.environ.get(BACKEND_ENV, "auto").strip().lower() != "triton":
        return
    if args.bf16 or args.fp16:
        return
    raise ArgumentError(
        f"{BACKEND_ENV}=triton with fp32 parameters: the fused kernel computes in bf16/fp16 "
        "(its dots would run in TF32). Add --bf16 (or --fp16), or unset "
        f"{BACKEND_ENV} (auto keeps fp32 on the exact path)"
    )
