"""Find the input images, check each one, and split subjects into train and validation.

`build_manifest` writes one row per usable image (subject, session, dataset, path, shape, spacing,
orientation, sha256) and one row per rejected input in the exclusion list (path and reason).
`split_subjects` assigns whole subjects (all their sessions) to train or val, stratified by
dataset and seeded; each dataset draws from its own stream, so adding a dataset does not move
the subjects of the others.
"""

from __future__ import annotations

import csv
import logging
import re
import zlib
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from brainddpm.bids import discover, ids_from_path, image_masks
from brainddpm.config import covariate_names
from brainddpm.data.covariates import read_covariates
from brainddpm.data.nifti import header_info, load_checked
from brainddpm.errors import BadInputError, ConfigError
from brainddpm.fileio import atomic_path, sha256_file

MANIFEST_COLUMNS = ["subject", "session", "dataset", "path", "shape", "spacing", "orientation", "sha256", "age", "sex"]
SPLIT_COLUMNS = ["subject", "session", "dataset", "path", "sha256", "split"]
EXCLUDED_COLUMNS = ["path", "dataset", "reason"]

log = logging.getLogger(__name__)


def write_tsv(rows: list[dict], columns: list[str], path) -> None:
    """Write a TSV atomically: a temporary file renamed into place when complete."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, delimiter="\t", lineterminator="\n", extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("n/a" if r.get(k) in (None, "") else r[k]) for k in columns})


def read_tsv(path) -> list[dict]:
    """Rows of a tab-separated table; a UTF-8 byte-order mark and CRLF line ends (spreadsheet exports) read
    as the same table."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def natural_key(text: str) -> list:
    """Sort key that puts ses-2 before ses-10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def read_participants(path, columns: tuple[str, ...] = ()) -> tuple[dict[tuple[str, str], dict], list[str]]:
    """(subject, session or '') -> row of a participants table, and the table's columns.

    BadInputError when the table cannot be read, or when two rows of one subject/session disagree on one of
    `columns` (the covariates the run conditions on): which one is right is the user's call, not the last
    row's. Other columns may differ (a table with a row per visit and no session_id): the last row wins.
    """
    try:
        rows = read_tsv(path)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise BadInputError(path, f"cannot read participants table ({exc})") from None
    if not rows:
        raise BadInputError(path, "participants table is empty")
    col = next((c for c in ("participant_id", "subject") if c in rows[0]), None)
    if col is None:
        raise BadInputError(path, f"participants table has no participant_id or subject column (has {list(rows[0])})")
    out: dict[tuple[str, str], dict] = {}
    for line, r in enumerate(rows, start=2):
        sub = r[col] if str(r[col]).startswith("sub-") else f"sub-{r[col]}"
        key = (sub, r.get("session_id") or "")
        if key in out:
            differ = [c for c in columns if c in r and (out[key].get(c) or "") != (r.get(c) or "")]
            if differ:
                both = "; ".join(f"{c} {out[key].get(c)!r} and {r.get(c)!r}" for c in differ)
                raise BadInputError(path, f"two rows for {sub}{' ' + key[1] if key[1] else ''} disagree ({both}; "
                                    f"the second at line {line}): keep one")
        out[key] = r
    return out, list(rows[0])


def inspect_image(path: str) -> dict:
    """Header facts and sha256 of a usable image; BadInputError otherwise (runs in worker processes)."""
    img, _ = load_checked(path)
    return {**header_info(img), "sha256": sha256_file(path)}


def _inspect_or_reason(path: str):
    try:
        return inspect_image(path)
    except BadInputError as exc:
        return exc.reason


def manifest_columns(condition: dict | None = None, masks: bool = False) -> list[str]:
    """MANIFEST_COLUMNS, `mask` when some dataset has per-image masks, then the covariates of `condition` that
    are not among them (a run without either writes the table it always wrote)."""
    columns = MANIFEST_COLUMNS + ["mask"] * masks
    return columns + [c for c in covariate_names(condition) if c not in columns]


def split_columns(condition: dict | None = None, masks: bool = False) -> list[str]:
    """SPLIT_COLUMNS, `mask` when images have their own, then the covariates of `condition` (they travel on to
    the shards)."""
    columns = SPLIT_COLUMNS + ["mask"] * masks
    return columns + [c for c in covariate_names(condition) if c not in columns]


def _covariate_problem(condition: dict | None, cand: dict) -> str | None:
    """Why a candidate cannot be used for conditioning (unreadable value, or missing under 'exclude')."""
    if not covariate_names(condition):
        return None
    try:
        values = read_covariates(condition, cand)
    except ValueError as exc:
        return f"{exc} (participants table)"
    missing = [k for k, v in values.items() if v is None]
    if missing and condition["missing"] == "exclude":
        return f"covariate {', '.join(repr(k) for k in missing)} missing (condition.missing: exclude)"
    return None


def check_covariate_columns(condition: dict | None, columns: dict[str, tuple[str | None, list[str]]]) -> None:
    """Each requested covariate is a column of the participants tables (`columns`: dataset -> (table, its
    columns)); `dataset` is always there. Missing from every table: a ConfigError naming the covariate and
    what each table has. Missing from some: under `condition.missing: exclude` a ConfigError naming those
    datasets (each of their volumes would be excluded), under `drop` a warning naming them."""
    for name in covariate_names(condition):
        if name == "dataset":
            continue
        lacking = {ds: (table, cols) for ds, (table, cols) in columns.items() if name not in cols}
        if not lacking:
            continue
        has = "; ".join(f"{ds}: {table} has {', '.join(cols) or 'no columns'}" if table else f"{ds}: no table"
                        for ds, (table, cols) in lacking.items())
        if len(lacking) == len(columns):
            raise ConfigError(f"config key 'condition.covariates': {name!r} is not a column of any participants "
                              f"table ({has})")
        if condition["missing"] == "exclude":
            raise ConfigError(f"config key 'condition.missing': exclude, and {name!r} is not a column for "
                              f"{', '.join(lacking)} ({has}): every volume of those datasets would be excluded; "
                              "add the column, or use missing: drop")
        log.warning("covariate %r is not a column for dataset(s) %s (%s): their volumes train without it "
                    "(condition.missing: drop)", name, ", ".join(lacking), has)


def build_manifest(datasets: list[dict], jobs: int = 1, progress: bool = False,
                   condition: dict | None = None) -> tuple[list[dict], list[dict]]:
    """Rows of usable images and rows of excluded inputs (path, dataset, reason).

    With a `condition` section, each row also carries its covariates (participants table columns of
    those names; `dataset` falls back to the dataset's name), and rows whose covariates are unreadable,
    or missing under `condition.missing: exclude`, are excluded with the reason.
    """
    from tqdm import tqdm

    names = covariate_names(condition)
    wanted = tuple(n for n in names if n != "dataset")
    candidates, excluded, columns = [], [], {}
    for i, ds in enumerate(datasets):
        paths = discover(ds, i)
        masks = image_masks(ds, paths, i)
        info: dict = {}
        columns[ds["name"]] = (ds.get("participants"), [])
        if ds.get("participants"):
            info, cols = read_participants(ds["participants"], wanted)
            columns[ds["name"]] = (ds["participants"], cols)
        for p in paths:
            sub, ses = ids_from_path(p)
            extra = info.get((sub, ses)) or info.get((sub, "")) or {}
            cand = {"subject": sub, "session": ses, "dataset": ds["name"], "path": p,
                    "age": extra.get("age"), "sex": extra.get("sex"), "participants_row": bool(extra)}
            if masks:
                cand["mask"] = masks[p]
            for name in names:  # 'dataset' is the dataset's name, as in the split's stratification
                cand.setdefault(name, extra.get(name))
            candidates.append(cand)
    check_covariate_columns(condition, columns)
    with ProcessPoolExecutor(max_workers=jobs) if jobs > 1 else _Serial() as pool:
        results = list(tqdm(pool.map(_inspect_or_reason, [c["path"] for c in candidates]),
                            total=len(candidates), desc="checking images", unit="img", disable=not progress))
    rows, seen_sha = [], {}
    for cand, res in zip(candidates, results):
        problem = res if isinstance(res, str) else _covariate_problem(condition, cand)
        if problem:
            excluded.append({"path": cand["path"], "dataset": cand["dataset"], "reason": problem})
            continue
        if res["sha256"] in seen_sha:  # one subject and session per image: discover refuses two
            excluded.append({"path": cand["path"], "dataset": cand["dataset"],
                             "reason": f"same file content as {seen_sha[res['sha256']]}"})
            continue
        seen_sha[res["sha256"]] = cand["path"]
        rows.append({**cand, **res})
    return rows, excluded


class _Serial:
    """Stand-in for a process pool when one process is enough (keeps tracebacks simple)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    map = staticmethod(map)


def split_subjects(rows: list[dict], val_fraction: float, seed: int, stratify: bool = True,
                   longitudinal: str = "all") -> list[dict]:
    """Assign each subject (all its sessions) to 'train' or 'val'. Deterministic for a seed."""
    if longitudinal == "first":
        first = {}
        for r in sorted(rows, key=lambda r: natural_key(r["session"])):
            first.setdefault((r["dataset"], r["subject"]), r)
        rows = list(first.values())
    groups: dict[str, list[tuple[str, str]]] = {}
    for r in rows:
        g = r["dataset"] if stratify else "all"
        groups.setdefault(g, [])
        if (r["dataset"], r["subject"]) not in groups[g]:
            groups[g].append((r["dataset"], r["subject"]))
    val = set()
    for g, subjects in sorted(groups.items()):
        subjects.sort()
        rng = np.random.default_rng([seed, zlib.crc32(g.encode())])
        order = rng.permutation(len(subjects))
        n_val = int(round(val_fraction * len(subjects)))
        if len(subjects) >= 2:
            n_val = min(max(n_val, 1), len(subjects) - 1)
        val.update(subjects[i] for i in order[:n_val])
    out = [{**r, "split": "val" if (r["dataset"], r["subject"]) in val else "train"} for r in rows]
    return sorted(out, key=lambda r: (r["split"], r["dataset"], r["subject"], r["session"]))


def shard_rows(split_rows: list[dict], split: str, per_shard: int) -> list[list[dict]]:
    """The rows of one split, in a fixed order, cut into shards of `per_shard` volumes."""
    rows = [r for r in split_rows if r["split"] == split]
    return [rows[i:i + per_shard] for i in range(0, len(rows), per_shard)]
