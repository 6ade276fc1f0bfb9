"""Forward+backward time per training step of every KV-sharing variant, as ratios to vanilla.

One process, one small config, all variants measured in the same run and interleaved round
by round (so machine noise hits every variant alike); prints the median per variant.

    .venv/bin/python tools/bench_model.py [--layers 8 --hidden 256 --heads 8 --seq 256 ...]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=768)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5, help="timed steps per variant")
    p.add_argument("--variants", nargs="*", default=None)
    args = p.parse_args()

    import fusedkv_megatron as fk
    from fusedkv_megatron import compat

    compat.apply()  # Megatron's CPU patches (no-op on a GPU), before seeding
    _init_single_process()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    variants = args.variants or list(fk.VARIANTS)
    if "vanilla" not in variants:
        variants.insert(0, "vanilla")
    models = {}
    for v in variants:
        cfg = fk.qwen3_config(
            args.layers,
            args.hidden,
            args.heads,
            num_query_groups=args.heads // 2 if v == "gqa" else None,
            ffn_hidden_size=args.ffn,
        )
        models[v] = fk.build_model(cfg, fk.KVSharingConfig(v), args.vocab, args.seq).to(device)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)
    pos = torch.arange(args.seq, device=device).expand(args.batch, -1)

    def step(model):
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(tokens, pos, None, labels=tokens).mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for m in models.values():  # warm-up
        step(m)
    times = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v, m in models.items():
            times[v].append(step(m))
    base = statistics.median(times["vanilla"])
    print(
        f"# {args.layers} layers, hidden {args.hidden}, {args.heads} heads, ffn {args.ffn}, "
        f"seq {args.seq}, batch {args.batch}, {device.type}, torch threads "
        f"{torch.get_num_threads()}, median of {args.rounds}"
    )
    print(f"{'variant':<24}{'params':>10}{'ms/step':>10}{'vs vanilla':>12}")
    for v in variants:
        ms = statistics.median(times[v]) * 1e3
        params = fk.count_parameters(models[v])
        print(f"{v:<24}{params:>10}{ms:>10.1f}{ms / (base * 1e3):>12.3f}")


if __name__ == "__main__":
    main()
