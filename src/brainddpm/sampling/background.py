"""Brain masks for synthetic volumes, and the rule that makes them, chosen on the training split.

Real volumes have a background of exactly 0 (the data stage zeroes everything outside the brain mask); a
diffusion model's samples have a haze there instead (0.04 on average in the demo, up to 0.7), which alone
tells them from real ones. `sample.background: mask` (the default) sets the background of every synthetic
volume to 0 outside its brain mask, as the data the model learnt from; `keep` leaves the volume as the
network made it. The unmasked volumes stay in the HDF5 part (`raw_images`) for the realism probe.

The mask rule, two parameters:

1. threshold the volume at `threshold`;
2. keep the largest 26-connected component (haze that is not attached to the brain goes);
3. fill its holes, slice by slice in all three directions and in 3D (dark ventricles and sulci stay in);
4. dilate by `dilate` voxels, but only into voxels above 0 (the brain's soft edge below the threshold).

The parameters are chosen on the training split only (never the validation split): among a grid of
thresholds and dilations, the pair whose masks of the real training volumes keep at least `keep` (99.5 %)
of every volume's brain voxels (the non-zero ones) and add the fewest background voxels, so that the mask
is as tight as the real brains allow. Steps 2 and 3 are scipy's `label` and `binary_fill_holes` (MONAI's
`KeepLargestConnectedComponent` would need scikit-image, which nothing else here needs); no library chooses
the parameters on a training split, hence that part is written here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from brainddpm.data.shards import open_shard
from brainddpm.errors import BadInputError
from brainddpm.fileio import atomic_path

log = logging.getLogger(__name__)

THRESHOLDS = (0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.16, 0.2, 0.25, 0.3, 0.4)
DILATIONS = (0, 1, 2)
KEEP = 0.995  # the fraction of each real training brain the chosen rule must keep
MAX_VOLUMES = 64  # training volumes the rule is chosen on (an evenly spaced subset of a larger split)


def brain_mask(volume: np.ndarray, threshold: float, dilate: int) -> np.ndarray:
    """The brain mask of one volume (D, H, W) by the rule of the module docstring (bool array)."""
    from scipy import ndimage

    above = volume > threshold
    if not above.any():
        return above
    labels, _ = ndimage.label(above, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(labels.ravel())[1:]
    mask = ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))
    for axis in range(3):  # a hole open to one side in 3D (a sulcus) is closed in its slices
        mask = np.stack([ndimage.binary_fill_holes(s) for s in np.moveaxis(mask, axis, 0)], axis=axis)
    if dilate:
        grown = ndimage.binary_dilation(mask, structure=ndimage.generate_binary_structure(3, 1), iterations=dilate)
        mask = mask | (grown & (volume > 0))
    return mask


def mask_background(volume: np.ndarray, rule: dict) -> tuple[np.ndarray, np.ndarray]:
    """The volume with 0 outside its brain mask, and the mask (uint8)."""
    mask = brain_mask(volume, float(rule["threshold"]), int(rule["dilate"]))
    return np.where(mask, volume, 0.0).astype(volume.dtype), mask.astype(np.uint8)


def choose_mask_rule(volumes: np.ndarray, keep: float = KEEP) -> dict:
    """The tightest (threshold, dilate) of the grid that keeps `keep` of every real volume's brain, with the
    figures it was chosen on: per pair, the worst kept fraction and the mean background voxels added."""
    volumes = np.asarray(volumes, np.float32).reshape(len(volumes), *np.shape(volumes)[-3:])
    brains = volumes > 0
    candidates = []
    for threshold in THRESHOLDS:
        for dilate in DILATIONS:
            masks = [brain_mask(v, threshold, dilate) for v in volumes]
            kept = min(float((m & b).sum()) / max(int(b.sum()), 1) for m, b in zip(masks, brains))
            added = float(np.mean([(m & ~b).sum() for m, b in zip(masks, brains)]))
            candidates.append({"threshold": threshold, "dilate": dilate, "worst_kept": round(kept, 5),
                               "background_added": round(added, 1)})
    passing = [c for c in candidates if c["worst_kept"] >= keep]
    if not passing:
        best = max(candidates, key=lambda c: c["worst_kept"])
        raise BadInputError("training split", f"no mask rule of the grid keeps {100 * keep:.1f} % of every training "
                            f"brain (best: {100 * best['worst_kept']:.2f} %, threshold {best['threshold']}): brains "
                            f"dimmer than the lowest threshold {THRESHOLDS[0]}? set sample.background: keep")
    chosen = min(passing, key=lambda c: (c["background_added"], -c["threshold"]))
    return {"threshold": chosen["threshold"], "dilate": chosen["dilate"], "keep": keep, "volumes": len(volumes),
            "worst_kept": chosen["worst_kept"], "background_added": chosen["background_added"],
            "candidates": candidates}


def training_volumes(train_dir: Path, limit: int = MAX_VOLUMES) -> np.ndarray:
    """At most `limit` volumes of the training split, evenly spaced over its shards, (N, D, H, W) float32;
    only those are read (a 1 mm split of 1000 volumes is 3.6 GB)."""
    index = json.loads((Path(train_dir) / "index.json").read_text())
    if index.get("latent"):
        raise BadInputError(Path(train_dir) / "index.json", "latent shards: the mask rule reads the image shards")
    counts = [s["count"] for s in index["shards"]]
    wanted = set(np.linspace(0, sum(counts) - 1, min(limit, sum(counts))).round().astype(int).tolist())
    volumes, start = [], 0
    for shard, count in zip(index["shards"], counts):
        mine = sorted(i - start for i in wanted if start <= i < start + count)
        if mine:
            with open_shard(Path(train_dir) / shard["file"]) as f:
                volumes += [f["images"][i, 0].astype(np.float32) for i in mine]
        start += count
    if not volumes:
        raise BadInputError(Path(train_dir) / "index.json", "no training volumes")
    return np.stack(volumes)


def run_mask_rule(train_dir: Path, out: Path) -> dict:
    """Choose the mask rule on the training split (training_volumes) and write it as JSON."""
    rule = choose_mask_rule(training_volumes(train_dir))
    log.info("mask rule: threshold %.3f, dilate %d: keeps >= %.2f %% of every one of %d training brains, adds %.0f "
             "background voxels on average", rule["threshold"], rule["dilate"], 100 * rule["worst_kept"],
             rule["volumes"], rule["background_added"])
    with atomic_path(out) as tmp:
        Path(tmp).write_text(json.dumps(rule, indent=1))
    return rule


def read_mask_rule(path: Path) -> dict:
    """A mask rule written by run_mask_rule; BadInputError naming the file when it is not one."""
    try:
        rule = json.loads(Path(path).read_text())
        return {"threshold": float(rule["threshold"]), "dilate": int(rule["dilate"])}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadInputError(path, f"not a mask rule of `brainddpm mask-rule` ({exc})") from None
