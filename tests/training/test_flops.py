"""FLOPs and MFU: the peak table per device and precision, MFU; the activation-checkpointing and lever benches."""

from __future__ import annotations

import pytest
import torch

from brainddpm.training import flops


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
    monkeypatch.setattr(flops, "device_name", lambda device: name)
    gpu = torch.device("cuda", 0)
    assert flops.peak_flops(gpu, precision) == peak
    if peak:
        assert flops.mfu(int(peak / 10), 2.0, gpu, precision) == pytest.approx(0.2)
    assert flops.peak_flops(torch.device("cpu"), precision) is None


def _tiny_cfg():
    from helpers import base_config

    return base_config(model={"channels": [8, 8, 16], "num_head_channels": 16, "use_flash_attention": True})


def test_activation_checkpointing_keeps_the_loss_and_the_gradients():
    from brainddpm.bench.train import apply_checkpointing
    from brainddpm.models.diffusion import build_model, build_scheduler, diffusion_loss

    cfg = _tiny_cfg()
    scheduler = build_scheduler(cfg["scheduler"])
    x = torch.rand(2, 1, 16, 16, 16)
    grads, losses = [], []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        net = build_model(cfg["model"])
        if checkpointed:
            apply_checkpointing(net)
        loss = diffusion_loss(net, scheduler, x, torch.Generator().manual_seed(1))
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in net.parameters()])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(*grads))


def test_lever_and_baseline_benches_run_and_report_on_cpu():
    from brainddpm.bench.train import Levers, bench_baseline, bench_levers

    cfg, cpu = _tiny_cfg(), torch.device("cpu")
    r = bench_levers(cfg, (16, 16, 16), 2, 1, cpu, Levers(channels_last=True, fused_adam=True, checkpointing=True),
                     warmup=1, flops=10**9)
    assert r["samples_per_s"] > 0 and r["tflops_per_s"] > 0 and r["mfu"] is None
    assert "channels_last_3d" in r["variant"] and "fused Adam" in r["variant"] and torch.isfinite(
        torch.tensor(r["final_loss"]))
    b = bench_baseline(cfg, (16, 16, 16), 2, 1, cpu, warmup=1, amp=False)
    assert b["samples_per_s"] > 0 and b["autocast_dtype"] == "fp32" and "tutorial" in b["variant"]
