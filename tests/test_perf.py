"""Throughput helpers: the peak table per device and precision, MFU, bf16 detection."""

from __future__ import annotations

import pytest
import torch

from brainddpm import perf


@pytest.mark.parametrize("name,precision,peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989e12),  # SXM
    ("NVIDIA H100 NVL", "bf16", 835e12),
    ("NVIDIA H100 PCIe", "bf16", 756e12),
    ("NVIDIA H200", "bf16", 989e12),
    ("NVIDIA A100-SXM-64GB", "bf16", 312e12),  # LEONARDO Booster
    ("NVIDIA A100-SXM-64GB", "fp32", 156e12),  # fp32 runs are measured against the TF32 peak
    ("NVIDIA H100 PCIe", "fp32", 378e12),
    ("Tesla V100-SXM2-32GB", "bf16", None),
])
def test_peak_matches_the_exact_part_and_precision(monkeypatch, name, precision, peak):
    monkeypatch.setattr(perf, "device_name", lambda device: name)
    gpu = torch.device("cuda", 0)
    assert perf.peak_flops(gpu, precision) == peak
    if peak:
        assert perf.mfu(int(peak / 10), 2.0, gpu, precision) == pytest.approx(0.2)
    assert perf.peak_flops(torch.device("cpu"), precision) is None


def test_precision_auto_is_fp32_on_cpu_and_explicit_choices_are_kept():
    cpu = torch.device("cpu")
    assert not perf.use_bf16("auto", cpu) and not perf.use_bf16("fp32", cpu) and perf.use_bf16("bf16", cpu)
    assert not perf.bf16_supported(cpu)
    assert perf.mfu(10**12, 1.0, cpu) is None
