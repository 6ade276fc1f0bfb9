"""The Megatron CPU patches: each still targets something upstream has, each is still needed
(the unpatched call fails without CUDA), and each does its job. When an upstream release
removes a target or stops needing a patch, this file fails and names the patch."""

from __future__ import annotations

import inspect
import re

import pytest
import torch

from fusedkv_megatron.compat import cpu, upstream

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU patches apply only without CUDA"
)


def test_all_patches_applied():
    assert cpu.is_applied()
    assert [p.name for p in cpu.PATCHES] == [
        "current_device",
        "rng_tracker",
        "synchronize",
        "streams",
        "causal_masks",
        "cuda_literals",
    ]
    assert all(p.reason for p in cpu.PATCHES)


@pytest.mark.parametrize("name", ["current_device", "streams", "rng_tracker", "causal_masks"])
def test_patch_still_needed(name):
    original = cpu.ORIGINALS[name]
    args = (4,) if name == "causal_masks" else ()
    with pytest.raises((RuntimeError, AssertionError, AttributeError)):
        # The unpatched upstream call needs a CUDA driver. Run it outside the literal-mapping
        # mode so that only the patch under test is missing.
        with torch._C.DisableTorchFunction():
            original(*args)


def test_cuda_literals_still_in_megatron():
    """The TorchFunctionMode exists for these literals; if they are gone, drop the mode."""
    from megatron.core import optimizer
    from megatron.core.optimizer import clip_grads
    from megatron.core.pipeline_parallel import schedules

    sources = [inspect.getsource(m) for m in (schedules, clip_grads, optimizer.optimizer)]
    hits = sum(
        len(re.findall(r"""device=['"]cuda['"]|\.cuda\(\)|torch\.cuda\.FloatTensor""", s))
        for s in sources
    )
    assert hits > 0, "Megatron no longer hard-codes CUDA here: remove the cuda_literals patch"


def test_patched_behaviour():
    assert torch.cuda.current_device() == torch.device("cpu")
    torch.cuda.synchronize()
    with torch.cuda.stream(torch.cuda.current_stream()):
        pass
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.ones(2).cuda().device.type == "cpu"
    assert torch.ones(2).type() == "torch.cuda.FloatTensor"

    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    tracker = CudaRNGStatesTracker()
    tracker.add("a", 7)
    outside = torch.get_rng_state()
    with tracker.fork("a"):
        first = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), outside)  # the default stream is untouched
    fresh = CudaRNGStatesTracker()
    fresh.add("a", 7)
    with fresh.fork("a"):
        assert torch.equal(torch.rand(3), first)  # same seed, same stream

    from megatron.core.transformer.utils import get_default_causal_mask

    assert torch.equal(get_default_causal_mask(3), torch.ones(3, 3, dtype=torch.bool).triu(1))


def test_upstream_checkpoint_without_output_bug_still_present():
    """When upstream fixes CheckpointWithoutOutput's fp8 flag, delete compat/upstream.py."""
    assert upstream.checkpoint_without_output_fp8_bug_present()
