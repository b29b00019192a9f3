"""The evaluation and report steps on tiny real shards: features -> bootstrap -> gather, memorization, report."""

import json

import numpy as np
import pytest
import torch

from brainddpm.data.nifti import target_affine
from brainddpm.data.shards import write_index, write_shard
from brainddpm.evaluation import medicalnet
from brainddpm.evaluation.evaluate import run_bootstrap, run_features, run_gather, run_memorization
from brainddpm.evaluation.report import write_report
from brainddpm.training.losslog import plot_loss
from helpers import base_config

SHAPE = (16, 20, 16)


def blobs(n, seed, noise=0.05):
    rng = np.random.default_rng(seed)
    idx = np.indices(SHAPE).astype(np.float32)
    c = (np.array(SHAPE) - 1) / 2
    out = np.zeros((n, *SHAPE), np.float32)
    for i in range(n):
        r = sum(((idx[k] - c[k]) / (SHAPE[k] * rng.uniform(0.3, 0.4))) ** 2 for k in range(3))
        out[i] = np.clip(0.6 + 0.3 * np.sin(idx[0] / rng.uniform(1.5, 3)) + rng.normal(0, noise, SHAPE), 0, 1) * (r < 1)
    return out


def split(tmp, name, vols, prefix):
    d = tmp / name
    aff = target_affine(base_config()["data"])
    meta = [{"subject": f"{prefix}-{i:03d}", "session": "ses-1", "dataset": "d"} for i in range(len(vols))]
    s = write_shard(d / "shard-0000.h5", vols, meta, aff)
    write_index(name, [s], d / "index.json")
    return d


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    train = split(tmp, "train", blobs(10, 1), "tr")
    val = split(tmp, "val", blobs(8, 2), "va")
    syn_part = tmp / "samples" / "ddpm" / "part-000.h5"
    write_shard(syn_part, blobs(8, 3, noise=0.15), [{"subject": f"synthetic-{i:04d}"} for i in range(8)],
                target_affine(base_config()["data"]), dtype="float32")
    torch.manual_seed(0)
    weights = tmp / "resnet_10_23dataset.pth"
    net = medicalnet.build_network("resnet10")
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()
                               if not k.endswith("num_batches_tracked")}}, weights)
    cfg = base_config(evaluate={"n": 8, "bootstrap": 60, "jobs": 3,
                                "msssim": {"kernel_size": 3, "scales": 2},
                                "fid": {"weights": str(weights)}})
    ev = cfg["evaluate"]
    run_features(ev, 5, val, [syn_part], tmp / "inputs.npz", tmp / "ids.json", "cpu")
    chunks = []
    for k in range(3):
        run_bootstrap(tmp / "inputs.npz", 60, 3, k, 5, tmp / f"chunk-{k}.npz")
        chunks.append(tmp / f"chunk-{k}.npz")
    doc = run_gather(tmp / "inputs.npz", tmp / "ids.json", chunks, tmp / "metrics.json")
    memo = run_memorization(ev["memorization"], 5, train, val, 8, [syn_part], tmp / "memorization.json")
    return tmp, doc, memo, train, val, syn_part


