"""Peak host (CPU) memory of a training run on one node: training plus checkpoint saves, summed
over the node's local ranks. Plain Python (no torch): the trainer checks it before it builds
the model, and fusedkv-plan reports the same figure.

Per rank, on top of a process baseline:
- CPU training: weights, gradients, optimizer state, activations and transients live in host
  memory (the planner's per-rank figures, CPU norms), and Adam's step holds a temporary of the
  size of the fp32 shard it updates.
- GPU training: those live on the GPU; host memory holds the process baseline (CUDA context,
  NCCL, Python: an assumption, not measured here) plus what a save stages there.
- A save (torch_dist writer, one writer thread): on CPU, tensors that are views of a larger
  buffer (the weights; the distributed optimizer's fp32 shards) are copied one at a time as
  they are written (compat/checkpoint_writer.py), so the largest tensor is the extra; on a GPU
  everything the rank writes is first copied to host memory.
- `fully_reshardable` (`--dist-ckpt-optim-fully-reshardable`) also gathers the distributed
  optimizer's state (fp32 main weights and Adam's two moments, 12 bytes per parameter of the
  TP/PP shard) on every data-parallel rank (on DP rank 0 only with
  `--distrib-optim-fully-reshardable-mem-efficient`).
- `--async-save` on CPU forks a writer: pages training changes while it writes are copied, up
  to the whole training state once more.

The constants are measured on this project's CPU runs (docs/checkpoints.md has the table).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

GiB = 1024**3
CPU_PROCESS_BASE = int(1.0 * GiB)  # measured: a tiny CPU run's resident size (torch, Megatron)
GPU_PROCESS_BASE = int(3.0 * GiB)  # assumed host memory of a GPU rank (CUDA context, NCCL)
WARN_FRACTION = 0.85  # above this share of the available memory: one warning line


@dataclass(frozen=True)
class HostMemory:
    """Bytes. `parts` explains the per-rank peak (name -> bytes)."""

    local_ranks: int
    on_gpu: bool
    training: int  # per rank, resident while training
    save: int  # per rank, on top of training during a save
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def per_rank(self) -> int:
        return self.training + self.save

    @property
    def node(self) -> int:
        return self.local_ranks * self.per_rank

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / GiB:.1f}" for k, v in self.parts.items() if v)
        where = "GPU run" if self.on_gpu else "CPU run"
        return (
            f"{self.node / GiB:.1f} GiB per node = {self.local_ranks} local rank(s) x "
            f"{self.per_rank / GiB:.1f} GiB ({where}; GiB per rank: {parts})"
        )


def host_memory(
    *,
    local_ranks: int,
    on_gpu: bool,
    weights: int,
    gradients: int,
    optimizer: int,
    activations: int,
    parameters: int,
    largest_tensor: int,
    data_parallel: int,
    distributed_optimizer: bool,
    fp32: bool,
    fully_reshardable: bool = False,
    async_save: bool = False,
    saves: bool = True,
) -> HostMemory:
    """The per-rank and per-node peak. `weights` ... `activations` are one rank's bytes (the
    largest pipeline rank's), `parameters` its parameter count (the TP/PP shard),
    `largest_tensor` the bytes of its largest tensor (the embedding, as a rule)."""
    parts: dict[str, int] = {}
    if on_gpu:
        parts["process"] = GPU_PROCESS_BASE
    else:
        parts["process"] = CPU_PROCESS_BASE
        parts["weights+grads+optimizer"] = weights + gradients + optimizer
        parts["activations"] = activations
        # torch's AdamW (foreach) holds a temporary of the updated shard's size in its step
        parts["optimizer step"] = 4 * (
            parameters // data_parallel if distributed_optimizer else parameters
        )
    training = sum(parts.values())
    save = 0
    if saves:
        # GPU: everything the rank writes is staged in host memory; CPU: one copied view.
        staged = weights + optimizer if on_gpu else largest_tensor
        parts["save: staged copies"] = staged
        save += staged
        if fully_reshardable and distributed_optimizer:
            # fp32 main weights and two moments per parameter, gathered on every DP rank (on
            # DP rank 0 only when mem-efficient: still the node's worst rank)
            gathered = 12 * parameters
            parts["save: fully_reshardable gather"] = gathered
            save += gathered
        if async_save and not on_gpu:
            parts["save: async copy-on-write"] = weights + gradients + optimizer
            save += weights + gradients + optimizer
    return HostMemory(local_ranks, on_gpu, training, save, parts)


def local_ranks_from_env(default: int = 1) -> int:
    """Processes of this job on this node: torchrun's LOCAL_WORLD_SIZE, else SLURM's tasks per
    node (SLURM_TASKS_PER_NODE is "8(x2)" or "8,7": the largest), else `default`."""
    value = os.environ.get("LOCAL_WORLD_SIZE", "")
    if value.isdigit() and int(value) > 0:
        return int(value)
    counts = [
        int(part.split("(")[0])
        for part in os.environ.get("SLURM_TASKS_PER_NODE", "").split(",")
        if part.split("(")[0].isdigit()
    ]
    return max(counts) if counts else default


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _meminfo(name: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cgroup_headroom() -> tuple[int, str] | None:
    """(bytes the job's memory cgroup can still grow by, description), v2 or v1."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base = f"/sys/fs/cgroup{path}"
            limit, used = _read_int(f"{base}/memory.max"), _read_int(f"{base}/memory.current")
        elif "memory" in controllers.split(","):
            base = f"/sys/fs/cgroup/memory{path}"
            limit = _read_int(f"{base}/memory.limit_in_bytes")
            used = _read_int(f"{base}/memory.usage_in_bytes")
        else:
            continue
        if limit is not None and used is not None and limit < 2**60:
            return max(limit - used, 0), f"cgroup limit {limit / GiB:.1f} GiB ({base})"
    return None


def available_host_memory(
    resident_now: int = 0, virtual_now: int = 0, local_ranks: int = 1
) -> tuple[int, str]:
    """(bytes this node's ranks may reach in all, where the figure comes from): the smallest of
    MemAvailable and the memory cgroup's headroom plus what the local ranks hold already
    (`resident_now` each, which the estimate counts), and a process address-space limit
    (ulimit -v, prlimit --as) less the address space mapped but not resident (`virtual_now`)."""
    held = resident_now * local_ranks
    candidates = []
    avail = _meminfo("MemAvailable")
    if avail is not None:
        candidates.append((avail + held, f"MemAvailable {avail / GiB:.1f} GiB"))
    cgroup = _cgroup_headroom()
    if cgroup is not None:
        candidates.append((cgroup[0] + held, cgroup[1]))
    soft = _address_space_limit()
    if soft is not None:
        per_rank = max(soft - max(virtual_now - resident_now, 0), 0)
        what = f"address-space limit {soft / GiB:.1f} GiB per process (ulimit -v)"
        candidates.append((per_rank * local_ranks, what))
    if not candidates:
        return 2**62, "unknown"
    return min(candidates)


def _address_space_limit() -> int | None:
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, ValueError, OSError):
        return None
    return None if soft in (-1, resource.RLIM_INFINITY) or soft <= 0 else soft


