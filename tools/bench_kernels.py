"""Benchmark the FusedKV attention kernels on a GPU (training fwd+bwd, and decode).

Training (causal, bf16, q [s, b, hq, d], b = tokens // s):
  fused          the Triton kernel, fusedkv (K = a1*K1 + an*Kn, V = b1*V1 + bn*Vn): grads
                 for q, the four sources and the four weights
  materialize    fuse K/V in torch, then SDPA (flash backend), same grads through autograd
  vanilla        SDPA flash on one K and V (what a vanilla MHA layer costs)
  lite-fused     the Triton kernel with one unweighted source each (= plain flash attention)
TFLOP/s count causal attention only: fwd 2*b*hq*s^2*d, fwd+bwd 3.5x that.

Decode (one query token, b sequences of cache length S): the split/combine Triton kernel
for fusedkv (reads 4 caches) and lite (2 caches, the I/O of MHA), materialize + SDPA, and
vanilla SDPA; each against its I/O bound = bytes that must be read / the copy bandwidth
measured here (device-to-device copy, read + write). Issue target: fused <= 1.15x bound.

Usage: python tools/bench_kernels.py [--seqs 2048 8192 32768] [--markdown out.md]
       python tools/bench_kernels.py --sweep   # time a few block configs at s=8192
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))  # compile_matrix

from fusedkv_megatron.fusion import KVFusion, fuse  # noqa: E402
from fusedkv_megatron.kernels.launch import KernelConfig  # noqa: E402
from fusedkv_megatron.kernels.triton_attention import (  # noqa: E402
    GPU_CONFIGS,
    fused_reconstruction_attention,
)
from fusedkv_megatron.kernels.triton_common import padded_head_dim  # noqa: E402
from fusedkv_megatron.kernels.triton_decode import (  # noqa: E402
    decode_io_bytes,
    fused_reconstruction_decode,
)

# --smoke-cpu switches to CPU and fp32 (the Triton interpreter): a check of this script.
DEVICE, DTYPE = "cuda", torch.bfloat16


def timed_ms(fn) -> float:
    if DEVICE == "cpu":
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Achievable HBM bandwidth (bytes/s): a device-to-device copy, counting read + write."""
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=DEVICE)
    y = torch.empty_like(x)
    ms = timed_ms(lambda: y.copy_(x))
    return 2 * nbytes / (ms * 1e-3)


def peak_mib(fn) -> float:
    if DEVICE == "cpu":
        return 0.0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _sdpa(q, k, v):
    """Causal SDPA on sbhd tensors with GQA, flash backend only."""
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out = F.scaled_dot_product_attention(
            q.permute(1, 2, 0, 3),
            k.permute(1, 2, 0, 3),
            v.permute(1, 2, 0, 3),
            is_causal=True,
            enable_gqa=q.shape[2] != k.shape[2],
        )
    return out.permute(2, 0, 1, 3)


