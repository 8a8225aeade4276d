"""The packages import one way: core <- layers <- models <- parallel <- runner <- spec <- executor <- engine.

fuselm.core holds the state every layer shares; layers are the blocks models are composed of (and
the paged attention they call); parallel holds the sharding and collectives several processes
share; the runner executes a step and must not know the engine, the
speculator or the executor that drives it over several processes; the engine drives them all.
Two checks: every import statement in the source (function-level ones included), and what a
fresh interpreter has loaded after importing every module of a package.
"""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import fuselm

ROOT = Path(fuselm.__file__).parent
LAYERED = ("core", "layers", "models", "parallel", "runner", "spec", "executor", "engine")
# package -> the layered packages it must never import: every one above it
FORBIDDEN = {package: set(LAYERED[i + 1:]) for i, package in enumerate(LAYERED)}


def imported_packages(package: str) -> dict[str, set[str]]:
    """For each layered package this package's modules import: the files that import it."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] == "fuselm" and len(parts) > 1 and parts[1] in LAYERED and parts[1] != package:
                    found.setdefault(parts[1], set()).add(path.name)
    return found


@pytest.mark.parametrize("package", LAYERED)
def test_no_import_against_the_layering(package):
    imports = imported_packages(package)
    wrong = {target: sorted(files) for target, files in imports.items() if target in FORBIDDEN[package]}
    assert not wrong, f"fuselm.{package} imports {wrong}"


def test_no_cycle_among_the_packages():
    graph = {package: set(imported_packages(package)) for package in LAYERED}
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        assert node not in path, f"import cycle: {' -> '.join(path + [node])}"
        if node in done:
            return
        for target in sorted(graph[node]):
            visit(target, path + [node])
        done.add(node)

    for package in LAYERED:
        visit(package, [])


def modules_of(package: str) -> list[str]:
    return [f"fuselm.{package}"] + [f"fuselm.{package}.{m.name}"
                                    for m in pkgutil.iter_modules([str(ROOT / package)])]


@pytest.mark.parametrize("package", LAYERED)
def test_importing_a_package_loads_nothing_above_it(package):
    """Every module of the package, imported in a fresh interpreter: no module of a forbidden package
    comes along (the AST check cannot see what the modules it imports import in turn)."""
    code = ("import importlib, sys\n"
            f"for name in {modules_of(package)!r}:\n"
            "    importlib.import_module(name)\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('fuselm.'))))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=ROOT.parent)
    assert result.returncode == 0, result.stderr
    loaded = result.stdout.split()
    leaked = [m for m in loaded if m.split(".")[1] in FORBIDDEN[package]]
    assert not leaked, f"importing fuselm.{package} loaded {leaked}"
