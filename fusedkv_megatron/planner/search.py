"""One layout's plan (memory per rank, throughput, whether it fits) and the search over
layouts that fit a machine, best estimated throughput first, with what each row is bound by
and why the first row wins."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..config import KVSharingError
from .efficiency import Efficiency
from .flops import TERM_NAMES, Throughput, throughput
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
    job: Job,
    layout: Layout,
    machine: Machine,
    eff: Efficiency | None = None,
    norm_impl: str = "fused",
) -> Plan:
    """Memory and throughput of `layout`; raises PlanError/KVSharingError if it cannot run."""
    check(job, layout)
    if layout.gpus != machine.gpus:
        raise PlanError(
            f"{layout.describe()} uses {layout.gpus} GPUs but the machine has "
            f"{machine.nodes} x {machine.gpus_per_node} = {machine.gpus}"
        )
    ranks = tuple(memory_per_rank(job, layout, norm_impl))
    return Plan(job, layout, machine, ranks, throughput(job, layout, machine, eff))


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
    eff: Efficiency | None = None,
    norm_impl: str = "fused",
) -> list[Plan]:
    """Every candidate layout that fits, best estimated throughput first; among equals (see
    `ties`), a layout with headroom (peak within 90% of the usable memory) first, then less
    model parallelism (fewer TP x PP GPUs), then larger micro-batches."""
    found = []
    for layout in candidates(job, machine, global_batch_size, base or Layout()):
        try:
            p = plan(job, layout, machine, eff, norm_impl)
        except (PlanError, KVSharingError):
            continue
        if p.fits:
            found.append(p)
    return sorted(
        found,
        key=lambda p: (
            -round(p.speed.tokens_per_s, 3),
            p.peak > 0.9 * p.machine.usable_bytes,
            p.layout.tp * p.layout.pp,
            p.layout.vpp or 1,
            -p.layout.micro_batch_size,
            p.peak,
        ),
    )


def tied(a: Plan, b: Plan) -> bool:
    """The same predicted throughput (to one part in a million: the model gives both layouts
    the same step time, e.g. they differ only in what it does not model)."""
    x, y = a.speed.tokens_per_s, b.speed.tokens_per_s
    return abs(x - y) <= 1e-6 * max(x, y)


def ties(plans: list[Plan]) -> list[int]:
    """For each ranked plan, the rank (0-based) of the first plan it ties with."""
    out = []
    for i, p in enumerate(plans):
        j = i
        while j > 0 and tied(plans[j - 1], p):
            j -= 1
        out.append(out[j] if j < i else i)
    return out


def bound_by(p: Plan) -> str:
    """What the step time of a plan is mostly made of: the largest term, and the largest
    overhead when compute leads."""
    sp = p.speed
    head = TERM_NAMES[sp.dominant]
    if sp.dominant in ("compute", "recompute"):
        over = sp.largest_overhead
        share = sp.terms[over] / sp.step_time_s
        if share >= 0.005:
            head += f" (then {TERM_NAMES[over]} {share:.0%})"
    return head


def why_first(plans: list[Plan]) -> str:
    """Why the first plan ranks first: the step-time terms where it beats the best plan of
    a different model-parallel shape (TP, PP, VPP) and the runner-up."""
    if not plans:
        return ""
    best = plans[0]
    shape = (best.layout.tp, best.layout.pp, best.layout.vpp)
    others = [p for p in plans[1:] if (p.layout.tp, p.layout.pp, p.layout.vpp) != shape]
    rivals = [q for q in (plans[1] if len(plans) > 1 else None, others[0] if others else None)
              if q is not None]  # fmt: skip
    lines = [f"#1 {best.layout.describe()}: {best.speed.tokens_per_s:,.0f} tokens/s, "
             f"step {best.speed.step_time_s:.3f} s, bound by {bound_by(best)}"]  # fmt: skip
    seen = set()
    for q in rivals:
        if id(q) in seen:
            continue
        seen.add(id(q))
        rank = plans.index(q) + 1
        gap = q.speed.step_time_s - best.speed.step_time_s
        diffs = sorted(
            ((q.speed.terms[k] - best.speed.terms[k], k) for k in best.speed.terms),
            reverse=True,
        )
        parts = [f"{TERM_NAMES[k]} {d:+.3f} s" for d, k in diffs if abs(d) >= 5e-4]
        if tied(best, q):
            verdict = "ties with"
        else:
            verdict = f"is {gap:.3f} s/step faster than"
        lines.append(
            f"   {verdict} #{rank} {q.layout.describe()}: its step differs by "
            f"{', '.join(parts) or 'nothing measurable'}"
        )
    return "\n".join(lines)


__all__ = ["Plan", "bound_by", "candidates", "plan", "search", "tied", "ties", "why_first"]
