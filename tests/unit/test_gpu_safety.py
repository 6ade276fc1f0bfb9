"""Start-up checks of the GPU fast path, on the CPU.

- GPUs visible to the system (a fake `nvidia-smi` on PATH, CUDA_VISIBLE_DEVICES, SLURM's GPU
  variables) while torch sees none: fusedkv-pretrain exits 2 naming the driver version, the
  CUDA version torch was built for and the fix; --allow-cpu, or CUDA_VISIBLE_DEVICES=""
  (a CPU job on a GPU node), let it run.
- --fp8-recipe mxfp8 on a GPU without MXFP8 (Hopper, faked) and fp32 with a forced Triton
  backend fail at start-up with the fix.
- Under the auto backend, tensors beyond the kernels' launch limits (CUDA's grid limit of
  65535 in the second dimension, int32 offsets) take the materialising path with one log
  line; the data-parallel overlap flags refuse combinations Megatron cannot run.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusedkv_megatron import kernels
from fusedkv_megatron.training import gpu_visibility
from fusedkv_megatron.training.arguments import ArgumentError, parse_args, validate_args

# A model shape (required) and mock data: the tiny config, no tokenizer.
TINY = Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny.yaml"
BASE = [
    "--config",
    str(TINY),
    "--tokenizer-type",
    "NullTokenizer",
    "--vocab-size",
    "512",
    "--mock-data",
]

REPO = Path(__file__).resolve().parents[2]
DRIVER = "535.104.05"
FAKE_SMI = f"""#!/bin/sh
case "$*" in
  *driver_version*) echo "{DRIVER}" ;;
  *-L*) echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"; echo "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-1)" ;;
  *) exit 1 ;;
esac
"""


@pytest.fixture
def fake_smi(tmp_path, monkeypatch):
    """A PATH whose nvidia-smi reports two H100s on driver 535; no GPU variables set."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(FAKE_SMI)
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for var in ("CUDA_VISIBLE_DEVICES", *gpu_visibility.SLURM_GPU_VARS):
        monkeypatch.delenv(var, raising=False)
    return bin_dir


def test_signals_from_nvidia_smi_and_the_environment(fake_smi, monkeypatch):
    assert gpu_visibility.gpu_signals({}) == ["nvidia-smi lists 2 GPUs"]
    assert gpu_visibility.driver_version() == DRIVER
    env = {"CUDA_VISIBLE_DEVICES": "0,1", "SLURM_JOB_GPUS": "0,1", "SLURM_GPUS_ON_NODE": "2"}
    assert gpu_visibility.gpu_signals(env) == [
        "nvidia-smi lists 2 GPUs",
        "CUDA_VISIBLE_DEVICES=0,1",
        "SLURM_GPUS_ON_NODE=2",
        "SLURM_JOB_GPUS=0,1",
    ]
    for hidden in ("", "-1"):  # every GPU hidden on purpose: a CPU job on a GPU node
        assert gpu_visibility.gpu_signals({"CUDA_VISIBLE_DEVICES": hidden}) == []
    monkeypatch.setenv("PATH", "/nonexistent")  # no nvidia-smi: only the variables count
    assert gpu_visibility.gpu_signals({}) == []
    assert gpu_visibility.gpu_signals({"SLURM_GPUS": "4"}) == ["SLURM_GPUS=4"]
    assert gpu_visibility.gpu_signals({"SLURM_GPUS_ON_NODE": "0", "SLURM_GPUS": "h100:0"}) == []
    assert gpu_visibility.gpu_signals({"SLURM_JOB_GPUS": "0"}) == ["SLURM_JOB_GPUS=0"]  # index


def test_message_names_driver_cuda_build_and_fix(fake_smi):
    message = gpu_visibility.gpus_visible_but_unusable({"SLURM_JOB_GPUS": "0"})
    assert message is not None
    assert DRIVER in message and "SLURM_JOB_GPUS=0" in message
    assert f"CUDA {torch.version.cuda}" in message and "--allow-cpu" in message
    from fusedkv_megatron.training.flags_fastpath import check_gpus_usable

    with pytest.raises(ArgumentError, match="--allow-cpu"):
        check_gpus_usable(parse_args([*BASE]))
    check_gpus_usable(parse_args([*BASE, "--allow-cpu"]))
    # fusedkv-plan validates the same flags without checking the machine
    validate_args(parse_args([*BASE]), world_size=1, cuda=False)


