"""Compile every kernel specialisation the FusedKV dispatchers launch, for a GPU, without one.

The dispatchers (`fused_reconstruction_attention` forward + backward, and
`fused_reconstruction_decode`) are called on small CPU tensors with `launch` intercepted, so
the launches are exactly what they would be on a GPU: the same kernels, arguments, constexprs
and block configurations. Each launch is specialised the way Triton's JIT does it (its own
binder: dtypes, 16-byte alignment of pointers and of integers divisible by 16, integers equal
to 1 as constants) and compiled for `sm_ARCH` with Triton's bundled ptxas; `cuobjdump` reads
registers, spills (local memory) and shared memory off the cubin.

Axes (training and decode): head dim (every multiple of 16 up to 256), sources 1 or 2 with
per-head, shared or no fusion weights, bf16/fp16, GQA group 1/2/4/8, one KV head or several
(1 is a compile-time constant for the JIT), sequence length a multiple of 16 or not; decode
also: query tokens t (BLOCK_R = 16..128 rows, t = 1 a constant) and causal or not. The
default covers every value of every axis at every head dim (one axis varied at a time from a
fusedkv base); `--full` compiles the whole product. Launches that specialise identically
(e.g. per-head and shared weights, which the host expands to one layout) compile once.

    python tools/compile_matrix.py                 # sm_90, default matrix, table on stdout
    python tools/compile_matrix.py --head-dims 96 160 --markdown out.md --json out.json

Exit status 1 if a specialisation fails to compile or needs more shared memory than the
architecture has. Compiled kernels are cached by Triton (TRITON_CACHE_DIR), so a rerun is fast.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile, never interpret

import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusedkv_megatron.fusion import KVFusion  # noqa: E402
from fusedkv_megatron.kernels import HEAD_DIMS  # noqa: E402
from fusedkv_megatron.kernels import triton_attention as ta  # noqa: E402
from fusedkv_megatron.kernels import triton_decode as td  # noqa: E402

SHARED_LIMIT_KB = {80: 163, 86: 99, 89: 99, 90: 227, 100: 227}
TERMS = ("2w", "2s", "2-", "1w", "1s", "1-")  # sources x (per-head, shared, no) weights
AXES_AT = (64, 96, 128, 160, 256)  # every tile width, and the paper configs' head dims


@dataclass(frozen=True)
class Case:
    """One dispatcher call: training (forward + backward) or decode."""

    kind: str  # "train" or "decode"
    head_dim: int
    terms: str = "2w"
    dtype: str = "bf16"
    group: int = 2
    kv_heads: int = 2
    aligned: bool = True
    tokens: int = 1  # decode query tokens
    causal: bool = True


def cases(head_dims, full: bool, axes_at=None) -> list[Case]:
    """The calls to make: the whole product with `full`; else the fusedkv base call at every
    head dim, and each axis value (one at a time) at the head dims in `axes_at` (all if None)."""
    axes = dict(
        terms=TERMS,
        dtype=("bf16", "fp16"),
        group=(1, 2, 4, 8),
        kv_heads=(1, 2),
        aligned=(True, False),
    )
    decode_axes = dict(tokens=(1, 2, 16, 32, 64), causal=(True, False))
    out = []
    for d, kind in itertools.product(head_dims, ("train", "decode")):
        base = Case(kind, d)
        ax = axes | (decode_axes if kind == "decode" else {})
        if full:
            for values in itertools.product(*ax.values()):
                out.append(replace(base, **dict(zip(ax, values, strict=True))))
            continue
        out.append(base)
        if axes_at is not None and d not in axes_at:
            continue
        for name, values in ax.items():
            out += [replace(base, **{name: v}) for v in values if v != getattr(base, name)]
        out.append(replace(base, group=1, kv_heads=1))  # one query head per program row
    return list(dict.fromkeys(out))


def _weights(kind: str, hk: int, d: int, dtype) -> torch.Tensor | None:
    return None if kind == "-" else torch.zeros(hk if kind == "w" else 1, d, dtype=dtype)


def _call(case: Case) -> None:
    """Run the dispatcher for `case` on CPU tensors (launches intercepted)."""
    dtype = torch.bfloat16 if case.dtype == "bf16" else torch.float16
    n, weight = int(case.terms[0]), case.terms[1]
    hk, hq, d = case.kv_heads, case.kv_heads * case.group, case.head_dim
    b = 2
    if case.kind == "train":
        s = 128 if case.aligned else 127
        q = torch.zeros(s, b, hq, d, dtype=dtype, requires_grad=True)
        ks = [torch.zeros(s, b, hk, d, dtype=dtype, requires_grad=True) for _ in range(n)]
        vs = [torch.zeros(s, b, hk, d, dtype=dtype, requires_grad=True) for _ in range(n)]
        ws = [_weights(weight, hk, d, torch.float32) for _ in range(2 * n)]
        out = ta.fused_reconstruction_attention(q, KVFusion(ks, ws[:n], vs, ws[n:]))
        out.backward(torch.zeros_like(out))
    else:
        S = 256 if case.aligned else 250
        q = torch.zeros(b, case.tokens, hq, d, dtype=dtype)
        caches = [torch.zeros(b, S, hk, d, dtype=dtype) for _ in range(2 * n)]
        ws = [_weights(weight, hk, d, torch.float32) for _ in range(2 * n)]
        td.fused_reconstruction_decode(
            q, KVFusion(caches[:n], ws[:n], caches[n:], ws[n:]), causal=case.causal, num_splits=4
        )


def capture(case: Case) -> list[tuple]:
    """The launches the dispatcher makes for `case`: (kernel, kind, config, args, meta)."""
    seen = []

    def fake_launch(kernel, kind, head_dim, cfg, build, device=None):
        _, args, meta = build(cfg)
        seen.append((kernel, kind, cfg, args, meta))
        return cfg

    saved = ta.launch, td.launch
    ta.launch = td.launch = fake_launch
    try:
        _call(case)
    finally:
        ta.launch, td.launch = saved
    return seen


class Compiler:
    """Specialise like the JIT and compile for one architecture."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.arch = arch
        self.target = GPUTarget("cuda", arch, 32)
        self.backend = make_backend(self.target)
        self.binders = {}
        nvidia = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
        self.cuobjdump = nvidia / "cuobjdump"

    def key_and_source(self, kernel, cfg, args, meta):
        from triton import knobs
        from triton.compiler import ASTSource
        from triton.runtime.jit import create_function_from_signature

        if kernel not in self.binders:
            self.binders[kernel] = create_function_from_signature(
                kernel.signature, kernel.params, self.backend
            )
        kwargs = dict(meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        kwargs["debug"] = bool(kernel.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        bound, specialization, options = self.binders[kernel](*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(
            self.backend, kwargs, bound, specialization, options
        )
        key = (kernel.__name__, repr(specialization), cfg.num_warps, cfg.num_stages)
        return key, ASTSource(kernel, signature, constexprs, attrs), options

    def compile(self, src, options) -> dict:
        compiled = triton.compile(src, target=self.target, options=options.__dict__)
        usage = dict(shared=compiled.metadata.shared, regs=None, local=None)
        ptx = compiled.asm["ptx"]
        usage["cp_async"] = ptx.count("cp.async.ca") + ptx.count("cp.async.cg")
        usage["tma"] = ptx.count("cp.async.bulk")
        if self.cuobjdump.exists():
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(compiled.asm["cubin"])
                f.flush()
                text = subprocess.run(
                    [str(self.cuobjdump), "--dump-resource-usage", f.name],
                    capture_output=True,
                    text=True,
                ).stdout
            # Spilled registers live in the stack frame (local memory) of the function.
            found = {k: re.search(rf"{k}:(\d+)", text) for k in ("REG", "STACK", "LOCAL")}
            value = {k: int(m.group(1)) if m else None for k, m in found.items()}
            usage["regs"] = value["REG"]
            usage["local"] = (value["STACK"] or 0) + (value["LOCAL"] or 0)
        return usage


def describe(kernel_name: str, meta: dict, case: Case) -> dict:
    """The row's identifying columns."""
    flags = "".join(
        ("K" if t[0] == "K" else "V") + ("w" if meta.get(f"ON_W{t}") else "-")
        for t in ("K1", "K2", "V1", "V2")
        if t in ("K1", "V1") or meta.get(f"{t[0]}2_ON")
    )
    return dict(
        kernel=kernel_name.strip("_").replace("_kernel", ""),
        head_dim=case.head_dim,
        dtype=case.dtype,
        terms=flags if "ON_WK1" in meta else "",
        group=meta.get("GROUP", ""),
        hk1=case.kv_heads == 1,
        aligned=case.aligned,
        rows=meta.get("BLOCK_R", ""),
        t1=case.kind == "decode" and case.tokens == 1,
        causal=meta.get("CAUSAL", ""),
    )


def run(arch: int, head_dims, full: bool, axes_at=None, log=print) -> tuple[list[dict], int]:
    """Compile the matrix; returns (rows, failures)."""
    compiler = Compiler(arch)
    limit = SHARED_LIMIT_KB.get(arch, 99) * 1024
    rows, done, failures = [], set(), 0
    todo = cases(head_dims, full, axes_at)
    start = time.perf_counter()
    for i, case in enumerate(todo):
        for kernel, _kind, cfg, args, meta in capture(case):
            key, src, options = compiler.key_and_source(kernel, cfg, args, meta)
            if key in done:
                continue
            done.add(key)
            row = describe(kernel.__name__, meta, case)
            row["config"] = f"{cfg.block_m}x{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}"
            try:
                row |= compiler.compile(src, options)
                row["ok"] = row["shared"] <= limit
                row["error"] = "" if row["ok"] else f"shared {row['shared']} B > {limit} B"
            except Exception as err:  # a failed compile is a result, reported and counted
                row |= dict(ok=False, error=f"{type(err).__name__}: {str(err)[:300]}")
            failures += not row["ok"]
            rows.append(row)
            if not row["ok"]:
                log(f"FAILED {row}")
        if (i + 1) % 20 == 0:
            log(
                f"[{time.perf_counter() - start:.0f}s] {i + 1}/{len(todo)} calls, "
                f"{len(rows)} specialisations, {failures} failed",
            )
    return rows, failures


def summary(rows: list[dict]) -> list[dict]:
    """Per kernel and head dim: how many specialisations, the worst registers/spills/shared."""
    out = {}
    for r in rows:
        s = out.setdefault(
            (r["kernel"], r["head_dim"]),
            dict(kernel=r["kernel"], head_dim=r["head_dim"], n=0, failed=0, configs=set()),
        )
        s["n"] += 1
        s["failed"] += not r["ok"]
        s["configs"].add(r.get("config", "?"))
        for field in ("regs", "local", "shared"):
            if r.get(field) is not None:
                s[field] = max(s.get(field, 0), r[field])
        s["cp_async"] = min(s.get("cp_async", 10**9), r.get("cp_async", 0))
    return [dict(v, configs=", ".join(sorted(v["configs"]))) for v in out.values()]


def markdown(rows: list[dict], arch: int, full: bool) -> str:
    lines = [
        f"triton {triton.__version__}, torch {torch.__version__}, sm_{arch}, "
        f"{'full' if full else 'covering'} matrix: {len(rows)} specialisations, "
        f"{sum(not r['ok'] for r in rows)} failed",
        "",
        "| kernel | head dim | specialisations | config(s) | max registers | max spill (local B) "
        "| max shared KB | min cp.async | failed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary(rows):
        lines.append(
            f"| {s['kernel']} | {s['head_dim']} | {s['n']} | {s['configs']} | "
            f"{s.get('regs', '?')} | {s.get('local', '?')} | {s.get('shared', 0) / 1024:.0f} | "
            f"{s['cp_async']} | {s['failed']} |"
        )
    return "\n".join(lines)


def compare(results: list[dict]) -> str:
    """Side by side for several `--json` results (e.g. two Triton versions): per kernel and
    tile width (padded head dim), the head dims, configs, and worst registers, spill bytes and
    shared memory in each."""
    from fusedkv_megatron.kernels.triton_common import padded_head_dim

    versions = [r["meta"]["triton"] for r in results]
    groups: dict[tuple, list] = {}
    for i, result in enumerate(results):
        for row in result["rows"]:
            key = (row["kernel"], padded_head_dim(row["head_dim"]))
            groups.setdefault(key, [[] for _ in results])[i].append(row)
    slash = " / ".join
    lines = [
        f"| kernel | tile (head dims) | config(s) | specialisations ({slash(versions)}) | max "
        f"registers | max spill B | max shared KB | failed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (kernel, tile), per in groups.items():
        dims = sorted({r["head_dim"] for rows in per for r in rows})
        configs = sorted({r.get("config", "?") for rows in per for r in rows})

        def worst(field, rows_=per):
            return slash(
                str(max((r.get(field) or 0) for r in rows) if rows else "-") for rows in rows_
            )

        shared = slash(
            f"{max(r.get('shared', 0) for r in rows) / 1024:.0f}" if rows else "-" for rows in per
        )
        failed = slash(str(sum(not r["ok"] for r in rows)) for rows in per)
        lines.append(
            f"| {kernel} | {tile} ({', '.join(map(str, dims))}) | {'; '.join(configs)} | "
            f"{slash(str(len(rows)) for rows in per)} | {worst('regs')} | {worst('local')} | "
            f"{shared} | {failed} |"
        )
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    cols = ("kernel", "head_dim", "dtype", "terms", "group", "hk1", "aligned", "rows", "t1")
    cols += ("causal", "config", "regs", "local", "shared", "cp_async", "ok")
    text = [" ".join(f"{c:>9}" for c in cols)]
    for r in rows:
        text.append(" ".join(f"{str(r.get(c, '')):>9}" for c in cols) + f" {r.get('error', '')}")
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90)")
    p.add_argument("--head-dims", type=int, nargs="+", default=list(HEAD_DIMS))
    p.add_argument("--full", action="store_true", help="the whole product of the axes")
    p.add_argument(
        "--axes-at",
        type=int,
        nargs="*",
        default=list(AXES_AT),
        help="head dims at which every axis value is compiled (the others: the fusedkv base "
        f"call only); default {' '.join(map(str, AXES_AT))}; none: base calls only",
    )
    p.add_argument("--markdown", type=Path, help="write the per-kernel summary table here")
    p.add_argument("--json", type=Path, help="write every row here")
    p.add_argument("--quiet", action="store_true", help="print the summary only")
    p.add_argument(
        "--compare",
        type=Path,
        nargs="+",
        help="print a side-by-side table of these --json results and exit (no compiling)",
    )
    args = p.parse_args(argv)
    if args.compare:
        print(compare([json.loads(path.read_text()) for path in args.compare]))
        return 0
    bad = [d for d in args.head_dims if d not in HEAD_DIMS]
    if bad:
        p.error(f"--head-dims {bad}: the kernels take multiples of 16 up to 256")
    torch.set_num_threads(1)
    rows, failures = run(
        args.arch, args.head_dims, args.full, args.axes_at, log=lambda m: print(m, flush=True)
    )
    if not args.quiet:
        print(table(rows))
    text = markdown(rows, args.arch, args.full)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.json:
        meta = dict(triton=triton.__version__, arch=args.arch, full=args.full, axes_at=args.axes_at)
        args.json.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
