"""The README's code works as written: every import in its Python blocks resolves, and every ``gcp.X`` /
``distill.X`` / ``grouping.X`` it calls exists (the API screen must survive moves inside the packages)."""

import importlib
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_the_readme_has_python_blocks():
    assert BLOCKS, "no ```python block in README.md"


@pytest.mark.parametrize(
    "line", [ln.strip() for b in BLOCKS for ln in b.splitlines() if re.match(r"\s*(from|import) ", ln)]
)
def test_every_readme_import_resolves(line):
    exec(line, {})


@pytest.mark.parametrize(
    "dotted", sorted({m for b in BLOCKS for m in re.findall(r"\b((?:gcp|distill|grouping)(?:\.\w+)+)", b)})
)
def test_every_readme_attribute_exists(dotted):
    parts = dotted.split(".")
    target = importlib.import_module(parts[0])
    for i, name in enumerate(parts[1:], start=1):
        if not hasattr(target, name):
            target = importlib.import_module(".".join(parts[: i + 1]))
        else:
            target = getattr(target, name)
