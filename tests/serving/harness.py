"""The serving environment for the tests: created once (tools/serve_env.sh) and reused, and a
runner that hands a JSON job to tests/serving/vllm_worker.py inside it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("vllm_worker.py")


def serve_python() -> Path:
    """The serving venv's python, creating or updating the venv (a few minutes the first time),
    or FUSEDKV_SERVE_PYTHON: an interpreter that already has vllm and fusedkv_vllm (a GPU
    machine's vLLM install)."""
    if os.environ.get("FUSEDKV_SERVE_PYTHON"):
        return Path(os.environ["FUSEDKV_SERVE_PYTHON"])
    out = subprocess.run(
        ["bash", "-c", 'source tools/serve_env.sh >&2 && echo "$SERVE_PY"'],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    if out.returncode != 0:
        raise RuntimeError(f"tools/serve_env.sh failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


def serving_env(kv_cache_gib: int = 1) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(VLLM_CPU_KVCACHE_SPACE=str(kv_cache_gib), VLLM_ENABLE_V1_MULTIPROCESSING="0",
               OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"), VLLM_NO_USAGE_STATS="1",
               DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # fmt: skip
    return env


def run_worker(python: Path, job: dict, workdir: Path, timeout: int = 900) -> dict:
    """Run every engine of `job` in one vLLM process; the per-run results by name."""
    job_file, out_file, log_file = (workdir / n for n in ("job.json", "out.json", "worker.log"))
    job_file.write_text(json.dumps(job))
    with open(log_file, "w") as log:
        proc = subprocess.run([str(python), str(WORKER), str(job_file), str(out_file)],
                              env=serving_env(), stdout=log, stderr=subprocess.STDOUT,
                              timeout=timeout, cwd=workdir)  # fmt: skip
    if proc.returncode != 0 or not out_file.exists():
        raise RuntimeError(f"vLLM worker failed ({proc.returncode}); log tail:\n"
                           f"{log_file.read_text()[-6000:]}")  # fmt: skip
    return json.loads(out_file.read_text())
