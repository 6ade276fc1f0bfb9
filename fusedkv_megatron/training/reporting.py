"""What the trainer reports: the progress line, TensorBoard scalars, fusion-weight statistics.

Like Megatron-LM, the last rank prints and writes TensorBoard (it holds the loss under pipeline
parallelism). TensorBoard tags: "lm loss", "learning-rate", "grad-norm", "tokens-per-sec",
"iteration-time-ms", "consumed-samples", "skipped-iterations", "validation/lm loss",
"validation/ppl", "test/..." and, per reconstruction layer L and fusion weight W,
"fusion/layer_L/W/{mean,std,abs_mean,min,max}"; on GPU also "tflops-per-gpu" and "mfu". Memory,
the parameter norm, the fp16 loss scale and the per-phase timers come from `observe.Observer`
(its docstring lists their tags).

With --wandb-project every scalar also goes to Weights & Biases (same tags, step = iteration),
through `Reporter.scalar`, the one place scalars are written.

Throughput and MFU count the training iterations only: the loop runs evaluation and checkpoint
saves inside `Reporter.excluded()`, which the interval's timer leaves out. MFU divides by the
dense bf16 peak of the GPU found by its exact name in gpu_peaks.py; for a GPU not there the log
says once why there is no MFU.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections import defaultdict

import torch

from ..fusion import fusion_weight_name


def log_rank() -> int:
    return torch.distributed.get_world_size() - 1


def is_log_rank() -> bool:
    return torch.distributed.get_rank() == log_rank()


def print_last(msg: str) -> None:
    if is_log_rank():
        print(msg, flush=True)


def print_first(msg: str) -> None:
    if torch.distributed.get_rank() == 0:
        print(msg, flush=True)


def fusion_weight_stats(model_chunks) -> dict[str, float]:
    """Statistics of every fusion weight of every reconstruction layer, over all TP/PP ranks.

    Collective over the world group (each rank contributes its shards once, from data-parallel
    rank 0); returns the dict on the log rank, {} elsewhere.
    """
    from megatron.core import parallel_state

    local: dict[str, list[float]] = {}
    if parallel_state.get_data_parallel_rank() == 0:
        for chunk in model_chunks:
            for module in chunk.modules():
                plan = getattr(module, "plan", None)
                if plan is None or not plan.is_reconstruction:
                    continue
                for kind, i, term in plan.fusion_terms():
                    w = getattr(module, fusion_weight_name(kind, i))
                    src = term.source[0]
                    key = f"fusion/layer_{plan.layer_number}/{kind}_from_layer_{src}"
                    x = w.detach().float()
                    local[key] = [
                        x.sum().item(),
                        (x * x).sum().item(),
                        x.abs().sum().item(),
                        x.min().item(),
                        x.max().item(),
                        float(x.numel()),
                    ]
    gathered = [None] * torch.distributed.get_world_size() if is_log_rank() else None
    torch.distributed.gather_object(local, gathered, dst=log_rank())
    if not is_log_rank():
        return {}
    merged: dict[str, list[float]] = {}
    for part in gathered:
        for key, (s, ss, a, lo, hi, n) in part.items():
            m = merged.setdefault(key, [0.0, 0.0, 0.0, math.inf, -math.inf, 0.0])
            m[0] += s
            m[1] += ss
            m[2] += a
            m[3] = min(m[3], lo)
            m[4] = max(m[4], hi)
            m[5] += n
    out = {}
    for key, (s, ss, a, lo, hi, n) in sorted(merged.items()):
        mean = s / n
        out[f"{key}/mean"] = mean
        out[f"{key}/std"] = math.sqrt(max(ss / n - mean * mean, 0.0))
        out[f"{key}/abs_mean"] = a / n
        out[f"{key}/min"] = lo
        out[f"{key}/max"] = hi
    return out


class IntervalTimer:
    """Wall time since the last `restart()`, less the time spent inside `excluded()`."""

    clock = staticmethod(time.perf_counter)

    def __init__(self):
        self.restart()

    def restart(self) -> None:
        self._start = self.clock()
        self._excluded = 0.0

    @contextlib.contextmanager
    def excluded(self):
        t0 = self.clock()
        try:
            yield
        finally:
            self._excluded += self.clock() - t0

    def elapsed(self) -> float:
        return self.clock() - self._start - self._excluded


class Reporter:
    """Accumulates per-iteration numbers between log intervals; prints and writes TensorBoard."""

    def __init__(self, args, flops_per_token: float, peak_tflops: float | None):
        self.args = args
        self.flops_per_token = flops_per_token
        self.peak_tflops = peak_tflops
        self.timer = IntervalTimer()
        self.no_mfu_reason = None
        if peak_tflops is None and torch.cuda.is_available():
            from .gpu_peaks import no_peak_reason

            self.no_mfu_reason = no_peak_reason() or "no dense bf16 peak was given"
        self.writer = None
        if args.tensorboard_dir and is_log_rank():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=args.tensorboard_dir, max_queue=100)
        self.wandb_run = start_wandb(args) if is_log_rank() else None
        self.observer = None
        self._reset()

    def attach(self, observer) -> None:
        """The run's `observe.Observer`: its fields, scalars and timers join each interval."""
        self.observer = observer

    def _reset(self) -> None:
        self.sums = defaultdict(float)
        self.counts = defaultdict(int)
        self.timer.restart()
        self.iters = 0
        self.samples = 0

    def start(self) -> None:
        """The first interval starts here (not when the reporter was built)."""
        self.timer.restart()

    @contextlib.contextmanager
    def excluded(self):
        """Context manager for evaluation and checkpoint saves: not counted as training time
        (nor in the per-phase timers)."""
        detached = self.observer.detached() if self.observer else contextlib.nullcontext()
        with self.timer.excluded(), detached:
            yield

    def scalar(self, tag: str, value: float, step: int) -> None:
        if value is None or not math.isfinite(value):
            return
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log({tag: value}, step=step)

    def record(
        self, loss: float | None, grad_norm: float | None, samples: int | None = None
    ) -> None:
        """One iteration of `samples` sequences (default: the global batch size)."""
        self.iters += 1
        self.samples += self.args.global_batch_size if samples is None else samples
        if loss is not None and math.isfinite(loss):
            self.sums["loss"] += loss
            self.counts["loss"] += 1
        if grad_norm is not None and math.isfinite(grad_norm):
            self.sums["grad_norm"] += grad_norm
            self.counts["grad_norm"] += 1

    def _mean(self, key: str) -> float | None:
        return self.sums[key] / self.counts[key] if self.counts[key] else None

    def log(
        self,
        iteration: int,
        consumed: int,
        lr: float,
        skipped_total: int,
        nan_in_row: int,
        fusion_stats: dict[str, float],
    ) -> None:
        """The progress line and TensorBoard scalars of the interval that ends at `iteration`."""
        a = self.args
        elapsed = self.timer.elapsed()
        ms = 1000.0 * elapsed / max(self.iters, 1)
        tokens_per_s = self.samples * a.seq_length / max(elapsed, 1e-9)
        loss, gnorm = self._mean("loss"), self._mean("grad_norm")
        fields = [
            f"iteration {iteration:8d}/{a.train_iters:8d}",
            f"consumed samples: {consumed:12d}",
            f"elapsed time per iteration (ms): {ms:.1f}",
            f"learning rate: {lr:.6E}",
            f"lm loss: {loss:.6E}" if loss is not None else "lm loss: nan",
            f"grad norm: {gnorm:.3f}" if gnorm is not None else "grad norm: nan",
            f"tokens/s: {tokens_per_s:.0f}",
        ]
        scalars = {
            "lm loss": loss,
            "learning-rate": lr,
            "grad-norm": gnorm,
            "tokens-per-sec": tokens_per_s,
            "iteration-time-ms": ms,
            "consumed-samples": consumed,
            "skipped-iterations": skipped_total,
        }
        if torch.cuda.is_available():
            world = torch.distributed.get_world_size()
            tflops = tokens_per_s * self.flops_per_token / world / 1e12
            fields.append(f"TFLOP/s/GPU: {tflops:.1f}")
            scalars["tflops-per-gpu"] = tflops
            if self.peak_tflops:
                fields.append(f"MFU: {100 * tflops / self.peak_tflops:.1f}%")
                scalars["mfu"] = tflops / self.peak_tflops
            elif self.no_mfu_reason:
                print_last(f"> MFU not reported: {self.no_mfu_reason}")
                self.no_mfu_reason = None  # said once
        lines = []
        if self.observer is not None:  # collective: every rank logs each interval
            more_fields, more_scalars, lines = self.observer.interval(self.iters)
            fields += more_fields
            scalars.update(more_scalars)
        fields.append(f"skipped iterations: {skipped_total}")
        if nan_in_row:
            fields.append(f"non-finite in a row: {nan_in_row}")
        print_last(" " + " | ".join(fields) + " |")
        for line in lines:
            print_last(line)
        for tag, value in {**scalars, **fusion_stats}.items():
            self.scalar(tag, value, iteration)
        if self.writer is not None:
            self.writer.flush()
        self._reset()

    def log_eval(self, name: str, iteration: int, loss: float) -> None:
        ppl = math.exp(min(loss, 30.0))
        line = f" {name} loss at iteration {iteration} | lm loss: {loss:.6E} | lm loss PPL: {ppl:.6E} |"
        bar = "-" * len(line)
        print_last(f"{bar}\n{line}\n{bar}")
        self.scalar(f"{name}/lm loss", loss, iteration)
        self.scalar(f"{name}/ppl", ppl, iteration)
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.observer is not None:
            self.observer.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def start_wandb(args):
    """A W&B run for --wandb-project (Megatron-LM's flags), or None without it. The arguments
    already checked that wandb is installed."""
    if not getattr(args, "wandb_project", None):
        return None
    import wandb

    save_dir = args.wandb_save_dir or os.path.join(args.save or ".", "wandb")
    os.makedirs(save_dir, exist_ok=True)
    return wandb.init(
        project=args.wandb_project,
        name=args.wandb_exp_name,
        dir=save_dir,
        config={k: v for k, v in vars(args).items() if not k.startswith("_")},
    )


