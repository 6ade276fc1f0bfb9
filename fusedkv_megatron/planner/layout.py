"""What the planner is asked about: a model, a parallel layout, a machine; and how the layers
split into pipeline chunks.

Everything here is plain Python (no torch, no Megatron), so `slurm/submit.py` can plan on a
login node. The chunk split mirrors Megatron-Core's `get_transformer_layer_offset` /
`get_num_layers_to_build` for even stages and for uneven first/last stages without a virtual
pipeline; a test compares it with `pipeline.pipeline_chunks` (which calls Megatron).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

from ..config import KVSharingConfig, KVSharingError
from ..fusion import LayerPlan, Source, layer_plans, live_sources
from ..training.model_size import PEAK_BF16_TFLOPS, ModelShape, gpu_peak_tflops, padded_vocab
from .fusions import Fusions
from .network import Network, network_for

RECOMPUTE = ("none", "selective", "full")
PRECISIONS = {"bf16": 2, "fp16": 2, "fp32": 4}
GiB = 1 << 30


class PlanError(ValueError):
    """A layout the trainer would refuse (or the planner cannot model), with the fix."""


@dataclass(frozen=True)
class Layout:
    """How a run is parallelised and batched. `recompute`: none | selective (core attention,
    Megatron's default module) | full (`recompute_method` uniform|block over
    `recompute_num_layers`)."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    vpp: int | None = None
    sequence_parallel: bool = False
    micro_batch_size: int = 1
    num_microbatches: int = 1
    recompute: str = "none"
    recompute_method: str = "uniform"
    recompute_num_layers: int = 1
    distributed_optimizer: bool = True
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None
    overlap_grad_reduce: bool = False  # DP gradient reduce during backward
    overlap_param_gather: bool = False  # distributed optimizer's gather during the next forward

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.dp * self.num_microbatches

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    def describe(self) -> str:
        rec = self.recompute
        if rec == "full":
            rec = f"full/{self.recompute_method}/{self.recompute_num_layers}"
        return (
            f"TP={self.tp}{'+SP' if self.sequence_parallel else ''} PP={self.pp} "
            f"VPP={self.vpp or 1} DP={self.dp} mbs={self.micro_batch_size} "
            f"m={self.num_microbatches} recompute={rec}"
        )


@dataclass(frozen=True)
class Machine:
    """The GPUs a job gets. Memory sizes are GiB (an "80 GB" H100 has 79.6 GiB, a "141 GB"
    H200 140.4 GiB). `reserve_gb` is memory the model cannot use: CUDA context, NCCL buffers
    and allocator fragmentation (an allowance, not a measurement)."""

    gpus_per_node: int
    nodes: int
    gpu_memory_gb: float
    gpu_kind: str = "H100"
    reserve_gb: float = 4.0
    network: Network | None = None  # None: the GPU kind's default (network.py)

    @property
    def net(self) -> Network:
        return self.network if self.network is not None else network_for(self.gpu_kind)

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def usable_bytes(self) -> int:
        return int((self.gpu_memory_gb - self.reserve_gb) * GiB)

    @property
    def peak_tflops(self) -> float:
        peak = gpu_peak_tflops(self.gpu_kind)
        if peak is None:
            raise PlanError(
                f"gpu kind {self.gpu_kind!r} has no known bf16 peak; use one of "
                f"{', '.join(PEAK_BF16_TFLOPS)}"
            )
        return peak


@dataclass(frozen=True)
class Job:
    """The model and its training shape. `shape.vocab_size` is the tokenizer's (unpadded)
    vocabulary; it is padded per layout as the trainer pads it."""

    shape: ModelShape
    kv: KVSharingConfig
    seq_length: int
    precision: str = "bf16"
    make_vocab_size_divisible_by: int = 128
    fusions: Fusions = Fusions()

    @property
    def bytes_per_element(self) -> int:
        return PRECISIONS[self.precision]

    def padded_shape(self, layout: Layout) -> ModelShape:
        vocab = padded_vocab(self.shape.vocab_size, self.make_vocab_size_divisible_by, layout.tp)
        return replace(self.shape, vocab_size=vocab)


@dataclass(frozen=True)
class Chunk:
    """One model chunk: pipeline rank, virtual stage (None without VPP), global layers
    [start, stop) (0-based), and its position in the order activations flow."""

    pp_rank: int
    vp_stage: int | None
    start: int
    stop: int
    index: int
    count: int

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.count - 1


@functools.cache
def plans(kv: KVSharingConfig, num_layers: int) -> tuple[LayerPlan, ...]:
    """`fusion.layer_plans`, computed once per configuration (the search asks many times)."""
    return tuple(layer_plans(kv, num_layers))


@functools.cache
def live(kv: KVSharingConfig, num_layers: int, after_layer: int) -> tuple[Source, ...]:
    """`fusion.live_sources` after `after_layer` (1-based count); () without KV sharing."""
    if not kv.shares_kv:
        return ()
    return live_sources(list(plans(kv, num_layers)), after_layer)


