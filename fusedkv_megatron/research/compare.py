"""fusedkv-compare: several training runs side by side (a Markdown report and PNG plots).

    fusedkv-compare runs/vanilla runs/fusedkv runs/probe --out runs/compare --baseline vanilla

A run is given as
- a run directory holding `tensorboard/` (event files) and `checkpoints/` (the --save
  directory), as examples/quickstart.sh and tools/variant_study.sh write them; or
- `TENSORBOARD_DIR,CHECKPOINT_DIR` (the --tensorboard-dir and --save of one run); or
- a TensorBoard directory alone (the report then lacks what only the checkpoint says:
  parameter counts and the KV cache).

From the checkpoint's fusedkv_run.json: the variant and the model shape, hence parameters
(fusedkv_megatron.training.model_size) and KV-cache bytes (fusion.kv_cache_bytes_per_token).
From the event files (events.py): losses, consumed samples, throughput, skipped iterations and
the fusion-weight statistics. Nothing here imports torch or Megatron.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import checkpoint_format as ckpt_format
from ..config import KVSharingConfig
from ..fusion import kv_cache_bytes_per_token
from ..training.model_size import ModelShape, parameter_count
from .events import NoEventFilesError, RunEvents, read_run_events

VALID_TAG = "validation/lm loss"
KV_BYTES_PER_ELEMENT = 2  # bf16/fp16 caches, as at inference


class CompareError(ValueError):
    """Bad input to fusedkv-compare (the message says what and how to fix it)."""


@dataclass
class Run:
    name: str
    tensorboard: Path
    checkpoints: Path | None
    events: RunEvents
    info: dict[str, Any] | None  # fusedkv_run.json of the latest checkpoint

    @property
    def variant(self) -> str:
        if self.info:
            return self.info["kv_sharing"]["variant"]
        return self.events.arguments().get("kv_sharing", "?")

    @property
    def seq_length(self) -> int | None:
        if self.info:
            return int(self.info["model"]["seq_length"])
        value = self.events.arguments().get("seq_length")
        return int(value) if value and value.isdigit() else None

    def tokens_at(self, steps: list[int]) -> list[float] | None:
        """Tokens consumed after each iteration in `steps` (consumed samples x sequence length;
        between logged points linear in the iteration, exact for a constant batch size)."""
        consumed = self.events.scalars.get("consumed-samples")
        if self.seq_length is None or consumed is None:
            return None
        xs, ys = [0, *consumed.steps], [0.0, *consumed.values]
        return [_interp(s, xs, ys) * self.seq_length for s in steps]


def _interp(x: float, xs: list[float], ys: list[float]) -> float:
    """Piecewise-linear interpolation; beyond the ends, extrapolated along the end segment."""
    if len(xs) == 1:
        return ys[0]
    i = next((k for k in range(1, len(xs)) if xs[k] >= x), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def locate_run(spec: str, name: str | None = None) -> Run:
    """A Run from a command-line RUN argument (see the module docstring)."""
    if "," in spec:
        tb_str, ck_str = spec.split(",", 1)
        tb, ck = Path(tb_str), Path(ck_str)
        default_name = tb.parent.name if tb.name == "tensorboard" else tb.name
    else:
        root = Path(spec)
        if not root.is_dir():
            raise CompareError(f"{spec}: no such directory; pass a run directory")
        tb = root / "tensorboard" if (root / "tensorboard").is_dir() else root
        ck = root / "checkpoints" if (root / "checkpoints").is_dir() else None
        if ck is None and (root / ckpt_format.TRACKER_FILE).is_file():
            ck = root
        default_name = root.resolve().name
        if default_name == "tensorboard":  # RUN/tensorboard given: the run's name
            default_name = root.resolve().parent.name
    for path, what in ((tb, "TensorBoard"), (ck, "checkpoint")):
        if path is not None and not path.is_dir():
            raise CompareError(f"{path}: no such {what} directory (from {spec!r})")
    try:
        events = read_run_events(tb)
    except NoEventFilesError as err:
        raise CompareError(str(err)) from None
    info = None
    if ck is not None:
        try:
            latest = ckpt_format.latest_checkpoint_dir(ck)
            info = ckpt_format.read_run_info(latest) if latest is not None else None
        except ckpt_format.CheckpointFormatError as err:
            raise CompareError(f"{ck}: {err}") from None
    return Run(name or default_name, tb, ck, events, info)


def _shape_and_kv(info: dict[str, Any]) -> tuple[ModelShape, KVSharingConfig]:
    m, kv = info["model"], info["kv_sharing"]
    shape = ModelShape(
        m["num_layers"],
        m["hidden_size"],
        m["ffn_hidden_size"],
        m["num_attention_heads"],
        m["num_query_groups"],
        m["kv_channels"],
        m["padded_vocab_size"],
        bool(m["share_embeddings_and_output_weights"]),
    )
    sources = kv["source_layers"]
    return shape, KVSharingConfig(
        kv["variant"],
        tuple(sources) if sources else None,
        kv["weights_per_head"],
        kv["fusion_init"],
    )


def summarize(run: Run) -> dict[str, Any]:
    """The numbers of one run's row in the report (None where the run does not say)."""
    s = run.events.scalars
    row: dict[str, Any] = {"run": run.name, "variant": run.variant}
    if run.info:
        shape, kv = _shape_and_kv(run.info)
        row["params"] = parameter_count(shape, kv, with_embeddings=True)
        row["params_no_embeddings"] = parameter_count(shape, kv, with_embeddings=False)
        row["kv_bytes_per_token"] = kv_cache_bytes_per_token(
            kv, shape.num_layers, shape.num_query_groups, shape.kv_channels, KV_BYTES_PER_ELEMENT
        )
        # Vanilla: every layer stores K and V; gqa's own vanilla has as many KV heads as heads.
        groups = shape.num_attention_heads if kv.variant == "gqa" else shape.num_query_groups
        vanilla = kv_cache_bytes_per_token(
            KVSharingConfig("vanilla"),
            shape.num_layers,
            groups,
            shape.kv_channels,
            KV_BYTES_PER_ELEMENT,
        )
        row["kv_ratio_to_vanilla"] = row["kv_bytes_per_token"] / vanilla
    steps = sorted({st for series in s.values() for st in series.steps})
    row["iterations"] = steps[-1] if steps else 0
    tokens = run.tokens_at([row["iterations"]])
    row["tokens"] = tokens[0] if tokens else None
    valid = s.get(VALID_TAG)
    if valid:
        row["final_valid_loss"] = valid.values[-1]
        row["final_valid_iteration"] = valid.steps[-1]
        best = min(range(len(valid.values)), key=valid.values.__getitem__)
        row["best_valid_loss"] = valid.values[best]
        row["best_valid_iteration"] = valid.steps[best]
        row["final_valid_ppl"] = math.exp(min(row["final_valid_loss"], 30.0))
        row["best_valid_ppl"] = math.exp(min(row["best_valid_loss"], 30.0))
    if "lm loss" in s:
        row["final_train_loss"] = s["lm loss"].last
    if "tokens-per-sec" in s:
        row["median_tokens_per_sec"] = statistics.median(s["tokens-per-sec"].values)
    if "skipped-iterations" in s:
        row["skipped_iterations"] = int(s["skipped-iterations"].last)
    return row


