"""PNG plots of fusedkv-compare and fusedkv-probe-report (matplotlib, headless Agg backend)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .compare import VALID_TAG, Run, _interp  # noqa: E402

if TYPE_CHECKING:
    import numpy as np

FUSION_TAG = re.compile(r"^fusion/layer_(\d+)/(key|value)_from_layer_(\d+)/abs_mean$")
DPI = 90


def smooth(values: list[float], weight: float) -> list[float]:
    """TensorBoard's debiased exponential moving average (weight 0: unchanged)."""
    out, last, n = [], 0.0, 0
    for v in values:
        n += 1
        last = last * weight + (1 - weight) * v
        out.append(last / (1 - weight**n) if weight else v)
    return out


def _x(run: Run, steps: list[int], by_tokens: bool) -> list[float]:
    return run.tokens_at(steps) if by_tokens else [float(s) for s in steps]


def _axis(runs: list[Run]) -> tuple[bool, str]:
    by_tokens = all(r.tokens_at([1]) is not None for r in runs)
    return by_tokens, "tokens" if by_tokens else "iteration"


def plot_losses(runs: list[Run], path: Path, smoothing: float) -> Path:
    """Training (smoothed) and validation loss of every run against tokens, side by side."""
    by_tokens, xlabel = _axis(runs)
    fig, (train, valid) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs:
        s = run.events.scalars
        if "lm loss" in s:
            train.plot(
                _x(run, s["lm loss"].steps, by_tokens),
                smooth(s["lm loss"].values, smoothing),
                label=run.name,
            )
        if VALID_TAG in s:
            valid.plot(
                _x(run, s[VALID_TAG].steps, by_tokens), s[VALID_TAG].values, "o-", label=run.name
            )
    train.set_title(f"training loss (smoothing {smoothing})")
    valid.set_title("validation loss")
    for ax in (train, valid):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _difference(run: Run, base: Run, tag: str, by_tokens: bool, smoothing: float):
    """(x, run - baseline) where the baseline's curve covers x (linear between its points)."""
    a, b = run.events.scalars.get(tag), base.events.scalars.get(tag)
    if a is None or b is None:
        return [], []
    xa, xb = _x(run, a.steps, by_tokens), _x(base, b.steps, by_tokens)
    ya, yb = smooth(a.values, smoothing), smooth(b.values, smoothing)
    pts = [(x, y - _interp(x, xb, yb)) for x, y in zip(xa, ya) if xb[0] <= x <= xb[-1]]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_loss_difference(runs: list[Run], base: Run, path: Path, smoothing: float) -> Path:
    """Loss minus the baseline run's loss at the same tokens (below zero: better)."""
    by_tokens, xlabel = _axis(runs)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, tag, title, sm, style in (
        (
            axes[0],
            "lm loss",
            f"training loss - {base.name} (smoothing {smoothing})",
            smoothing,
            "-",
        ),
        (axes[1], VALID_TAG, f"validation loss - {base.name}", 0.0, "o-"),
    ):
        for run in runs:
            if run is base:
                continue
            x, y = _difference(run, base, tag, by_tokens, sm)
            if x:
                ax.plot(x, y, style, label=run.name)
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss difference")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def fusion_curves(run: Run) -> dict[tuple[str, int, int], tuple[list[int], list[float]]]:
    """{(kind, top layer, source layer): (iterations, mean |weight|)} from the fusion tags."""
    out = {}
    for tag, series in run.events.scalars.items():
        m = FUSION_TAG.match(tag)
        if m:
            out[(m[2], int(m[1]), int(m[3]))] = (series.steps, series.values)
    return out


def plot_fusion_weights(run: Run, path: Path) -> Path | None:
    """Mean |fusion weight| per (top layer, source) over training; None for runs without."""
    curves = fusion_curves(run)
    if not curves:
        return None
    by_tokens, xlabel = _axis([run])
    sources = sorted({src for _, _, src in curves})
    tops = sorted({top for _, top, _ in curves})
    colors = plt.get_cmap("viridis", max(len(sources), 2))
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, kind in zip(axes, ("key", "value"), strict=True):
        for (k, top, src), (steps, values) in sorted(curves.items()):
            if k != kind:
                continue
            ax.plot(
                _x(run, steps, by_tokens),
                values,
                styles[tops.index(top) % len(styles)],
                color=colors(sources.index(src)),
                label=f"layer {top} <- {src}",
            )
        ax.set_title(f"{run.name}: {kind} fusion weights, mean |w|")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, ncol=max(1, len(sources) // 2))
    axes[0].set_ylabel("mean |weight|")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_heatmaps(
    matrices: dict[str, np.ndarray], tops: list[int], sources: list[int], title: str, path: Path
) -> Path:
    """One heatmap per matrix (rows: top layers, columns: source layers), values annotated."""
    import numpy as np

    fig, axes = plt.subplots(1, len(matrices), figsize=(4.2 * len(matrices), 3.6))
    for ax, (name, m) in zip(np.atleast_1d(axes), matrices.items(), strict=True):
        signed = "signed" in name
        lim = float(np.nanmax(np.abs(m))) if np.isfinite(m).any() else 1.0
        # |w| on the data's own range: small differences between sources stay visible.
        low = -lim if signed else (float(np.nanmin(m)) if np.isfinite(m).any() else 0.0)
        im = ax.imshow(
            m,
            cmap="RdBu_r" if signed else "viridis",
            vmin=low,
            vmax=max(lim, low + 1e-12),
            aspect="auto",
        )
        ax.set_xticks(range(len(sources)), [str(s) for s in sources])
        ax.set_yticks(range(len(tops)), [str(t) for t in tops])
        ax.set_xlabel("source (storage) layer")
        ax.set_ylabel("top layer")
        ax.set_title(name, fontsize=9)
        for (i, j), v in np.ndenumerate(m):
            if np.isfinite(v):
                dark = abs(v) > 0.6 * lim if signed else v < low + 0.6 * (lim - low)
                ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=6,
                        color="white" if dark else "black")  # fmt: skip
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
