"""The realism probe (brainddpm.evaluation.realism): each probe reads what it should, and the verdict names it.

Two halves of one set of brain-like volumes stand in for real and "synthetic": a probe must read about 0.5
where the halves differ in nothing it sees, and near 1.0 where they differ in what it is built to see."""

import json

import numpy as np
import pytest

from brainddpm.data.shards import write_index, write_shard
from brainddpm.evaluation.realism import probe_sets, run_realism_probe, verdict
from brainddpm.evaluation.report.realism import realism_section
from helpers import brain_volume

SETTINGS = {"folds": 4, "components": 8, "bins": 20, "smooth_sigma": 1.0, "core_fraction": 0.9}
SHAPE = (16, 20, 16)


def _halves(n: int = 24):
    """2n brain-like volumes in [0, 1] with background exactly 0, as two halves."""
    vols = np.stack([brain_volume(i, SHAPE) for i in range(2 * n)])
    vols = np.clip(vols / 160.0, 0, 1).astype(np.float32)
    return vols[:n], vols[n:]


def _probes(real, other, raw=None):
    meta = [{"subject": f"sub-{i:02d}"} for i in range(len(real))]
    probes, evidence, core = probe_sets(real, meta, other, raw, SETTINGS, n_boot=200, seed=0)
    for name, p in probes.items():
        print(f"{name}: {p['accuracy']:.3f} [{p['ci'][0]:.3f}, {p['ci'][1]:.3f}]")
    return probes, evidence, core


def test_a_background_offset_gives_the_whole_volume_away_but_not_the_brain():
    real, other = _halves()
    offset = np.where(other > 0, other, 0.05).astype(np.float32)  # a constant haze outside the brain
    probes, evidence, core = _probes(real, offset)
    assert probes["whole"]["accuracy"] >= 0.9
    assert abs(probes["brain"]["accuracy"] - 0.5) <= 0.2 and probes["brain"]["ci"][0] < 0.5
    assert verdict(probes).endswith("outside the core brain (the background, the brain's edge), not the core anatomy")
    assert evidence.shape == SHAPE and evidence[~core].mean() > evidence[core].mean()  # the evidence is outside


def test_an_intensity_scale_gives_the_histogram_away():
    real, other = _halves()
    probes, _, _ = _probes(real, np.clip(other * 1.2, 0, 1))
    assert probes["histogram"]["accuracy"] >= 0.9
    assert "the intensity histogram" in verdict(probes)


def test_two_halves_of_one_set_are_not_told_apart():
    real, other = _halves()
    probes, _, _ = _probes(real, other)
    assert all(p["ci"][0] < 0.5 + 1e-9 or p["accuracy"] < 0.75 for p in probes.values())
    assert verdict(probes) == "no probe tells them from real volumes"


def test_the_stage_reads_shards_and_parts_and_the_report_shows_the_probes(tmp_path):
    real, other = _halves(12)
    hazy = np.where(other > 0, other, 0.05).astype(np.float32)
    summary = write_shard(tmp_path / "val" / "shard-0000.h5", real, [{"subject": f"sub-{i:02d}"} for i in range(12)],
                          np.eye(4))
    write_index("val", [summary], tmp_path / "val" / "index.json")
    part = tmp_path / "ddim" / "part-000.h5"
    write_shard(part, other, [{"subject": f"synthetic-{i:04d}"} for i in range(12)], np.eye(4), dtype="float32",
                raw_images=hazy, attrs={"background": "mask"})
    out = tmp_path / "ddim" / "realism.json"
    result = run_realism_probe(SETTINGS, 12, 100, 0, tmp_path / "val", [part], out, out.with_name("evidence.png"),
                               out.with_name("evidence.nii.gz"))
    assert result["background_masked"] and set(result["probes"]) == {"whole", "brain", "histogram", "texture",
                                                                       "whole_unmasked"}
    assert result["probes"]["whole_unmasked"]["accuracy"] >= 0.9  # the haze, before masking
    assert result["background_level"]["synthetic_unmasked"] > 0.04 and result["background_level"]["synthetic"] == 0
    assert json.loads(out.read_text())["verdict"] == result["verdict"]
    assert "the background, which the mask removes" in result["verdict"]
    section = realism_section({"ddim": out}, tmp_path / "report")
    assert "| ddim |" in section and (tmp_path / "report" / "evidence-ddim.png").stat().st_size > 1000


@pytest.mark.parametrize("whole, expected", [(0.95, "**recognisably synthetic**"), (0.6, "not told from real")])
def test_the_verdict_calls_a_set_the_probe_tells_apart_recognisably_synthetic(whole, expected):
    from brainddpm.evaluation.report.realism import realism_sentence

    probes = {"whole": {"accuracy": whole, "ci": [whole - 0.05, min(1.0, whole + 0.05)]}}
    probes["whole"]["ci"] = [0.45, 0.7] if whole < 0.75 else probes["whole"]["ci"]
    assert expected in realism_sentence({"probes": probes, "verdict": verdict(probes)})


def test_a_set_told_apart_by_its_histogram_alone_is_recognisably_synthetic():
    """The whole-volume probe near chance does not clear a set whose histogram inside the brain gives it away
    (the latent demo's case: whole 0.75, histogram 1.0); the unmasked probe alone does not condemn it."""
    from brainddpm.evaluation.report.realism import realism_sentence

    probes = {"whole": {"accuracy": 0.75, "ci": [0.62, 0.88], "what": "the whole volume"},
              "histogram": {"accuracy": 1.0, "ci": [1.0, 1.0], "what": "the intensity histogram inside the brain"},
              "whole_unmasked": {"accuracy": 1.0, "ci": [1.0, 1.0], "what": "the whole volume before masking"}}
    sentence = realism_sentence({"probes": probes, "verdict": verdict(probes)})
    assert "**recognisably synthetic**" in sentence and "intensity histogram inside the brain 1.000" in sentence
    assert "before masking 1.000" not in sentence.split(";")[0]
    del probes["histogram"]
    assert "**recognisably synthetic**" not in realism_sentence({"probes": probes, "verdict": verdict(probes)})