COLUMNS = (  # (key, header, format)
    ("run", "run", "{}"),
    ("variant", "variant", "{}"),
    ("params", "parameters", "{:,}"),
    ("params_no_embeddings", "without embeddings", "{:,}"),
    ("kv_bytes_per_token", "KV bytes/token", "{:,}"),
    ("kv_ratio_to_vanilla", "KV vs vanilla", "{:.2f}"),
    ("tokens", "tokens seen", "{:,.0f}"),
    ("iterations", "iterations", "{}"),
    ("final_valid_loss", "final val loss", "{:.4f}"),
    ("final_valid_ppl", "final val ppl", "{:.2f}"),
    ("best_valid_loss", "best val loss", "{:.4f}"),
    ("best_valid_ppl", "best val ppl", "{:.2f}"),
    ("final_train_loss", "train loss (end)", "{:.4f}"),
    ("median_tokens_per_sec", "median tokens/s", "{:,.0f}"),
    ("skipped_iterations", "skipped iters", "{}"),
)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| " + " | ".join(h for _, h, _ in COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    for row in rows:
        cells = [fmt.format(row[k]) if row.get(k) is not None else "n/a" for k, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(
    runs: list[Run], rows: list[dict[str, Any]], out: Path, plots: list[Path], baseline: str
) -> Path:
    parts = [
        "# Run comparison",
        "",
        f"Written by `fusedkv-compare` from {len(runs)} runs; baseline for differences: "
        f"`{baseline}`.",
        "",
        markdown_table(rows),
        "",
        "Parameters and KV bytes/token (bf16, all layers) come from each run's latest "
        "checkpoint (fusedkv_run.json); losses, tokens, throughput and skipped iterations from "
        "its TensorBoard event files. Perplexity = exp(validation loss). Best val loss is the "
        "lowest of the validations logged; the iteration of each is below.",
        "",
        "| run | final val at iteration | best val at iteration | event files | checkpoint |",
        "|---|---|---|---|---|",
    ]
    for run, row in zip(runs, rows, strict=True):
        parts.append(
            f"| {run.name} | {row.get('final_valid_iteration', 'n/a')} | "
            f"{row.get('best_valid_iteration', 'n/a')} | {len(run.events.files)} | "
            f"{run.checkpoints or 'none'} |"
        )
    parts.append("")
    for plot in plots:
        parts += [f"![{plot.stem}]({plot.name})", ""]
    path = out / "report.md"
    path.write_text("\n".join(parts))
    return path


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="fusedkv-compare",
        description="Compare fusedkv-pretrain runs: a Markdown report and PNG plots.",
    )
    p.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="a run directory (tensorboard/ + checkpoints/), or TENSORBOARD_DIR,CHECKPOINT_DIR",
    )
    p.add_argument("--out", default="compare", help="output directory (default: ./compare)")
    p.add_argument("--names", nargs="+", help="one label per run (default: directory names)")
    p.add_argument(
        "--baseline",
        help="label of the run the difference plot subtracts (default: the first vanilla "
        "run, else the first run)",
    )
    p.add_argument(
        "--smoothing",
        type=float,
        default=0.6,
        help="TensorBoard-style exponential smoothing of training losses, 0 (off) to <1 "
        "(default 0.6); validation losses are never smoothed",
    )
    p.add_argument("--no-plots", action="store_true", help="write the Markdown report only")
    return p.parse_args(argv)


