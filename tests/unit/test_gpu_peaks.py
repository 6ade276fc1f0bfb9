"""MFU's denominator comes from an exact table of GPU names, and throughput counts training only:
the peak lookup by exact `torch.cuda.get_device_name()` strings (a PCIe H100 does not get the SXM
peak), the one-time "MFU not reported" line, and the interval timer that leaves out evaluation
and checkpoint saves."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fusedkv_megatron.training import gpu_peaks, model_size, reporting
from fusedkv_megatron.training.gpu_peaks import GPU_PEAKS, device_peak_tflops, gpu_peak_tflops

# Device names as CUDA reports them, and the dense bf16 peak each must get.
EXACT = {
    "NVIDIA H100 80GB HBM3": 989.5,  # SXM5
    "NVIDIA H100 PCIe": 756.5,
    "NVIDIA H100 NVL": 835.5,
    "NVIDIA H200": 989.5,
    "NVIDIA H200 NVL": 835.5,
    "NVIDIA GH200 480GB": 989.5,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA B200": 2250.0,
    "NVIDIA GB200": 2500.0,
    "NVIDIA L40S": 362.05,
    "NVIDIA L40": 181.05,
    "NVIDIA L4": 121.0,
    "NVIDIA A10": 125.0,
}
# Names that contain a table entry (or are contained in one) but are other GPUs.
NOT_IN_TABLE = [
    "NVIDIA H100",  # no such name in the table: which board?
    "H100 PCIe",  # not the CUDA device name
    "NVIDIA H100 PCIe 2",
    "NVIDIA A10G",  # the AWS A10G is not the A10
    "NVIDIA A100",
    "NVIDIA L20",
    "Tesla V100-SXM2-32GB",
    "NVIDIA GeForce RTX 4090",
]


@pytest.mark.parametrize("name", sorted(EXACT))
def test_exact_device_names_get_their_data_sheet_peak(name):
    assert device_peak_tflops(name) == (EXACT[name], None)
    # Case and runs of blanks are not part of a GPU's identity.
    assert device_peak_tflops("  " + name.upper().replace(" ", "  ") + " ")[0] == EXACT[name]


@pytest.mark.parametrize("name", NOT_IN_TABLE)
def test_other_names_get_no_peak_and_a_reason(name):
    peak, why = device_peak_tflops(name)
    assert peak is None
    assert f"GPU {name!r} is not in the table" in why and "gpu_peaks.py" in why


def test_mig_slices_get_no_peak():
    peak, why = device_peak_tflops("NVIDIA H100 80GB HBM3 MIG 1g.10gb")
    assert peak is None and "MIG slice" in why


def test_the_table_is_consistent():
    names = [n for row in GPU_PEAKS for n in row.device_names]
    assert len(names) == len(set(names)), "a device name in two rows"
    kinds = [row.kind.casefold() for row in GPU_PEAKS]
    assert len(kinds) == len(set(kinds))
    for row in GPU_PEAKS:
        assert row.tflops > 0 and row.device_names and row.source
        for name in row.device_names:
            assert name == " ".join(name.split()) and name.startswith("NVIDIA ")


def test_the_planner_names_gpus_by_kind_or_exact_name():
    assert gpu_peak_tflops("H100") == 989.5
    assert gpu_peak_tflops("h100-pcie") == 756.5
    assert gpu_peak_tflops("NVIDIA H100 NVL") == 835.5
    assert gpu_peak_tflops("H10") is None and gpu_peak_tflops("NVIDIA H100") is None
    assert model_size.PEAK_BF16_TFLOPS["A100"] == 312.0


def _fake_gpu(monkeypatch, name: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 0)


def test_peak_of_this_gpu_uses_the_device_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_peaks.peak_tflops() is None and gpu_peaks.no_peak_reason() is None
    _fake_gpu(monkeypatch, "NVIDIA H100 PCIe")
    assert model_size.peak_tflops() == 756.5 and gpu_peaks.no_peak_reason() is None
    _fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3")
    assert model_size.peak_tflops() == 989.5


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_interval_timer_leaves_out_excluded_time(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(reporting.IntervalTimer, "clock", staticmethod(clock))
    timer = reporting.IntervalTimer()
    clock.now += 2.0  # training
    with timer.excluded():
        clock.now += 50.0  # evaluation
    clock.now += 1.0  # training
    with pytest.raises(RuntimeError), timer.excluded():
        clock.now += 7.0  # a save that failed still took no training time
        raise RuntimeError
    assert timer.elapsed() == pytest.approx(3.0)
    timer.restart()
    clock.now += 0.5
    assert timer.elapsed() == pytest.approx(0.5)


def _args(**kw):
    base = dict(tensorboard_dir=None, global_batch_size=8, seq_length=128, train_iters=10)
    return SimpleNamespace(**{**base, **kw})


def test_reporter_mfu_and_throughput_exclude_evaluation(monkeypatch, capsys, dist_single):
    """tokens/s and MFU of an interval with 2 s of training and 30 s of evaluation."""
    clock = FakeClock()
    monkeypatch.setattr(reporting.IntervalTimer, "clock", staticmethod(clock))
    _fake_gpu(monkeypatch, "NVIDIA H100 PCIe")
    flops_per_token = 3e9
    reporter = reporting.Reporter(_args(), flops_per_token, gpu_peaks.peak_tflops())
    reporter.start()
    for _ in range(2):
        clock.now += 1.0
        reporter.record(2.0, 1.0)
    with reporter.excluded():
        clock.now += 30.0
    reporter.log(2, 16, 1e-4, 0, 0, {})
    line = capsys.readouterr().out
    tokens_per_s = 2 * 8 * 128 / 2.0
    tflops = tokens_per_s * flops_per_token / 1e12
    assert "elapsed time per iteration (ms): 1000.0" in line
    assert f"tokens/s: {tokens_per_s:.0f}" in line
    assert f"TFLOP/s/GPU: {tflops:.1f}" in line
    assert f"MFU: {100 * tflops / 756.5:.1f}%" in line
    assert "MFU not reported" not in line


def test_unknown_gpu_logs_why_once(monkeypatch, capsys, dist_single):
    _fake_gpu(monkeypatch, "NVIDIA A10G")
    reporter = reporting.Reporter(_args(), 3e9, gpu_peaks.peak_tflops())
    for it in (1, 2, 3):
        reporter.record(2.0, 1.0)
        reporter.log(it, 8 * it, 1e-4, 0, 0, {})
    out = capsys.readouterr().out
    assert out.count("MFU not reported: GPU 'NVIDIA A10G' is not in the table") == 1
    assert "MFU:" not in out and out.count("TFLOP/s/GPU") == 3
