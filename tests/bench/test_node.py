"""`brainddpm bench gpu --tiny` on the CPU: every section runs for real (child processes, the training
engine, the sampler, the decoder), the JSON has a measured row per section, the table prints, and --resume
reruns only what did not finish."""

import contextlib
import io
import json
from pathlib import Path

import pytest

from brainddpm import cli
from brainddpm.bench.node import LATENT_SECTIONS, PIXEL_SECTIONS, TINY_DDIM_STEPS

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pixel_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-gpu") / "x.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = cli.main(["bench", "gpu", "--tiny", "--out", str(out)])
    return out, rc, printed.getvalue()


def _table_rows(text: str) -> list[str]:
    return [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ") and "---" not in line]


def test_bench_gpu_tiny_measures_every_pixel_section(pixel_run):
    out, rc, _ = pixel_run
    assert rc == 0
    record = json.loads(out.read_text())
    sections = record["sections"]
    assert list(sections) == list(PIXEL_SECTIONS) and record["kind"] == "pixel" and record["tiny"] is True
    for name, row in sections.items():
        assert not {"error", "skipped", "timed_out", "crashed"} & set(row), (name, row)
    train, tutorial, sampling = sections["train"], sections["tutorial"], sections["sampling"]
    assert train["network"] == "pixel UNet" and train["target_shape"] == record["image_shape"] == [8, 12, 8]
    assert train["samples_per_s"] > 0 and train["flops_per_sample"] > 0 and train["peak_memory_bytes"] > 0
    assert train["weight_checksum_change"] != 0 and train["ema"] is True  # the engine really stepped
    assert tutorial["samples_per_s"] > 0 and tutorial["variant"].startswith("MONAI tutorial step")
    assert sampling["steps"] == TINY_DDIM_STEPS and sampling["batch"] == 2 and sampling["compile"] is False
    assert sampling["s_per_volume"] == pytest.approx(sampling["s_per_batch"] / 2) and sampling["s_per_volume"] > 0
    assert sections["environment"]["device"] == "cpu" and sections["ceilings"]["matmul_bf16_tflops"] > 0


def test_bench_gpu_prints_the_table_with_a_line_per_section(pixel_run):
    out, _, text = pixel_run
    assert _table_rows(text) == ["section", *PIXEL_SECTIONS]
    assert f"written: {out}" in text
    assert "x the tutorial step" in text and "s per volume" in text and "samples/s" in text


def test_resume_keeps_measured_rows_and_reruns_the_failed_one(pixel_run, tmp_path, capsys):
    out, _, _ = pixel_run
    record = json.loads(out.read_text())
    record["sections"]["tutorial"] = {"error": "RuntimeError: as a failed earlier run left it"}
    again = tmp_path / "again.json"
    again.write_text(json.dumps(record))
    assert cli.main(["bench", "gpu", "--tiny", "--out", str(again), "--resume"]) == 0
    printed = capsys.readouterr().out
    resumed = json.loads(again.read_text())
    assert resumed["sections"]["train"] == record["sections"]["train"]  # kept, not measured again
    assert resumed["sections"]["tutorial"]["samples_per_s"] > 0
    assert list(resumed["sections"]) == list(PIXEL_SECTIONS) and resumed["earlier_commands"]
    assert _table_rows(printed) == ["section", *PIXEL_SECTIONS]


def test_bench_gpu_tiny_latent_decodes_and_samples(tmp_path, capsys):
    out = tmp_path / "latent.json"
    argv = ["bench", "gpu", "--tiny", "--config", str(ROOT / "config/latent.yaml"), "--out", str(out),
            "--sections", "decode", "sampling", "--ddim-steps", "2"]
    assert cli.main(argv) == 0
    record = json.loads(out.read_text())
    assert record["kind"] == "latent" and list(record["sections"]) == ["decode", "sampling"]
    decode, sampling = record["sections"]["decode"], record["sections"]["sampling"]
    assert decode["latent_shape"] == [3, 8, 8, 8]
    assert decode["whole"]["roi"] is None and decode["window"]["roi"] == [4, 4, 4]  # half the latent
    assert decode["whole"]["s_per_volume"] > 0 and decode["window"]["s_per_volume"] > 0
    assert sampling["steps"] == 2 and sampling["decode_s_per_volume"] > 0
    total = sampling["diffusion_s_per_volume"] + sampling["decode_s_per_volume"]
    assert sampling["s_per_volume"] == pytest.approx(total)
    assert _table_rows(capsys.readouterr().out) == ["section", "decode", "decode", "sampling"]


def test_an_unknown_section_is_refused_naming_the_config_kind_and_its_sections(tmp_path, capsys):
    assert cli.main(["bench", "gpu", "--tiny", "--out", str(tmp_path / "x.json"), "--sections", "decode"]) == 2
    err = capsys.readouterr().err
    assert "--sections: decode not measured for a pixel config" in err and ", ".join(PIXEL_SECTIONS) in err
    assert not (tmp_path / "x.json").exists()
    assert set(LATENT_SECTIONS) - set(PIXEL_SECTIONS) == {"autoencoder", "decode"}
