"""Covariate encoding (models/conditioning.py), CFG condition dropping (models/diffusion.py) and sampling
plans (sampling/plan.py), and their round trip through manifest, shards, training and the final model file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from brainddpm.config import deep_merge, validate_config
from brainddpm.data.covariates import parse_value
from brainddpm.data.manifest import build_manifest
from brainddpm.data.nifti import grid_affine
from brainddpm.data.shards import read_meta, write_index, write_shard
from brainddpm.errors import BadInputError, ConfigError
from brainddpm.models.conditioning import NULL_FILL, CovariateEncoding, fit_encoding
from brainddpm.models.diffusion import drop_condition
from brainddpm.models.final import load_final, read_final
from brainddpm.sampling.plan import build_plan, plan_match_validation, plan_strata
from helpers import base_config, bids_dataset

COND = {"covariates": [{"name": "age", "type": "continuous"}, {"name": "sex", "type": "categorical"}],
        "drop_prob": 0.15, "missing": "drop"}
TRAIN_COV = [{"age": 20.0, "sex": "F"}, {"age": 40.0, "sex": "M"}, {"age": 60.0, "sex": "F"}, {"age": None, "sex": "M"}]


def test_encoding_is_fitted_on_the_given_volumes_and_encodes_missing_values_as_absent():
    enc = fit_encoding(COND, TRAIN_COV)
    age, sex = enc.covariates
    assert age["mean"] == pytest.approx(40.0) and age["std"] == pytest.approx(np.std([20, 40, 60]))
    assert sex["categories"] == ["F", "M"] and enc.dim == 2 + 3
    np.testing.assert_allclose(enc.vector({"age": 40.0 + age["std"], "sex": "M"}), [1, 1, 0, 1, 1])
    np.testing.assert_allclose(enc.vector({"age": None, "sex": None}), [0, 0, 0, 0, 0])
    assert enc.vectors(TRAIN_COV).shape == (4, 1, 5)
    with pytest.raises(ConfigError, match="'X' is not among the training split's categories"):
        enc.vector({"age": 30, "sex": "X"})
    np.testing.assert_allclose(enc.vector({"age": 30, "sex": "X"}, strict=False)[2:], [0, 0, 0])
    assert CovariateEncoding.from_dict(json.loads(json.dumps(enc.to_dict()))) == enc
    with pytest.raises(BadInputError, match="no volume has a value for covariate 'age'"):
        fit_encoding(COND, [{"age": None, "sex": "F"}])


def test_table_values_are_parsed_by_type():
    age, sex = COND["covariates"]
    assert parse_value(age, "63.5") == 63.5 and parse_value(age, "n/a") is None and parse_value(age, "") is None
    assert parse_value(sex, " F ") == "F" and parse_value(sex, "NaN") is None
    with pytest.raises(ValueError, match="covariate 'age' = 'old' is not a number"):
        parse_value(age, "old")


def test_condition_drop_rate_and_null_condition():
    context = torch.rand(20000, 1, 5)
    g = torch.Generator().manual_seed(0)
    out = drop_condition(context, 0.15, g)
    dropped = (out == NULL_FILL).all(dim=2).squeeze(1)
    kept = (out == context).all(dim=2).squeeze(1)
    assert bool((dropped | kept).all())  # a whole vector is dropped or kept
    assert abs(dropped.float().mean().item() - 0.15) < 0.01
    assert not (drop_condition(context, 0.0, g) == NULL_FILL).any()
    assert (drop_condition(context, 1.0, g) == NULL_FILL).all()
    # the same generator state gives the same drops (resume is exact)
    a = drop_condition(context, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(a, drop_condition(context, 0.5, torch.Generator().manual_seed(3)))


def test_match_validation_plan_takes_validation_volume_i_for_synthetic_volume_i():
    enc = fit_encoding(COND, TRAIN_COV)
    val = [{"age": 71.0, "sex": "F"}, {"age": 33.0, "sex": "Q"}, {"age": None, "sex": "M"}]
    plan = plan_match_validation(5, val, enc)
    assert [p["covariates"]["age"] for p in plan] == [71.0, 33.0, None, 71.0, 33.0]
    assert [p["covariates"]["sex"] for p in plan] == ["F", None, "M", "F", None]  # Q: unknown to the model
    doc = build_plan({"n": 5, "guidance_scale": 2.0}, enc, val)  # match_validation is the default
    assert doc["mode"] == "match_validation" and doc["guidance_scale"] == 2.0
    assert [v["index"] for v in doc["volumes"]] == list(range(5)) and doc["encoding"] == enc.to_dict()


def test_strata_plan_spaces_ranges_and_balances_unnamed_covariates():
    enc = fit_encoding(COND, TRAIN_COV)
    plan = plan_strata([{"age": [70, 80], "sex": "F", "n": 3}, {"age": 25, "n": 4}], enc)
    assert [p["covariates"]["age"] for p in plan] == [70, 75, 80, 25, 25, 25, 25]
    assert [p["covariates"]["sex"] for p in plan] == ["F", "F", "F", "F", "M", "F", "M"]
    assert [p["stratum"] for p in plan] == ["age=70-80, sex=F"] * 3 + ["age=25"] * 4
    with pytest.raises(ConfigError, match="'diagnosis'"):
        plan_strata([{"diagnosis": "AD", "n": 2}], enc)
    with pytest.raises(ConfigError, match="sample.n"):
        build_plan({"n": 6, "conditions": [{"age": 25, "n": 4}]}, enc, [])


def test_config_checks_strata_against_covariates_and_n():
    strata = [{"age": [70, 80], "n": 4}, {"sex": "F", "n": 4}]
    cfg = base_config(condition=COND, sample={"n": 8, "jobs": 2, "conditions": strata})
    validate_config(cfg)
    for sample, message in (({"n": 9}, "'sample.n': 9, but the strata"),
                            ({"conditions": [{"site": "A", "n": 8}]},
                             r"'sample.conditions\[0\].site': not a covariate"),
                            ({"conditions": [{"sex": [1, 2], "n": 8}]}, "needs a continuous covariate"),
                            ({"conditions": [{"age": "old", "n": 8}]}, "is not a number")):
        with pytest.raises(ConfigError, match=message):
            validate_config(deep_merge(cfg, {"sample": sample}))
    with pytest.raises(ConfigError, match="unique"):
        validate_config(deep_merge(cfg, {"condition": {"covariates": COND["covariates"] * 2}}))


def test_manifest_carries_covariates_and_lists_volumes_it_cannot_use(tmp_path):
    paths = bids_dataset(tmp_path / "ds", subjects=4)
    table = tmp_path / "participants.tsv"
    table.write_text("participant_id\tage\tsex\tdiagnosis\nsub-00\t61\tF\tAD\nsub-01\tn/a\tM\tCN\n"
                     "sub-02\told\tF\tCN\nsub-03\t44\tM\tCN\n")
    ds = [{"name": "ds", "root": str(tmp_path / "ds"), "participants": str(table)}]
    cond = {**COND, "covariates": COND["covariates"] + [{"name": "diagnosis", "type": "categorical"},
                                                        {"name": "dataset", "type": "categorical"}]}
    rows, excluded = build_manifest(ds, condition=cond)
    assert len(paths) == 4
    assert {r["subject"]: (r["age"], r["diagnosis"], r["dataset"]) for r in rows} == {
        "sub-00": ("61", "AD", "ds"), "sub-01": ("n/a", "CN", "ds"), "sub-03": ("44", "CN", "ds")}
    assert [e["reason"] for e in excluded] == ["covariate 'age' = 'old' is not a number (participants table)"]
    rows, excluded = build_manifest(ds, condition={**cond, "missing": "exclude"})
    assert sorted(r["subject"] for r in rows) == ["sub-00", "sub-03"]
    assert "covariate 'age' missing (condition.missing: exclude)" in {e["reason"] for e in excluded}
    rows, excluded = build_manifest(ds)  # unconditional: no covariate check, every image is used
    assert len(rows) == 4 and not excluded and "diagnosis" not in rows[0]


def test_a_covariate_that_is_no_column_fails_in_the_manifest_job(tmp_path, caplog):
    bids_dataset(tmp_path / "a", subjects=2)
    bids_dataset(tmp_path / "b", subjects=2, seed=1)
    (tmp_path / "a.tsv").write_text("participant_id\tage\tsex\nsub-00\t61\tF\nsub-01\t70\tM\n")
    (tmp_path / "b.tsv").write_text("participant_id\tsex\nsub-00\tF\nsub-01\tM\n")
    ds = [{"name": "a", "root": str(tmp_path / "a"), "participants": str(tmp_path / "a.tsv")},
          {"name": "b", "root": str(tmp_path / "b"), "participants": str(tmp_path / "b.tsv")}]
    diagnosis = {**COND, "covariates": [{"name": "diagnosis", "type": "categorical"}]}
    with pytest.raises(ConfigError, match=r"'condition.covariates': 'diagnosis' is not a column of any participants "
                                          r"table \(a: .*a.tsv has participant_id, age, sex; b: .*b.tsv has"):
        build_manifest(ds, condition=diagnosis)
    with pytest.raises(ConfigError, match=r"'condition.missing': exclude, and 'age' is not a column for b"):
        build_manifest(ds, condition={**COND, "missing": "exclude"})
    with caplog.at_level("WARNING"):
        rows, _ = build_manifest(ds, condition=COND)  # missing: drop: allowed, and said
    assert len(rows) == 4 and "covariate 'age' is not a column for dataset(s) b" in caplog.text
    no_tables = [{"name": "a", "root": str(tmp_path / "a")}]
    with pytest.raises(ConfigError, match="'age' is not a column of any participants table \\(a: no table\\)"):
        build_manifest(no_tables, condition=COND)


def _conditional_shards(split_dir, n: int = 8):
    from helpers import SHAPE

    rng = np.random.default_rng(0)
    vols = rng.uniform(0, 1, size=(n, *SHAPE)).astype(np.float32)
    meta = [{"subject": f"s{i}", "covariates": {"age": 20.0 + 5 * i, "sex": "FM"[i % 2]}} for i in range(n)]
    summary = write_shard(split_dir / "shard-000.h5", vols, meta, grid_affine(SHAPE, (1.0,) * 3, (0.0,) * 3),
                          dtype="float32", compression="none")
    write_index("train", [summary], split_dir / "index.json")
    return split_dir, meta


def test_covariates_round_trip_through_shards_training_and_the_model_file(tmp_path):
    from brainddpm.training.loop import train
    from helpers import tiny_config

    split, meta = _conditional_shards(tmp_path / "train")
    assert [m["covariates"] for m in read_meta(split / "shard-000.h5")] == [m["covariates"] for m in meta]
    cfg = deep_merge(tiny_config(max_steps=2), {"condition": COND})
    train(cfg, split, tmp_path / "run")
    model, config = load_final(tmp_path / "run" / "model.safetensors")
    expected = fit_encoding(COND, [m["covariates"] for m in meta])
    assert CovariateEncoding.from_dict(config["condition"]) == expected
    assert config["condition"]["drop_prob"] == 0.15 and config["condition"]["null_fill"] == NULL_FILL
    assert model.with_conditioning and read_final(tmp_path / "run" / "model.safetensors", tensors=False)[1] == {}
    # shards without covariates cannot train a conditional model: the error names the index
    from helpers import make_shards

    plain = make_shards(tmp_path / "plain")
    with pytest.raises(BadInputError, match="hold no covariates"):
        train(cfg, plain, tmp_path / "run2")


def test_an_empty_condition_section_trains_the_unconditional_model_bit_for_bit(tmp_path):
    from safetensors.torch import load_file

    from brainddpm.training.loop import train
    from helpers import make_shards, tiny_config

    split = make_shards(tmp_path / "train")
    plain = tiny_config(max_steps=3)
    plain.pop("condition", None)
    train(plain, split, tmp_path / "a")
    train(deep_merge(plain, {"condition": {**COND, "covariates": []}}), split, tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "condition" not in read_final(tmp_path / "b" / "model.safetensors", tensors=False)[0]


def test_sampling_a_conditional_model_follows_its_plan_and_stores_what_was_asked(tmp_path):
    import h5py

    from brainddpm.sampling.plan import run_condition_plan
    from brainddpm.sampling.sample import run_sample
    from brainddpm.training.loop import train
    from helpers import tiny_config

    split, meta = _conditional_shards(tmp_path / "train")
    val, _ = _conditional_shards(tmp_path / "val", n=3)
    cfg = deep_merge(tiny_config(max_steps=1), {"condition": COND})
    train(cfg, split, tmp_path / "run")
    model = tmp_path / "run" / "model.safetensors"
    sample_cfg = {**cfg["sample"], "n": 4, "batch": 2, "jobs": 2, "device": "cpu", "ddim_steps": 2}
    with pytest.raises(BadInputError, match="needs the plan"):
        run_sample(sample_cfg, model, "ddim", 0, tmp_path / "p.h5", tmp_path / "nifti")
    plan = run_condition_plan({"n": 4, "guidance_scale": 2.5}, model, val, tmp_path / "conditions.json")
    assert [v["covariates"]["age"] for v in plan["volumes"]] == [20.0, 25.0, 30.0, 20.0]  # match_validation
    run_sample(sample_cfg, model, "ddim", 1, tmp_path / "part-001.h5", tmp_path / "nifti",
               plan_path=tmp_path / "conditions.json")
    stored = read_meta(tmp_path / "part-001.h5")
    assert [m["covariates"] for m in stored] == [plan["volumes"][i]["covariates"] for i in (2, 3)]
    assert [m["stratum"] for m in stored] == ["match_validation"] * 2
    with h5py.File(tmp_path / "part-001.h5") as f:
        assert json.loads(f.attrs["encoding"])["covariates"] == plan["encoding"]["covariates"]
        assert f.attrs["guidance_scale"] == 2.5
    sidecar = json.loads((tmp_path / "nifti" / "synthetic-0003_ddim.json").read_text())
    assert sidecar["covariates"] == plan["volumes"][3]["covariates"]
    assert sidecar["seed"] == cfg["sample"]["base_seed"] + 3
    assert sidecar["guidance_scale"] == 2.5 and (tmp_path / "nifti" / "synthetic-0003_ddim.nii.gz").exists()
    # a plan made for another model's encoding is refused
    other = json.loads((tmp_path / "conditions.json").read_text())
    other["encoding"]["covariates"][0]["mean"] += 1
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(BadInputError, match="another model's covariate encoding"):
        run_sample(sample_cfg, model, "ddim", 0, tmp_path / "p.h5", tmp_path / "nifti",
                   plan_path=tmp_path / "other.json")
    with pytest.raises(BadInputError, match="an unconditional model"):
        from helpers import make_shards

        train(tiny_config(max_steps=1), make_shards(tmp_path / "plain"), tmp_path / "plain-run")
        run_condition_plan({"n": 4}, tmp_path / "plain-run" / "model.safetensors", val, tmp_path / "x.json")


def test_guided_output_is_uncond_plus_w_times_the_difference():
    from brainddpm.sampling.sample import guided_output

    class Fake(torch.nn.Module):  # output = the context's first entry, broadcast: cond vs null tell apart
        def forward(self, x, timesteps, context=None):
            return torch.ones_like(x) * (0.0 if context is None else context[:, 0, :1, None, None, None])

    x, t = torch.zeros(2, 1, 2, 2, 2), torch.zeros(2, dtype=torch.long)
    ctx = torch.tensor([[[0.5, 1.0]], [[2.0, 1.0]]])
    out = guided_output(Fake(), x, t, ctx, 3.0)  # null gives -1: -1 + 3 * (c - -1)
    assert torch.allclose(out[:, 0, 0, 0, 0], torch.tensor([-1 + 3 * 1.5, -1 + 3 * 3.0]))
    assert torch.allclose(guided_output(Fake(), x, t, ctx, 1.0)[:, 0, 0, 0, 0], torch.tensor([0.5, 2.0]))
