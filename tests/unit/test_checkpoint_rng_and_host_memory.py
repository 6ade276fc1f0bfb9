"""RNG states restore only on the device kind they were taken on (a CPU checkpoint resumed on a
GPU and back), and the host-memory estimate adds what each save format and mode costs."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from fusedkv_megatron.planner.host_memory import (
    CPU_PROCESS_BASE,
    GPU_PROCESS_BASE,
    available_host_memory,
    host_memory,
)


@pytest.fixture
def tracker(megatron_tp1):
    from megatron.core import tensor_parallel

    return tensor_parallel.get_cuda_rng_tracker()


def _cuda_like_state(cpu_state: dict) -> dict:
    """What a GPU run saves: CUDA generator states (16 bytes, not the CPU's 5056)."""
    cuda = torch.zeros(16, dtype=torch.uint8)
    return {
        **cpu_state,
        "device_kind": "cuda",
        "cuda_rng_state": cuda,
        "rng_tracker_states": {k: cuda.clone() for k in cpu_state["rng_tracker_states"]},
    }


def test_a_gpu_checkpoint_on_cpu_restores_no_cuda_state(tracker):
    from fusedkv_megatron.training.checkpoint_state import rng_state, set_rng_state

    saved = rng_state()
    assert saved["device_kind"] == "cpu"
    expected_draw = (random.random(), np.random.rand(), torch.rand(1))
    for legacy in (True, False):  # checkpoints before the device_kind field, and after
        tracker_before = {k: v.clone() for k, v in tracker.get_states().items()}
        state = _cuda_like_state(saved)
        if legacy:
            del state["device_kind"]
        skipped = set_rng_state(state, here="cpu")
        assert skipped == [
            "the CUDA generator state",
            "Megatron's model-parallel RNG tracker states (cuda states)",
        ]
        # the host generators are restored, the tracker keeps its valid CPU states
        assert (random.random(), np.random.rand(), torch.rand(1)) == expected_draw
        for k, v in tracker.get_states().items():
            assert torch.equal(v, tracker_before[k])
    with tracker.fork():  # usable: the state still has the CPU generator's size
        torch.rand(1)


def test_a_cpu_checkpoint_on_gpu_restores_no_tracker_state(tracker, monkeypatch):
    from fusedkv_megatron.training.checkpoint_state import rng_state, set_rng_state

    saved = rng_state()
    set_calls = []
    monkeypatch.setattr(tracker, "set_states", lambda states: set_calls.append(states))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s: set_calls.append(s))
    skipped = set_rng_state(saved, here="cuda")
    assert skipped == ["Megatron's model-parallel RNG tracker states (cpu states)"]
    assert set_calls == []  # nothing of the CPU's size reaches a CUDA generator
    assert set_rng_state(saved, here="cpu") == [] and len(set_calls) == 1


N = 100_000_000  # parameters of one rank


def _estimate(**kw):
    args = dict(
        local_ranks=1, on_gpu=False, weights=4 * N, gradients=4 * N, optimizer=8 * N,
        activations=0, parameters=N, largest_tensor=N // 10, data_parallel=1,
        distributed_optimizer=True, fp32=True,
    )  # fmt: skip
    return host_memory(**{**args, **kw})


def test_host_memory_adds_what_each_save_costs():
    plain = _estimate()
    assert plain.training == CPU_PROCESS_BASE + 16 * N + 4 * N  # + Adam's step temporary
    assert plain.save == N // 10  # one streamed copy at a time
    assert _estimate(fully_reshardable=True).save == plain.save + 12 * N
    assert _estimate(async_save=True).save == plain.save + 16 * N  # copy-on-write worst case
    assert _estimate(saves=False).save == 0
    gpu = _estimate(on_gpu=True, local_ranks=8)
    assert gpu.training == GPU_PROCESS_BASE and gpu.save == 12 * N  # staged to host memory
    assert gpu.node == 8 * (GPU_PROCESS_BASE + 12 * N)
    assert "8 local rank(s)" in gpu.describe()


def test_available_memory_counts_an_address_space_limit(monkeypatch):
    import resource

    from fusedkv_megatron.planner import host_memory as hm

    monkeypatch.setattr(hm, "_meminfo", lambda name: 100 * 2**30)
    monkeypatch.setattr(hm, "_cgroup_headroom", lambda: None)
    monkeypatch.setattr(resource, "getrlimit", lambda which: (10 * 2**30, resource.RLIM_INFINITY))
    available, source = available_host_memory(resident_now=2**30, virtual_now=4 * 2**30)
    assert available == 7 * 2**30 and "address-space limit 10.0 GiB" in source


def test_local_ranks_come_from_torchrun_or_slurm(monkeypatch):
    from fusedkv_megatron.planner.host_memory import local_ranks_from_env

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("SLURM_TASKS_PER_NODE", raising=False)
    assert local_ranks_from_env(default=3) == 3
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "4(x2),3")
    assert local_ranks_from_env() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert local_ranks_from_env() == 8
