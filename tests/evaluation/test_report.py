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


def test_the_html_page_carries_the_markdown_with_its_figures(tmp_path):
    import numpy as np

    from brainddpm.evaluation.report import grid_markdown, write_html

    (tmp_path / "ci.png").write_bytes(b"\x89PNG fake")
    text = "# Report\n\n## Verdict\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n![ci](ci.png)\n\n![gone](missing.png)\n"
    text += grid_markdown(np.diag([2.15, 1.7, 2.15, 1.0]), (84, 128, 84))
    write_html(text, tmp_path, tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    assert "<h2>Verdict</h2>" in page and "<td>1</td>" in page
    assert 'src="data:image/png;base64,iVBORyBmYWtl"' in page and 'src="missing.png"' in page
    assert "84x128x84 voxels of <strong>2.15x1.70x2.15 mm</strong>" in page and "brainddpm to-mni" in page
