"""The module tables of docs/architecture.md (a row per module) and README.md (rows by
concern) name every module of the recnix package, and only modules that exist: a
new module cannot land without its row."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import recnix

PACKAGE_DIR = Path(recnix.__file__).parent
REPO = PACKAGE_DIR.parent
TABLES = ["docs/architecture.md", "README.md"]


def package_modules() -> set[str]:
    return {
        str(path.relative_to(REPO))
        for path in PACKAGE_DIR.rglob("*.py")
        if path.name != "__init__.py"
    }


def modules_in_the_table(document: str) -> set[str]:
    """Each module a row's first column names: ``recnix/a.py``; ``b.py`` after it (the
    same directory); ``recnix/protocol/`` (every module under it)."""
    named = set()
    modules = package_modules()
    for line in (REPO / document).read_text().splitlines():
        if not line.startswith("| `recnix/"):
            continue
        directory = ""
        for entry in re.findall(r"`([\w/.-]+)`", line.split("|")[1]):
            if entry.endswith("/"):
                under = {m for m in modules if m.startswith(entry)}
                named |= under or {entry}
            elif entry.endswith(".py"):
                if "/" in entry:
                    directory = entry.rpartition("/")[0]
                else:
                    entry = f"{directory}/{entry}"
                named.add(entry)
    return named


@pytest.mark.parametrize("document", TABLES)
def test_every_module_has_a_row(document: str) -> None:
    missing = package_modules() - modules_in_the_table(document)
    assert not missing, f"{document}'s module table lacks {sorted(missing)}"


@pytest.mark.parametrize("document", TABLES)
def test_every_row_names_a_module_that_exists(document: str) -> None:
    gone = modules_in_the_table(document) - package_modules()
    assert not gone, f"{document}'s module table names missing {sorted(gone)}"


def test_unit_tests_mirror_the_layers() -> None:
    """tests/unit/<layer>/ for each subpackage of recnix (and harness/ for the VM harness):
    the unit tests of a module are found under its layer's name."""
    layers = {p.name for p in PACKAGE_DIR.iterdir() if (p / "__init__.py").is_file()}
    unit = REPO / "tests" / "unit"
    test_dirs = {p.name for p in unit.iterdir() if (p / "__init__.py").is_file()}
    assert test_dirs - {"harness"} <= layers, sorted(test_dirs - layers)