def chunks(num_layers: int, layout: Layout) -> list[Chunk]:
    """Every model chunk in flow order (virtual stage major, then pipeline rank)."""
    pp, vpp = layout.pp, layout.vpp or 1
    first, last = layout.first_stage_layers, layout.last_stage_layers
    if pp == 1 or (first is None and last is None):
        n = pp * vpp
        if num_layers % n:
            raise PlanError(
                f"num_layers={num_layers} does not split over PP={pp} x VPP={vpp} = {n} "
                f"chunks; choose PP x VPP dividing {num_layers}"
            )
        per = num_layers // n
        bounds = [(j * per, (j + 1) * per) for j in range(n)]
    else:
        if layout.vpp:
            raise PlanError(
                "uneven first/last pipeline stages with a virtual pipeline are not modelled by "
                "the planner; plan with even stages or without VPP"
            )
        middle = pp - (first is not None) - (last is not None)
        rest = num_layers - (first or 0) - (last or 0)
        if rest < 0 or (middle and rest % middle) or (not middle and rest):
            raise PlanError(
                f"num_layers={num_layers} with first stage {first} and last stage {last} "
                f"layers leaves {rest} for {middle} middle stages; make it divide evenly"
            )
        sizes = [rest // middle if middle else 0] * pp
        if first is not None:
            sizes[0] = first
        if last is not None:
            sizes[-1] = last
        bounds, start = [], 0
        for size in sizes:
            bounds.append((start, start + size))
            start += size
    n = len(bounds)
    return [
        Chunk(j % pp, (j // pp) if layout.vpp else None, a, b, j, n)
        for j, (a, b) in enumerate(bounds)
    ]


def check(job: Job, layout: Layout) -> None:
    """Raise PlanError (or KVSharingError) for a layout the trainer cannot run."""
    s = job.shape
    for name in ("tp", "pp", "dp", "micro_batch_size", "num_microbatches"):
        if getattr(layout, name) < 1:
            raise PlanError(f"{name}={getattr(layout, name)} must be >= 1")
    if layout.recompute not in RECOMPUTE:
        raise PlanError(f"recompute={layout.recompute!r}: choose one of {', '.join(RECOMPUTE)}")
    if layout.recompute == "full" and layout.recompute_method not in ("uniform", "block"):
        raise PlanError(f"recompute_method={layout.recompute_method!r}: uniform or block")
    if job.precision not in PRECISIONS:
        raise PlanError(f"precision={job.precision!r}: choose one of {', '.join(PRECISIONS)}")
    if s.num_attention_heads % layout.tp:
        raise PlanError(
            f"num_attention_heads={s.num_attention_heads} is not divisible by TP={layout.tp}"
        )
    job.kv.validate(s.num_layers, s.num_attention_heads, s.num_query_groups, layout.tp)
    if layout.sequence_parallel and layout.tp == 1:
        raise PlanError("sequence parallelism needs TP > 1")
    if layout.sequence_parallel and job.seq_length % layout.tp:
        raise PlanError(f"seq_length={job.seq_length} is not divisible by TP={layout.tp} (SP)")
    if layout.vpp is not None and (layout.vpp < 2 or layout.pp < 2):
        raise PlanError(f"VPP={layout.vpp} needs PP > 1 and VPP >= 2 (or no VPP)")
    if layout.vpp and layout.num_microbatches % layout.pp:
        raise PlanError(
            f"the interleaved schedule needs the number of microbatches "
            f"({layout.num_microbatches}) to be a multiple of PP={layout.pp}"
        )
    found = chunks(s.num_layers, layout)
    if any(c.stop <= c.start for c in found):
        raise PlanError(f"a pipeline chunk of {layout.describe()} would hold no layers")
    if layout.recompute == "full" and layout.recompute_num_layers < 1:
        raise PlanError(f"recompute_num_layers={layout.recompute_num_layers} must be >= 1")


def layout_from_args(a) -> Layout:
    """The layout of a run from its validated `fusedkv-pretrain` arguments (the trainer's own,
    or the planner's, which parses the same flags)."""
    return Layout(
        tp=a.tensor_model_parallel_size,
        pp=a.pipeline_model_parallel_size,
        dp=a.data_parallel_size,
        vpp=a.virtual_pipeline_model_parallel_size,
        sequence_parallel=a.sequence_parallel,
        micro_batch_size=a.micro_batch_size,
        num_microbatches=a.num_microbatches,
        recompute=a.recompute_granularity or "none",
        recompute_method=a.recompute_method or "uniform",
        recompute_num_layers=a.recompute_num_layers or 1,
        distributed_optimizer=a.use_distributed_optimizer,
        first_stage_layers=getattr(a, "num_layers_in_first_pipeline_stage", None),
        last_stage_layers=getattr(a, "num_layers_in_last_pipeline_stage", None),
        overlap_grad_reduce=bool(getattr(a, "overlap_grad_reduce", False)),
        overlap_param_gather=bool(getattr(a, "overlap_param_gather", False)),
    )


__all__ = [
    "GiB",
    "Chunk",
    "Job",
    "KVSharingError",
    "Layout",
    "Machine",
    "PlanError",
    "chunks",
    "layout_from_args",
]
