"""GPUs the system shows but torch cannot use: say so instead of training on the CPU.

The usual cause is a torch wheel built for a newer CUDA than the node's driver supports (the
default PyPI wheel is a CUDA 13 build, which needs driver 580 or newer): then
`torch.cuda.is_available()` is False and, without this check, the trainer would pick gloo and
the CPU for a job that asked for GPUs. The signals: `nvidia-smi -L` lists a GPU, or
CUDA_VISIBLE_DEVICES names one, or SLURM allocated some (SLURM_GPUS, SLURM_GPUS_ON_NODE,
SLURM_GPUS_PER_NODE, SLURM_GPUS_PER_TASK, SLURM_JOB_GPUS, SLURM_STEP_GPUS). A
CUDA_VISIBLE_DEVICES that hides every GPU ("" or -1, as a CPU job on a GPU node sets) is a
deliberate CPU run and silences the check; so does --allow-cpu.
"""

from __future__ import annotations

import os
import shutil
import subprocess

SLURM_GPU_VARS = (
    "SLURM_GPUS",
    "SLURM_GPUS_ON_NODE",
    "SLURM_GPUS_PER_NODE",
    "SLURM_GPUS_PER_TASK",
    "SLURM_JOB_GPUS",
    "SLURM_STEP_GPUS",
)
HIDDEN = ("", "-1", "none", "nodevfiles", "void")  # CUDA_VISIBLE_DEVICES values hiding all GPUs
# Oldest Linux driver for each CUDA major version (NVIDIA's CUDA compatibility table; minor
# version compatibility within a major version).
MIN_DRIVER = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}
NVIDIA_SMI_TIMEOUT_S = 15


def _nvidia_smi(*args: str) -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, *args], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def gpu_signals(env=None) -> list[str]:
    """What says this machine has GPUs for the job, one phrase each (empty: nothing does)."""
    env = os.environ if env is None else env
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None and cvd.strip().lower() in HIDDEN:
        return []  # every GPU hidden on purpose (a CPU job on a GPU node)
    found = []
    listing = _nvidia_smi("-L")
    if listing:
        n = sum(1 for line in listing.splitlines() if line.startswith("GPU "))
        if n:
            found.append(f"nvidia-smi lists {n} GPU{'s' if n > 1 else ''}")
    if cvd is not None:
        found.append(f"CUDA_VISIBLE_DEVICES={cvd}")
    for var in SLURM_GPU_VARS:
        value = env.get(var, "").strip()
        if not value or value == "(null)":
            continue
        counts = var not in ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS")  # the others: [type:]count
        if counts and value.split(":")[-1] == "0":
            continue
        found.append(f"{var}={value}")
    return found


def driver_version() -> str | None:
    out = _nvidia_smi("--query-gpu=driver_version", "--format=csv,noheader")
    return out.splitlines()[0].strip() if out else None


def _torch_cuda_warning() -> str | None:
    """The warning torch gives when it finds a GPU it cannot use (e.g. "driver too old")."""
    import warnings

    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.is_available()
    for w in caught:
        text = str(w.message).strip()
        if "CUDA" in text or "driver" in text.lower():
            return " ".join(text.split())
    return None


def gpus_visible_but_unusable(env=None) -> str | None:
    """The error message if the system shows GPUs but torch sees none, else None."""
    import torch

    if torch.cuda.is_available():
        return None
    signals = gpu_signals(env)
    if not signals:
        return None
    driver = driver_version()
    built = torch.version.cuda  # None for a CPU-only wheel
    if built is None:
        build = f"torch {torch.__version__} is a CPU-only build"
        fix = "install a CUDA build of torch"
    else:
        major = int(built.split(".")[0])
        need = MIN_DRIVER.get(major)
        build = f"torch {torch.__version__} was built for CUDA {built}" + (
            f" (needs NVIDIA driver >= {need})" if need else ""
        )
        fix = (
            "install a torch build for this driver (e.g. pip install torch --index-url "
            "https://download.pytorch.org/whl/cu126 for CUDA 12.6, driver >= 525) or "
            "update the driver"
        )
    torch_says = _torch_cuda_warning()
    return (
        f"GPUs are visible ({'; '.join(signals)}; NVIDIA driver "
        f"{driver or 'version unknown: nvidia-smi did not answer'}) but torch cannot use "
        f"them: {build}, and torch.cuda.is_available() is False"
        + (f" (torch says: {torch_says})" if torch_says else "")
        + f". Fix: {fix}; or pass --allow-cpu to train on the CPU on purpose"
    )
