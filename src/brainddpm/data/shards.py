"""HDF5 shards of preprocessed volumes, and the per-split index that lists them.

Layout of one shard (also used for sampled volumes):

    images         (N, 1, D, H, W)  float16|float32, one volume per chunk, compressed
    checksum       (N,)  sha256 of each stored volume's bytes (C order, stored dtype)
    subject, session, dataset, source_path, source_sha256   (N,) strings
    p_low, p_high, mask_voxels                               (N,) per-volume normalisation statistics
    covariates     (N,) JSON strings {name: value or null}, only in shards of a conditioned run
    stratum        (N,) strings, only in samples of a conditional model (the sampling plan's stratum)
    affine         (4, 4) RAS affine of the target grid
    attrs: target_shape, spacing, normalization (JSON), code_version, dtype, count, kind

Files are written under a temporary name and renamed when complete, so a reader never sees a
half-written shard.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np

from brainddpm import __version__
from brainddpm.errors import BadInputError
from brainddpm.fileio import atomic_path, sha256_file

STRING_FIELDS = ("subject", "session", "dataset", "source_path", "source_sha256")
STAT_FIELDS = ("p_low", "p_high", "mask_voxels")
OPTIONAL_STRING_FIELDS = ("stratum",)  # written only when some volume has it (synthetic volumes of a plan)


def volume_checksum(vol: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(vol).tobytes()).hexdigest()


def _compression(name: str, level: int) -> dict:
    if name == "none":
        return {}
    if name == "gzip":
        return {"compression": "gzip", "compression_opts": level}
    return {"compression": name}


def write_shard(path, images: np.ndarray, meta: list[dict], affine: np.ndarray, *, dtype: str = "float16",
                compression: str = "lzf", compression_level: int = 1, attrs: dict | None = None,
                raw_images: np.ndarray | None = None) -> dict:
    """Write volumes (N, D, H, W) or (N, 1, D, H, W) with per-volume metadata; return a summary.
    `raw_images` (samples with their background masked): the volumes before masking, stored beside."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = np.asarray(images)
    if images.ndim == 4:
        images = images[:, None]
    stored = images.astype(dtype)
    n = len(stored)
    checksums = [volume_checksum(v) for v in stored]
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("images", data=stored, chunks=(1, *stored.shape[1:]) if n else None,
                         shuffle=compression != "none", **_compression(compression, compression_level))
        if raw_images is not None:
            f.create_dataset("raw_images", data=np.asarray(raw_images).reshape(stored.shape).astype(dtype),
                             chunks=(1, *stored.shape[1:]) if n else None, shuffle=compression != "none",
                             **_compression(compression, compression_level))
        str_dt = h5py.string_dtype()
        f.create_dataset("checksum", data=np.array(checksums, dtype=object), dtype=str_dt)
        for key in STRING_FIELDS:
            f.create_dataset(key, data=np.array([str(m.get(key, "")) for m in meta], dtype=object), dtype=str_dt)
        for key in STAT_FIELDS:
            f.create_dataset(key, data=np.array([float(m.get(key, np.nan)) for m in meta], dtype=np.float64))
        for key in OPTIONAL_STRING_FIELDS:
            if any(key in m for m in meta):
                f.create_dataset(key, data=np.array([str(m.get(key, "")) for m in meta], dtype=object), dtype=str_dt)
        if any("covariates" in m for m in meta):
            f.create_dataset("covariates", dtype=str_dt, data=np.array(
                [json.dumps(m.get("covariates", {}), sort_keys=True) for m in meta], dtype=object))
        f.create_dataset("affine", data=np.asarray(affine, dtype=np.float64))
        f.attrs.update({
            "target_shape": list(stored.shape[2:]),
            "spacing": list(np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))),
            "code_version": __version__, "dtype": dtype, "count": n, "kind": "volumes",
            "intensity_range": [0.0, 1.0],
        })
        for k, v in (attrs or {}).items():
            f.attrs[k] = json.dumps(v) if isinstance(v, (dict, list)) else v
    return {"file": path.name, "count": n, "sha256": sha256_file(path), "checksums": checksums,
            "subjects": sorted({m.get("subject", "") for m in meta})}


def open_shard(path) -> h5py.File:
    """Open a shard for reading, or raise BadInputError naming the file."""
    try:
        f = h5py.File(path, "r")
    except (OSError, ValueError) as exc:
        raise BadInputError(path, f"not a readable HDF5 shard ({exc})") from None
    if "images" not in f:
        f.close()
        raise BadInputError(path, "HDF5 file without an 'images' dataset: not a brain-ddpm shard")
    return f


def read_meta(path) -> list[dict]:
    """Per-volume metadata of a shard (no image data)."""
    with open_shard(path) as f:
        strings = STRING_FIELDS + ("checksum",) + tuple(k for k in OPTIONAL_STRING_FIELDS if k in f)
        cols = {k: [s.decode() if isinstance(s, bytes) else s for s in f[k][()]] for k in strings}
        cols.update({k: f[k][()].tolist() for k in STAT_FIELDS})
        if "covariates" in f:
            cols["covariates"] = [json.loads(s.decode() if isinstance(s, bytes) else s) for s in f["covariates"][()]]
    return [dict(zip(cols, vals)) for vals in zip(*cols.values())]