def test_metrics_json_has_every_field_and_the_ids(evaluated):
    tmp, doc, *_ = evaluated
    on_disk = json.loads((tmp / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(doc))
    for name in ("mmd_monai_generative", "mmd_linear_unbiased", "mmd_gaussian_unbiased", "fid",
                 "msssim_synthetic", "msssim_real", "msssim_real_bbox", "floor_fid"):
        e = doc["metrics"][name]
        assert {"value", "ci_low", "ci_high", "n_real", "n_synthetic", "definition"} <= set(e)
        assert e["ci_low"] <= e["ci_high"]
    assert doc["metrics"]["fid"]["n_real"] == 8 and doc["metrics"]["floor_fid"]["n_real"] == 4
    assert [r["subject"] for r in doc["ids"]["real"]] == [f"va-{i:03d}" for i in range(8)]
    assert len(doc["ids"]["synthetic"]) == 8 and doc["fid_computed"]
    # noisier synthetic blobs: their MS-SSIM diversity differs from the real set's
    assert doc["metrics"]["msssim_synthetic"]["value"] < doc["metrics"]["msssim_real"]["value"]


def test_without_weights_fid_is_not_reported(evaluated, tmp_path):
    tmp, doc, memo, train, val, syn_part = evaluated
    cfg = base_config(evaluate={"n": 8, "bootstrap": 10, "jobs": 1, "msssim": {"kernel_size": 3, "scales": 2},
                                "fid": {"weights": str(tmp_path / "missing.pth")}})
    ids = run_features(cfg["evaluate"], 5, val, [syn_part], tmp_path / "i.npz", tmp_path / "ids.json", "cpu")
    assert "fetch_fid_weights" in ids["fid_note"]
    run_bootstrap(tmp_path / "i.npz", 10, 1, 0, 5, tmp_path / "c.npz")
    out = run_gather(tmp_path / "i.npz", tmp_path / "ids.json", [tmp_path / "c.npz"], tmp_path / "m.json")
    assert "fid" not in out["metrics"] and not out["fid_computed"]


def test_memorization_flags_a_copied_training_volume(evaluated, tmp_path):
    tmp, doc, memo, train, val, syn_part = evaluated
    assert len(memo["synthetic_max_corr"]) == 8 and len(memo["validation_max_corr"]) == 8
    copied = blobs(10, 1)[[4]]  # synthetic volume 0 is training volume 4
    part = tmp_path / "part-000.h5"
    write_shard(part, np.concatenate([copied, blobs(3, 9)]), [{"subject": f"synthetic-{i:04d}"} for i in range(4)],
                np.eye(4), dtype="float32")
    cfg = base_config()["evaluate"]["memorization"]
    m = run_memorization(cfg, 5, train, val, 8, [part], tmp_path / "m.json")
    assert m["flagged"][0] == 0 and m["synthetic_nearest_train"][0] == 4
    assert m["synthetic_max_corr"][0] == pytest.approx(1.0, abs=1e-3)


def test_memorization_checks_every_samplers_volumes(evaluated, tmp_path):
    """Friction 5: the copy is in the second sampler's part; the check finds it there (the top level stays the
    first sampler's, which the report draws, and is what one sampler alone gives)."""
    tmp, doc, memo, train, val, syn_part = evaluated
    copied = tmp_path / "samples" / "ddim" / "part-000.h5"
    write_shard(copied, np.concatenate([blobs(10, 1)[[4]], blobs(3, 9)]),
                [{"subject": f"synthetic-{i:04d}"} for i in range(4)], np.eye(4), dtype="float32")
    cfg = base_config()["evaluate"]["memorization"]
    both = run_memorization(cfg, 5, train, val, 8, [syn_part, copied], tmp_path / "m.json")
    assert list(both["samplers"]) == ["ddpm", "ddim"]
    assert both["samplers"]["ddim"]["flagged"][0] == 0 and both["samplers"]["ddim"]["synthetic_nearest_train"][0] == 4
    alone = run_memorization(cfg, 5, train, val, 8, [syn_part], tmp_path / "alone.json")
    assert "samplers" not in alone and {k: v for k, v in both.items() if k != "samplers"} == alone
    assert both["samplers"]["ddpm"] == alone


def test_report_is_written(evaluated, tmp_path):
    tmp, doc, memo, train, val, syn_part = evaluated
    run = tmp_path / "run"
    run.mkdir()
    (run / "loss.csv").write_text("step,epoch,loss,lr,samples_per_s\n" +
                                  "".join(f"{s},{s // 5},{1 / (s + 1)},0.001,10\n" for s in range(20)))
    plot_loss(run / "loss.csv", run / "loss.png")
    (run / "train.json").write_text(json.dumps({"epochs": 4, "steps": 20, "final_loss": 0.05, "wall_time_s": 60,
                                                "gpu_hours": 0, "world_size": 1, "device": "cpu"}))
    out = tmp_path / "report"
    write_report({"ddpm": tmp / "metrics.json"}, tmp / "memorization.json", train, val, {"ddpm": [syn_part]},
                 run, out)
    md = (out / "report.md").read_text()
    assert "real images" in md and "MMD (95% CI)" in md and "Memorization" in md
    for f in ("metrics.md", "metrics.csv", "metrics.json", "ci.png", "slices.png", "memorization.png", "loss.png"):
        assert (out / f).stat().st_size > 100, f
    table = json.loads((out / "metrics.json").read_text())["table"]
    assert table[1][0].startswith("DDPM model") and table[-1][0] == "real images"
