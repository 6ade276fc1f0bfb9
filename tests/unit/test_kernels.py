"""The Triton kernels compute what the PyTorch references compute (docs/model.md, docs/kernels.md).

On CPU through Triton's interpreter, in fp32 at small shapes (bf16 `tl.dot` is not exact in
the interpreter): sequence lengths that are and are not multiples of the blocks (the
interpreter uses 16/32 blocks), GQA ratios 1, 2 and 4, one or two sources with per-head,
shared or no weights, causal; head dims that are powers of two and padded ones (96 -> 128
and 160 -> 256 wide tiles, masked), with RoPE-pair tied key weights. Tolerance: rtol = atol = 1e-4 for the output and every gradient
(observed errors are ~5e-6 on values of order 10; a wrong mask or weight gradient is off by
O(1)). The GPU versions at realistic sizes in bf16 are in tests/gpu.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fusedkv_megatron import kernels
from fusedkv_megatron.fusion import KVFusion
from fusedkv_megatron.kernels.reference import (
    reconstruction_attention_reference,
    reconstruction_decode_reference,
)

TOL = dict(rtol=1e-4, atol=1e-4)


REPO = Path(__file__).resolve().parents[2]


def _cases() -> dict[str, Callable[[], None]]:
    """Every check that runs Triton kernels, by name (run in the interpreter worker)."""
    from tests.unit import test_kernels_megatron as tkm

    cases = {f"train/{c}": functools.partial(check_training, c) for c in TRAIN_CASES}
    cases |= {f"train/tied-keys-d{d}": functools.partial(check_tied_key_weights, d) for d in TIED}
    cases["train/custom-scale"] = check_custom_scale
    cases["train/rejects-unsupported"] = check_rejects_unsupported
    cases |= {f"decode/{c}": functools.partial(check_decode, c) for c in DECODE_CASES}
    cases |= {f"model/{c}": functools.partial(tkm.check_model, c) for c in tkm.MODEL_CASES}
    cases["tools/bench_kernels-smoke"] = check_bench_script
    return cases


def check_bench_script() -> None:
    """tools/bench_kernels.py runs end to end (on CPU at tiny sizes: its flow, not timings)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_kernels", REPO / "tools/bench_kernels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = "--smoke-cpu --seqs 20 --tokens 20 --decode-batch 1 --heads 2 --kv-heads 1"
    assert bench.main([*args.split(), "--head-dim", "16"]) == 0
    assert bench.main([*args.split(), "--head-dim", "16", "--sweep"]) == 0


def _worker() -> None:
    """Run every case under TRITON_INTERPRET=1 and print {name: None | traceback} as JSON on
    the last line. Triton decides interpreter vs compiler when it and a kernel are imported,
    so this must be a fresh process with the variable set before anything imports triton."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    results = {}
    for name, fn in _cases().items():
        start = time.perf_counter()
        try:
            fn()
            results[name] = None
        except Exception:
            results[name] = traceback.format_exc()
        print(f"{name}: {time.perf_counter() - start:.2f} s", file=sys.stderr)
    print(json.dumps(results))


@functools.cache
def _run_worker() -> dict[str, str | None]:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop(kernels.BACKEND_ENV, None)
    code = "from tests.unit.test_kernels import _worker; _worker()"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    if proc.returncode != 0:
        pytest.fail(f"interpreter worker failed (rc={proc.returncode}):\n{proc.stderr[-6000:]}")
    sys.stderr.write(proc.stderr[-3000:])  # per-case timings, shown by pytest on failure
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def interpreter_results() -> dict[str, str | None]:
    """The worker's results: it runs once per pytest process, in a subprocess."""
    return _run_worker()


def interpreted(results: dict[str, str | None], name: str) -> None:
    """Fail with the worker's traceback if case `name` failed there."""
    assert name in results, f"case {name} did not run in the interpreter worker"
    if results[name] is not None:
        pytest.fail(f"{name} failed under TRITON_INTERPRET=1:\n{results[name]}", pytrace=False)


