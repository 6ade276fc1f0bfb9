"""One layout's plan (memory per rank, throughput, whether it fits) and the search over
layouts that fit a machine, best estimated throughput first."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..config import KVSharingError
from .flops import Throughput, throughput
from .layout import Job, Layout, Machine, PlanError, check
from .memory import RankMemory, memory_per_rank


@dataclass(frozen=True)
class Plan:
    job: Job
    layout: Layout
    machine: Machine
    ranks: tuple[RankMemory, ...]
    speed: Throughput

    @property
    def peak(self) -> int:
        """The largest per-GPU peak over the pipeline ranks, bytes."""
        return max(r.peak for r in self.ranks)

    @property
    def worst_rank(self) -> RankMemory:
        return max(self.ranks, key=lambda r: r.peak)

    @property
    def fits(self) -> bool:
        return self.peak <= self.machine.usable_bytes


def plan(
    job: Job, layout: Layout, machine: Machine, mfu: float = 0.4, norm_impl: str = "fused"
) -> Plan:
    """Memory and throughput of `layout`; raises PlanError/KVSharingError if it cannot run."""
    check(job, layout)
    if layout.gpus != machine.gpus:
        raise PlanError(
            f"{layout.describe()} uses {layout.gpus} GPUs but the machine has "
            f"{machine.nodes} x {machine.gpus_per_node} = {machine.gpus}"
        )
    ranks = tuple(memory_per_rank(job, layout, norm_impl))
    return Plan(job, layout, machine, ranks, throughput(job, layout, machine, mfu))


def _powers_of_two(limit: int) -> list[int]:
    out, v = [], 1
    while v <= limit:
        out.append(v)
        v *= 2
    return out


def candidates(job: Job, machine: Machine, global_batch_size: int, base: Layout):
    """Layouts over TP (within a node), PP, VPP, micro-batch and recompute that the trainer
    accepts for this global batch. SP is on whenever TP > 1; the optimizer setting and uneven
    stages of `base` are kept."""
    layers = job.shape.num_layers
    for tp in _powers_of_two(machine.gpus_per_node):
        for pp in _powers_of_two(min(machine.gpus // tp, layers)):
            if machine.gpus % (tp * pp):
                continue
            dp = machine.gpus // (tp * pp)
            for vpp in [None, *(v for v in (2, 3, 4, 6, 8) if pp > 1)]:
                for mbs in (1, 2, 4, 8):
                    if global_batch_size % (mbs * dp):
                        continue
                    for rec in ("none", "selective", "full"):
                        yield replace(
                            base,
                            tp=tp,
                            pp=pp,
                            dp=dp,
                            vpp=vpp,
                            sequence_parallel=tp > 1,
                            micro_batch_size=mbs,
                            num_microbatches=global_batch_size // (mbs * dp),
                            recompute=rec,
                            recompute_method="uniform",
                            recompute_num_layers=1,
                            first_stage_layers=base.first_stage_layers if pp > 1 else None,
                            last_stage_layers=base.last_stage_layers if pp > 1 else None,
                        )


def search(
    job: Job,
    machine: Machine,
    global_batch_size: int,
    base: Layout | None = None,
    mfu: float = 0.4,
    norm_impl: str = "fused",
) -> list[Plan]:
    """Every candidate layout that fits, best estimated throughput first; among equals, a
    layout with headroom (peak within 90% of the usable memory) first, then less model
    parallelism (fewer TP x PP GPUs), then larger micro-batches."""
    found = []
    for layout in candidates(job, machine, global_batch_size, base or Layout()):
        try:
            p = plan(job, layout, machine, mfu, norm_impl)
        except (PlanError, KVSharingError):
            continue
        if p.fits:
            found.append(p)
    return sorted(
        found,
        key=lambda p: (
            -round(p.speed.tokens_per_s, 6),
            p.peak > 0.9 * p.machine.usable_bytes,
            p.layout.tp * p.layout.pp,
            p.layout.vpp or 1,
            -p.layout.micro_batch_size,
            p.peak,
        ),
    )


__all__ = ["Plan", "candidates", "plan", "search"]
