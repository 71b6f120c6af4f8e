"""Shared pytest configuration: tier markers are declared in pyproject.toml.

The suite runs on parallel workers (pytest-xdist: ``-n auto --dist loadscope`` in
pyproject.toml, with tests/scheduling.py's groups as the scopes and its load
budget; ``-n 0`` runs everything in one process). Cache entries that two groups
need (base tarballs, disk images, root filesystems) are built once, under a lock
(recnix_vm.cachelock).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

# The VM harness (vm/recnix_vm, a package of its own) from the tree, also where only
# recnix is installed (the Nix package's check phase, a root filesystem's run).
_VM_DIR = str(Path(__file__).resolve().parents[1] / "vm")
if _VM_DIR not in sys.path:
    sys.path.insert(0, _VM_DIR)

from tests.scheduling import group_of, longest_first, make_scheduler  # noqa: E402

# Hypothesis switches to its "ci" profile when $CI is set. Under any profile
# but "default", the settings of the parametrized property tests fall back
# through a chain that grows with every case until it overflows the stack
# (Hypothesis 6.170), so the suite runs with the same profile everywhere.
settings.load_profile("default")


def pytest_configure(config: pytest.Config) -> None:
    # Keep the order below: pytest-xdist >= 3.7 would reorder groups by test count.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Order the groups longest first, keeping each group's own order (pytest has
    already ordered the items of module-scoped parametrized fixtures)."""
    rank = {g: i for i, g in enumerate(longest_first([group_of(i.nodeid) for i in items]))}
    items.sort(key=lambda item: rank[group_of(item.nodeid)])


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    return make_scheduler(config, log)


# -- the versions tier's summary ----------------------------------------------
# Printed here, not in tests/versions/conftest.py: with parallel workers only this
# conftest is loaded by the process that prints the summary.

INNER_RUN_PROPERTY = "inner-run-summary"  # a record_property name (test_tiers_per_version)
_inner_runs: list[list[str]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call":
        _inner_runs.extend(list(v) for k, v in report.user_properties if k == INNER_RUN_PROPERTY)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _inner_runs:
        terminalreporter.section("the tiers per Nix version")
        for lines in _inner_runs:
            for line in lines:
                terminalreporter.write_line(line)
