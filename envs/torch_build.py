"""Does the installed torch match what `make install` was asked for?  `python envs/torch_build.py VERSION [INDEX]`

VERSION is TORCH_VERSION (e.g. 2.13.0); INDEX is TORCH_INDEX, whose last part names the build: cu126 (CUDA
12.6), cpu (no CUDA), or nothing (any build of that version, as pip picks it from PyPI). Exit 0 when the
installed torch matches; otherwise exit 1 with one line saying what is installed and what was asked for (the
Makefile then reinstalls torch). torch itself is not imported, so the check costs no second of a `make demo`:
its version comes from the installed distribution and its CUDA version from torch/version.py, read as text.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import re
import sys
from pathlib import Path


def requested_cuda(index: str) -> str | None | bool:
    """The CUDA version that the index's name asks for ("12.6" for .../cu126), None for .../cpu, True for any."""
    name = index.rstrip("/").rsplit("/", 1)[-1] if index else ""
    cuda = re.fullmatch(r"cu(\d+)(\d)", name)
    if cuda:
        return f"{int(cuda.group(1))}.{cuda.group(2)}"
    return None if name == "cpu" else True


def installed_torch() -> tuple[str, str | None] | None:
    """(version, CUDA version or None) of the installed torch, or None when there is none."""
    spec = importlib.util.find_spec("torch")
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    source = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    line = re.search(r"^cuda\s*(?::[^=]*)?=\s*(.+)$", source.read_text() if source.is_file() else "", flags=re.M)
    cuda = ast.literal_eval(line.group(1).strip()) if line else None
    return version, cuda


def mismatch(version: str, index: str) -> str | None:
    """Why the installed torch is not the requested one, or None when it is."""
    want_cuda = requested_cuda(index)
    want = f"torch {version}" + ("" if want_cuda is True else f" with CUDA {want_cuda}" if want_cuda else " (CPU)")
    want += f" from {index}" if index else ""
    found = installed_torch()
    if found is None:
        return f"torch is not installed; asked for {want}"
    have, cuda = found
    build = f"CUDA {cuda}" if cuda else "no CUDA"
    if have.split("+")[0] != version or (want_cuda is not True and cuda != want_cuda):
        return f"the installed torch {have} ({build}) is not the one asked for: {want}"
    return None


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__.splitlines()[0])
    why = mismatch(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else "")
    if why:
        print(f"make install: {why}", file=sys.stderr)
    sys.exit(1 if why else 0)
