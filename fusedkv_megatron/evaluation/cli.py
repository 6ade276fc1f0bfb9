"""fusedkv-eval: lm-evaluation-harness on a training checkpoint or a Hugging Face export.

    fusedkv-eval CKPT_DIR --tasks fusedkv_heldout [--tensorboard-dir TB]
    fusedkv-eval HF_DIR --tasks fusedkv_heldout,hellaswag --online

A Megatron checkpoint (a --save directory or one iter_XXXXXXX directory) is converted to a
temporary HF directory with fusedkv-convert-hf first. The results go to JSON next to the checkpoint
(CKPT_DIR/eval/iter_XXXXXXX.json, or HF_DIR/eval/results.json) and, with --tensorboard-dir, as
scalars "eval/TASK/METRIC" at the checkpoint's iteration, beside the training curves.

Everything runs offline unless --online is given: HF_HUB_OFFLINE, HF_DATASETS_OFFLINE and
TRANSFORMERS_OFFLINE are set before lm-eval is imported, so a task whose data are not in the local
cache fails instead of downloading. The package's own task `fusedkv_heldout` needs no data from
outside (see tasks/fusedkv_heldout.yaml and docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")
TASK_DIR = Path(__file__).resolve().parent / "tasks"
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def go_offline() -> None:
    """Local files only for the Hub, datasets and transformers. They read these variables when
    first imported, so modules already imported (by a caller, or a test session) get the flag
    set as well."""
    for name in OFFLINE_ENV:
        os.environ[name] = "1"
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:
        hub.HF_HUB_OFFLINE = True
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = datasets_config.HF_DATASETS_OFFLINE = True


class EvalError(ValueError):
    """Bad input for fusedkv-eval: the message names the problem and the fix."""


def resolve_model(path: str | Path) -> tuple[str, Path, int | None]:
    """("megatron", the iteration directory, its iteration) or ("hf", the directory, None)."""
    from .. import checkpoint_format as fmt

    path = Path(path)
    if (path / fmt.TRACKER_FILE).is_file():
        ckpt = fmt.latest_checkpoint_dir(path)
        return "megatron", ckpt, fmt.read_run_info(ckpt)["iteration"]
    if (path / fmt.RUN_FILE).is_file():
        return "megatron", path, fmt.read_run_info(path)["iteration"]
    if (path / "config.json").is_file():
        return "hf", path, None
    raise EvalError(
        f"{path} is neither a training checkpoint (no {fmt.TRACKER_FILE} or {fmt.RUN_FILE}) nor "
        "a Hugging Face directory (no config.json): pass the --save directory of fusedkv-pretrain "
        "or a directory written by fusedkv-convert-hf"
    )


def default_output(kind: str, path: Path, iteration: int | None) -> Path:
    """CKPT_ROOT/eval/iter_XXXXXXX.json for a checkpoint, HF_DIR/eval/results.json otherwise."""
    if kind == "megatron":
        return path.parent / "eval" / f"{path.name}.json"
    return path / "eval" / "results.json"


def model_args(
    hf_dir: Path,
    batch_size: int,
    device: str,
    prefix_token_id: int | None,
    dtype: str | None = None,
) -> dict:
    """lm-eval's HFLM arguments. The prefix token (what the first token of a document is
    predicted from) defaults to the export's end-of-document id, as in training, where every
    document follows the previous one's eod; lm-eval's own default would be the BOS token.
    `dtype` (one of DTYPES) defaults to float32 on the CPU and the export's own on a GPU."""
    args: dict[str, Any] = {
        "pretrained": str(hf_dir),
        "trust_remote_code": True,
        "dtype": dtype or ("float32" if device == "cpu" else "auto"),
        "batch_size": batch_size,
    }
    if prefix_token_id is None:
        gen = hf_dir / "generation_config.json"
        eos = json.loads(gen.read_text()).get("eos_token_id") if gen.is_file() else None
        prefix_token_id = eos[0] if isinstance(eos, list) and eos else eos
    if prefix_token_id is not None:
        args["prefix_token_id"] = int(prefix_token_id)
    return args