def training_rows(
    seq: int,
    tokens: int,
    hq: int,
    hk: int,
    d: int,
    bandwidth: float = 0.0,
    only: tuple[str, ...] | None = None,
) -> list[dict]:
    """Rows for the training methods (all four, or `only` these); `bandwidth` is unused
    (decode_rows' signature)."""
    b = max(1, tokens // seq)
    dev, dt = DEVICE, DTYPE

    def leaf(*shape, dtype=dt):
        return torch.randn(*shape, device=dev, dtype=dtype).requires_grad_(True)

    q = leaf(seq, b, hq, d)
    srcs = [leaf(seq, b, hk, d) for _ in range(4)]
    ws = [leaf(hk, d, dtype=torch.float32) for _ in range(4)]
    do = torch.randn(seq, b, hq, d, device=dev, dtype=dt)
    # name: (forward, the leaves it differentiates)
    methods = {
        "fused": (
            lambda: fused_reconstruction_attention(q, KVFusion(srcs[:2], ws[:2], srcs[2:], ws[2:])),
            [q, *srcs, *ws],
        ),
        "materialize": (
            lambda: _sdpa(q, fuse(srcs[:2], ws[:2]), fuse(srcs[2:], ws[2:])),
            [q, *srcs, *ws],
        ),
        "vanilla": (lambda: _sdpa(q, srcs[0], srcs[2]), [q, srcs[0], srcs[2]]),
        "lite-fused": (
            lambda: fused_reconstruction_attention(
                q, KVFusion(srcs[1:2], [None], srcs[2:3], [None])
            ),
            [q, srcs[1], srcs[2]],
        ),
    }
    flops = 2 * b * hq * seq * seq * d  # causal forward: 4*b*h*s^2*d / 2
    rows = []
    for name, (fn, leaves) in methods.items():
        if only is not None and name not in only:
            continue

        def step(fn=fn, leaves=leaves):
            return torch.autograd.grad(fn(), leaves, do)

        with torch.no_grad():
            fwd = timed_ms(fn)
        both = timed_ms(step)
        rows.append(
            dict(
                kind="train",
                method=name,
                seq=seq,
                batch=b,
                fwd_ms=fwd,
                fwd_bwd_ms=both,
                fwd_tflops=flops / fwd / 1e9,
                fwd_bwd_tflops=3.5 * flops / both / 1e9,
                peak_mib=peak_mib(step),
            )
        )
    return rows


def decode_rows(
    seq: int,
    batch: int,
    hq: int,
    hk: int,
    d: int,
    bandwidth: float,
    only: tuple[str, ...] | None = None,
) -> list[dict]:
    """Rows for the decode methods (all four, or `only` these)."""
    dev, dt = DEVICE, DTYPE
    q = torch.randn(batch, 1, hq, d, device=dev, dtype=dt)
    caches = [torch.randn(batch, seq, hk, d, device=dev, dtype=dt) for _ in range(4)]
    ws = [torch.randn(hk, d, device=dev) for _ in range(4)]

    def sdpa(k, v):
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=hq != hk
        )

    methods = {
        "fused": (
            lambda: fused_reconstruction_decode(
                q, KVFusion(caches[:2], ws[:2], caches[2:], ws[2:])
            ),
            caches,
        ),
        "lite-fused": (
            lambda: fused_reconstruction_decode(
                q, KVFusion(caches[1:2], [None], caches[2:3], [None])
            ),
            caches[1:3],
        ),
        "materialize": (lambda: sdpa(fuse(caches[:2], ws[:2]), fuse(caches[2:], ws[2:])), caches),
        "vanilla": (lambda: sdpa(caches[0], caches[2]), caches[::2]),
    }
    rows = []
    for name, (fn, read) in methods.items():
        if only is not None and name not in only:
            continue
        with torch.no_grad():
            ms = timed_ms(fn)
        bound_ms = decode_io_bytes(q, read) / bandwidth * 1e3
        rows.append(
            dict(
                kind="decode",
                method=name,
                seq=seq,
                batch=batch,
                ms=ms,
                bound_ms=bound_ms,
                x_bound=ms / bound_ms,
                gbps=decode_io_bytes(q, read) / (ms * 1e-3) / 1e9,
            )
        )
    return rows


def sweep(hq: int, hk: int, d: int, seq: int = 8192, decode_batch: int = 8) -> None:
    """Time a few block configurations per kernel: fused fwd and fwd+bwd at `seq` (b = 1),
    and fusedkv decode at 4 * `seq` (its time / I/O bound). Defaults are among them."""
    from fusedkv_megatron.kernels import triton_decode

    k = KernelConfig
    candidates = {
        "fwd": [
            k(128, 64, 4, 3),
            k(128, 64, 8, 3),
            k(128, 64, 8, 2),
            k(64, 64, 4, 3),
            k(128, 128, 8, 2),
        ],
        "dkdv": [
            k(32, 64, 8, 3),
            k(32, 64, 8, 2),
            k(32, 128, 8, 2),
            k(64, 64, 8, 2),
            k(16, 64, 4, 2),
        ],
        "dq": [k(128, 64, 8, 2), k(128, 32, 8, 3), k(64, 64, 8, 2), k(64, 32, 4, 3)],
        "decode": [
            k(16, 64, 4, 3),
            k(16, 32, 4, 3),
            k(16, 64, 8, 3),
            k(16, 128, 8, 2),
            k(16, 32, 8, 4),
        ],
    }
    tables = dict(GPU_CONFIGS, decode=triton_decode.GPU_CONFIG)
    d_table = padded_head_dim(d)  # the tables are keyed by the padded width
    bandwidth = copy_bandwidth(2 << 20 if DEVICE == "cpu" else 2 << 30)
    for kind, configs in candidates.items():
        default = tables[kind].get(d_table)
        for cfg in configs:
            tables[kind][d_table] = cfg
            try:
                if kind == "decode":
                    row = decode_rows(4 * seq, decode_batch, hq, hk, d, bandwidth, ("fused",))[0]
                    result = f"decode {row['ms'] * 1e3:.1f} us = {row['x_bound']:.2f}x bound"
                else:
                    row = training_rows(seq, seq, hq, hk, d, only=("fused",))[0]
                    result = f"fwd {row['fwd_ms']:.3f} ms, fwd+bwd {row['fwd_bwd_ms']:.3f} ms"
                print(f"{kind:6s} {cfg}: {result}", flush=True)
            except Exception as err:  # a config that does not compile is a result too
                print(f"{kind:6s} {cfg}: failed: {err}", flush=True)
        if default is not None:
            tables[kind][d_table] = default


