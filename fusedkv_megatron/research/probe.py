"""fusedkv-probe-report: where the top half reads its K and V from, per (top, source) layer.

    fusedkv-probe-report runs/probe --out runs/probe/report

For every reconstruction layer and every source layer it reads, the mean |weight| and the
signed mean of the fusion weights (over KV heads and channels; a key weight per RoPE pair counts
once, as stored), as heatmaps (PNG) and Markdown tables. Made for `--kv-sharing dense_probe`
(every storage layer is a source: the paper's Fig. 2), and works for every learnable variant.

Input: a run directory (its checkpoints/), a --save directory (its latest iteration), an
iter_XXXXXXX directory (torch_dist: read through Megatron in this process, at any TP/PP), or an
HF export of fusedkv-convert-hf (safetensors, read without torch or Megatron).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

from .. import checkpoint_format as ckpt_format
from ..config import KVSharingConfig
from ..fusion import FUSION_WEIGHT_RE, layer_plans

_NAME = re.compile(r"layers\.(\d+)\.self_(?:attention|attn)\." + FUSION_WEIGHT_RE.pattern)
KINDS = {"key": "K", "value": "V"}


class ProbeError(ValueError):
    """Bad input to fusedkv-probe-report (the message says what and how to fix it)."""


def _hf_weights(hf_dir: Path) -> tuple[KVSharingConfig, int, dict[str, np.ndarray]]:
    from safetensors.numpy import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    if cfg.get("model_type") != "fusedkv_qwen3":
        raise ProbeError(
            f"{hf_dir}: model_type={cfg.get('model_type')!r} has no fusion weights (only "
            "fusedkv_qwen3 exports of a learnable variant have)"
        )
    index = hf_dir / "model.safetensors.index.json"
    shards = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.is_file()
        else ["model.safetensors"]
    )
    tensors: dict[str, np.ndarray] = {}
    for shard in shards:
        tensors.update(load_file(hf_dir / shard))
    sources = cfg.get("kv_source_layers")
    kv = KVSharingConfig(
        cfg["kv_sharing"],
        tuple(sources) if sources else None,
        cfg.get("fusion_weights_per_head", True),
        cfg.get("fusion_init", "normal"),
    )
    return kv, cfg["num_hidden_layers"], tensors


def _megatron_weights(path: Path) -> tuple[KVSharingConfig, int, dict[str, np.ndarray]]:
    from ..hf.mapping import ConversionError
    from ..hf.megatron_io import load_megatron_checkpoint

    try:
        info, _, state = load_megatron_checkpoint(path)
    except ConversionError as err:
        raise ProbeError(str(err)) from None
    kv = info["kv_sharing"]
    sources = kv["source_layers"]
    config = KVSharingConfig(
        kv["variant"],
        tuple(sources) if sources else None,
        kv["weights_per_head"],
        kv["fusion_init"],
    )
    weights = {k: v.float().numpy() for k, v in state.items() if _NAME.search(k)}
    return config, info["model"]["num_layers"], weights


def load_fusion_weights(path: str | Path) -> tuple[KVSharingConfig, int, dict[str, np.ndarray]]:
    """(KV-sharing config, layer count, {parameter name: fusion weight}) of a checkpoint, run
    directory or HF export."""
    path = Path(path)
    if not path.is_dir():
        raise ProbeError(f"{path}: no such directory")
    if (path / "config.json").is_file():
        return _hf_weights(path)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if not any((path / f).is_file() for f in (ckpt_format.TRACKER_FILE, ckpt_format.RUN_FILE)):
        raise ProbeError(
            f"{path} holds no checkpoint: pass a run directory (with checkpoints/), the --save "
            "directory of fusedkv-pretrain, one iter_XXXXXXX directory, or an HF export"
        )
    return _megatron_weights(path)


def fusion_matrices(
    kv: KVSharingConfig, num_layers: int, weights: dict[str, np.ndarray]
) -> tuple[list[int], list[int], dict[str, np.ndarray]]:
    """(top layers, source layers, {"K mean |w|", "K signed mean", "V ...": [tops, sources]}),
    NaN where a top layer does not read a source. Layers are 1-based, as in Megatron."""
    plans = [p for p in layer_plans(kv, num_layers) if p.is_reconstruction]
    tops = [p.layer_number for p in plans]
    sources = sorted({t.source[0] for p in plans for t in p.key + p.value})
    found = {}
    for name, w in weights.items():
        m = _NAME.search(name)
        if m:
            found[(int(m[1]) + 1, m[2], int(m[3]))] = np.asarray(w, dtype=np.float64)
    out = {}
    for kind, letter in KINDS.items():
        absolute = np.full((len(tops), len(sources)), np.nan)
        signed = np.full_like(absolute, np.nan)
        for r, plan in enumerate(plans):
            for j, term in enumerate(plan.key if kind == "key" else plan.value):
                w = found.get((plan.layer_number, kind, j))
                if w is None:
                    continue
                c = sources.index(term.source[0])
                absolute[r, c], signed[r, c] = np.abs(w).mean(), w.mean()
        out[f"{letter} mean |w|"], out[f"{letter} signed mean"] = absolute, signed
    if all(np.isnan(m).all() for m in out.values()):
        raise ProbeError(
            f"kv_sharing={kv.variant!r} has no learnable fusion weights to report; train "
            "--kv-sharing dense_probe (or fusedkv, fusedkv_lite_learnable)"
        )
    return tops, sources, out


def markdown_tables(tops: list[int], sources: list[int], matrices: dict[str, np.ndarray]) -> str:
    parts = []
    for name, m in matrices.items():
        parts += [
            f"### {name}",
            "",
            "| top layer | " + " | ".join(f"from {s}" for s in sources) + " |",
            "|---|" + "---|" * len(sources),
        ]
        for top, row in zip(tops, m, strict=True):
            cells = [f"{v:.4f}" if np.isfinite(v) else "" for v in row]
            parts.append(f"| {top} | " + " | ".join(cells) + " |")
        parts.append("")
    return "\n".join(parts)


def write_probe_report(path: str | Path, out: str | Path, plots: bool = True) -> Path:
    kv, num_layers, weights = load_fusion_weights(path)
    tops, sources, matrices = fusion_matrices(kv, num_layers, weights)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{kv.variant}, {num_layers} layers, fusion_init={kv.fusion_init}: {path}"
    parts = [
        "# Fusion weights by (top layer, source layer)",
        "",
        f"{title}. Mean over KV heads and channels of each fusion vector (key vectors per RoPE "
        "pair, as stored). Layers are 1-based; rows are the reconstruction layers, columns the "
        "storage layers they read.",
        "",
    ]
    if plots:
        from .plots import plot_heatmaps

        png = plot_heatmaps(matrices, tops, sources, title, out / "probe_heatmap.png")
        parts += [f"![fusion weights]({png.name})", ""]
    parts.append(markdown_tables(tops, sources, matrices))
    report = out / "probe.md"
    report.write_text("\n".join(parts))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="fusedkv-probe-report",
        description="Heatmaps of the learned fusion weights per (top layer, source layer).",
    )
    p.add_argument(
        "path",
        metavar="CKPT_OR_RUN",
        help="run directory, --save directory, iter_XXXXXXX directory or HF export",
    )
    p.add_argument("--out", default="probe_report", help="output directory")
    p.add_argument("--no-plots", action="store_true", help="write the Markdown tables only")
    a = p.parse_args(argv)
    try:
        report = write_probe_report(a.path, a.out, plots=not a.no_plots)
    except ProbeError as err:
        print(f"fusedkv-probe-report: error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        if err.name != "matplotlib":
            raise
        print(
            "fusedkv-probe-report: error: the heatmaps need matplotlib: pip install "
            "'fusedkv_megatron[research]' (or pass --no-plots)",
            file=sys.stderr,
        )
        return 2
    print(f"fusedkv-probe-report: wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
