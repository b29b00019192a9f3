"""The report's one-sentence verdict: is the synthetic set within the real-halves floor?"""

from __future__ import annotations

from brainddpm.evaluation.report import floor_verdict


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
