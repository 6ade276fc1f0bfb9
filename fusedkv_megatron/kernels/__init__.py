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
import logging
import os

from torch import Tensor

from ..fusion import KVFusion
from .reference import reconstruction_attention_reference, reconstruction_decode_reference

BACKEND_ENV = "FUSEDKV_ATTENTION_BACKEND"
BACKENDS = ("auto", "triton", "torch")
HEAD_DIMS = tuple(range(16, 257, 16))  # what the fused kernels take (padded tiles)
GRID_Y_MAX = 65535  # CUDA's limit on a grid's second dimension
INT32_MAX = 2**31 - 1
log = logging.getLogger(__name__)
_fallbacks_logged: set[str] = set()


def _largest_offset(shape, strides, batch_dim: int) -> int:
    return sum((n - 1) * abs(st) for i, (n, st) in enumerate(zip(shape, strides)) if i != batch_dim)


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def launch_limit_blockers(q: Tensor, source: Tensor, decode: bool = False) -> list[str]:
    """Why the kernels' launch limits rule these tensors out (empty if they fit): the
    kernels put batch x heads programs in the grid's second dimension (at most 65535 in CUDA)
    and index everything but the batch with int32, so every tensor they read or write (the
    inputs as given, and outputs and gradients, which are contiguous) must keep its largest
    offset within one sequence below 2^31. Training tensors are `[s, b, h, d]`, decode
    tensors `[b, s, h, d]`."""
    batch_dim = 0 if decode else 1
    b = q.shape[batch_dim]
    heads = source.shape[-2] if decode else q.shape[-2]
    why = []
    if b * heads > GRID_Y_MAX:
        why.append(
            f"batch {b} x {heads} {'KV ' if decode else ''}heads = {b * heads} programs exceed "
            f"CUDA's grid limit of {GRID_Y_MAX} in the second dimension"
        )
    for name, x in (("q", q), ("source", source)):
        for strides in (x.stride(), _contiguous_strides(x.shape)):
            largest = _largest_offset(x.shape, strides, batch_dim)
            if largest > INT32_MAX:
                why.append(
                    f"{name} {tuple(x.shape)}: largest offset within one sequence {largest} "
                    f"exceeds int32"
                )
                break
    return why


def log_fallback_once(what: str, why: list[str]) -> None:
    """One log line per distinct reason the Triton path fell back to the torch path."""
    text = f"{what}: {'; '.join(why)}; falling back to the materialising torch path ({BACKEND_ENV}=auto)"
    if text not in _fallbacks_logged:
        _fallbacks_logged.add(text)
        log.warning(text)


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
    if use_triton(q, backend) and _fits(q, kv, backend, decode=False):
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
    if use_triton(q, backend) and _fits(q, kv, backend, decode=True):
        from .triton_decode import fused_reconstruction_decode

        return fused_reconstruction_decode(q, kv, softmax_scale, causal, num_splits)
    return reconstruction_decode_reference(q, kv, softmax_scale, causal)


def _fits(q: Tensor, kv: KVFusion, backend: str | None, decode: bool) -> bool:
    """Under auto, tensors beyond the kernels' launch limits take the torch path (one log
    line); a forced triton backend goes on to the kernel, whose host side raises."""
    if requested_backend(backend) == "triton":
        return True
    why = launch_limit_blockers(q, kv.k_sources[0], decode=decode)
    if why:
        log_fallback_once("fused attention kernel" if not decode else "fused decode kernel", why)
    return not why


def head_dim_supported(head_dim: int) -> bool:
    """The fused kernels take head dims that are multiples of 16 up to 256 (padded tiles)."""
    return head_dim in HEAD_DIMS


__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "HEAD_DIMS",
    "KVFusion",
    "head_dim_supported",
    "launch_limit_blockers",
    "reconstruction_attention",
    "reconstruction_attention_reference",
    "reconstruction_decode",
    "reconstruction_decode_reference",
    "requested_backend",
    "triton_available",
    "use_triton",
]
