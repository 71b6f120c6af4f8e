"""Tier ``versions``: every test here is marked ``versions`` (deselect with
``-m "not versions"``); the summary lists each suite's inner counts and skips."""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.versions)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from tests.versions.test_tiers_per_version import RUNS

    if not RUNS:
        return
    terminalreporter.section("unit and host tiers per Nix version")
    for run in RUNS:
        terminalreporter.write_line(run.summary())
        for name, reason in run.skipped:
            terminalreporter.write_line(f"  SKIPPED {name}: {reason}")
