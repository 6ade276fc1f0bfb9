"""Memory and throughput planner: will a training run fit its GPUs, and how fast will it go?

Plain Python (no torch, no Megatron), so it runs where the job is submitted:

    from fusedkv_megatron.planner import Job, Layout, Machine, plan, search
    p = plan(job, Layout(tp=2, dp=64, sequence_parallel=True, num_microbatches=8), machine)
    p.peak, p.fits, p.speed.tokens_per_s, p.speed.terms

Memory (activations.py, memory.py), communication bytes (comm.py), step time (flops.py, from
efficiency.py's GEMM curve and network.py's machine), Megatron-LM's formula for comparison
(megatron_formula.py), the search (search.py).

The command line is `fusedkv-plan` (cli.py); docs/planner.md states the model, its sources
and its limits.
"""

from __future__ import annotations

from .activations import ChunkActivations, chunk_activations
from .comm import Transfer, step_bytes, step_transfers
from .efficiency import Efficiency
from .flops import Throughput, throughput
from .fusions import Fusions
from .layout import Chunk, GiB, Job, Layout, Machine, PlanError, check, chunks
from .memory import RankMemory, chunk_parameters, memory_per_rank
from .network import Network, network_for
from .search import Plan, plan, search

__all__ = [
    "Chunk",
    "ChunkActivations",
    "Efficiency",
    "Fusions",
    "GiB",
    "Job",
    "Layout",
    "Machine",
    "Network",
    "Plan",
    "PlanError",
    "RankMemory",
    "Throughput",
    "Transfer",
    "check",
    "chunk_activations",
    "chunk_parameters",
    "chunks",
    "memory_per_rank",
    "network_for",
    "plan",
    "search",
    "step_bytes",
    "step_transfers",
    "throughput",
]
