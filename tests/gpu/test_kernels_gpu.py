"""The Triton kernels on a GPU, at realistic sizes, in bf16/fp16 (run: tools/gpu_check.sh).

Training, for the output and every gradient: with `truth` the fp32 reference computed from
the same (upcast) inputs,

    max|kernel - truth| <= 2 * max|torch low-precision reference - truth| + 1e-3 * max|truth|

i.e. the kernel is at most twice as far from exact as materialize + SDPA in the same dtype
(flash-attention's own test criterion), plus a small relative slack.

Decode: an elementwise worst-case bound from the kernel's bf16 roundings (`decode_bound`),
not a multiple of another implementation's error.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from fusedkv_megatron.fusion import KVFusion
from fusedkv_megatron.kernels.reference import (
    decode_mask,
    reconstruction_attention_reference,
    reconstruction_decode_reference,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def assert_within_bound(name, got, low, truth):
    truth = truth.float()
    err = (got.float() - truth).abs().max().item()
    ref_err = (low.float() - truth).abs().max().item()
    bound = 2 * ref_err + 1e-3 * truth.abs().max().item()
    assert err <= bound, f"{name}: kernel error {err:.3g} > bound {bound:.3g} (torch {ref_err:.3g})"


def _make(shape_q, shape_src, k_terms, v_terms, dtype, hk, d, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device="cuda")

    def weight(kind):
        return None if kind == "-" else rnd(hk if kind == "w" else 1, d)

    q = rnd(*shape_q).to(dtype)
    ks = [rnd(*shape_src).to(dtype) for _ in k_terms]
    vs = [rnd(*shape_src).to(dtype) for _ in v_terms]
    return q, ks, [weight(t) for t in k_terms], vs, [weight(t) for t in v_terms]


def _leaves(q, ks, kw, vs, vw, dtype=None):
    """Fresh leaf copies requiring grad (in `dtype` for tensors, weights stay fp32)."""

    def leaf(x, to=None):
        if x is None:
            return None
        return x.detach().to(to or x.dtype).clone().requires_grad_(True)

    return (
        leaf(q, dtype),
        [leaf(x, dtype) for x in ks],
        [leaf(w) for w in kw],
        [leaf(x, dtype) for x in vs],
        [leaf(w) for w in vw],
    )


# (s, b, hq, hkv, head_dim, key terms, value terms, dtype)
TRAIN = {
    "fusedkv-s2048-gqa2-d128-bf16": (2048, 2, 16, 8, 128, "ww", "ww", torch.bfloat16),
    "lite-s4133-gqa8-d64-bf16": (4133, 1, 16, 2, 64, "-", "-", torch.bfloat16),
    "lite_learnable-shared-s1500-d128-fp16": (1500, 2, 8, 8, 128, "s", "s", torch.float16),
    "fusedkv-s8192-mha-d64-bf16": (8192, 1, 16, 16, 64, "ww", "ww", torch.bfloat16),
    "fusedkv-s2048-gqa2-d96-bf16": (2048, 2, 16, 8, 96, "ww", "ww", torch.bfloat16),
    "lite_learnable-s1999-d160-bf16": (1999, 1, 8, 8, 160, "w", "w", torch.bfloat16),
}


@pytest.mark.parametrize("case", TRAIN)
def test_fused_attention_gpu(case):
    from fusedkv_megatron.kernels.triton_attention import fused_reconstruction_attention

    s, b, hq, hk, d, kt, vt, dtype = TRAIN[case]
    base = _make((s, b, hq, d), (s, b, hk, d), kt, vt, dtype, hk, d)
    grad_out = torch.randn(s, b, hq, d, device="cuda").to(dtype)
    runs = {}
    for name, to in (("kernel", None), ("low", None), ("truth", torch.float32)):
        q, ks, kw, vs, vw = _leaves(*base, dtype=to)
        if name == "kernel":
            out = fused_reconstruction_attention(q, KVFusion(ks, kw, vs, vw))
        elif name == "low":
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
                out = reconstruction_attention_reference(q, KVFusion(ks, kw, vs, vw))
        else:
            with sdpa_kernel([SDPBackend.MATH]):
                out = reconstruction_attention_reference(q, KVFusion(ks, kw, vs, vw))
        leaves = [q, *ks, *vs, *[w for w in kw + vw if w is not None]]
        grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
        runs[name] = [out.detach(), *grads]
        del out, grads
    names = ["out", "dq"] + [f"dK{i}" for i in range(len(kt))] + [f"dV{i}" for i in range(len(vt))]
    names += [f"dw{i}" for i in range(len(runs["kernel"]) - len(names))]
    for i, name in enumerate(names):
        assert_within_bound(name, runs["kernel"][i], runs["low"][i], runs["truth"][i])


# (b, t, hq, hkv, head_dim, S, key terms, value terms, hf layout)
DECODE = {
    "fusedkv-t1-S32768-gqa2-d128": (4, 1, 16, 8, 128, 32768, "ww", "ww", False),
    "lite-t4-S8197-gqa8-d64-hf": (2, 4, 16, 2, 64, 8197, "-", "-", True),
    "fusedkv-t1-S8192-d160": (2, 1, 16, 16, 160, 8192, "ww", "ww", False),
}

U = 2.0**-8  # bf16 unit roundoff: 8 significant bits, round to nearest


def decode_bound(q, key, value, scale, causal=True):
    """Per output element, the worst case of the kernel's own roundings against the fp32
    truth on the same bf16 inputs (q `[b, t, hq, d]`, fused key/value `[b, S, hkv, d]` fp32).

    The kernel rounds (1) each fused K and V element to bf16, |dK| <= U|K|, |dV| <= U|V|;
    (2) each softmax weight to bf16 before P.V, |dp| <= U p (the normaliser sums the fp32
    weights); (3) the output to bf16, <= U|o|. Scores are fp32 dots of bf16 values. To first
    order, with p the softmax weights and s_j = scale * q.K_j:
        |ds_j| <= U * scale * sum_i |q_i K_ji|
        |do| <= max_j |ds_j| * sum_j p_j |V_j - o|  (the softmax's response to ds)
              + U * sum_j p_j |V_j|                 (rounded V)
              + U * sum_j p_j |V_j|                 (rounded P)
              + U * |o|                             (rounded output)
    E.g. d = 128 unit normals: U * scale * sum|q K| ~ 3.9e-3 * 0.088 * 128 * 0.64 = 0.028 and
    sum p|V| ~ 0.8, so |do| <~ 0.03-0.05 where a wrong mask or weight is off by O(|o|) ~ 0.1-1.
    Times 1.25 for second-order terms and fp32 accumulation over S (<= S * 2**-24 relative)."""
    b, t, hq, d = q.shape
    group = hq // key.shape[2]
    qh = q.float().transpose(1, 2)  # [b, hq, t, d]
    kh = key.repeat_interleave(group, dim=2).transpose(1, 2)  # [b, hq, S, d]
    vh = value.repeat_interleave(group, dim=2).transpose(1, 2)
    scores = qh @ kh.transpose(-1, -2) * scale
    if causal:
        scores = scores.masked_fill(~decode_mask(t, key.shape[1], q.device), float("-inf"))
    p = scores.softmax(-1)  # [b, hq, t, S]
    o = p @ vh
    ds = U * scale * (qh.abs() @ kh.abs().transpose(-1, -2))
    ds_max = ds.masked_fill(p == 0, 0).amax(-1, keepdim=True)  # [b, hq, t, 1]
    # sum_j p_j |V_j - o| per output element ([b, hq, t, S, d] transient: <= 1 GiB here)
    spread = torch.einsum("bhts,bhtsd->bhtd", p, (vh[:, :, None] - o[:, :, :, None]).abs())
    bound = ds_max * spread + 2 * U * (p @ vh.abs()) + U * o.abs()
    return (1.25 * bound).transpose(1, 2)  # [b, t, hq, d]


@pytest.mark.parametrize("case", DECODE)
def test_decode_gpu(case):
    """The decode kernel is within `decode_bound` of the fp32 truth, element by element."""
    from fusedkv_megatron.fusion import fuse
    from fusedkv_megatron.kernels.triton_decode import fused_reconstruction_decode

    b, t, hq, hk, d, S, kt, vt, hf = DECODE[case]
    q, ks, kw, vs, vw = _make(
        (b, t, hq, d), (b, hk, S, d) if hf else (b, S, hk, d), kt, vt, torch.bfloat16, hk, d
    )
    if hf:
        ks, vs = [x.transpose(1, 2) for x in ks], [x.transpose(1, 2) for x in vs]
    with torch.no_grad():
        got = fused_reconstruction_decode(q, KVFusion(ks, kw, vs, vw))
        up = [x.float() for x in (q, *ks, *vs)]
        truth = reconstruction_decode_reference(
            up[0], KVFusion(up[1 : 1 + len(ks)], kw, up[1 + len(ks) :], vw)
        )
        key, value = fuse(up[1 : 1 + len(ks)], kw), fuse(up[1 + len(ks) :], vw)
        bound = decode_bound(q, key, value, d**-0.5)
    err = (got.float() - truth).abs()
    worst = (err / bound).max().item()
    assert worst <= 1.0, (
        f"decode error {err.max().item():.3g} exceeds the rounding bound (worst element at "
        f"{worst:.2f}x its bound; max bound {bound.max().item():.3g}, max|o| "
        f"{truth.abs().max().item():.3g})"
    )


def test_sdpa_core_attention_uses_flash(megatron_tp1):
    """The local backend's core attention runs on the flash kernel (any other choice is
    refused inside this context) at s = 8192 with GQA, and is within the bound."""
    from megatron.core.transformer.enums import AttnMaskType

    from fusedkv_megatron import qwen3_config
    from fusedkv_megatron.core_attention import SDPAAttention

    config = qwen3_config(
        1, 2048, 16, num_query_groups=4, kv_channels=128, bf16=True, params_dtype=torch.bfloat16
    )
    attn = SDPAAttention(config, 1, AttnMaskType.causal, "self")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(8192, 1, h, 128, generator=g, device="cuda")
        .to(torch.bfloat16)
        .requires_grad_(True)
        for h in (16, 4, 4)
    )
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out = attn(q, k, v, None)
        out.sum().backward()
    assert out.shape == (8192, 1, 2048)
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        truth = attn(q.float(), k.float(), v.float(), None)
        low = attn(q, k, v, None)
    assert_within_bound("sdpa out", out, low, truth)


def test_model_triton_path_gpu(megatron_tp1, monkeypatch):
    """A bf16 FusedKV model on the GPU (local backend, no TE): the Triton path and the
    materializing path agree: |loss difference| < 1e-2 and, per parameter,
    ||g_triton - g_torch|| <= 5e-2 ||g_torch|| (bf16 rounding of two different orderings)."""
    from fusedkv_megatron import KVSharingConfig, build_model, qwen3_config
    from fusedkv_megatron.kernels import BACKEND_ENV

    config = qwen3_config(
        4,
        512,
        8,
        num_query_groups=4,
        kv_channels=64,
        bf16=True,
        params_dtype=torch.bfloat16,
        use_cpu_initialization=True,
    )
    model = build_model(config, KVSharingConfig("fusedkv"), 256, 1024).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, 256, (2, 1025), generator=g, device="cuda")
    tokens, labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    pos = torch.arange(1024, device="cuda").expand(2, -1)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv(BACKEND_ENV, backend)
        model.zero_grad(set_to_none=True)
        loss = model(tokens, pos, None, labels=labels).float().mean()
        loss.backward()
        results[backend] = (loss.item(), {n: p.grad.float() for n, p in model.named_parameters()})
    (l0, g0), (l1, g1) = results["torch"], results["triton"]
    assert abs(l0 - l1) < 1e-2, (l0, l1)
    for name, grad in g0.items():
        assert (g1[name] - grad).norm() <= 5e-2 * grad.norm() + 1e-6, name
