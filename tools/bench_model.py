"""Forward+backward time per training step of every KV-sharing variant, as ratios to vanilla,
and of this project's vanilla against a plain Megatron-Core GPTModel (the "no overhead" check).

One process, one config, all models measured in the same run and interleaved round by round
(so machine noise hits every model alike); prints the median per model. The baseline
"megatron-gpt" is Megatron-Core's own GPTModel built from Megatron's own layer spec
(`get_gpt_layer_local_spec`, or `get_gpt_layer_with_transformer_engine_spec` with --te) with
the same TransformerConfig as this project's vanilla: the ratio vanilla / megatron-gpt is what
this project's layer spec, attention module and FusedKV plumbing cost (or save) on a model
that shares nothing. Fusions are set as the trainer sets them (on where they can run: see
fusedkv_megatron/fastpath.py), except the weight-gradient accumulation fusion, which needs
the DDP wrapper's gradient buffers.

    .venv/bin/python tools/bench_model.py [--layers 8 --hidden 256 --heads 8 --seq 256 ...]
    python tools/bench_model.py --variants vanilla fusedkv --layers 4 --hidden 1024 \\
        --heads 16 --ffn 2816 --vocab 128000 --seq 8192 --batch 1 --bf16   # 332m shape, GPU
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from pathlib import Path

import torch

BASELINE = "megatron-gpt"


def _init_single_process() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, rank=0, world_size=1)
    ps.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(0)


def _megatron_gpt(config, vocab: int, seq: int, te: bool):
    """A plain Megatron-Core GPTModel from Megatron's own layer spec, nothing of this project."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    make = get_gpt_layer_with_transformer_engine_spec if te else get_gpt_layer_local_spec
    spec = make(qk_layernorm=True, normalization="RMSNorm")
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab,
        max_sequence_length=seq,
        position_embedding_type="rope",
        rotary_base=1_000_000,
        share_embeddings_and_output_weights=False,  # as build_model by default
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=768)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5, help="timed steps per model")
    p.add_argument("--variants", nargs="*", default=None)
    p.add_argument(
        "--no-megatron-baseline",
        action="store_true",
        help="skip the plain Megatron-Core GPTModel (the no-overhead check)",
    )
    p.add_argument("--bf16", action="store_true", help="bf16 parameters and compute")
    p.add_argument("--te", action="store_true", help="Transformer Engine specs (CUDA, TE)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()

    import fusedkv_megatron as fk
    from fusedkv_megatron import compat
    from fusedkv_megatron.fastpath import fusion_fields, resolve_fusions

    compat.apply()  # Megatron's CPU patches (no-op on a GPU), before seeding
    _init_single_process()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    fusions = fusion_fields(resolve_fusions(cuda))
    fusions["gradient_accumulation_fusion"] = False  # needs DDP's main_grad buffers
    variants = args.variants or list(fk.VARIANTS)
    if "vanilla" not in variants:
        variants.insert(0, "vanilla")

    def config(variant: str):
        return fk.qwen3_config(
            args.layers,
            args.hidden,
            args.heads,
            num_query_groups=args.heads // 2 if variant == "gqa" else None,
            ffn_hidden_size=args.ffn,
            kv_sharing=fk.KVSharingConfig(variant),
            params_dtype=dtype,
            bf16=args.bf16,
            use_cpu_initialization=not cuda,
            **fusions,
        )

    models = {}
    for v in variants:
        model = fk.build_model(
            config(v), fk.KVSharingConfig(v), args.vocab, args.seq, use_transformer_engine=args.te
        )
        models[v] = model.to(device=device, dtype=dtype)
    if not args.no_megatron_baseline:
        models[BASELINE] = _megatron_gpt(config("vanilla"), args.vocab, args.seq, args.te).to(
            device=device, dtype=dtype
        )
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)
    pos = torch.arange(args.seq, device=device).expand(args.batch, -1)

    # On the CPU the clock is this process's CPU time: with one thread it is the compute time,
    # and unlike wall time it does not count the waits for a core on a shared machine.
    clock = time.perf_counter if cuda else time.process_time

    def step(model):
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        t0 = clock()
        model(tokens, pos, None, labels=tokens).float().mean().backward()
        if cuda:
            torch.cuda.synchronize()
        return clock() - t0

    peaks = {}
    for name, m in models.items():  # warm-up (and, on a GPU, each model's peak memory)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        step(m)
        if cuda:
            peaks[name] = torch.cuda.max_memory_allocated() / 2**30
    times = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, m in models.items():
            times[name].append(step(m))
    base = statistics.median(times["vanilla"])
    print(
        f"# {args.layers} layers, hidden {args.hidden}, {args.heads} heads, ffn {args.ffn}, "
        f"vocab {args.vocab}, seq {args.seq}, batch {args.batch}, "
        f"{'bf16' if args.bf16 else 'fp32'}, {'TE' if args.te else 'local'} specs, "
        f"{torch.cuda.get_device_name() if cuda else 'cpu'}, torch threads "
        f"{torch.get_num_threads()}, median of {args.rounds} "
        f"({'wall' if cuda else 'process CPU'} time); fusions on: "
        f"{', '.join(k for k, on in fusions.items() if on) or 'none'}"
    )
    mem = "  peak GiB" if cuda else ""
    print(f"{'model':<24}{'params':>12}{'ms/step':>10}{'tokens/s':>12}{'vs vanilla':>12}{mem}")
    rows = []
    for name in models:
        sec = statistics.median(times[name])
        row = dict(
            model=name,
            params=fk.count_parameters(models[name]),
            ms_per_step=sec * 1e3,
            tokens_per_s=args.batch * args.seq / sec,
            vs_vanilla=sec / base,
            peak_gib=peaks.get(name),
        )
        rows.append(row)
        extra = f"{row['peak_gib']:>10.2f}" if cuda else ""
        print(
            f"{name:<24}{row['params']:>12,}{row['ms_per_step']:>10.1f}"
            f"{row['tokens_per_s']:>12,.0f}{row['vs_vanilla']:>12.3f}{extra}"
        )
    result = dict(args=vars(args) | {"json": None}, device=str(device), rows=rows)
    if BASELINE in models:
        ratio = base / statistics.median(times[BASELINE])
        result["vanilla_vs_megatron_gpt"] = ratio
        print(
            f"no-overhead check: this project's vanilla takes {ratio:.3f}x the time of a plain "
            f"Megatron-Core GPTModel ({'TE' if args.te else 'local'} spec, same config)"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
