"""The encoding stage: image shards -> latent shards, the same latents for any number of jobs, and the latent
scale factor checked wherever latent shards and their index meet."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from brainddpm.data.nifti import grid_affine
from brainddpm.data.prepare import run_index
from brainddpm.data.shards import latent_info, read_meta, read_volumes, split_files, write_shard
from brainddpm.encoding.encode import run_encode
from brainddpm.errors import BadInputError
from brainddpm.models.autoencoder import build_autoencoder, encode_volumes
from brainddpm.models.final import save_final
from helpers import SHAPE, TINY_AUTOENCODER, make_shards

SCALE = 2.5


def autoencoder_file(path, shape=SHAPE, scale=SCALE, seed=0):
    torch.manual_seed(seed)
    ae = build_autoencoder(TINY_AUTOENCODER)
    save_final(path, ae.state_dict(), {"kind": "autoencoder", "autoencoder": TINY_AUTOENCODER,
                                       "data": {"target_shape": list(shape)}, "scale_factor": scale}, 1)
    return path


def _split_into_shards(source, out_dir, sizes):
    """The volumes of `source` rewritten as shards of `sizes` volumes (what another volumes_per_shard gives)."""
    vols, meta, affine = read_volumes(split_files(source))
    files, start = [], 0
    for i, n in enumerate(sizes):
        files.append(out_dir / f"shard-{i:04d}.h5")
        write_shard(files[-1], vols[start:start + n], meta[start:start + n], affine, dtype="float32",
                    compression="none")
        start += n
    return files


def test_same_latents_for_one_and_many_jobs(tmp_path):
    ae = autoencoder_file(tmp_path / "autoencoder.safetensors")
    source = make_shards(tmp_path / "images", n=6)
    one = _split_into_shards(source, tmp_path / "one", [6])
    many = _split_into_shards(source, tmp_path / "many", [2, 3, 1])
    run_encode(ae, one[0], tmp_path / "latents-one" / "shard-0000.h5", "cpu")
    for i, f in enumerate(many):  # one job per shard
        run_encode(ae, f, tmp_path / "latents-many" / f"shard-{i:04d}.h5", "cpu")
    a, meta_a, _ = read_volumes([tmp_path / "latents-one" / "shard-0000.h5"])
    b, meta_b, _ = read_volumes(sorted((tmp_path / "latents-many").glob("shard-*.h5")))
    assert a.shape == (6, 2, 4, 4, 4) and np.array_equal(a, b)
    assert [m["subject"] for m in meta_a] == [m["subject"] for m in meta_b] == [f"s{i}" for i in range(6)]


def test_latents_are_scaled_posterior_means_with_the_image_metadata(tmp_path):
    ae = autoencoder_file(tmp_path / "autoencoder.safetensors")
    source = make_shards(tmp_path / "images", n=3)
    out = tmp_path / "latents" / "shard-0000.h5"
    run_encode(ae, split_files(source)[0], out, "cpu")
    images, _, _ = read_volumes(split_files(source))
    torch.manual_seed(0)
    model = build_autoencoder(TINY_AUTOENCODER).eval()
    expected = encode_volumes(model, torch.from_numpy(images[:1]), TINY_AUTOENCODER) * SCALE
    with h5py.File(out) as f:
        assert np.allclose(f["images"][0], expected[0].numpy(), atol=1e-6)
        assert f.attrs["kind"] == "latents" and float(f.attrs["scale_factor"]) == SCALE
        assert np.array_equal(f["affine"][()], grid_affine(SHAPE, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)))
    assert [m["subject"] for m in read_meta(out)] == ["s0", "s1", "s2"]


def test_index_carries_the_scale_factor_and_refuses_a_shard_with_another(tmp_path):
    ae = autoencoder_file(tmp_path / "autoencoder.safetensors")
    source = make_shards(tmp_path / "images", n=4)
    files = _split_into_shards(source, tmp_path / "split", [2, 2])
    latents = tmp_path / "latents" / "train"
    for i, f in enumerate(files):
        run_encode(ae, f, latents / f"shard-{i:04d}.h5", "cpu")
    index = run_index("train", sorted(latents.glob("shard-*.h5")), latents / "index.json")
    assert index["latent"]["scale_factor"] == SCALE and index["latent"]["latent_shape"] == [2, 4, 4, 4]
    assert latent_info(latents)["image_shape"] == list(SHAPE)
    with h5py.File(latents / "shard-0001.h5", "r+") as f:  # a shard written with another scale factor
        f.attrs["scale_factor"] = 1.0
    with pytest.raises(BadInputError, match=r"shard-0001\.h5.*scale_factor 1\.0.*says 2\.5"):
        latent_info(latents)
    with pytest.raises(BadInputError, match="disagree"):
        run_index("train", sorted(latents.glob("shard-*.h5")), latents / "index.json")


def test_autoencoder_of_another_shape_is_refused_naming_both(tmp_path):
    ae = autoencoder_file(tmp_path / "autoencoder.safetensors", shape=(8, 8, 8))
    source = make_shards(tmp_path / "images", n=2)
    with pytest.raises(BadInputError, match=r"shard-000\.h5.*\[16, 16, 16\].*autoencoder\.safetensors.*\[8, 8, 8\]"):
        run_encode(ae, split_files(source)[0], tmp_path / "latent.h5", "cpu")
    assert not (tmp_path / "latent.h5").exists()
