"""The table `brainddpm bench gpu` prints from its JSON record: one line per section, in markdown."""

from __future__ import annotations

GiB = 2**30
HEADER = ["| section | what | figure | MFU | peak memory | warm-up |", "|---|---|---|---:|---:|---:|"]


def _number(value, spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def _memory(row: dict) -> str:
    peak = row.get("peak_memory_bytes")
    return _number(peak and peak / GiB, ".2f", " GiB")


def _training(name: str, row: dict, sections: dict) -> list[str]:
    shape = "x".join(map(str, row["target_shape"]))
    network = f"{row['variant']} on the {row['network']}" if name == "tutorial" else row["network"]
    what = f"{network}, {shape}, batch {row['batch']}"
    figure = f"{row['samples_per_s']:.3f} samples/s"
    tutorial = (sections.get("tutorial") or {}).get("samples_per_s")
    if name == "train" and tutorial:
        figure += f" ({row['samples_per_s'] / tutorial:.2f}x the tutorial step)"
    mfu = row.get("mfu")
    return [f"| {name} | {what} | {figure} | {_number(mfu and 100 * mfu, '.1f', ' %')} | {_memory(row)} | "
            f"{_number(row.get('warmup_s'), '.1f', ' s')} |"]


def _decode(name: str, row: dict) -> list[str]:
    lines = []
    for key in ("whole", "window"):
        part = row[key]
        where = "whole volume" if part["roi"] is None else f"windows of {'x'.join(map(str, part['roi']))} latent"
        lines.append(f"| {name} | {where}, {row['precision']}, one volume | {part['s_per_volume']:.3f} s per volume "
                     f"| – | {_memory(part)} | {part['first_s']:.2f} s |")
    return lines


def _sampling(name: str, row: dict) -> list[str]:
    what = f"DDIM {row['steps']} steps, batch {row['batch']}{', compiled' if row['compile'] else ''}"
    figure = f"{row['s_per_volume']:.3f} s per volume"
    if row.get("decode_s_per_volume"):
        figure += f" ({row['diffusion_s_per_volume']:.3f} diffusion + {row['decode_s_per_volume']:.3f} decode)"
    figure += f"; DDPM-1000 derived {row['ddpm_s_per_volume_derived']:.1f} s"
    return [f"| {name} | {what} | {figure} | – | {_memory(row)} | {row['warmup_s']:.1f} s |"]


def _line(name: str, row: dict, sections: dict) -> list[str]:
    for key in ("skipped", "error"):
        if key in row:
            return [f"| {name} | | {'timed out: ' if row.get('timed_out') else ''}{key}: {row[key]} | | | |"]
    if "samples_per_s" in row:
        return _training(name, row, sections)
    if name == "decode":
        return _decode(name, row)
    if name == "sampling":
        return _sampling(name, row)
    if name == "ceilings":
        return [f"| {name} | bf16 matmul {row['matmul_n']}³, device copy | {row['matmul_bf16_tflops']:.3g} TFLOP/s, "
                f"{row['copy_tb_per_s_read_plus_write']:.3g} TB/s | | | |"]
    if name == "environment":
        memory = _number(row.get("memory_bytes") and row["memory_bytes"] / GiB, ".0f", " GiB")
        return [f"| {name} | {row['device']} | torch {row['torch']}, CUDA {row['cuda']}, cuDNN {row['cudnn']}, "
                f"MONAI {row['monai']}, DeepSpeed {row['deepspeed']} | | {memory} | |"]
    return [f"| {name} | | {row} | | | |"]


def table(record: dict) -> str:
    """The record's sections as a markdown table, with a title line naming the config and shape."""
    shape = "x".join(map(str, record["image_shape"]))
    configs = " ".join(record["options"]["config"]) or "config/config.yaml"
    lines = [f"brainddpm bench gpu: {record['kind']} model, {configs}{' (--tiny)' if record['tiny'] else ''}, "
             f"images {shape}", "", *HEADER]
    for name, row in record["sections"].items():
        lines += _line(name, row, record["sections"])
    return "\n".join(lines)
