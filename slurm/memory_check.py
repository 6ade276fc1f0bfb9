"""The memory check of slurm/submit.py: the planner's prediction for a job, and the preset table.

The planner (fusedkv_megatron.planner) is plain Python; it is imported from this checkout, so
a login node needs Python and PyYAML, not torch. Where it cannot be imported the check says so
and the job is submitted unchecked.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from presets import PRESETS

REPO = Path(__file__).resolve().parent.parent
TABLE_GPUS = ((80.0, "H100"), (141.0, "H200"))


class MemoryCheckError(ValueError):
    """A job predicted not to fit (or refused by the trainer's rules), with layouts that fit."""


def load_planner():
    """fusedkv_megatron.planner.cli from this checkout, or None and why it cannot be imported
    (the planner needs no torch, but its config reading needs PyYAML)."""
    if str(REPO) not in sys.path:
        sys.path.append(str(REPO))
    try:
        from fusedkv_megatron.planner import cli
    except ImportError as e:
        return None, f"{type(e).__name__}: {e}"
    return cli, None


def memory_check(
    opts: argparse.Namespace, config: Path, nodes: int, nproc: int, tp: int, pp: int, extra
) -> list[str]:
    """The planner's prediction for this job as script-header lines. Raises MemoryCheckError when
    the layout is predicted not to fit (unless --ignore-memory-check), naming layouts that fit."""
    cli, why = load_planner()
    if cli is None:
        return [f"memory check: not done, the planner cannot be imported here ({why})"]
    argv = ["--config", str(config)]
    argv += ["--kv-sharing", opts.kv_sharing] if opts.kv_sharing else []
    argv += ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]
    argv += list(extra)
    argv += ["--gpus-per-node", str(nproc), "--nodes", str(nodes)]
    argv += ["--gpu-memory", str(opts.gpu_memory), "--gpu-kind", opts.gpu_kind]
    argv += ["--gemm-efficiency", str(opts.gemm_efficiency)]
    try:
        planned, _ = cli.plan_from_argv(argv)
    except SystemExit:
        return ["memory check: not done, the planner rejects the trainer arguments (above)"]
    except ValueError as e:  # the trainer's or the planner's named error
        raise MemoryCheckError(f"the trainer would refuse this job: {e}") from None
    lines = [f"predicted (fusedkv-plan): {cli.summary(planned)}"]
    if planned.fits:
        return lines
    if opts.ignore_memory_check:
        return [*lines, "memory check: predicted not to fit, submitted anyway"]
    batch = planned.layout.global_batch_size
    eff = cli.Efficiency(ceiling=opts.gemm_efficiency)
    found = cli.search(planned.job, planned.machine, batch, planned.layout, eff)
    fitting = found[:5]
    suggestions = "\n".join(
        f"  -- {' '.join(cli.layout_flags(p.layout))}   ({cli.gib(p.peak)} GiB, "
        f"{p.speed.tokens_per_s:,.0f} tokens/s, bound by {cli.bound_by(p)})"
        for p in fitting
    )
    if found:
        suggestions += "\n" + cli.why_first(found)
    raise MemoryCheckError(
        f"{planned.layout.describe()} is predicted not to fit: {cli.summary(planned)}.\n"
        + (
            f"Layouts that fit (trainer flags after --):\n{suggestions}\n"
            if fitting
            else "No layout of this machine and global batch fits; add nodes or GPU memory.\n"
        )
        + "Pass --ignore-memory-check to submit anyway (docs/planner.md: the model, its limits)"
    )


def preset_table(gemm_efficiency: float = 0.6) -> str:
    """Every GPU preset's layout with its predicted per-GPU peak and throughput on 80 GB and
    141 GB GPUs, and the fastest layout the planner finds for each (a Markdown table)."""
    cli, why = load_planner()
    if cli is None:
        raise MemoryCheckError(f"the planner cannot be imported here ({why})")
    rows = [
        "| preset | GPUs | preset layout | peak / GPU, 80 GB | peak / GPU, 141 GB | tokens/s "
        "(predicted MFU), 80 / 141 GB | fastest that fits, 80 GB | fastest that fits, 141 GB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for preset in (p for p in PRESETS.values() if not p.cpu):
        config = REPO / "examples" / "configs" / f"{preset.name}.yaml"
        cells, best, speeds = [], [], []
        eff = cli.Efficiency(ceiling=gemm_efficiency)
        for memory, kind in TABLE_GPUS:
            planned, _ = cli.plan_from_argv(
                ["--config", str(config), "--gpus-per-node", str(preset.gpus_per_node),
                 "--nodes", str(preset.nodes), "--gpu-memory", str(memory), "--gpu-kind", kind,
                 "--gemm-efficiency", str(gemm_efficiency)]
            )  # fmt: skip
            verdict = "fits" if planned.fits else "does not fit"
            cells.append(f"{cli.gib(planned.peak)} GiB ({verdict})")
            lay = planned.layout
            speeds.append(f"{planned.speed.tokens_per_s:,.0f} ({planned.speed.mfu:.0%})")
            found = cli.search(planned.job, planned.machine, lay.global_batch_size, lay, eff)
            best.append(
                f"{found[0].layout.describe()}, {cli.gib(found[0].peak)} GiB, "
                f"{found[0].speed.tokens_per_s:,.0f} tokens/s, {cli.bound_by(found[0])}"
                if found
                else "none"
            )
        rows.append(
            f"| {preset.name} | {preset.nodes} x {preset.gpus_per_node} | {lay.describe()}"
            f"{f' CP={preset.context_parallel}' if preset.context_parallel > 1 else ''} | "
            f"{cells[0]} | {cells[1]} | {' / '.join(speeds)} | {best[0]} | {best[1]} |"
        )
    return "\n".join(rows)
