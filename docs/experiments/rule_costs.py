"""Per-rule cost table from a run's Snakemake benchmark files, for sizing a SLURM profile.

Every rule writes `results/benchmarks/<rule or stage>/...tsv` (`benchmark:` in workflow/rules): wall
time `s` and peak resident memory `max_rss` (MB) of the job.  This prints, per rule, the number of
jobs and the largest wall time and memory, as a markdown table:

    python docs/experiments/rule_costs.py results/benchmarks

The rule of a file is its name for single-job rules (manifest.tsv) and is read from the file name
for the others (shard/train-0003.tsv -> shard, evaluate/<run>-ddpm-boot-001.tsv -> bootstrap).
"""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

PATTERNS = [  # (regex on the path below the benchmarks folder, rule)
    (r"^shard/\w+-index\.tsv$", "shard_index"),
    (r"^shard/", "shard"),
    (r"^sample/.*-condition-plan\.tsv$", "condition_plan"),
    (r"^sample/", "sample_part"),
    (r"^train/", "train"),
    (r"^evaluate/.*-features\.tsv$", "features"),
    (r"^evaluate/.*-boot-\d+\.tsv$", "bootstrap"),
    (r"^evaluate/.*-gather\.tsv$", "gather_metrics"),
    (r"^evaluate/.*-memorization\.tsv$", "memorization"),
    (r"^evaluate/.*-condition-check\.tsv$", "condition_check"),
    (r"^(\w+)\.tsv$", None),  # demo_cohort, manifest, split, report
]


def rule_of(relative: str) -> str:
    for pattern, rule in PATTERNS:
        m = re.search(pattern, relative)
        if m:
            return rule or m.group(1)
    raise ValueError(f"{relative}: not a benchmark file of this workflow")


def main(folder: str) -> None:
    root = Path(folder)
    rows: dict[str, list[tuple[float, float]]] = {}
    for path in sorted(root.rglob("*.tsv")):
        with open(path, newline="") as f:
            records = list(csv.DictReader(f, delimiter="\t"))
        for r in records:
            rss = float(r["max_rss"]) if r["max_rss"] not in ("", "NA", "-") else float("nan")
            rows.setdefault(rule_of(path.relative_to(root).as_posix()), []).append((float(r["s"]), rss))
    print("| rule | jobs | wall time, max (s) | peak memory, max (MB) |")
    print("|---|---:|---:|---:|")
    for rule, values in rows.items():
        print(f"| {rule} | {len(values)} | {max(v[0] for v in values):.1f} | {max(v[1] for v in values):.0f} |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
