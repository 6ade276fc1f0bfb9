"""Megatron-Core on a machine without CUDA: the few patches it needs, in one place.

Megatron-Core 0.19 hard-codes CUDA in a handful of call sites that the training path hits even
with gloo process groups. `apply()` redirects them to the CPU, and only when CUDA is absent; on
a GPU it does nothing. Each patch names its reason. `PATCHES` is checked by
tests/unit/test_cpu_compat.py, which fails when an upstream change removes a patched target or
makes a patch unnecessary.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

TESTED_MEGATRON = "0.19"
_applied = False
_mode: TorchFunctionMode | None = None
# What each patch replaced, kept so tests can show the patch is still needed.
ORIGINALS: dict[str, object] = {}


@dataclass(frozen=True)
class Patch:
    name: str
    reason: str
    apply: Callable[[], None]


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Maps the CUDA literals in Megatron's optimizer/schedule code to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Megatron's optimizers assert 'torch.cuda.FloatTensor' etc.; report the CUDA name.
            name = func(*args)
            return name if ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)
        if _is_cuda_device(kwargs.get("device")):
            kwargs = {**kwargs, "device": "cpu"}
        if kwargs.get("pin_memory"):  # CP's RoPE slice pins its index (needs a CUDA driver)
            kwargs = {**kwargs, "pin_memory": False}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _DummyStream:
    """Stands in for torch.cuda.Stream/Event: every call is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *a, **k: None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _patch_current_device():
    ORIGINALS["current_device"] = torch.cuda.current_device
    torch.cuda.current_device = lambda: torch.device("cpu")


def _patch_synchronize():
    ORIGINALS["synchronize"] = torch.cuda.synchronize
    torch.cuda.synchronize = lambda *a, **k: None


def _patch_streams():
    ORIGINALS["streams"] = torch.cuda.current_stream
    torch.cuda.current_stream = lambda *a, **k: _DummyStream()
    torch.cuda.default_stream = lambda *a, **k: _DummyStream()
    torch.cuda.Stream = _DummyStream
    torch.cuda.Event = _DummyStream
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()


def _patch_rng_tracker():
    from megatron.core.tensor_parallel import random as mrandom

    ORIGINALS["rng_tracker"] = mrandom._get_cuda_rng_state
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    def add(self, name, seed):
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)

    mrandom.CudaRNGStatesTracker.add = add
    mrandom.CudaRNGStatesTracker.fork = fork


def _patch_cuda_literals():
    global _mode
    _mode = _CudaToCpuMode()
    _mode.__enter__()


def _patch_causal_masks():
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils

    ORIGINALS["causal_masks"] = utils.get_default_causal_mask

    def causal(sq):
        return torch.ones(sq, sq, dtype=torch.bool).triu(1)

    def sliding(sq, skv, window_size):
        m = torch.ones(sq, skv, dtype=torch.bool)
        return ~(m.triu(skv - sq - window_size[0]).tril(skv - sq + window_size[1]))

    for module in (utils, fused_softmax):
        module.get_default_causal_mask = causal
        module.get_sliding_window_causal_mask = sliding


PATCHES: list[Patch] = [
    Patch(
        "current_device",
        "attention buffers, TP mappings, p2p and DDP buffers allocate on torch.cuda.current_device()",
        _patch_current_device,
    ),
    Patch(
        "rng_tracker",
        "the TP RNG tracker keeps CUDA generator states; attention forks it even with dropout 0",
        _patch_rng_tracker,
    ),
    Patch(
        "synchronize",
        "batched p2p and the async checkpoint writer call torch.cuda.synchronize()",
        _patch_synchronize,
    ),
    Patch(
        "streams",
        "the grad-buffer sync calls torch.cuda.current_stream() unconditionally (0.19)",
        _patch_streams,
    ),
    Patch(
        "causal_masks",
        "the softmax's default causal mask is built with device='cuda'; it also runs inside "
        "backward (activation recompute), where no TorchFunctionMode is active",
        _patch_causal_masks,
    ),
    Patch(
        "cuda_literals",
        "schedules/clip_grads/optimizers use device='cuda', .cuda() and 'torch.cuda.*' type checks",
        _patch_cuda_literals,
    ),
]


def cuda_absent() -> bool:
    return not torch.cuda.is_available()


def apply(force: bool = False) -> bool:
    """Apply every patch once when CUDA is absent. Returns True if the patches are active."""
    global _applied
    if _applied:
        return True
    if not (force or cuda_absent()):
        return False
    import megatron.core

    version = megatron.core.__version__
    if not version.startswith(TESTED_MEGATRON):
        log.warning(
            "fusedkv_megatron's CPU patches were checked against megatron-core %s.x, found %s; "
            "run tests/unit/test_cpu_compat.py",
            TESTED_MEGATRON,
            version,
        )
    for patch in PATCHES:
        patch.apply()
    _applied = True
    return True


def is_applied() -> bool:
    return _applied
