"""Suggested SLURM layouts for the model sizes in examples/configs/ (read by slurm/submit.py).

A preset says where a run goes (nodes, GPUs, tensor/pipeline split, time limit, how early to stop
before it); the YAML config says what is trained (model, optimizer, data, iterations). Data
parallel is what is left: DP = nodes * GPUs per node / (TP * PP * CP), so `--nodes` scales a
preset. CP (context parallelism) splits each sequence over CP GPUs: the long-context preset.

The GPU layouts assume 8 x 80 GB GPUs per node (H100/A100 class), sequence length 8192, bf16 and
the distributed optimizer. Every size up to 1.5B fits a GPU without tensor parallelism, and pure
data parallelism is the fastest layout when it fits; 4B uses TP=2 within a node (NVLink) to leave
room for 8k-token activations. Token budgets (paper): 332M and 650M 200B, 1.5B 400B, 4B 800B.
The memory planner's predicted per-GPU peaks for these layouts on 80 GB and 141 GB GPUs are in
docs/planner.md (`python slurm/submit.py --preset-table` prints them); submit.py checks every job.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    name: str
    nodes: int  # suggested node count
    gpus_per_node: int  # 0: a CPU run under gloo (no GPU requested)
    tensor_parallel: int
    pipeline_parallel: int
    time: str  # default --time; longer runs go on by requeueing
    signal_grace_s: int  # SLURM sends USR1 this long before the time limit
    exit_margin_s: int  # the trainer stops by itself this long before the time limit
    procs_per_node: int = 0  # CPU presets: torchrun processes per node (GPU: one per GPU)
    context_parallel: int = 1  # ranks one sequence is split over (long context)
    note: str = ""

    @property
    def cpu(self) -> bool:
        return self.gpus_per_node == 0


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "tiny",
            nodes=1,
            gpus_per_node=0,
            tensor_parallel=1,
            pipeline_parallel=1,
            time="00:30:00",
            signal_grace_s=60,
            exit_margin_s=120,
            procs_per_node=2,
            note="CPU smoke run: 2 gloo processes per node (DP=2), no GPU requested",
        ),
        Preset(
            "332m",
            nodes=1,
            gpus_per_node=8,
            tensor_parallel=1,
            pipeline_parallel=1,
            time="24:00:00",
            signal_grace_s=300,
            exit_margin_s=600,
            note="pure data parallel; 200B tokens",
        ),
        Preset(
            "650m",
            nodes=2,
            gpus_per_node=8,
            tensor_parallel=1,
            pipeline_parallel=1,
            time="24:00:00",
            signal_grace_s=300,
            exit_margin_s=600,
            note="pure data parallel; 200B tokens",
        ),
        Preset(
            "1.5b",
            nodes=8,
            gpus_per_node=8,
            tensor_parallel=1,
            pipeline_parallel=1,
            time="24:00:00",
            signal_grace_s=300,
            exit_margin_s=900,
            note="pure data parallel (DP=64); 400B tokens",
        ),
        Preset(
            "4b",
            nodes=16,
            gpus_per_node=8,
            tensor_parallel=2,
            pipeline_parallel=1,
            time="24:00:00",
            signal_grace_s=420,
            exit_margin_s=1200,
            note="TP=2 inside a node, DP=64; 800B tokens",
        ),
        Preset(
            "332m-32k",
            nodes=1,
            gpus_per_node=8,
            tensor_parallel=1,
            pipeline_parallel=1,
            context_parallel=2,
            time="24:00:00",
            signal_grace_s=300,
            exit_margin_s=600,
            note="32k context: CP=2 (sequence split over 2 GPUs), DP=4",
        ),
    )
}
