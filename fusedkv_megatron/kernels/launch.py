"""Static kernel configurations and a launcher that steps down when one does not fit.

The block sizes are chosen per kernel and head_dim, not autotuned (autotuning costs minutes of
compilation per shape and is nondeterministic across runs). If a configuration exceeds the
GPU's shared memory, `launch` retries with fewer pipeline stages, then smaller blocks, and
remembers the configuration that worked.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

try:  # the exception Triton raises for shared-memory overflow
    from triton.runtime.errors import OutOfResources
except ImportError:  # pragma: no cover - very old or very new Triton
    OutOfResources = RuntimeError


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2

    def smaller(self) -> KernelConfig | None:
        """Fewer stages first; then halve the larger block (both if equal), keeping >= 16.

        Blocks are powers of two, so whichever of BLOCK_M/BLOCK_N a kernel needs to be a
        multiple of the other stays so."""
        if self.num_stages > 1:
            return replace(self, num_stages=self.num_stages - 1)
        m, n = self.block_m, self.block_n
        if max(m, n) <= 16:
            return None
        if m == n:
            return replace(self, block_m=m // 2, block_n=n // 2, num_stages=2)
        if m > n:
            return replace(self, block_m=m // 2, num_stages=2)
        return replace(self, block_n=n // 2, num_stages=2)


# Step-downs that happened, so later calls start from a configuration that fits.
_working: dict[tuple[str, int], KernelConfig] = {}


def recorded(kind: str, head_dim: int) -> KernelConfig | None:
    """The configuration a step-down found for `(kind, head_dim)`, if one happened."""
    return _working.get((kind, head_dim))


def pick(table: dict[int, KernelConfig], head_dim: int, kind: str) -> KernelConfig:
    """The GPU configuration for `kind` at (padded) `head_dim`: a recorded step-down, else the
    table's entry for the smallest listed head_dim >= it (the largest listed one otherwise)."""
    if (kind, head_dim) in _working:
        return _working[(kind, head_dim)]
    listed = sorted(table)
    return table[next((h for h in listed if h >= head_dim), listed[-1])]


def launch(
    kernel,
    kind: str,
    head_dim: int,
    cfg: KernelConfig,
    build: Callable[[KernelConfig], tuple[tuple, tuple, dict]],
    device: torch.device | None = None,
) -> KernelConfig:
    """Run `kernel[grid](*args, **meta)` with `(grid, args, meta) = build(cfg)` on `device`
    (the tensors' device: Triton launches on the current CUDA device), stepping down the
    configuration on a resource overflow (and remembering it under `(kind, head_dim)`).
    Returns what ran."""
    first = cfg
    on_device = (
        torch.cuda.device(device)
        if device is not None and device.type == "cuda"
        else contextlib.nullcontext()
    )
    while True:
        grid, args, meta = build(cfg)
        try:
            with on_device:
                kernel[grid](*args, **meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        except OutOfResources as err:
            smaller = cfg.smaller()
            if smaller is None:
                raise
            warnings.warn(
                f"{kind} kernel config {cfg} does not fit ({err}); trying {smaller}",
                stacklevel=2,
            )
            cfg = smaller
            continue
        if cfg != first:
            _working[(kind, head_dim)] = cfg
        return cfg


__all__ = ["KernelConfig", "launch", "pick", "recorded"]