def read_volumes(paths, verify: bool = False) -> tuple[np.ndarray, list[dict], np.ndarray]:
    """All volumes of the given shards as float32 (N, 1, D, H, W), their metadata and the affine."""
    arrays, meta, affine = [], [], None
    for p in paths:
        with open_shard(p) as f:
            imgs = f["images"][()]
            affine = f["affine"][()] if affine is None else affine
        m = read_meta(p)
        if verify:
            for i, (vol, row) in enumerate(zip(imgs, m)):
                check_volume(p, i, vol, row["checksum"])
        arrays.append(imgs.astype(np.float32))
        meta += m
    if not arrays:
        raise BadInputError(",".join(map(str, paths)) or "<no shards>", "no volumes to read")
    return np.concatenate(arrays), meta, affine


def read_raw_volumes(paths) -> np.ndarray | None:
    """The unmasked volumes (`raw_images`) of sample parts written with sample.background: mask, as float32
    (N, 1, D, H, W); None when no part has them (sample.background: keep: its images are raw), and a
    BadInputError naming a part without them when others have them."""
    arrays, without = [], []
    for p in paths:
        with open_shard(p) as f:
            if "raw_images" in f:
                arrays.append(f["raw_images"][()].astype(np.float32))
            else:
                without.append(p)
    if without and arrays:
        raise BadInputError(without[0], "no raw_images, where the sampler's other parts have them (sampled with "
                            "another sample.background)")
    return np.concatenate(arrays) if arrays else None


def check_volume(path, index: int, vol: np.ndarray, expected: str) -> None:
    if volume_checksum(vol) != expected:
        raise BadInputError(path, f"volume {index} does not match its stored checksum (corrupt shard)")


def write_index(split: str, summaries: list[dict], path, excluded: list[dict] = (), latent: dict | None = None) -> dict:
    """index.json for one split: shards, counts, checksums; for latent shards their `latent` description."""
    index = {
        "split": split, "code_version": __version__,
        "n_volumes": sum(s["count"] for s in summaries),
        "n_subjects": len({sub for s in summaries for sub in s["subjects"]}),
        "shards": summaries, "excluded": list(excluded),
        **({"latent": latent} if latent else {}),
    }
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(index, indent=1))
    return index


def shard_summary(path) -> dict:
    """The index entry of an existing shard (recomputed from the file)."""
    meta = read_meta(path)
    return {"file": Path(path).name, "count": len(meta), "sha256": sha256_file(path),
            "checksums": [m["checksum"] for m in meta], "subjects": sorted({m["subject"] for m in meta})}


def split_files(split_dir) -> list[Path]:
    """Shard files of a split, in index order."""
    split_dir = Path(split_dir)
    index = split_dir / "index.json"
    if not index.exists():
        raise BadInputError(index, "shard index not found (run `snakemake prepare` first)")
    return [split_dir / s["file"] for s in json.loads(index.read_text())["shards"]]


def data_description(split_dir) -> dict:
    """What a model's final file records about its training data: the image grid (shape, affine, intensity range,
    read from the split's first shard) and, for latent shards (`latent_info`), the latent shape, scale factor and
    autoencoder (the shape is then the images', not the latents')."""
    with open_shard(split_files(split_dir)[0]) as f:
        meta = {"target_shape": [int(s) for s in f.attrs["target_shape"]], "affine": f["affine"][()].tolist(),
                "intensity_range": [float(v) for v in f.attrs.get("intensity_range", [0.0, 1.0])]}
    latent = latent_info(split_dir)
    if latent is not None:
        meta.update(target_shape=latent["image_shape"], latent_shape=latent["latent_shape"],
                    scale_factor=latent["scale_factor"], autoencoder_sha256=latent["autoencoder_sha256"])
    return meta


def training_split(shards_dir) -> Path:
    """The training split of a shards folder: the folder itself when it holds index.json, else its train/."""
    shards_dir = Path(shards_dir)
    if (shards_dir / "index.json").exists() or not (shards_dir / "train").is_dir():
        return shards_dir
    return shards_dir / "train"


# ---- latent shards (written by the encoding stage): the same layout, with kind "latents" ----
def shard_latent(path) -> dict | None:
    """A latent shard's description (scale factor, autoencoder, image and latent shapes); None for images."""
    with open_shard(path) as f:
        if f.attrs.get("kind") != "latents":
            return None
        missing = [k for k in ("scale_factor", "autoencoder_sha256", "image_shape", "latent_shape") if k not in f.attrs]
        if missing:
            raise BadInputError(path, f"a latent shard without the attribute(s) {', '.join(missing)}: encode it again")
        return {"scale_factor": float(f.attrs["scale_factor"]),
                "autoencoder_sha256": str(f.attrs["autoencoder_sha256"]),
                "image_shape": json.loads(f.attrs["image_shape"]), "latent_shape": json.loads(f.attrs["latent_shape"])}


def latent_info(split_dir) -> dict | None:
    """The `latent` entry of a split's index.json (None for image shards), checked against every shard: a
    shard written with another scale factor or autoencoder than the index says is refused, naming both."""
    split_dir = Path(split_dir)
    index_path = split_dir / "index.json"
    index = json.loads(index_path.read_text())
    latent = index.get("latent")
    if latent is None:
        return None
    for entry in index["shards"]:
        found = shard_latent(split_dir / entry["file"])
        if found is None:
            raise BadInputError(split_dir / entry["file"], f"is not a latent shard, but {index_path} lists it as one")
        for key in ("scale_factor", "autoencoder_sha256"):
            if found[key] != latent[key]:
                raise BadInputError(split_dir / entry["file"], f"has latent {key} {found[key]}, but {index_path} "
                                    f"says {latent[key]}: the shards were encoded by different autoencoders; "
                                    "encode them again")
    return latent