@pytest.mark.slow
def test_trainer_exits_2_when_gpus_are_visible_but_unusable(fake_smi):
    """The whole CLI, as a user meets it: exit 2 and the message, before any training."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    cmd = [
        sys.executable,
        "-m",
        "fusedkv_megatron.pretrain",
        *BASE,
        "--train-iters",
        "1",
        "--lr-warmup-iters",
        "0",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "GPUs are visible (nvidia-smi lists 2 GPUs" in proc.stderr
    assert f"NVIDIA driver {DRIVER}" in proc.stderr
    assert f"built for CUDA {torch.version.cuda}" in proc.stderr
    assert "--allow-cpu" in proc.stderr and "iteration" not in proc.stdout


def test_mxfp8_needs_blackwell(monkeypatch):
    from fusedkv_megatron.training.flags_fastpath import _check_fp8_recipe

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    args = parse_args([*BASE, "--bf16", "--fp8-format", "e4m3", "--fp8-recipe", "mxfp8"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    with pytest.raises(ArgumentError, match=r"mxfp8 needs .* is 9\.0\. Use --fp8-recipe"):
        _check_fp8_recipe(args, cuda=True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (10, 0))
    _check_fp8_recipe(args, cuda=True)  # Blackwell: fine
    args.fp8_recipe = "delayed"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    _check_fp8_recipe(args, cuda=True)


def test_forced_triton_in_fp32_fails_at_start_up(monkeypatch):
    monkeypatch.setenv(kernels.BACKEND_ENV, "triton")
    with pytest.raises(ArgumentError, match="triton with fp32 parameters.*--bf16"):
        validate_args(parse_args([*BASE]), world_size=1, cuda=False)
    validate_args(parse_args([*BASE, "--bf16"]), world_size=1, cuda=False)
    monkeypatch.setenv(kernels.BACKEND_ENV, "auto")
    validate_args(parse_args([*BASE]), world_size=1, cuda=False)


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--overlap-param-gather"], "needs --use-distributed-optimizer"),
        (["--overlap-param-gather", "--use-distributed-optimizer"], "needs --overlap-grad-reduce"),
        (["--align-param-gather"], "needs --overlap-param-gather"),
        (["--ddp-bucket-size", "0"], "--ddp-bucket-size=0 must be > 0"),
    ],
)
def test_overlap_flags_refuse_what_megatron_cannot_run(flags, match):
    with pytest.raises(ArgumentError, match=match):
        validate_args(parse_args([*BASE, *flags]), world_size=1, cuda=False)


def test_interleaved_pipeline_aligns_the_param_gather():
    flags = [*BASE, "--use-distributed-optimizer", "--overlap-grad-reduce",
             "--overlap-param-gather", "--pipeline-model-parallel-size", "2",
             "--virtual-pipeline-model-parallel-size", "2"]  # fmt: skip
    assert validate_args(parse_args(flags), world_size=2, cuda=False).align_param_gather
    plain = validate_args(parse_args(flags[:-2]), world_size=2, cuda=False)
    assert not plain.align_param_gather


def _meta(*shape):
    return torch.empty(shape, device="meta", dtype=torch.bfloat16)


def test_launch_limits_name_grid_and_int32():
    # training [s, b, h, d]: b x hq programs in the grid's second dimension
    assert kernels.launch_limit_blockers(_meta(128, 4096, 16, 64), _meta(128, 4096, 16, 64)) == [
        "batch 4096 x 16 heads = 65536 programs exceed CUDA's grid limit of 65535 in the "
        "second dimension"
    ]
    assert kernels.launch_limit_blockers(_meta(128, 4095, 16, 64), _meta(128, 4095, 16, 64)) == []
    # sbhd: the sequence stride spans the batch, so a 2^31-element tensor overflows int32
    big = _meta(131072, 8, 32, 128)
    why = kernels.launch_limit_blockers(big, _meta(131072, 8, 8, 128))
    assert len(why) == 1 and why[0].startswith("q (131072, 8, 32, 128)") and "int32" in why[0]
    # strides as given count too: a view whose sequence stride is inflated
    wide = torch.empty(0, device="meta").new_empty_strided((4096, 2, 16, 128), (2**20, 128, 0, 1))
    assert "int32" in kernels.launch_limit_blockers(wide, _meta(4096, 2, 16, 128))[0]
    ok = _meta(4096, 2, 16, 128)
    assert kernels.launch_limit_blockers(ok, ok) == []
    # decode [b, S, hkv, d]: b x hkv programs; the offsets within one sequence
    assert kernels.launch_limit_blockers(_meta(8, 1, 16, 128), _meta(8, 32768, 8, 128), True) == []
    assert (
        "grid limit"
        in kernels.launch_limit_blockers(_meta(9000, 1, 16, 128), _meta(9000, 64, 8, 128), True)[0]
    )


def test_auto_falls_back_with_one_log_line(monkeypatch, caplog):
    """A layer whose tensors exceed the grid limit takes the materialising path under auto,
    with one log line however often it runs; a forced triton raises instead."""
    from types import SimpleNamespace

    from fusedkv_megatron import attention_policy

    monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)
    monkeypatch.setattr(attention_policy, "use_triton", lambda q, backend=None: True)
    monkeypatch.setattr(attention_policy, "_unsupported", lambda module: [])
    kernels._fallbacks_logged.clear()
    module = SimpleNamespace(layer_number=7)
    q, src = _meta(16, 4096, 16, 64), _meta(16, 4096, 16, 64)
    with caplog.at_level(logging.WARNING, logger="fusedkv_megatron.kernels"):
        for _ in range(3):
            assert not attention_policy.fused_attention_applies(module, q, None, [src])
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("layer 7: batch 4096 x 16 heads")
    assert "falling back to the materialising torch path" in lines[0]
    small = _meta(16, 2, 16, 64)
    assert attention_policy.fused_attention_applies(module, small, None, [small])
    with pytest.raises(RuntimeError, match="grid limit"):
        attention_policy.fused_attention_applies(module, q, "triton", [src])
