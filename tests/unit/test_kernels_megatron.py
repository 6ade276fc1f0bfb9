"""The kernels inside Megatron: the local backend's SDPA core attention equals Megatron's
DotProductAttention, and a model whose reconstruction layers run the Triton kernel gives the
loss and gradients of the materializing path (every variant, recompute modes included).

The model comparisons run Triton's interpreter, so they execute in the interpreter worker
of test_kernels.py (`check_model`); the test here reports their result.
"""

from __future__ import annotations

import os

import pytest
import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from fusedkv_megatron import kernels
from fusedkv_megatron.core_attention import SDPAAttention
from tests.tiny import HEADS, HIDDEN, tiny_batch, tiny_config, tiny_model
from tests.unit.test_kernels import interpreted, interpreter_results  # noqa: F401

SEQ, BATCH = 12, 2


def _qkv(groups: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    d = HIDDEN // HEADS
    q = torch.randn(SEQ, BATCH, HEADS, d, generator=g).requires_grad_(True)
    k = torch.randn(SEQ, BATCH, groups, d, generator=g).requires_grad_(True)
    v = torch.randn(SEQ, BATCH, groups, d, generator=g).requires_grad_(True)
    return q, k, v


def _run(module, q, k, v, mask):
    out = module(q, k, v, mask)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    return out, grads


@pytest.mark.parametrize("groups", [HEADS, HEADS // 2, 1], ids=["mha", "gqa2", "mqa"])
@pytest.mark.parametrize("mask_type", ["causal", "arbitrary"])
def test_sdpa_core_attention_equals_dot_product_attention(megatron_tp1, groups, mask_type):
    """fp32 on CPU: same output `[s, b, h*d]` and same q/k/v gradients (rtol 1e-5,
    atol 1e-6); `arbitrary` uses a random boolean mask (True = masked) with the diagonal kept."""
    config = tiny_config("vanilla", num_layers=1, num_query_groups=groups)
    mtype = AttnMaskType[mask_type]
    mask = None
    if mask_type == "arbitrary":
        g = torch.Generator().manual_seed(3)
        mask = torch.rand(BATCH, 1, SEQ, SEQ, generator=g) < 0.4
        mask &= ~torch.eye(SEQ, dtype=torch.bool)
    dpa = DotProductAttention(config, 1, mtype, "self")
    sdpa = SDPAAttention(config, 1, mtype, "self")
    q, k, v = _qkv(groups)
    out_ref, grads_ref = _run(dpa, q, k, v, mask)
    out, grads = _run(sdpa, q, k, v, mask)
    assert out.shape == (SEQ, BATCH, HIDDEN)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    for name, a, e in zip("qkv", grads, grads_ref, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"d{n}: {m}")


def test_local_backend_uses_sdpa(megatron_tp1):
    model = tiny_model("fusedkv")
    cores = [m.core_attention for m in model.modules() if hasattr(m, "core_attention")]
    assert cores and all(isinstance(c, SDPAAttention) for c in cores)


# name: (variant, KVSharingConfig overrides, TransformerConfig overrides)
MODEL_CASES = {
    "fusedkv": ("fusedkv", {}, {}),
    "fusedkv-shared-weights": ("fusedkv", {"weights_per_head": False}, {}),
    "fusedkv_lite": ("fusedkv_lite", {}, {}),
    "fusedkv_lite_learnable": ("fusedkv_lite_learnable", {}, {}),
    "yoco": ("yoco", {}, {}),
    "cla": ("cla", {}, {}),
    # a head dim that is not a power of two (padded tiles), with RoPE-pair tied key weights
    "fusedkv-head-dim-48": ("fusedkv", {}, {"kv_channels": 48}),
    "fusedkv-full-recompute": (
        "fusedkv",
        {},
        dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    ),
    "fusedkv-selective-core_attn": (
        "fusedkv",
        {},
        dict(recompute_granularity="selective", recompute_modules=["core_attn"]),
    ),
}


@pytest.mark.parametrize("case", MODEL_CASES)
def test_model_triton_path_matches_torch_path(interpreter_results, case):  # noqa: F811
    """Loss and every parameter gradient equal between FUSEDKV_ATTENTION_BACKEND=triton and
    =torch (rtol 1e-4, atol 1e-5), and the kernel really ran in every reconstruction layer."""
    interpreted(interpreter_results, f"model/{case}")


def _parallel_state() -> None:
    """A one-process gloo group with TP=PP=1 (the worker has no pytest fixtures)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from fusedkv_megatron import compat
    from tests.conftest import free_port

    compat.apply()  # the worker is a fresh interpreter: patch Megatron before seeding
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)


def check_model(case: str) -> None:
    from fusedkv_megatron import attention

    variant, kv_overrides, overrides = MODEL_CASES[case]
    _parallel_state()
    model = tiny_model(variant, kv_overrides=kv_overrides, **overrides)
    tokens, labels, pos = tiny_batch()
    calls = []
    real = attention.reconstruction_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    results = {}
    for backend in ("torch", "triton"):
        os.environ[kernels.BACKEND_ENV] = backend
        attention.reconstruction_attention = counting
        try:
            model.zero_grad(set_to_none=True)
            loss = model(tokens, pos, None, labels=labels)
            loss.sum().backward()
        finally:
            attention.reconstruction_attention = real
            os.environ.pop(kernels.BACKEND_ENV)
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        results[backend] = (loss.detach(), grads, len(calls))
        calls.clear()
    (loss0, grads0, n0), (loss1, grads1, n1) = results["torch"], results["triton"]
    reconstruction = sum(type(m).__name__ == "ReconstructionAttention" for m in model.modules())
    assert n0 == 0 and n1 >= reconstruction > 0, (n0, n1, reconstruction)
    torch.testing.assert_close(loss1, loss0, rtol=1e-4, atol=1e-5)
    assert grads1.keys() == grads0.keys()
    for name, g in grads1.items():
        torch.testing.assert_close(g, grads0[name], rtol=1e-4, atol=1e-5, msg=name)


def test_forced_triton_rejects_unsupported_layer(megatron_tp1, monkeypatch):
    """FUSEDKV_ATTENTION_BACKEND=triton on a layer the kernel cannot run (attention dropout in
    training) fails with the reason instead of silently materializing."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # makes triton runnable on CPU; no kernel runs
    monkeypatch.setenv(kernels.BACKEND_ENV, "triton")
    model = tiny_model("fusedkv", attention_dropout=0.1)
    tokens, labels, pos = tiny_batch()
    with pytest.raises(RuntimeError, match="attention_dropout=0.1"):
        model(tokens, pos, None, labels=labels)
