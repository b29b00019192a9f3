"""The report's one-sentence verdict: is the synthetic set within the real-halves floor?"""

from __future__ import annotations

from brainddpm.evaluation.report.study import floor_verdict


def _entry(value, low, high):
    return {"value": value, "ci_low": low, "ci_high": high}


def test_verdict_says_within_only_when_the_intervals_overlap():
    floor = _entry(0.004, -0.005, 0.02)
    within = floor_verdict("ddim", {"mmd_monai_generative": _entry(0.015, 0.01, 0.03),
                                    "floor_mmd_monai_generative": floor})
    assert "synthetic set is within the real-halves floor" in within and "0.0150 [0.0100–0.0300]" in within
    apart = floor_verdict("ddpm", {"mmd_monai_generative": _entry(0.1, 0.09, 0.11),
                                   "floor_mmd_monai_generative": floor})
    assert "**not** within" in apart and "lies above" in apart
    assert "no verdict" in floor_verdict("ddpm", {"mmd_monai_generative": _entry(0.1, 0.09, 0.11)})


def test_the_html_page_carries_the_markdown_with_its_figures(tmp_path):
    import numpy as np

    from brainddpm.evaluation.report.page import grid_markdown, write_html

    (tmp_path / "ci.png").write_bytes(b"\x89PNG fake")
    text = "# Report\n\n## Verdict\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n![ci](ci.png)\n\n![gone](missing.png)\n"
    text += grid_markdown(np.diag([2.15, 1.7, 2.15, 1.0]), (84, 128, 84))
    write_html(text, tmp_path, tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    assert "<h2>Verdict</h2>" in page and "<td>1</td>" in page
    assert 'src="data:image/png;base64,iVBORyBmYWtl"' in page and 'src="missing.png"' in page
    assert "84x128x84 voxels of <strong>2.15x1.70x2.15 mm</strong>" in page and "brainddpm to-mni" in page


# ---- the utility section (utility.json of the utility stage) ----

def _utility_doc(mix_gain: float) -> dict:
    """A small utility.json: arms real, mix-1 and augmented, models linear and cnn; mix-1 gains `mix_gain`
    balanced accuracy and AUROC with the linear model (its paired difference's CI: that gain +- 0.05)."""
    real = {"balanced_accuracy": (0.70, 0.60, 0.80), "auroc": (0.75, 0.65, 0.85)}

    def arm(gain):
        models = {}
        for model in ("linear", "cnn"):
            g = (gain or 0.0) if model == "linear" else 0.0
            models[model] = {}
            for m, (v, lo, hi) in real.items():
                entry = {"value": v + g, "ci": [lo + g, hi + g], "per_repeat": [v + g]}
                if gain is not None:
                    entry["difference"] = {"value": g, "ci": [g - 0.05, g + 0.05]}
                models[model][m] = entry
        return models

    gen = {"run": "demo-utility", "samplers": ["ddim"], "checkpoints": ["results/train/demo-utility/model.safetensors"],
           "checkpoint_steps": ["1300"], "files": ["a/part-000.h5", "a/part-001.h5"]}
    return {
        "target": "diagnosis", "kind": "categorical", "classes": ["control", "patient"],
        "metrics": ["balanced_accuracy", "auroc"], "higher_is_better": {"balanced_accuracy": True, "auroc": True},
        "test": {"split": "results/shards/val", "volumes": 24, "subjects": 20}, "steps": 150, "repeats": 3,
        "bootstrap": 1000, "confidence": 0.95, "generator": gen,
        "arms": {"real": {"n": 38, "counts": {"real": 38}, "repeats": 3, "synthetic": None, "models": arm(None)},
                 "mix-1": {"n": 76, "counts": {"real": 38, "synthetic": 38}, "repeats": 3, "synthetic": gen,
                           "models": arm(mix_gain)},
                 "augmented": {"n": 76, "counts": {"real": 38, "augmented": 38}, "repeats": 3, "synthetic": None,
                               "models": arm(0.0)}},
        "two_sample": {"ddim": {"accuracy": 0.81, "ci": [0.7, 0.9], "chance": 0.5, "steps": 150,
                                "held_out": {"real_subjects": 10, "real_volumes": 12, "synthetic_volumes": 24}}},
    }


MEMO = {"flagged": [], "synthetic_max_corr": [0.9, 0.95], "validation_max_corr": [0.93, 0.97], "percentile": 95,
        "threshold": 0.968}


def test_utility_verdict_states_the_result_whatever_it_is():
    from brainddpm.evaluation.report.utility import utility_verdict

    assert "**beat** real only on balanced accuracy in 1 of 2" in utility_verdict(_utility_doc(0.15))
    assert "mix-1 with the linear model: +0.150 [+0.100, +0.200]" in utility_verdict(_utility_doc(0.15))
    none = utility_verdict(_utility_doc(0.02))
    assert "**no measurable difference**" in none and "test set of 24 volumes" in none
    assert "did **worse**" in utility_verdict(_utility_doc(-0.2))


def test_utility_section_tables_every_arm_and_model_with_cis(tmp_path):
    from brainddpm.evaluation.report.page import write_html
    from brainddpm.evaluation.report.utility import plot_utility, utility_markdown

    doc = _utility_doc(0.15)
    text = utility_markdown(doc, MEMO)
    assert text.startswith("## Utility: does the synthetic data help?")
    assert "run **demo-utility**, sampler **ddim**" in text and "(step 1300)" in text
    assert "| mix-1 | linear | 76 (38 real + 38 synthetic) | 0.850 [0.750, 0.950] | +0.150 [+0.100, +0.200] |" in text
    assert "| real | cnn | 38 (38 real) | 0.700 [0.600, 0.800] | (reference) |" in text
    assert "| ddim | 0.810 [0.700, 0.900] | 12 real (10 subjects) + 24 synthetic | 150 |" in text
    assert "0 of 2 synthetic volumes" in text and "0.9680" in text
    plot_utility(doc, tmp_path / "utility.png")
    assert (tmp_path / "utility.png").stat().st_size > 5_000
    write_html(text, tmp_path, tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    assert "<h2>Utility: does the synthetic data help?</h2>" in page and "data:image/png;base64," in page
