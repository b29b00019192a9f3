"""Precision: train.precision on this device (bf16 detection)."""

from __future__ import annotations

import torch

from brainddpm.training import precision
from brainddpm.training.flops import mfu


def test_precision_auto_is_fp32_on_cpu_and_explicit_choices_are_kept():
    cpu = torch.device("cpu")
    assert not precision.use_bf16("auto", cpu) and not precision.use_bf16("fp32", cpu)
    assert precision.use_bf16("bf16", cpu)
    assert not precision.bf16_supported(cpu)
    assert mfu(10**12, 1.0, cpu) is None
