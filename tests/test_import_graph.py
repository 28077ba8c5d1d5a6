"""The packages import one way: the foundation (`errors`, `io`, `checkpoint_files`, `device`) at the bottom,
then `model` and `tokenizer`, `data`, `training`, `rl`, and `recipes` (run configs and stages) on top of
those; `inference`, `serving`, `evaluation` and `export` need no trainer; the CLI above everything.

Every import in `src/minillm` is checked, module level or inside a function (only `if TYPE_CHECKING:`
blocks are skipped, as they never run), so a lazy import cannot hide an edge."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "minillm"

FOUNDATION = {"errors", "io", "checkpoint_files", "device", "extras"}
BELOW = {  # each package, and the packages it may import (besides itself)
    "errors": set(),
    "io": {"errors"},
    "checkpoint_files": {"errors"},
    "device": {"errors"},
    "extras": {"errors"},
    "model": FOUNDATION,
    "tokenizer": FOUNDATION,
    "data": FOUNDATION | {"tokenizer"},
    "inference": FOUNDATION | {"model", "tokenizer"},
    "export": FOUNDATION | {"model", "tokenizer"},
    "serving": FOUNDATION | {"model", "tokenizer", "inference"},
    "evaluation": FOUNDATION | {"model", "tokenizer", "data", "inference"},
    "training": FOUNDATION | {"model", "tokenizer", "data"},
    "rl": FOUNDATION | {"model", "tokenizer", "data", "inference", "training"},
    "recipes": FOUNDATION | {"model", "tokenizer", "data", "inference", "training", "rl"},
    "benchmarks": FOUNDATION | {"model", "tokenizer", "data", "inference", "training", "recipes"},
    "quickstart": FOUNDATION | {"model", "tokenizer", "data", "inference", "training", "rl", "recipes", "evaluation",
                                "(package)"},
    "cli": FOUNDATION | {"model", "tokenizer", "data", "inference", "export", "serving", "evaluation", "training", "rl",
                         "recipes", "benchmarks", "quickstart", "(package)"},
    "__main__": {"cli"},
    "(package)": {"model", "tokenizer", "inference"},  # minillm/__init__.py: the public names
}


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "(package)"


def _type_checking_only(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (getattr(test, "id", None) == "TYPE_CHECKING"
                                         or getattr(test, "attr", None) == "TYPE_CHECKING")


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported minillm module) for every import that can run."""
    found = []

    def visit(node: ast.AST) -> None:
        if _type_checking_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("minillm") and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "minillm")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def module_name(path: Path) -> str:
    return ".".join(("minillm", *path.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")


SOURCES = sorted(SRC.rglob("*.py"))


def test_every_package_is_placed_in_the_layers():
    assert {package_of(module_name(p)) for p in SOURCES} <= set(BELOW)


def test_imports_point_down_only():
    wrong = []
    for path in SOURCES:
        here = package_of(module_name(path))
        for line, target in imports(path):
            there = package_of(target)
            if there != here and there not in BELOW[here]:
                wrong.append(f"{path.relative_to(SRC.parent)}:{line}: {here} imports {target}")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_the_layers_have_no_cycle():
    graph = {package: allowed - {package} for package, allowed in BELOW.items()}
    state: dict[str, int] = {}

    def visit(package: str, trail: list[str]) -> None:
        if state.get(package) == 1:
            pytest.fail("cycle: " + " -> ".join([*trail, package]))
        if state.get(package) == 2:
            return
        state[package] = 1
        for nxt in graph[package]:
            visit(nxt, [*trail, package])
        state[package] = 2

    for package in graph:
        visit(package, [])


def test_no_module_level_getattr_shims():
    shims = [str(p.relative_to(SRC.parent)) for p in SOURCES
             if any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in ast.parse(p.read_text()).body)]
    assert shims == []


@pytest.mark.parametrize("package, absent", [
    ("minillm.serving", "minillm.training"),
    ("minillm.inference", "minillm.training"),
    ("minillm.evaluation", "minillm.training"),
    ("minillm.export", "minillm.training"),
    ("minillm.export.onnx", "minillm.training"),
    ("minillm.model", "minillm.data"),
    ("minillm.tokenizer", "minillm.data"),
    ("minillm.training", "minillm.rl"),
    ("minillm", "minillm.training"),
])
def test_importing_a_package_loads_nothing_above_it(package, absent):
    code = (f"import sys, {package}\n"
            f"print(sorted(m for m in sys.modules if m == {absent!r} or m.startswith({absent!r} + '.')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]", f"importing {package} loads {loaded}"
