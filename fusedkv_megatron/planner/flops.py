"""Model FLOPs per step, and the step time and throughput they take at an assumed MFU.

Model FLOPs are Megatron-LM's accounting (`training/model_size.py`): 2 per multiply-add, the
attention over the full sequence, backward twice the forward (Narayanan et al. 2021, appendix).
The step time is what those FLOPs take on all GPUs at the assumed model-FLOPs utilisation,
stretched by work the MFU figure does not count: the pipeline bubble, (PP - 1) / (VPP * m) of
the ideal time (Narayanan et al. 2021), and recomputation (full: one more forward of the
recomputed layers; selective: one more forward of the attention core). Communication is not
modelled beyond what the assumed MFU absorbs.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..training.model_size import flops_per_token, forward_flops_per_token
from .layout import Job, Layout, Machine


@dataclass(frozen=True)
class Throughput:
    model_flops_per_step: float
    mfu: float  # assumed for the unstalled, non-recomputing part of the step
    step_time_s: float
    tokens_per_s: float
    bubble: float  # fraction of the ideal time added by the pipeline bubble
    recompute: float  # fraction of the model FLOPs computed again


def recompute_fraction(job: Job, layout: Layout) -> float:
    """Extra FLOPs of recomputation, as a fraction of the step's model FLOPs."""
    if layout.recompute == "none":
        return 0.0
    shape = job.padded_shape(layout)
    fwd = forward_flops_per_token(shape, job.kv, job.seq_length)
    if layout.recompute == "selective":
        extra = fwd.attention
    else:
        per_chunk = shape.num_layers // (layout.pp * (layout.vpp or 1))
        share = 1.0
        if layout.recompute_method == "block":
            share = min(layout.recompute_num_layers, per_chunk) / per_chunk
        extra = share * (fwd.layer_matmuls + fwd.attention)
    return extra / (3.0 * fwd.total)


def throughput(job: Job, layout: Layout, machine: Machine, mfu: float) -> Throughput:
    """Predicted step time and tokens/s of `layout` on `machine` at model-FLOPs utilisation
    `mfu` (0 < mfu <= 1) for the unstalled, non-recomputing part of the step."""
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu={mfu} must be in (0, 1], e.g. 0.4 for 40%")
    tokens = layout.global_batch_size * job.seq_length
    flops = flops_per_token(job.padded_shape(layout), job.kv, job.seq_length) * tokens
    ideal = flops / (layout.gpus * machine.peak_tflops * 1e12 * mfu)
    bubble = (layout.pp - 1) / ((layout.vpp or 1) * layout.num_microbatches)
    extra = recompute_fraction(job, layout)
    step = ideal * (1 + extra + bubble)
    return Throughput(flops, mfu, step, tokens / step, bubble, extra)


__all__ = ["Throughput", "recompute_fraction", "throughput"]
