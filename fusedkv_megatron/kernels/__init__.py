"""Attention kernels for KV-sharing layers, and the choice between Triton and PyTorch.

- `reconstruction_attention`: causal training/prefill attention of a reconstruction layer,
  with K = sum wk_i * K_i and V = sum wv_i * V_i fused on chip (Triton, forward + backward) or
  materialized then SDPA (PyTorch reference).
- `reconstruction_decode`: flash-decoding of a few query tokens against source caches.
- `SDPAAttention` (core_attention.py): Megatron-compatible core attention on torch SDPA, the
  local backend's replacement for Megatron's unfused DotProductAttention.

Backend choice: `FUSEDKV_ATTENTION_BACKEND=auto|triton|torch` (or an explicit `backend=`
argument, which wins). `auto` runs Triton on CUDA tensors and PyTorch elsewhere; `triton` on
CPU needs `TRITON_INTERPRET=1` (tests only: the interpreter is slow); `torch` always runs the
reference. The Triton modules are imported only when used. Head dims: any multiple of 16 up
to 256 (`HEAD_DIMS`; tiles padded to a power of two). What keeps a Megatron layer off the
kernel: `fused_kernel_blockers` (configuration) and `fused_attention_applies` (device, dtype).
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from .reference import reconstruction_attention_reference, reconstruction_decode_reference

BACKEND_ENV = "FUSEDKV_ATTENTION_BACKEND"
BACKENDS = ("auto", "triton", "torch")
HEAD_DIMS = tuple(range(16, 257, 16))  # what the fused kernels take (padded tiles)


def requested_backend(backend: str | None = None) -> str:
    """The backend asked for: `backend` if given, else the environment variable, else auto."""
    value = backend if backend is not None else os.environ.get(BACKEND_ENV, "auto")
    value = (value or "auto").strip().lower()
    if value not in BACKENDS:
        raise ValueError(
            f"{BACKEND_ENV}/backend={value!r} is not one of {BACKENDS}: use auto (Triton on "
            "CUDA, PyTorch elsewhere), triton or torch"
        )
    return value


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(x: Tensor, backend: str | None = None) -> bool:
    """Whether the Triton kernels run for tensors like `x` under the requested backend.

    Raises when `triton` is forced where it cannot run."""
    choice = requested_backend(backend)
    if choice == "torch":
        return False
    runnable = triton_available() and (x.is_cuda or (_interpreting() and x.device.type == "cpu"))
    if choice == "triton" and not runnable:
        raise RuntimeError(
            f"{BACKEND_ENV}=triton but the Triton kernels cannot run on {x.device} "
            f"(triton importable: {triton_available()}); use a CUDA device, set "
            "TRITON_INTERPRET=1 for CPU tests, or choose auto/torch"
        )
    return runnable and (choice == "triton" or x.is_cuda)


def reconstruction_attention(
    q: Tensor,
    k_sources: list[Tensor],
    k_weights: list[Tensor | None],
    v_sources: list[Tensor],
    v_weights: list[Tensor | None],
    softmax_scale: float | None = None,
    backend: str | None = None,
) -> Tensor:
    """Causal attention of q `[s, b, hq, d]` over K = sum_i wk_i * K_i, V = sum_i wv_i * V_i
    (sources `[s, b, hkv, d]`, weights `[hkv or 1, d]` or None). Returns `[s, b, hq, d]`;
    differentiable in q, every source and every weight."""
    if use_triton(q, backend):
        from .triton_attention import fused_reconstruction_attention

        return fused_reconstruction_attention(
            q, k_sources, k_weights, v_sources, v_weights, softmax_scale
        )
    return reconstruction_attention_reference(
        q, k_sources, k_weights, v_sources, v_weights, softmax_scale
    )


def reconstruction_decode(
    q: Tensor,
    k_sources: list[Tensor],
    k_weights: list[Tensor | None],
    v_sources: list[Tensor],
    v_weights: list[Tensor | None],
    softmax_scale: float | None = None,
    causal: bool = True,
    num_splits: int | None = None,
    backend: str | None = None,
) -> Tensor:
    """Decode: q `[b, t, hq, d]` (the last t positions) against source caches `[b, S, hkv, d]`
    that already hold them. Returns `[b, t, hq, d]` (forward only)."""
    if use_triton(q, backend):
        from .triton_decode import fused_reconstruction_decode

        return fused_reconstruction_decode(
            q, k_sources, k_weights, v_sources, v_weights, softmax_scale, causal, num_splits
        )
    return reconstruction_decode_reference(
        q, k_sources, k_weights, v_sources, v_weights, softmax_scale, causal
    )


def head_dim_supported(head_dim: int) -> bool:
    """The fused kernels take head dims that are multiples of 16 up to 256 (padded tiles)."""
    return head_dim in HEAD_DIMS


def fused_kernel_blockers(
    config, head_dim: int, plan, training: bool = True, attn_mask_type="causal"
) -> list[str]:
    """Why the fused kernel cannot run a reconstruction layer of `plan` under the Megatron
    `config` (empty if it can). Independent of the device and dtype (see fused_attention_applies)."""
    why = []
    if training and config.attention_dropout > 0:
        why.append(f"attention_dropout={config.attention_dropout} (the kernel has no dropout)")
    if config.context_parallel_size != 1:
        why.append(f"context_parallel_size={config.context_parallel_size}")
    if getattr(attn_mask_type, "name", attn_mask_type) != "causal":
        why.append(f"attn_mask_type={attn_mask_type} (causal only)")
    if config.softmax_type != "vanilla" or config.window_size is not None:
        why.append(f"softmax_type={config.softmax_type!r}, window_size={config.window_size}")
    if not head_dim_supported(head_dim):
        why.append(f"head_dim={head_dim} (a multiple of 16 up to 256)")
    if len(plan.key) > 2 or len(plan.value) > 2:
        why.append("more than two sources for K or V")
    return why


def _unsupported(module) -> list[str]:
    return fused_kernel_blockers(
        module.config,
        module.hidden_size_per_attention_head,
        module.plan,
        module.training,
        module.attn_mask_type,
    )


def fused_attention_applies(
    module, q: Tensor, backend: str | None = None, sources: list[Tensor] = ()
) -> bool:
    """Whether a ReconstructionAttention `module` runs the Triton kernel for the query `q`
    (and the source tensors it would read): auto picks it on CUDA when q is fp16/bf16, the
    sources have q's dtype and the layer is supported (else the materializing path; fp32 would
    make the kernel's dots TF32); a forced `triton` raises on an unsupported layer."""
    if not use_triton(q, backend):
        return False
    why = _unsupported(module)
    mixed = sorted({str(x.dtype) for x in sources if x.dtype != q.dtype})
    if mixed:
        why.append(f"sources in {', '.join(mixed)} but the query in {q.dtype}")
    forced = requested_backend(backend) == "triton"
    if why and forced:
        raise RuntimeError(
            f"{BACKEND_ENV}=triton, but layer {module.layer_number} cannot use the fused "
            f"kernel: {'; '.join(why)}. Use auto or torch for this configuration"
        )
    return not why and (forced or q.dtype in (torch.float16, torch.bfloat16))


__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "HEAD_DIMS",
    "fused_attention_applies",
    "fused_kernel_blockers",
    "head_dim_supported",
    "reconstruction_attention",
    "reconstruction_attention_reference",
    "reconstruction_decode",
    "reconstruction_decode_reference",
    "requested_backend",
    "triton_available",
    "use_triton",
]
