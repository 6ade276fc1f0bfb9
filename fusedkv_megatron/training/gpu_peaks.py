"""Dense bf16 tensor-core peaks of datacenter GPUs: the denominator of MFU, and the planner's.

A GPU is found by the exact name `torch.cuda.get_device_name()` reports, never by a part of it:
"H100" is in the names of three boards whose peaks differ by 30% ("NVIDIA H100 80GB HBM3" is
the SXM5 board, "NVIDIA H100 PCIe" and "NVIDIA H100 NVL" the PCIe cards). The names are the
product names of the NVIDIA driver's list of supported GPUs (README, appendix "Supported NVIDIA
GPU Products", https://download.nvidia.com/XFree86/Linux-x86_64/ <version>/README/
supportedchips.html), which CUDA reports as the device name. The planner may also give the
short `kind` of a row ("H100-PCIe").

Peaks are the "BF16 Tensor Core" lines of NVIDIA's data sheets without sparsity; most sheets
print the sparse figure (marked "with sparsity"), twice the dense one. FP16 has the same peak on
every GPU here. A MIG slice, or a GPU not in the table, gets no peak: the trainer then reports
no MFU and says why once.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuPeak:
    kind: str  # short name, for fusedkv-plan --gpu-kind
    tflops: float  # dense bf16 tensor-core peak
    device_names: tuple[str, ...]  # exactly as torch.cuda.get_device_name() reports them
    source: str  # the data sheet


_H100 = "https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet"
GPU_PEAKS: tuple[GpuPeak, ...] = (
    # H100 data sheet: BF16 1,979 (SXM) / 1,671 (NVL) / 1,513 (PCIe) TFLOPS with sparsity.
    GpuPeak("H100", 989.5, ("NVIDIA H100 80GB HBM3",), _H100),
    GpuPeak("H100-NVL", 835.5, ("NVIDIA H100 NVL",), _H100),
    GpuPeak("H100-PCIe", 756.5, ("NVIDIA H100 PCIe",), _H100),
    # H200 page, specifications: 1,979 (SXM) / 1,671 (NVL) with sparsity.
    GpuPeak("H200", 989.5, ("NVIDIA H200",), "https://www.nvidia.com/en-us/data-center/h200/"),
    GpuPeak(
        "H200-NVL", 835.5, ("NVIDIA H200 NVL",), "https://www.nvidia.com/en-us/data-center/h200/"
    ),
    # GH200 Grace Hopper: the Hopper GPU of the H100 SXM, 1,979 with sparsity.
    GpuPeak(
        "GH200",
        989.5,
        ("NVIDIA GH200 480GB", "NVIDIA GH200 120GB", "NVIDIA GH200 144G HBM3e"),
        "https://www.nvidia.com/en-us/data-center/grace-hopper-superchip/",
    ),
    # H800 (SXM) and H800 PCIe data sheets: 1,979 and 1,513 with sparsity.
    GpuPeak("H800", 989.5, ("NVIDIA H800",), "NVIDIA H800 SXM5 data sheet"),
    GpuPeak("H800-PCIe", 756.5, ("NVIDIA H800 PCIe",), "NVIDIA H800 PCIe data sheet"),
    # A100 data sheet: BF16 312 | 624 (sparse) for the 40 GB and 80 GB, SXM4 and PCIe boards.
    GpuPeak(
        "A100",
        312.0,
        (
            "NVIDIA A100-SXM4-40GB",
            "NVIDIA A100-SXM4-80GB",
            "NVIDIA A100-PCIE-40GB",
            "NVIDIA A100 80GB PCIe",
        ),
        "https://www.nvidia.com/en-us/data-center/a100/",
    ),
    GpuPeak(
        "A800",
        312.0,
        ("NVIDIA A800-SXM4-40GB", "NVIDIA A800-SXM4-80GB", "NVIDIA A800 80GB PCIe"),
        "NVIDIA A800 data sheet (BF16 312 | 624 sparse)",
    ),
    # HGX B200: FP16/BF16 36 PFLOPS for 8 GPUs with sparsity; GB200 NVL72: 360 for 72.
    GpuPeak("B200", 2250.0, ("NVIDIA B200",), "https://www.nvidia.com/en-us/data-center/hgx/"),
    GpuPeak(
        "GB200", 2500.0, ("NVIDIA GB200",), "https://www.nvidia.com/en-us/data-center/gb200-nvl72/"
    ),
    # Ada and Ampere PCIe cards: "BF16 Tensor Core dense | sparse".
    GpuPeak("L40S", 362.05, ("NVIDIA L40S",), "https://www.nvidia.com/en-us/data-center/l40s/"),
    GpuPeak("L40", 181.05, ("NVIDIA L40",), "https://www.nvidia.com/en-us/data-center/l40/"),
    GpuPeak("L4", 121.0, ("NVIDIA L4",), "https://www.nvidia.com/en-us/data-center/l4/"),
    GpuPeak(
        "A10", 125.0, ("NVIDIA A10",), "https://www.nvidia.com/en-us/data-center/products/a10-gpu/"
    ),
    GpuPeak("A40", 149.7, ("NVIDIA A40",), "https://www.nvidia.com/en-us/data-center/a40/"),
    GpuPeak(
        "A30", 165.0, ("NVIDIA A30",), "https://www.nvidia.com/en-us/data-center/products/a30-gpu/"
    ),
)

# Short kind -> dense bf16 peak (the planner lists these).
PEAK_BF16_TFLOPS = {row.kind: row.tflops for row in GPU_PEAKS}


def _key(name: str) -> str:
    """Case and runs of blanks do not distinguish GPUs; every other character does."""
    return " ".join(name.split()).casefold()


_BY_DEVICE_NAME = {_key(n): row for row in GPU_PEAKS for n in row.device_names}
_BY_KIND = {_key(row.kind): row for row in GPU_PEAKS}


def device_peak_tflops(device_name: str) -> tuple[float | None, str | None]:
    """(dense bf16 peak, None) for a GPU of the table by its exact device name, else
    (None, why there is no peak)."""
    row = _BY_DEVICE_NAME.get(_key(device_name))
    if row is not None:
        return row.tflops, None
    if " MIG " in f" {device_name} ":
        return None, (
            f"GPU {device_name!r} is a MIG slice, and the share of the full GPU's peak it gets "
            "is not known"
        )
    return None, (
        f"GPU {device_name!r} is not in the table of dense bf16 peaks "
        "(fusedkv_megatron/training/gpu_peaks.py); add a row with this exact name and the "
        "data sheet's BF16 Tensor Core peak without sparsity"
    )


def gpu_peak_tflops(name: str) -> float | None:
    """Dense bf16 peak by exact device name ("NVIDIA H100 PCIe") or short kind ("H100-PCIe");
    None for anything else."""
    row = _BY_DEVICE_NAME.get(_key(name)) or _BY_KIND.get(_key(name))
    return row.tflops if row is not None else None


def peak_tflops() -> float | None:
    """Dense bf16 peak of this process's GPU; None on CPU or for a GPU not in the table."""
    import torch

    if not torch.cuda.is_available():
        return None
    return device_peak_tflops(torch.cuda.get_device_name())[0]


def no_peak_reason() -> str | None:
    """Why this process's GPU has no peak (None on CPU or when it has one)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return device_peak_tflops(torch.cuda.get_device_name())[1]
