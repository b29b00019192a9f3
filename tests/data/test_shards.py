import json

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from brainddpm.data.dataset import ShardDataset
from brainddpm.data.manifest import read_tsv
from brainddpm.data.nifti import preprocess, target_affine
from brainddpm.data.prepare import n_shards, run_index, run_manifest, run_shard, run_split
from brainddpm.data.shards import data_description
from brainddpm.errors import BadInputError
from helpers import base_config, bids_dataset


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prep")
    bids_dataset(tmp / "a", 7, sessions={0: 2})
    bids_dataset(tmp / "b", 4, seed=1)
    cfg = base_config(datasets=[{"name": "a", "root": str(tmp / "a")}, {"name": "b", "root": str(tmp / "b")}],
                      data={"val_fraction": 0.3})
    run_manifest(cfg, tmp / "manifest.tsv", tmp / "excluded.tsv")
    run_split(cfg, tmp / "manifest.tsv", tmp / "splits.tsv")
    out = {}
    for split in ("train", "val"):
        files = [tmp / split / f"shard-{i:04d}.h5" for i in range(n_shards(tmp / "splits.tsv", split, 3))]
        for i, f in enumerate(files):
            run_shard(cfg, tmp / "splits.tsv", split, i, f)
        run_index(split, files, tmp / split / "index.json")
        out[split] = files
    return cfg, tmp, out


def test_shard_roundtrip_equals_preprocessed(prepared):
    cfg, tmp, files = prepared
    rows = [r for r in read_tsv(tmp / "splits.tsv") if r["split"] == "train"]
    ds = ShardDataset(tmp / "train", verify=True)
    assert len(ds) == len(rows)
    for i, row in enumerate(rows):
        expected, _ = preprocess(row["path"], cfg["data"])
        got, condition = ds[i]
        assert got.shape == (1, 8, 12, 8) and got.dtype == torch.float32
        assert condition.shape == (1, 0)  # an unconditional split: the pair's condition vector is empty
        np.testing.assert_allclose(got[0].numpy(), expected.astype(np.float16).astype(np.float32))
        assert ds.meta[i]["subject"] == row["subject"] and ds.meta[i]["source_sha256"] == row["sha256"]


def test_shard_layout_and_index(prepared):
    cfg, tmp, files = prepared
    with h5py.File(files["train"][0], "r") as f:
        assert f["images"].shape[1:] == (1, 8, 12, 8) and f["images"].dtype == np.float16
        assert f["images"].chunks == (1, 1, 8, 12, 8) and f["images"].compression == "lzf"
        np.testing.assert_allclose(f["affine"][()], target_affine(cfg["data"]))
        assert list(f.attrs["target_shape"]) == [8, 12, 8]
        assert json.loads(f.attrs["normalization"])["upper_percentile"] == 99.5
    index = json.loads((tmp / "train" / "index.json").read_text())
    assert index["n_volumes"] == sum(s["count"] for s in index["shards"])
    assert [s["file"] for s in index["shards"]] == [f.name for f in files["train"]]
    assert not list(tmp.glob("**/.tmp-*"))


def test_data_description_reads_the_grid_of_the_split(prepared):
    cfg, tmp, files = prepared
    meta = data_description(tmp / "train")
    assert meta["target_shape"] == [8, 12, 8] and meta["intensity_range"] == [0.0, 1.0]
    np.testing.assert_allclose(meta["affine"], target_affine(cfg["data"]))
    assert "latent_shape" not in meta  # image shards: no latent description


def test_checksum_verification_catches_corruption(prepared, tmp_path):
    cfg, tmp, files = prepared
    bad = tmp_path / "shard.h5"
    bad.write_bytes(files["val"][0].read_bytes())
    with h5py.File(bad, "r+") as f:
        img = f["images"][0]
        img[0, 4, 6, 4] += 0.5
        f["images"][0] = img
    ShardDataset([bad])[0]  # without verification the read succeeds
    with pytest.raises(BadInputError, match="checksum"):
        ShardDataset([bad], verify=True)[0]


def test_dataloader_workers_and_distributed_sampler(prepared):
    cfg, tmp, files = prepared
    ds = ShardDataset(tmp / "train")
    loader = DataLoader(ds, batch_size=2, num_workers=2)
    batches = list(loader)
    assert all(len(b) == 2 for b in batches)  # (volumes, condition vectors), whatever the dataset
    seen = torch.cat([x for x, _ in batches])
    cached = ShardDataset(tmp / "train", cache=True)
    assert torch.equal(seen, torch.stack([cached[i][0] for i in range(len(cached))]))
    parts = [list(DistributedSampler(ds, num_replicas=2, rank=r, shuffle=True, seed=3)) for r in (0, 1)]
    assert set(parts[0] + parts[1]) == set(range(len(ds)))
    assert len(parts[0]) == len(parts[1]) == (len(ds) + 1) // 2


def test_missing_index_is_a_clear_error(tmp_path):
    with pytest.raises(BadInputError, match="snakemake prepare"):
        ShardDataset(tmp_path)