def fastpath_lines(rt) -> list[str]:
    """The fusions (each on or off, and why) and the data-parallel communication settings."""
    from ..fastpath import describe_fusions
    from .initialize import fusion_states

    a = rt.args
    ddp = rt.model[0].ddp_config
    bucket = f"{ddp.bucket_size:,} elements" if ddp.bucket_size else "one per chunk"
    return [
        describe_fusions(fusion_states(a)),
        f"> data-parallel: distributed optimizer {'on' if ddp.use_distributed_optimizer else 'off'}"
        f", overlap grad reduce {'on' if ddp.overlap_grad_reduce else 'off'}, overlap param "
        f"gather {'on' if ddp.overlap_param_gather else 'off'}"
        f"{' (aligned over pipeline stages)' if ddp.align_param_gather else ''}, buckets "
        f"{bucket}",
    ]


def startup_report(rt) -> None:
    """The start-up lines: model, parameters, KV cache, parallel layout, each layer kind's
    attention path and (with PP) the bytes each pipeline boundary carries."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    from ..fusion import kv_cache_bytes_per_token
    from ..pipeline import boundary_bytes
    from ..spec import describe_attention

    a, rt_model = rt.args, rt.model
    counts = torch.zeros(2, dtype=torch.float64)
    tied = not a.untie_embeddings_and_output_weights
    for chunk in rt_model:
        for name, p in chunk.named_parameters():
            if not param_is_not_tensor_parallel_duplicate(p):
                continue
            embedding = "embedding" in name or "output_layer" in name
            if embedding and "output_layer" in name and tied:
                continue  # the tied output layer is the input embedding (counted once)
            counts[0] += p.numel()
            counts[1] += 0 if embedding else p.numel()
    counts = counts.to(rt.device)
    torch.distributed.all_reduce(counts, group=parallel_state.get_model_parallel_group())
    kv_bytes = kv_cache_bytes_per_token(rt.kv, a.num_layers, a.num_query_groups, a.kv_channels)
    print_first(
        f"> model: {a.kv_sharing}, {a.num_layers} layers, hidden {a.hidden_size}, ffn "
        f"{a.ffn_hidden_size}, heads {a.num_attention_heads}/{a.num_query_groups} KV, head dim "
        f"{a.kv_channels}, vocab {rt.tokenizer.vocab_size} (padded {rt.padded_vocab_size}), "
        f"seq {a.seq_length}\n"
        f"> parameters: {int(counts[0]):,} with embeddings, {int(counts[1]):,} without\n"
        f"> KV cache: {kv_bytes:,} bytes per token (bf16)\n"
        f"> parallel: TP {a.tensor_model_parallel_size}, PP {a.pipeline_model_parallel_size}, "
        f"VPP {a.virtual_pipeline_model_parallel_size}, CP {a.context_parallel_size}, DP "
        f"{a.data_parallel_size}; global batch "
        f"{a.global_batch_size} = micro {a.micro_batch_size} x DP x {a.num_microbatches} "
        f"microbatches"
    )
    for line in fastpath_lines(rt):
        print_first(line)
    use_te = a.transformer_impl == "transformer_engine"
    cuda, packed = rt.device.type == "cuda", a.reset_attention_mask
    for line in describe_attention(rt.config, rt.kv, use_te, cuda, packed_documents=packed):
        print_first(line)
    if a.pipeline_model_parallel_size > 1:
        for b in boundary_bytes(rt.config, rt.kv, a.micro_batch_size, a.seq_length):
            print_first(
                f"> pipeline boundary after layer {b.after_layer}: {b.total_bytes:,} bytes per "
                f"microbatch per TP rank (hidden {b.hidden_bytes:,} + sources "
                f"{[f'{kind.upper()}{layer}' for layer, kind in b.sources]} {b.source_bytes:,})"
            )
