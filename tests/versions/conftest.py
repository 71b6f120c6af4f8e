"""Tier ``versions``: every test here is marked ``versions`` (deselect with
``-m "not versions"``); the summary of each suite's inner counts and skips is
printed by tests/conftest.py."""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.versions)