def compile_only(arch: int, head_dims: tuple[int, ...]) -> int:
    """Compile each kernel's fusedkv specialisation at `head_dims` for sm_`arch` without a GPU
    and print shared memory, registers and spills: tools/compile_matrix.py with its base
    calls only (that tool compiles every specialisation). Returns the number of failures."""
    import compile_matrix

    rows, failures = compile_matrix.run(arch, head_dims, full=False, axes_at=())
    print(compile_matrix.table(rows))
    return failures


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"GPU: {meta['gpu']}; torch {meta['torch']}, triton {meta['triton']}; "
        f"{meta['date']}; hq={meta['hq']} hkv={meta['hk']} d={meta['d']} bf16; "
        f"copy bandwidth {meta['bandwidth'] / 1e12:.2f} TB/s",
        "",
        "| training | seq | batch | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | "
        "peak MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["kind"] == "train":
            lines.append(
                f"| {r['method']} | {r['seq']} | {r['batch']} | {r['fwd_ms']:.3f} | "
                f"{r['fwd_tflops']:.0f} | {r['fwd_bwd_ms']:.3f} | "
                f"{r['fwd_bwd_tflops']:.0f} | {r['peak_mib']:.0f} |"
            )
    lines += [
        "",
        "| decode (t=1) | seq | batch | us | I/O bound us | x bound | GB/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["kind"] == "decode":
            lines.append(
                f"| {r['method']} | {r['seq']} | {r['batch']} | {r['ms'] * 1e3:.1f} | "
                f"{r['bound_ms'] * 1e3:.1f} | {r['x_bound']:.2f} | {r['gbps']:.0f} |"
            )
    lines += ["", "Throughput relative to MHA-equivalent I/O (paper: FusedKV kernel -28.4%):"]
    by = {(r["kind"], r["method"], r["seq"]): r for r in rows}
    for (kind, method, seq), r in sorted(by.items()):
        if method != "fused":
            continue
        if kind == "train":
            base = by[(kind, "vanilla", seq)]["fwd_bwd_ms"]
            mat = by[(kind, "materialize", seq)]["fwd_bwd_ms"]
            lines.append(
                f"- train s={seq}: fused vs vanilla flash {base / r['fwd_bwd_ms'] - 1:+.1%},"
                f" vs materialize+flash {mat / r['fwd_bwd_ms'] - 1:+.1%}"
            )
        else:
            base = by[(kind, "lite-fused", seq)]["ms"]
            lines.append(f"- decode S={seq}: fusedkv vs lite (MHA I/O) {base / r['ms'] - 1:+.1%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", type=int, nargs="+", default=[2048, 8192, 32768])
    p.add_argument("--tokens", type=int, default=32768, help="training tokens per step (b*s)")
    p.add_argument("--decode-batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--markdown", type=Path)
    p.add_argument("--json", type=Path)
    p.add_argument("--sweep", action="store_true")
    p.add_argument(
        "--compile-only",
        type=int,
        metavar="ARCH",
        help="compile every kernel for sm_ARCH (e.g. 90) without a GPU; print registers/spills",
    )
    p.add_argument(
        "--smoke-cpu",
        action="store_true",
        help="run the script's flow on CPU at tiny sizes (needs TRITON_INTERPRET=1; no timings)",
    )
    args = p.parse_args(argv)
    if args.compile_only:
        dims = (args.head_dim,) if args.head_dim != 128 else (64, 96, 128, 160, 256)
        return 1 if compile_only(args.compile_only, dims) else 0
    if args.smoke_cpu:
        global DEVICE, DTYPE
        DEVICE, DTYPE = "cpu", torch.float32
    elif not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU (none found)", file=sys.stderr)
        return 2
    import triton

    torch.manual_seed(0)
    hq, hk, d = args.heads, args.kv_heads, args.head_dim
    if args.sweep:
        sweep(hq, hk, d, 8192 if DEVICE == "cuda" else args.seqs[0], args.decode_batch)
        return 0
    meta = dict(
        gpu=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke test)",
        torch=torch.__version__,
        triton=triton.__version__,
        date=datetime.date.today().isoformat(),
        hq=hq,
        hk=hk,
        d=d,
        bandwidth=copy_bandwidth(2 << 20 if DEVICE == "cpu" else 2 << 30),
    )
    rows = []
    for seq in args.seqs:
        for bench, size in ((training_rows, args.tokens), (decode_rows, args.decode_batch)):
            try:
                rows += bench(seq, size, hq, hk, d, meta["bandwidth"])
            except torch.OutOfMemoryError as err:
                print(
                    f"{bench.__name__} seq {seq}: out of memory ({err}); skipped", file=sys.stderr
                )
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
        print(f"seq {seq} done", file=sys.stderr, flush=True)
    text = markdown(rows, meta)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    return 0 if math.isfinite(sum(r.get("ms", r.get("fwd_ms", 0)) for r in rows)) else 1


if __name__ == "__main__":
    sys.exit(main())
