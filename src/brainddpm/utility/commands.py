"""The utility stage's subcommands: utility-part (one arm, one repeat), utility-gather (every part ->
utility.json) and two-sample (the classifier two-sample test of one sampler's volumes).

Their settings are the config's `utility` section, given as JSON (`--settings-json`, as the workflow
passes it: only the keys that step uses, brainddpm.reruns); keys left out take the schema's defaults.
"""

from __future__ import annotations

import json
from pathlib import Path

from brainddpm.errors import ConfigError
from brainddpm.fileio import atomic_path


def read_settings(args, need_target: bool = True) -> dict:
    """The `utility` section of --settings-json, checked by the schema and completed with its defaults; the
    target may be left out where none is needed (the two-sample test)."""
    from brainddpm.config import validate_config

    try:
        given = json.loads(args.settings_json) if args.settings_json else {}
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config key 'utility': --settings-json is not JSON ({exc})") from None
    if not isinstance(given, dict):
        raise ConfigError("config key 'utility': --settings-json must be a JSON object")
    settings = validate_config({"utility": given}, partial=True)["utility"]
    if need_target and not settings["target"]:
        raise ConfigError("config key 'utility.target': required (the covariate the downstream models predict)")
    return settings


def _write_json(data: dict, out: Path) -> None:
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(data, indent=1))


def cmd_utility_part(args) -> None:
    from brainddpm.utility.protocol import run_part

    _write_json(run_part(read_settings(args), args.train, args.val, args.samples, args.arm, args.repeat), args.out)


def cmd_utility_gather(args) -> None:
    from brainddpm.utility.protocol import gather, read_parts

    parts = read_parts(args.parts)
    result = gather(parts, read_settings(args), args.parts[0])
    result["generator"] = generator_info(parts, args.run)
    if args.two_sample:
        result["two_sample"] = {Path(p).stem: json.loads(Path(p).read_text()) for p in args.two_sample}
    _write_json(result, args.out)


def generator_info(parts: list[dict], run: str | None) -> dict:
    """Which synthetic volumes the arms used: the run, the sampler(s), the checkpoint(s) and the part files."""
    used = [p["synthetic"] for p in parts if p.get("synthetic")]
    info = {"run": run, "samplers": [], "checkpoints": [], "checkpoint_steps": [], "files": []}
    for u in used:
        for key in info:
            for value in u.get(key, []) if key != "run" else []:
                if value not in info[key]:
                    info[key].append(value)
    return info


def cmd_two_sample(args) -> None:
    from brainddpm.data.shards import read_volumes, split_files
    from brainddpm.utility.protocol import sample_files_info
    from brainddpm.utility.two_sample import two_sample_test

    settings = read_settings(args, need_target=False)
    real, meta, _ = read_volumes(split_files(args.real))
    synthetic, _, _ = read_volumes(args.samples)
    if real.shape[1:] != synthetic.shape[1:]:
        raise ConfigError(f"two-sample: real volumes {real.shape[2:]} and synthetic {synthetic.shape[2:]} differ "
                          "in shape")
    cnn = {**settings["cnn"], "steps": settings["two_sample"]["steps"]}
    result = two_sample_test(real, [m["subject"] for m in meta], synthetic, cnn,
                             settings["two_sample"]["holdout"], settings["bootstrap"], settings["confidence"],
                             settings["seed"])
    result.update(real=str(args.real), synthetic=sample_files_info(args.samples))
    _write_json(result, args.out)


def _settings_arg(p) -> None:
    p.add_argument("--settings-json", metavar="JSON",
                   help="the config's `utility` section as JSON (keys left out take their defaults)")


def add_commands(sub) -> None:
    p = sub.add_parser("utility-part", help="train the downstream models of one utility arm for one repeat",
                       description="Train the downstream models (3D CNN, PCA + linear) of ARM with the seed of "
                                   "REPEAT on the training split (plus synthetic volumes) and store their "
                                   "predictions on the validation split, the test set.")
    _settings_arg(p)
    p.add_argument("--train", type=Path, required=True, help="training split folder (index.json + shards)")
    p.add_argument("--val", type=Path, required=True, help="validation split folder: the test set")
    p.add_argument("--samples", type=Path, nargs="*", default=[],
                   help="sample part files (part-*.h5); needed by the arms synthetic and mix-<ratio>")
    p.add_argument("--arm", required=True,
                   help="real, synthetic, mix-<ratio> (ratio from utility.ratios), augmented or oversampled")
    p.add_argument("--repeat", type=int, required=True, help="repeat number, 0..utility.repeats-1")
    p.add_argument("--out", type=Path, required=True, help="output part JSON")
    p.set_defaults(func=cmd_utility_part)

    p = sub.add_parser("utility-gather", help="every utility part -> utility.json (metrics, CIs, differences)",
                       description="Score every part on the same subject-level bootstrap resamples of the test "
                                   "set; per arm and model: metric, CI, n, and the paired difference against "
                                   "real only with its CI.")
    _settings_arg(p)
    p.add_argument("--parts", type=Path, nargs="+", required=True, help="every part JSON of utility-part")
    p.add_argument("--two-sample", type=Path, nargs="*", default=[],
                   help="two-sample JSON files to include, keyed by file name stem (e.g. ddpm.json)")
    p.add_argument("--run", help="the run that made the synthetic volumes (config `run`), recorded in utility.json")
    p.add_argument("--out", type=Path, required=True, help="output utility.json")
    p.set_defaults(func=cmd_utility_gather)

    p = sub.add_parser("two-sample", help="classifier two-sample test: real vs synthetic volumes",
                       description="A small 3D CNN learns real vs synthetic and is scored on held-out subjects; "
                                   "balanced accuracy 0.5 means indistinguishable.")
    _settings_arg(p)
    p.add_argument("--real", type=Path, required=True, help="real split folder (the validation split)")
    p.add_argument("--samples", type=Path, nargs="+", required=True, help="sample part files of one sampler")
    p.add_argument("--out", type=Path, required=True, help="output two-sample JSON")
    p.set_defaults(func=cmd_two_sample)
