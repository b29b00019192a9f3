"""The package's layout: every module imports, and imports follow the pipeline's stage order.

src/brainddpm/ has one package per stage, data < models < training < encoding < sampling < evaluation <
utility < bench, and the shared top-level modules (config, errors, fileio, device, arguments, startup) that
every stage may use.
A stage imports only itself, earlier stages and the shared modules; a shared module imports no stage.
cli.py (which assembles every stage's subcommands) and bench/ (which measures them all) are the entry
points, exempt from the stage order. Imports are read from the source with `ast`, wherever they are
(module level or inside a function, where the subcommands and heavy dependencies import lazily).
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import brainddpm

STAGES = ("data", "models", "training", "encoding", "sampling", "evaluation", "utility", "bench")
# and the package's __init__
SHARED = ("config", "errors", "fileio", "device", "arguments", "startup", "reruns", "bids")
ENTRY_POINTS = ("cli",)
PACKAGE_DIR = Path(brainddpm.__file__).parent

MODULES = ["brainddpm"] + sorted(m.name for m in pkgutil.walk_packages(brainddpm.__path__, "brainddpm."))


def _source(module: str) -> Path:
    parts = module.split(".")[1:]
    path = PACKAGE_DIR.joinpath(*parts)
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _place(module: str) -> tuple[str, int]:
    """(what the module is, its rank in the stage order): shared modules first, cli after every stage."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in SHARED:
        return "shared top-level module", -1
    if parts[1] in STAGES:
        return f"stage {parts[1]}", STAGES.index(parts[1])
    if parts[1] in ENTRY_POINTS:
        return "entry point, after every stage", len(STAGES)
    raise AssertionError(f"{module} is neither a stage nor a shared module: add it to STAGES or SHARED in "
                         "tests/test_layout.py")


def _imports(module: str, text: str | None = None) -> list[tuple[str, int]]:
    """Every brainddpm module that `module` imports (statically, at any depth), with the line."""
    found = []
    text = _source(module).read_text() if text is None else text
    for node in ast.walk(ast.parse(text, filename=str(_source(module)))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "brainddpm"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"{module}, line {node.lineno}: relative import; write `from brainddpm...`")
            if node.module and node.module.split(".")[0] == "brainddpm":
                for a in node.names:  # `from brainddpm.evaluation import metrics` imports a module
                    sub = f"{node.module}.{a.name}"
                    found.append((sub if sub in MODULES else node.module, node.lineno))
    return found


def test_every_package_and_top_level_module_has_a_place():
    for module in MODULES:
        _place(module)  # fails for a top-level module or package that is neither a stage nor shared
    packages = {p.parent.name for p in PACKAGE_DIR.glob("*/__init__.py")}
    assert packages == set(STAGES), f"stage packages {sorted(packages)}, expected {STAGES}"


@pytest.mark.parametrize("module", MODULES)
def test_every_module_imports(module):
    importlib.import_module(module)


def test_imports_follow_the_stage_order():
    wrong = []
    for module in MODULES:
        what, rank = _place(module)
        if module.split(".")[1:2] in (["cli"], ["bench"]):
            continue  # entry points: they may import every stage
        for target, line in _imports(module):
            target_what, target_rank = _place(target)
            if rank < 0 and target_rank >= 0:
                wrong.append(f"{module} ({what}) imports {target} ({target_what}), line {line}: a shared "
                             "module imports no stage")
            elif target_rank > rank:
                wrong.append(f"{module} ({what}) imports {target} ({target_what}), line {line}: a later stage "
                             f"(order: {' < '.join(STAGES)})")
    assert not wrong, "imports against the stage order:\n" + "\n".join(wrong)


def test_the_reading_sees_every_kind_of_import():
    text = """
import brainddpm.data.shards
from brainddpm.evaluation import metrics, evaluate
from brainddpm import __version__
from brainddpm.sampling.sample import run_sample as rs
import numpy as np


def f():
    import brainddpm.models.final as final
    if True:
        from brainddpm.training.loop import train
"""
    assert sorted(_imports("brainddpm.errors", text)) == [
        ("brainddpm", 4), ("brainddpm.data.shards", 2), ("brainddpm.evaluation.evaluate", 3),
        ("brainddpm.evaluation.metrics", 3), ("brainddpm.models.final", 10), ("brainddpm.sampling.sample", 5),
        ("brainddpm.training.loop", 12)]
    with pytest.raises(AssertionError, match="relative import"):
        _imports("brainddpm.errors", "from .config import load_config\n")


MAX_FUNCTION_LINES = 80  # a function you can read at once (the developers' guide)


def test_no_function_is_longer_than_a_screen():
    root = Path(brainddpm.__file__).parent
    long = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(root)}:{node.lineno} {node.name}: {lines} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them):\n" + "\n".join(long)