def _weight(kind: str, hk: int, d: int, g: torch.Generator) -> torch.Tensor | None:
    """'w': one vector per KV head, 's': one shared vector, '-': unweighted."""
    if kind == "-":
        return None
    w = torch.randn(hk if kind == "w" else 1, d, generator=g)
    return w.requires_grad_(True)


def _inputs(s, b, hq, hk, d, k_terms, v_terms, seed=0, strided=False):
    """q `[s, b, hq, d]`, sources `[s, b, hk, d]` and weights, all requiring grad. `strided`:
    q a transposed view and sources slices of a wider tensor (not contiguous)."""
    g = torch.Generator().manual_seed(seed)

    def src():
        if strided:
            return torch.randn(s, b, 2 * hk, d, generator=g)[:, :, hk:].requires_grad_(True)
        return torch.randn(s, b, hk, d, generator=g).requires_grad_(True)

    if strided:
        q = torch.randn(b, s, hq, d, generator=g).transpose(0, 1).requires_grad_(True)
    else:
        q = torch.randn(s, b, hq, d, generator=g).requires_grad_(True)
    ks = [src() for _ in k_terms]
    vs = [src() for _ in v_terms]
    kw = [_weight(t, hk, d, g) for t in k_terms]
    vw = [_weight(t, hk, d, g) for t in v_terms]
    return q, ks, kw, vs, vw


# (s, b, hq, hkv, head_dim, key terms, value terms, strided)
TRAIN_CASES = {
    "fusedkv-s37-gqa2": (37, 2, 4, 2, 16, "ww", "ww", False),
    "fusedkv-shared-s64-gqa4": (64, 1, 4, 1, 32, "ss", "ss", False),
    "lite-s50-mha-d64-strided": (50, 1, 2, 2, 64, "-", "-", True),
    "lite_learnable-s17-gqa2": (17, 2, 6, 3, 16, "w", "w", False),
    "yoco-s33-gqa4": (33, 1, 8, 2, 16, "-", "-", False),
    "mixed-s5": (5, 2, 2, 1, 16, "w-", "s", False),
    "fusedkv-s37-gqa2-d96": (37, 2, 4, 2, 96, "ww", "ww", False),
    "lite_learnable-shared-s29-d160": (29, 1, 4, 2, 160, "s", "s", False),
    "lite-s21-mha-d160-strided": (21, 1, 2, 2, 160, "-", "-", True),
    "mixed-s18-d48": (18, 1, 2, 1, 48, "-w", "w-", False),
}


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_fused_attention_matches_reference(interpreter_results, case):
    """Forward output and the gradients of q, every source and every weight equal the
    reference (materialize K/V, then causal SDPA)."""
    interpreted(interpreter_results, f"train/{case}")


def check_training(case: str) -> None:
    s, b, hq, hk, d, k_terms, v_terms, strided = TRAIN_CASES[case]
    q, ks, kw, vs, vw = _inputs(s, b, hq, hk, d, k_terms, v_terms, strided=strided)
    out = kernels.reconstruction_attention(q, KVFusion(ks, kw, vs, vw), backend="triton")
    ref = reconstruction_attention_reference(q, KVFusion(ks, kw, vs, vw))
    torch.testing.assert_close(out, ref, **TOL)

    leaves = [q, *ks, *vs, *[w for w in kw + vw if w is not None]]
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(out, leaves, grad_out)
    want = torch.autograd.grad(ref, leaves, grad_out)
    names = ["q"] + [f"K{i}" for i in range(len(ks))] + [f"V{i}" for i in range(len(vs))]
    names += [f"w{i}" for i in range(len(leaves) - len(names))]
    for name, a, e in zip(names, got, want, strict=True):
        assert a.shape == e.shape, name
        torch.testing.assert_close(a, e, **TOL, msg=lambda m, n=name: f"grad {n}: {m}")


TIED = (96, 160)


@pytest.mark.parametrize("head_dim", TIED)
def test_tied_key_weights_padded_head_dim(interpreter_results, head_dim):
    """Key weights stored per RoPE pair (channel j tied with j + d/2) and expanded in torch:
    with padded tiles (d = 96, 160) the kernel gives the reference's gradients for the stored
    half-width weights (the kernel never pairs channels itself)."""
    interpreted(interpreter_results, f"train/tied-keys-d{head_dim}")


