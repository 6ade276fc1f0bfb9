"""Will this run's host memory hold training and its checkpoint saves? Checked after the model is
built and before the first step (where the optimizer's moments, the activations and the first
save are still to come), against what the node has: MemAvailable, the memory cgroup's limit, or
a process address-space limit. Above it the run stops (exit 2) with the numbers and the fixes;
close to it, one warning line. The estimate is planner.host_memory's, which fusedkv-plan prints.
"""

from __future__ import annotations

import re

import torch

from ..planner.host_memory import (
    WARN_FRACTION,
    GiB,
    HostMemory,
    available_host_memory,
    for_job,
    local_ranks_from_env,
)
from .arguments import ArgumentError


def estimate(rt, world_size: int, on_gpu: bool) -> HostMemory:
    """The planner's per-rank figures for this run as built, turned into the node's host peak."""
    from ..planner.memory import memory_per_rank
    from .memory_report import job_and_layout

    job, layout = job_and_layout(rt)
    ranks = memory_per_rank(job, layout, "fused" if on_gpu else "composite")
    local = min(local_ranks_from_env(world_size), world_size)
    return for_job(job, layout, ranks, rt.args, local_ranks=local, on_gpu=on_gpu)


def _status_bytes(name: str) -> int:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{name}:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return 0
    return int(m.group(1)) * 1024 if m else 0


def _fixes(args, est: HostMemory) -> str:
    fixes = []
    if est.local_ranks > 1:
        fixes.append("fewer ranks per node (torchrun --nproc-per-node, more nodes)")
    if not est.on_gpu:
        fixes.append("a smaller --micro-batch-size or activation recompute")
    if not args.use_distributed_optimizer:
        fixes.append("--use-distributed-optimizer (shards Adam's state over data-parallel ranks)")
    if args.dist_ckpt_optim_fully_reshardable:
        fixes.append("the default optimizer format (drop --dist-ckpt-optim-fully-reshardable)")
    if args.async_save and not est.on_gpu:
        fixes.append("synchronous saves (drop --async-save)")
    fixes.append("--no-host-memory-check to run anyway")
    return "; ".join(fixes)


def check_host_memory(rt) -> HostMemory:
    """Raise ArgumentError (exit 2) when the estimate exceeds the node's available memory."""
    args = rt.args
    on_gpu = torch.cuda.is_available()
    est = estimate(rt, torch.distributed.get_world_size(), on_gpu)
    resident, virtual = _status_bytes("VmRSS"), _status_bytes("VmSize")
    available, source = available_host_memory(resident, virtual, est.local_ranks)
    need = est.node
    if need > available:
        raise ArgumentError(
            f"host memory: this run needs about {est.describe()}, and {available / GiB:.1f} "
            f"GiB are available ({source}); it would be killed at the latest at its first "
            f"checkpoint save. Fixes: {_fixes(args, est)}"
        )
    if need > WARN_FRACTION * available and torch.distributed.get_rank() == 0:
        print(
            f"warning: host memory: this run needs about {est.describe()}, "
            f"{need / available:.0%} of the {available / GiB:.1f} GiB available ({source})",
            flush=True,
        )
    return est
