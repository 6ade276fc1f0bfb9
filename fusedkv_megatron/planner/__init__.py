"""Memory and throughput planner: will a training run fit its GPUs, and how fast will it go?

Plain Python (no torch, no Megatron), so it runs where the job is submitted:

    from fusedkv_megatron.planner import Job, Layout, Machine, plan, search
    p = plan(job, Layout(tp=2, dp=64, sequence_parallel=True, num_microbatches=8), machine)
    p.peak, p.fits, p.speed.tokens_per_s

The command line is `fusedkv-plan` (cli.py); docs/planner.md states the model, its sources
and its limits.
"""

from __future__ import annotations

from .activations import ChunkActivations, chunk_activations
from .flops import Throughput, throughput
from .layout import Chunk, GiB, Job, Layout, Machine, PlanError, check, chunks
from .memory import RankMemory, chunk_parameters, memory_per_rank
from .search import Plan, plan, search

__all__ = [
    "Chunk",
    "ChunkActivations",
    "GiB",
    "Job",
    "Layout",
    "Machine",
    "Plan",
    "PlanError",
    "RankMemory",
    "Throughput",
    "check",
    "chunk_activations",
    "chunk_parameters",
    "chunks",
    "memory_per_rank",
    "plan",
    "search",
    "throughput",
]
