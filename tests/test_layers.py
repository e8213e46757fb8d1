"""The package layers of docs/design.md hold: every import points down (or within its own package), there is
no import circle, and an import inside a function is only ever the lazy import of a module that wraps an
optional package (ultralytics), with one named exception (``LAZY_API``: gcp/__init__ offers the application's
``gcp.compress`` on first use, since importing it eagerly would close a circle through distill)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gcp", "distill", "grouping")
# Lower ranks are imported by higher ones, never the other way round.
RANKS = {
    "grouping": 0,
    "gcp.io": 0,
    "gcp.limits": 0,
    "gcp.vocab": 0,
    "gcp.core": 1,
    "gcp.adapters": 2,
    "gcp.sparse": 2,
    "gcp.runtime": 2,
    "gcp.detection": 2,
    "distill": 3,
    "gcp.app": 4,
    "gcp": 5,
}
# Modules that import an optional package at their top, and so are themselves imported lazily.
OPTIONAL_WRAPPERS = ("gcp.app.ultralytics",)
# gcp/__init__ offers gcp.compress from the application layer on first use: the application imports distill,
# which imports gcp's base modules and so runs gcp/__init__ (see gcp.__getattr__).
LAZY_API = ("gcp", "gcp.app")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    return max((prefix for prefix in RANKS if module == prefix or module.startswith(prefix + ".")), key=len)


def is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module of ours, inside a function?) for every import outside ``if TYPE_CHECKING:``."""
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and is_type_checking(child):
                continue
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((alias.name, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.append((child.module, in_function))
            visit(child, nested)

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return [(name, lazy) for name, lazy in found if name.split(".")[0] in PACKAGES]


def graph() -> dict[str, list[tuple[str, bool]]]:
    return {
        module_name(path): imports(path)
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def test_imports_point_down_or_stay_in_their_package():
    upward = [
        f"{source} -> {target}"
        for source, targets in graph().items()
        for target, _lazy in targets
        if layer(target) != layer(source) and RANKS[layer(target)] >= RANKS[layer(source)]
    ]
    assert not upward, upward


def test_imports_inside_functions_are_only_of_optional_wrappers():
    hidden = [
        f"{source} -> {target}"
        for source, targets in graph().items()
        for target, lazy in targets
        if lazy and not target.startswith(OPTIONAL_WRAPPERS) and (source, target) != LAZY_API
    ]
    assert not hidden, hidden


def ancestors(module: str) -> list[str]:
    """The packages whose ``__init__`` Python runs before ``module``: ``gcp.core.prune`` -> gcp, gcp.core."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def edges_of(modules: dict[str, list[tuple[str, bool]]]) -> dict[str, set[str]]:
    """Eager import edges, each import also reaching the ``__init__`` of every package above its target that
    is not already running above the importer (``from distill import x`` runs distill/__init__, and
    ``import gcp.vocab`` from distill runs gcp/__init__)."""
    edges: dict[str, set[str]] = {}
    for source, targets in modules.items():
        running = set(ancestors(source))
        reached = set()
        for target, lazy in targets:
            if lazy:
                continue
            reached |= {t for t in [*ancestors(target), target] if t in modules and t not in running}
        edges[source] = reached - {source}
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, str] = {}
    found: list[list[str]] = []

    def walk(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                found.append(trail[trail.index(nxt) :] + [nxt])
            elif nxt not in state:
                walk(nxt, trail + [nxt])
        state[node] = "done"

    for start in sorted(edges):
        if start not in state:
            walk(start, [start])
    return found


def test_no_import_circle():
    found = circles(edges_of(graph()))
    assert not found, found


def test_the_rule_catches_an_upward_import(tmp_path):
    """The checks above must be able to fail: a core module importing the application is upward."""
    assert RANKS[layer("gcp.app.pipeline")] > RANKS[layer("gcp.core.prune")]
    source = tmp_path / "bad.py"
    source.write_text("def f():\n    from gcp.app import pipeline\n", encoding="utf-8")
    assert imports(source) == [("gcp.app", True)]


def test_the_circle_check_sees_package_inits():
    """An eager application import in gcp/__init__ closes a circle through distill (it once did: a fresh
    ``import distill`` failed), which only the package-init edges show."""
    modules = graph()
    modules["gcp"] = [*modules["gcp"], ("gcp.app.compress", False)]
    assert any("distill.losses" in circle and "gcp" in circle for circle in circles(edges_of(modules)))


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_imports_first_in_a_fresh_interpreter(package):
    done = subprocess.run(
        [sys.executable, "-c", f"import {package}"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
