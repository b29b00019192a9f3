"""The report's "Realism" section: what tells synthetic volumes from real ones (realism_probe's realism.json per
sampler): the probes' balanced accuracies with CIs, the background levels, and the evidence maps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from brainddpm.evaluation.report.common import md_table
from brainddpm.fileio import atomic_path

RECOGNISABLY_SYNTHETIC = 0.9  # a probe of the masked volumes at or above this: the set is recognisably synthetic
MASKED_PROBES = ("whole", "brain", "histogram", "texture")  # the volumes as handed over (not whole_unmasked)


def _interval(probe: dict) -> str:
    return f"{probe['accuracy']:.3f} [{probe['ci'][0]:.3f}, {probe['ci'][1]:.3f}]"


def realism_sentence(realism: dict) -> str:
    """The verdict's clause on realism: recognisably synthetic (any probe of the masked volumes at or above
    RECOGNISABLY_SYNTHETIC, named), told apart, or not told apart, and by what."""
    probes = realism["probes"]
    whole = probes["whole"]
    telling = [n for n in MASKED_PROBES if n in probes and probes[n]["accuracy"] >= RECOGNISABLY_SYNTHETIC]
    if telling:
        named = ", ".join(f"{probes[n].get('what', n)} {_interval(probes[n])}" for n in telling)
        lead = f"**recognisably synthetic**: a linear probe tells its volumes from real ones ({named})"
    elif realism["verdict"].startswith("no probe"):
        lead = f"not told from real volumes by any probe (whole volume {_interval(whole)})"
    else:
        lead = f"told from real volumes by some probes (whole volume {_interval(whole)})"
    return f"{lead}; {realism['verdict']}"


def realism_section(files: dict[str, Path], out: Path) -> str:
    """The section's markdown; each sampler's evidence figure copied beside the report as evidence-<sampler>.png."""
    docs = {s: json.loads(Path(p).read_text()) for s, p in files.items()}
    names = list(next(iter(docs.values()))["probes"])
    rows = [[s] + [_interval(d["probes"][n]) if n in d["probes"] else "–" for n in names] for s, d in docs.items()]
    what = {n: next(iter(docs.values()))["probes"][n]["what"] for n in names}
    lines = ["## Realism: what gives the synthetic volumes away?", "",
             "Linear probes (standardisation, PCA, logistic regression; cross-validated by subject) tell the "
             "validation volumes from each sampler's synthetic ones on one view each. Balanced accuracy [95% CI]: "
             "0.5 is chance, 1.0 tells every volume apart (src/brainddpm/evaluation/realism.py).", "",
             md_table(["sampler", *names], rows), "", *[f"- `{n}`: {what[n]}" for n in names], ""]
    for sampler, d in docs.items():
        level = d["background_level"]
        unmasked = f", {level['synthetic_unmasked']:.4f} before masking" if "synthetic_unmasked" in level else ""
        lines += [f"**{sampler}**: {realism_sentence(d)}. Mean intensity outside every real brain: real "
                  f"{level['real']:.4f}, synthetic {level['synthetic']:.4f}{unmasked}.", ""]
        png = Path(files[sampler]).with_name("evidence.png")
        if png.is_file():
            with atomic_path(out / f"evidence-{sampler}.png") as tmp:
                shutil.copyfile(png, tmp)
            lines += [f"![where the probe sees {sampler} volumes as synthetic](evidence-{sampler}.png)", ""]
    return "\n".join(lines)