def check_tied_key_weights(d: int) -> None:
    from fusedkv_megatron.fusion import expand_key_weight

    q, ks, _, vs, vw = _inputs(23, 1, 4, 2, d, "ww", "w-")
    g = torch.Generator().manual_seed(5)
    halves = [torch.randn(2, d // 2, generator=g).requires_grad_(True) for _ in ks]
    results = []
    for fn in (
        lambda kw: kernels.reconstruction_attention(q, KVFusion(ks, kw, vs, vw), backend="triton"),
        lambda kw: reconstruction_attention_reference(q, KVFusion(ks, kw, vs, vw)),
    ):
        out = fn([expand_key_weight(w, rotary_interleaved=False) for w in halves])
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        results.append((out, torch.autograd.grad(out, [q, *ks, *halves], grad_out)))
    (out, got), (ref, want) = results
    torch.testing.assert_close(out, ref, **TOL)
    for i, (a, e) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, e, **TOL, msg=lambda m, i=i: f"grad {i}: {m}")


def test_fused_attention_custom_scale(interpreter_results):
    interpreted(interpreter_results, "train/custom-scale")


def check_custom_scale() -> None:
    q, ks, kw, vs, vw = _inputs(20, 1, 2, 1, 16, "w", "-")
    out = kernels.reconstruction_attention(
        q, KVFusion(ks, kw, vs, vw), softmax_scale=0.3, backend="triton"
    )
    ref = reconstruction_attention_reference(q, KVFusion(ks, kw, vs, vw), softmax_scale=0.3)
    torch.testing.assert_close(out, ref, **TOL)


def _decode_inputs(b, t, hq, hk, d, S, k_terms, v_terms, hf_layout, seed=0):
    """q `[b, t, hq, d]`, caches `[b, S, hk, d]` (as transposed `[b, hk, S, d]` views when
    `hf_layout`)."""
    g = torch.Generator().manual_seed(seed)

    def cache():
        if hf_layout:
            return torch.randn(b, hk, S, d, generator=g).transpose(1, 2)
        return torch.randn(b, S, hk, d, generator=g)

    q = torch.randn(b, t, hq, d, generator=g)
    ks, vs = [cache() for _ in k_terms], [cache() for _ in v_terms]
    kw = [_weight(x, hk, d, g) for x in k_terms]
    vw = [_weight(x, hk, d, g) for x in v_terms]
    return q, ks, kw, vs, vw


# (b, t, hq, hkv, head_dim, S, splits, key terms, value terms, causal, hf_layout)
DECODE_CASES = {
    "fusedkv-t1-S70-3splits": (2, 1, 4, 2, 16, 70, 3, "ww", "ww", True, False),
    # S=33 in 16-blocks: the last split holds position 32 only, which 3 of the 4 queries
    # may not see (an empty partial that the combine must ignore).
    "lite_learnable-t4-S33-hf": (1, 4, 8, 2, 16, 33, 3, "w", "w", True, True),
    "yoco-t3-S50-gqa4-d32": (1, 3, 4, 1, 32, 50, 1, "-", "-", True, False),
    "shared-t2-noncausal-d64": (2, 2, 2, 2, 64, 40, 2, "ss", "-", False, False),
    "fusedkv-t2-S45-gqa2-d96": (2, 2, 4, 2, 96, 45, 2, "ww", "ww", True, False),
    "lite-t1-S37-d160-hf": (1, 1, 2, 1, 160, 37, 3, "-", "-", True, True),
    # GROUP * t = 4 * 40 = 160 query rows > MAX_ROWS (128): two launches over chunks of t.
    "yoco-t40-S57-gqa4-chunked": (1, 40, 4, 1, 16, 57, 2, "-", "-", True, False),
}


@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_matches_reference(interpreter_results, case):
    """Flash-decoding (split over the sequence, then combined) equals the reference."""
    interpreted(interpreter_results, f"decode/{case}")


def check_decode(case: str) -> None:
    b, t, hq, hk, d, S, splits, k_terms, v_terms, causal, hf = DECODE_CASES[case]
    q, ks, kw, vs, vw = _decode_inputs(b, t, hq, hk, d, S, k_terms, v_terms, hf)
    with torch.no_grad():
        out = kernels.reconstruction_decode(
            q, KVFusion(ks, kw, vs, vw), causal=causal, num_splits=splits, backend="triton"
        )
        ref = reconstruction_decode_reference(q, KVFusion(ks, kw, vs, vw), causal=causal)
    torch.testing.assert_close(out, ref, **TOL)


def test_decode_last_row_equals_training_attention():
    """The decode reference with t = S is causal attention (the two references agree)."""
    q, ks, kw, vs, vw = _decode_inputs(2, 9, 4, 2, 16, 9, "ww", "w", False)
    with torch.no_grad():
        dec = reconstruction_decode_reference(q, KVFusion(ks, kw, vs, vw))
        sb = [x.transpose(0, 1) for x in (q, *ks, *vs)]
        train = reconstruction_attention_reference(sb[0], KVFusion(sb[1:3], kw, sb[3:], vw))
    torch.testing.assert_close(dec, train.transpose(0, 1), rtol=1e-6, atol=1e-6)


def test_backend_choice(monkeypatch):
    """auto: Triton only on CUDA; torch: never; triton where it cannot run: a clear error."""
    x = torch.zeros(1)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv(kernels.BACKEND_ENV, "auto")
    assert not kernels.use_triton(x)
    assert not kernels.use_triton(x, "torch")
    with pytest.raises(RuntimeError, match="cannot run on cpu"):
        kernels.use_triton(x, "triton")
    monkeypatch.setenv(kernels.BACKEND_ENV, "TRITON")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.use_triton(x)
    monkeypatch.setenv(kernels.BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match="auto, triton or torch|not one of"):
        kernels.use_triton(x)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.use_triton(x, "triton")
    assert not kernels.use_triton(x, "auto")  # the interpreter is for tests only


def test_bench_script_runs(interpreter_results):
    interpreted(interpreter_results, "tools/bench_kernels-smoke")


def test_kernel_rejects_unsupported_shapes(interpreter_results):
    interpreted(interpreter_results, "train/rejects-unsupported")


def check_rejects_unsupported() -> None:
    q, ks, kw, vs, vw = _inputs(8, 1, 3, 2, 16, "w", "w")
    with pytest.raises(ValueError, match="multiple of the KV heads"):
        kernels.reconstruction_attention(q, KVFusion(ks, kw, vs, vw), backend="triton")
    q, ks, kw, vs, vw = _inputs(8, 1, 2, 1, 16, "www", "w")
    with pytest.raises(ValueError, match="1 or 2 key and value sources"):
        kernels.reconstruction_attention(q, KVFusion(ks, kw, vs, vw), backend="triton")
    for bad in (24, 272):
        q, ks, kw, vs, vw = _inputs(8, 1, 2, 1, bad, "w", "w")
        with pytest.raises(ValueError, match=f"head_dim={bad} .*multiple of 16 up to 256"):
            kernels.reconstruction_attention(q, KVFusion(ks, kw, vs, vw), backend="triton")


def _layer(head_dim: int = 128, **config):
    """A stand-in for a ReconstructionAttention: what attention_policy.fused_attention_applies
    reads."""
    from types import SimpleNamespace

    cfg = (
        dict(
            attention_dropout=0.0, context_parallel_size=1, softmax_type="vanilla", window_size=None
        )
        | config
    )
    plan = SimpleNamespace(key=(1, 2), value=(1, 2))
    return SimpleNamespace(
        config=SimpleNamespace(**cfg),
        training=True,
        layer_number=7,
        attn_mask_type=SimpleNamespace(name="causal"),
        plan=plan,
        hidden_size_per_attention_head=head_dim,
    )


def test_fused_attention_applies_rules(monkeypatch):
    """Where Triton can run: auto takes the kernel for bf16/fp16 supported layers and falls
    back otherwise (fp32, dropout, CP); forced triton raises on an unsupported layer."""
    from fusedkv_megatron import attention_policy as policy

    monkeypatch.setattr(policy, "use_triton", lambda x, backend=None: True)
    bf16, fp32 = torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1)
    assert policy.fused_attention_applies(_layer(), bf16, "auto")
    assert policy.fused_attention_applies(_layer(), torch.zeros(1, dtype=torch.half), "auto")
    assert not policy.fused_attention_applies(_layer(), fp32, "auto")
    assert policy.fused_attention_applies(_layer(), fp32, "triton")
    for bad in (dict(attention_dropout=0.1), dict(context_parallel_size=2)):
        assert not policy.fused_attention_applies(_layer(**bad), bf16, "auto")
        with pytest.raises(RuntimeError, match="layer 7 cannot use the fused kernel"):
            policy.fused_attention_applies(_layer(**bad), bf16, "triton")
    for d in (16, 48, 96, 160, 256):
        assert policy.fused_attention_applies(_layer(d), bf16, "auto"), d
    for d in (24, 8, 272):
        assert not policy.fused_attention_applies(_layer(d), bf16, "auto"), d
    # The query's dtype decides (not the hidden states'); sources of another dtype do not fuse.
    assert not policy.fused_attention_applies(_layer(), bf16, "auto", sources=[fp32])
    with pytest.raises(RuntimeError, match="sources in torch.float32 but the query in"):
        policy.fused_attention_applies(_layer(), bf16, "triton", sources=[fp32])
    monkeypatch.setattr(policy, "use_triton", lambda x, backend=None: False)
    assert not policy.fused_attention_applies(_layer(), bf16, "auto")


