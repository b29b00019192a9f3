"""FLOPs and activation memory of the 1 mm latent preset (config/latent.yaml), counted on the CPU without
running a single kernel: the networks are built on PyTorch's `meta` device, where every op only computes
shapes. FLOPs: torch's FlopCounterMode over one training forward + backward of one volume (convolutions,
matmuls, attention; norms and elementwise ops uncounted, as for MFU). Memory: the bytes autograd saves
for the backward (saved_tensors_hooks) during that forward, in fp32, plus weights, gradients and Adam
state (16 bytes per parameter). Under bf16 autocast most saved activations are bf16: about half.

    python docs/experiments/latent_costs.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from brainddpm.config import deep_merge  # noqa: E402
from brainddpm.models.autoencoder import build_autoencoder, latent_shape, padded_shape  # noqa: E402
from brainddpm.models.diffusion import build_model  # noqa: E402


def count(net: torch.nn.Module, forward, shape, blocks=()) -> dict:
    """`blocks`: the modules activation checkpointing wraps; for them, what checkpointing keeps (each block's
    input) and the largest block's own activations (what one recomputation holds) are counted too."""
    saved = [0]
    inside: list[int] = []
    kept = [0]

    def pack(t: torch.Tensor):
        saved[0] += t.numel() * t.element_size()
        return t

    def before(module, inputs):
        kept[0] += sum(t.numel() * t.element_size() for t in inputs if isinstance(t, torch.Tensor))
        module._saved_before = saved[0]

    def after(module, inputs, output):
        inside.append(saved[0] - module._saved_before)

    handles = [h for b in blocks for h in (b.register_forward_pre_hook(before), b.register_forward_hook(after))]

    x = torch.rand(1, *shape, device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = forward(net, x)
        out.float().square().mean().backward()
    for h in handles:
        h.remove()
    params = sum(p.numel() for p in net.parameters())
    row = {"input": list(shape), "parameters": params, "flops_per_sample": int(counter.get_total_flops()),
           "saved_activations_fp32_gib": saved[0] / 2**30, "weights_grads_adam_gib": 16 * params / 2**30}
    if blocks:  # derived: block inputs kept, plus one block recomputed at a time
        outside = saved[0] - sum(inside)
        row["checkpointed_activations_fp32_gib"] = (outside + kept[0] + max(inside)) / 2**30
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg = deep_merge(cfg, yaml.safe_load((ROOT / "config" / "latent.yaml").read_text()))
    ae_cfg, image = cfg["autoencoder"], cfg["data"]["target_shape"]
    rows = {}
    with torch.device("meta"):
        # counted without checkpointing (its hooks hide what it saves); what checkpointing keeps is derived:
        # MONAI's use_checkpoint wraps the whole encoder and the whole decoder, each recomputed in the backward
        ae = build_autoencoder({**ae_cfg, "use_checkpoint": False}).train()
        blocks = [ae.encoder, ae.decoder]
        key = f"autoencoder, whole volume {'x'.join(map(str, padded_shape(image, ae_cfg['pad_multiple'])))}"
        rows[key] = count(ae, lambda n, x: n(x)[0], (1, *padded_shape(image, ae_cfg["pad_multiple"])), blocks)
        from brainddpm.models.autoencoder import build_discriminator

        disc = build_discriminator(ae_cfg["adversarial"]).train()
        rows[f"PatchDiscriminator ({ae_cfg['adversarial']['channels']}, {ae_cfg['adversarial']['layers']} layers), one "
             "pass"] = count(disc, lambda n, x: n(x)[-1], (1, *padded_shape(image, ae_cfg["pad_multiple"])))
        z = latent_shape(ae_cfg, image)
        unet = build_model(cfg["model"], None, channels=z[0]).train()
        t = torch.zeros(1, dtype=torch.long, device="meta")
        rows[f"latent UNet {tuple(cfg['model']['channels'])} on {'x'.join(map(str, z))}"] = count(
            unet, lambda n, x: n(x, timesteps=t), z)
    for name, r in rows.items():
        print(f"{name}: {r['parameters'] / 1e6:.1f} M parameters, {r['flops_per_sample'] / 1e12:.2f} TFLOP per "
              f"sample (fwd+bwd), saved activations {r['saved_activations_fp32_gib']:.1f} GiB fp32, weights+grads+"
              f"Adam {r['weights_grads_adam_gib']:.2f} GiB" + (
                  f"; with checkpointing (derived) {r['checkpointed_activations_fp32_gib']:.1f} GiB fp32"
                  if "checkpointed_activations_fp32_gib" in r else ""))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
