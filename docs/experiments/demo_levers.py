"""Measure one setting of the demo's levers: train on the demo shards, sample with DDIM, compare with the
validation split. Used for docs/benchmarks.md ("Demo: what makes it learn"); not part of the pipeline.

    python docs/experiments/demo_levers.py SHARDS OUT NAME '{scheduler: {prediction_type: v_prediction}}'

SHARDS is a demo run's results/shards (train/ and val/), OUT a scratch folder; the YAML overrides are
merged over config/config.yaml + config/demo.yaml (plus `ddim_steps`, `nsamp`). Prints one JSON line:
steps, final loss, training and sampling seconds, MMD (GenerativeModels definition) against the
validation set, the same MMD between two halves of the validation set (the floor), and the mean pairwise
MS-SSIM of the synthetic and of the real volumes (3 scales, kernel 5).
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from brainddpm.config import deep_merge, load_config, validate_config
from brainddpm.data.shards import read_volumes, split_files
from brainddpm.evaluation import metrics
from brainddpm.models.final import load_final
from brainddpm.sampling.sample import contact_sheet, denoise, make_scheduler
from brainddpm.training.loop import train

shards, out_root, name = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
over = yaml.safe_load(sys.argv[4]) if len(sys.argv) > 4 else {}
steps, n = int(over.pop("ddim_steps", 50)), int(over.pop("nsamp", 8))
root = Path(__file__).resolve().parents[2]
cfg = validate_config(deep_merge(load_config([root / "config/config.yaml", root / "config/demo.yaml"]), over))
out = out_root / name
t0 = time.time()
info = train(cfg, shards, out)
t_train = time.time() - t0
model, config = load_final(out / "model.safetensors")
t0 = time.time()
syn = denoise(model, make_scheduler(config, "ddim", steps), list(range(100000, 100000 + n)),
              tuple(config["data"]["target_shape"]), torch.device("cpu")).numpy()
t_sample = time.time() - t0
real = read_volumes(split_files(shards / "val"))[0].astype(np.float32)
voxels = int(np.prod(real.shape[1:]))
kxx, kyy, kxy = metrics.gram_matrices(real, syn)
a, b = metrics.real_halves(len(real), 0)
floor = metrics.mmd_monai_generative(kxx[np.ix_(a, a)], kxx[np.ix_(b, b)], kxx[np.ix_(a, b)], voxels)
result = {"name": name, "overrides": over, "steps": info["steps"], "loss": round(info["final_loss"], 4),
          "train_s": round(t_train), "sample_s": round(t_sample),
          "mmd": round(metrics.mmd_monai_generative(kxx, kyy, kxy, voxels), 4), "floor": round(floor, 4),
          "msssim_synthetic": round(metrics.mean_offdiag(metrics.pairwise_msssim(syn, 5, 3)), 3),
          "msssim_real": round(metrics.mean_offdiag(metrics.pairwise_msssim(real, 5, 3)), 3), "n_real": len(real)}
print(json.dumps(result))
contact_sheet(syn[:4, 0], [f"{name} {i}" for i in range(4)], out / "sheet.png")