@pytest.mark.slow
def test_kernels_compile_for_hopper():
    """The compiled (GPU) path, which the interpreter does not exercise: every kernel the
    dispatchers launch compiles for sm_90 and fits its shared memory (tools/compile_matrix.py:
    the fusedkv specialisation at every head dim 16..256, and every axis value -- sources,
    weights, dtype, group, one KV head, unaligned S, decode rows, causal -- at the paper
    configs' head dims 96 and 160). No GPU needed: Triton compiles to a cubin here; a warm
    Triton cache makes reruns fast."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools/compile_matrix.py"),
            "--quiet",
            "--axes-at",
            "96",
            "160",
        ],
        cwd=REPO,
        env=env | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert proc.returncode == 0, f"{proc.stdout[-6000:]}\n{proc.stderr[-4000:]}"
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| ")]
    summary = {(r[0].strip(), int(r[1])) for r in rows[1:] if r[1].strip().isdigit()}
    kernels_ = ("fwd", "delta", "dkdv", "dq", "decode_split", "decode_combine")
    want = {(k, d) for k in kernels_ for d in kernels.HEAD_DIMS}
    assert summary == want, sorted(want ^ summary)
    assert all(r[-1].strip() == "0" for r in rows[1:]), proc.stdout[-3000:]


def test_launch_steps_down_when_a_config_does_not_fit():
    """On a shared-memory overflow the launcher retries with fewer stages, then smaller blocks
    (keeping powers of two, so BLOCK_M/BLOCK_N stay multiples of each other), and remembers
    the configuration that ran."""
    from fusedkv_megatron.kernels import launch as L

    seen = []

    class FakeKernel:
        def __getitem__(self, grid):
            def run(*args, num_warps, num_stages, **meta):
                seen.append((meta["BLOCK_M"], meta["BLOCK_N"], num_stages))
                if meta["BLOCK_M"] * meta["BLOCK_N"] * num_stages > 64 * 64:
                    raise L.OutOfResources(1, 2, "shared memory")

            return run

    def build(c):
        return (1,), (), dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n)

    L._working.pop(("test", 64), None)
    with pytest.warns(UserWarning, match="does not fit"):
        ran = L.launch(FakeKernel(), "test", 64, L.KernelConfig(128, 64, 4, 3), build)
    assert seen == [(128, 64, 3), (128, 64, 2), (128, 64, 1), (64, 64, 2), (64, 64, 1)]
    assert ran == L.KernelConfig(64, 64, 4, 1)
    assert L.pick({64: L.KernelConfig(128, 64, 4, 3)}, 64, "test") == ran
    assert L.KernelConfig(16, 16, 4, 1).smaller() is None
    L._working.pop(("test", 64))


def test_gpu_decode_bound_holds_for_the_kernels_roundings():
    """The GPU decode test's rounding bound (tests/gpu/test_kernels_gpu.py::decode_bound),
    checked on CPU: a torch simulation of the kernel's roundings (fused K/V, softmax weights and
    output rounded to bf16) stays within it, and dropping one key weight does not."""
    from fusedkv_megatron.fusion import fuse
    from fusedkv_megatron.kernels.reference import decode_mask
    from tests.gpu.test_kernels_gpu import decode_bound

    g = torch.Generator().manual_seed(0)
    b, t, hq, hk, d, S = 1, 3, 4, 2, 96, 700
    q = torch.randn(b, t, hq, d, generator=g).bfloat16()
    srcs = [torch.randn(b, S, hk, d, generator=g).bfloat16().float() for _ in range(4)]
    ws = [torch.randn(hk, d, generator=g) for _ in range(4)]
    key, value = fuse(srcs[:2], ws[:2]), fuse(srcs[2:], ws[2:])
    truth = reconstruction_decode_reference(q.float(), KVFusion(srcs[:2], ws[:2], srcs[2:], ws[2:]))
    kh, vh = (x.bfloat16().float().repeat_interleave(2, 2).transpose(1, 2) for x in (key, value))
    scores = q.float().transpose(1, 2) @ kh.transpose(-1, -2) * d**-0.5
    scores = scores.masked_fill(~decode_mask(t, S, q.device), float("-inf"))
    e = torch.exp(scores - scores.amax(-1, keepdim=True))
    simulated = ((e.bfloat16().float() @ vh) / e.sum(-1, keepdim=True)).bfloat16().float()
    bound = decode_bound(q, key, value, d**-0.5)
    assert ((simulated.transpose(1, 2) - truth).abs() / bound).max() < 0.25
    wrong = reconstruction_decode_reference(
        q.float(), KVFusion(srcs[:2], [ws[0], None], srcs[2:], ws[2:])
    )
    assert ((wrong - truth).abs() / bound).max() > 1.5


def test_int32_offset_guard_checks_every_tensor():
    """The kernels index the batch in int64 and the rest in int32: a tensor whose largest
    offset within one sequence exceeds int32 is refused by name (shapes only: meta tensors)."""
    from fusedkv_megatron.kernels.triton_common import check_int32_offsets

    small = torch.empty((64, 1, 2, 128), device="meta")
    big = torch.empty((2**20, 1, 2, 2048), device="meta")  # s * stride_s ~ 2**32
    with pytest.raises(ValueError, match=r"do \(1048576, 1, 2, 2048\).*exceeds int32"):
        check_int32_offsets(1, q=small, do=big)
    strided = torch.empty((2**16, 2, 2**8, 128), device="meta").transpose(0, 2)  # a view
    with pytest.raises(ValueError, match="source"):
        check_int32_offsets(1, q=small, source=strided[:, :1])
    # Decode caches are batch-first: 2**32 elements in all, but each sequence's fit in int32.
    check_int32_offsets(0, cache=torch.empty((2**14, 2**10, 2, 128), device="meta"))


def test_launch_runs_under_the_tensors_device(monkeypatch):
    """`launch` makes the tensors' CUDA device current (Triton launches on the current one)."""
    from contextlib import contextmanager

    from fusedkv_megatron.kernels import launch as L

    entered = []

    @contextmanager
    def fake_device(device):
        entered.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_device)

    class Kernel:
        def __getitem__(self, grid):
            return lambda *a, **k: entered.append("ran")

    cfg = L.KernelConfig(16, 16, 1, 1)
    L.launch(Kernel(), "test", 16, cfg, lambda c: ((1,), (), {}), torch.device("cuda", 1))
    assert entered == [torch.device("cuda", 1), "ran"]
    entered.clear()
    L.launch(Kernel(), "test", 16, cfg, lambda c: ((1,), (), {}), torch.device("cpu"))
    assert entered == ["ran"]