def for_job(job, layout, ranks, args, *, local_ranks: int, on_gpu: bool) -> HostMemory:
    """The estimate for a planner Job/Layout and its per-rank memory (`ranks`, as
    memory_per_rank gives them), with the checkpoint flags of `args` (fusedkv-pretrain's)."""
    worst = max(ranks, key=lambda r: r.peak)
    s = job.padded_shape(layout)
    width = 4 if job.precision == "fp32" else 2
    largest = width * max(s.vocab_size, 2 * s.ffn_hidden_size) * s.hidden_size // layout.tp
    return host_memory(
        local_ranks=local_ranks,
        on_gpu=on_gpu,
        weights=worst.weights,
        gradients=worst.gradients,
        optimizer=worst.optimizer,
        activations=worst.activations + worst.transient,
        parameters=worst.parameters,
        largest_tensor=largest,
        data_parallel=layout.dp,
        distributed_optimizer=layout.distributed_optimizer,
        fp32=job.precision == "fp32",
        fully_reshardable=getattr(args, "dist_ckpt_optim_fully_reshardable", False),
        async_save=getattr(args, "async_save", False),
        saves=bool(getattr(args, "save", None)) or getattr(args, "save_interval", None) is not None,
    )


def plan_line(plan, args) -> str:
    """fusedkv-plan's line: the host memory of one node of the planned GPU run."""
    est = for_job(
        plan.job, plan.layout, plan.ranks, args,
        local_ranks=plan.machine.gpus_per_node, on_gpu=True,
    )  # fmt: skip
    return f"host memory per node (training + checkpoint save): {est.describe()}"