def run_compare(argv: list[str] | None = None) -> Path:
    """The command without the exit-code handling: returns the report's path."""
    a = _parse(argv)
    if a.names and len(a.names) != len(a.runs):
        raise CompareError(f"--names has {len(a.names)} labels for {len(a.runs)} runs")
    if not 0.0 <= a.smoothing < 1.0:
        raise CompareError(f"--smoothing {a.smoothing} must be in [0, 1)")
    names = a.names or [None] * len(a.runs)
    runs = [locate_run(spec, name) for spec, name in zip(a.runs, names, strict=True)]
    labels = [r.name for r in runs]
    if len(set(labels)) != len(labels):
        raise CompareError(f"two runs share a label in {labels}; give --names")
    if a.baseline is None:
        baseline = next((r for r in runs if r.variant == "vanilla"), runs[0])
    else:
        baseline = next((r for r in runs if r.name == a.baseline), None)
        if baseline is None:
            raise CompareError(f"--baseline {a.baseline!r} is not a run label; labels: {labels}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [summarize(r) for r in runs]
    plots: list[Path] = []
    if not a.no_plots:
        from .plots import plot_fusion_weights, plot_loss_difference, plot_losses

        plots.append(plot_losses(runs, out / "loss.png", a.smoothing))
        plots.append(plot_loss_difference(runs, baseline, out / "loss_difference.png", a.smoothing))
        for run in runs:
            path = plot_fusion_weights(run, out / f"fusion_{run.name}.png")
            if path is not None:
                plots.append(path)
    return write_report(runs, rows, out, plots, baseline.name)


def main(argv: list[str] | None = None) -> int:
    try:
        report = run_compare(argv)
    except CompareError as err:
        print(f"fusedkv-compare: error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        if err.name != "matplotlib":
            raise
        print(
            "fusedkv-compare: error: the plots need matplotlib: pip install "
            "'fusedkv_megatron[research]' (or pass --no-plots)",
            file=sys.stderr,
        )
        return 2
    print(f"fusedkv-compare: wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