def flat_metrics(results: dict) -> dict[str, float]:
    """{"TASK/METRIC": value} for every finite metric lm-eval reports (no stderr entries, no
    sample counts)."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            name = key.split(",")[0]
            if name.endswith("_stderr") or name == "sample_len" or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)) and math.isfinite(value):
                out[f"{task}/{name}"] = float(value)
    return out


def write_tensorboard(tb_dir: str | Path, metrics: dict[str, float], step: int) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tb_dir))
    try:
        for tag, value in metrics.items():
            writer.add_scalar(f"eval/{tag}", value, step)
    finally:
        writer.close()


def evaluate(
    path: str | Path,
    tasks: list[str],
    *,
    output: str | Path | None = None,
    tensorboard_dir: str | Path | None = None,
    step: int | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    device: str | None = None,
    prefix_token_id: int | None = None,
    online: bool = False,
    dtype: str | None = None,
) -> dict:
    """Run the lm-eval `tasks` on a checkpoint or HF export; write and return the results JSON."""
    if not online:
        go_offline()
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise EvalError(
            "fusedkv-eval needs lm-evaluation-harness: pip install 'fusedkv_megatron[eval]' "
            "(or pip install 'lm-eval>=0.4.9,<0.5')"
        ) from None
    import torch

    kind, model_dir, iteration = resolve_model(path)
    step = iteration if step is None else step
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    output = Path(output) if output else default_output(kind, model_dir, iteration)
    task_manager = TaskManager(include_path=str(TASK_DIR))
    unknown = [t for t in tasks if t not in task_manager.all_tasks]
    if unknown:
        raise EvalError(
            f"unknown lm-eval task(s) {unknown}; this package ships fusedkv_heldout, lm-eval "
            "lists its own with: lm-eval ls tasks"
        )
    with tempfile.TemporaryDirectory(prefix="fusedkv-eval-") as tmp:
        hf_dir = model_dir
        if kind == "megatron":
            from ..hf.convert import megatron_to_hf

            weights = getattr(torch, dtype or "float32")
            hf_dir = megatron_to_hf(model_dir, Path(tmp) / "hf", dtype=weights)
        results = lm_eval.simple_evaluate(
            model="hf",
            model_args=model_args(hf_dir, batch_size, device, prefix_token_id, dtype),
            tasks=tasks,
            device=device,
            limit=limit,
            task_manager=task_manager,
            log_samples=False,
        )
    metrics = flat_metrics(results)
    report = {
        "model": str(model_dir),
        "kind": kind,
        "iteration": iteration,
        "tasks": tasks,
        "limit": limit,
        "dtype": dtype or ("float32" if device == "cpu" else "auto"),
        "metrics": metrics,
        "results": results.get("results", {}),
        "n-samples": results.get("n-samples", {}),
        "versions": results.get("versions", {}),
        "lm_eval_version": getattr(lm_eval, "__version__", None),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if tensorboard_dir:
        write_tensorboard(tensorboard_dir, metrics, step or 0)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fusedkv-eval", description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="a fusedkv-pretrain --save directory (or iter_XXXXXXX) or HF dir")
    p.add_argument(
        "--tasks",
        required=True,
        help="comma-separated lm-eval tasks, e.g. fusedkv_heldout (ships with this package)",
    )
    p.add_argument("--output", help="results JSON (default: next to the checkpoint, in eval/)")
    p.add_argument("--tensorboard-dir", help="also write the metrics as scalars eval/TASK/METRIC")
    p.add_argument(
        "--step",
        type=int,
        help="TensorBoard step (default: the checkpoint's iteration; 0 for an HF directory)",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, help="only the first N documents of each task")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="the dtype the model is evaluated in (default: float32 on the CPU, the export's "
        "own on a GPU; a training checkpoint is exported in this dtype, float32 by default)",
    )
    p.add_argument(
        "--prefix-token-id",
        type=int,
        help="token a document's first token is predicted from (default: the end-of-document "
        "id from the export's generation_config.json, as in training)",
    )
    p.add_argument(
        "--online",
        action="store_true",
        help="allow lm-eval/datasets to download task data (default: offline, local cache only)",
    )
    a = p.parse_args(argv)
    if not a.online:
        go_offline()  # before anything imports huggingface_hub
    tasks = [t for t in a.tasks.split(",") if t]
    from ..checkpoint_format import CheckpointFormatError
    from ..hf.mapping import ConversionError

    try:
        report = evaluate(
            a.path,
            tasks,
            output=a.output,
            tensorboard_dir=a.tensorboard_dir,
            step=a.step,
            batch_size=a.batch_size,
            limit=a.limit,
            device=a.device,
            prefix_token_id=a.prefix_token_id,
            online=a.online,
            dtype=a.dtype,
        )
    except (EvalError, ConversionError, CheckpointFormatError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for tag, value in report["metrics"].items():
        print(f"{tag}: {value:.6g}")
    out = a.output or default_output(report["kind"], Path(report["model"]), report["iteration"])
    print(f"[fusedkv-eval] results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
