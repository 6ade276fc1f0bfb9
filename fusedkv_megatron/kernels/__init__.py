"""Attention kernels for KV-sharing layers, and the choice between Triton and PyTorch.

- `reconstruction_attention(q, kv)`: causal training/prefill attention of a reconstruction
  layer, with `kv` (a `KVFusion`) giving K = sum wk_i * K_i and V = sum wv_i * V_i, fused on chip (Triton, forward + backward) or
  materialized then SDPA (PyTorch reference).
- `reconstruction_decode(q, kv)`: flash-decoding of a few query tokens against source caches.

Backend choice: `FUSEDKV_ATTENTION_BACKEND=auto|triton|torch` (or an explicit `backend=`
argument, which wins). `auto` runs Triton on CUDA tensors and PyTorch elsewhere; `triton` on
CPU needs `TRITON_INTERPRET=1` (tests only: the interpreter is slow); `torch` always runs the
reference. The Triton modules are imported only when used. Head dims: any multiple of 16 up
to 256 (`HEAD_DIMS`; tiles padded to a power of two). What keeps a Megatron layer off the
kernel is the layer's policy, next to the attention modules (`attention_policy.py`).
"""

from __future__ import annotations

import functools
import os

from torch import Tensor

from ..fusion import KVFusion
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
    q: Tensor, kv: KVFusion, softmax_scale: float | None = None, backend: str | None = None
) -> Tensor:
    """Causal attention of q `[s, b, hq, d]` over `kv`'s K = sum_i wk_i * K_i,
    V = sum_i wv_i * V_i (sources `[s, b, hkv, d]`, weights `[hkv or 1, d]` or None). Returns
    `[s, b, hq, d]`; differentiable in q, every source and every weight."""
    if use_triton(q, backend):
        from .triton_attention import fused_reconstruction_attention

        return fused_reconstruction_attention(q, kv, softmax_scale)
    return reconstruction_attention_reference(q, kv, softmax_scale)


def reconstruction_decode(
    q: Tensor,
    kv: KVFusion,
    softmax_scale: float | None = None,
    causal: bool = True,
    num_splits: int | None = None,
    backend: str | None = None,
) -> Tensor:
    """Decode: q `[b, t, hq, d]` (the last t positions) against `kv`'s source caches
    `[b, S, hkv, d]` that already hold them. Returns `[b, t, hq, d]` (forward only)."""
    if use_triton(q, backend):
        from .triton_decode import fused_reconstruction_decode

        return fused_reconstruction_decode(q, kv, softmax_scale, causal, num_splits)
    return reconstruction_decode_reference(q, kv, softmax_scale, causal)


def head_dim_supported(head_dim: int) -> bool:
    """The fused kernels take head dims that are multiples of 16 up to 256 (padded tiles)."""
    return head_dim in HEAD_DIMS


__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "HEAD_DIMS",
    "KVFusion",
    "head_dim_supported",
    "reconstruction_attention",
    "reconstruction_attention_reference",
    "reconstruction_decode",
    "reconstruction_decode_reference",
    "requested_backend",
    "triton_available",
    "use_triton",
]
