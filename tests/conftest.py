"""Shared pytest configuration: tier markers are declared in pyproject.toml.

The suite runs on parallel workers (pytest-xdist, ``-n auto --dist loadscope``
in pyproject.toml, the scopes being our groups; ``-n 0``: one process). A worker runs a whole
*group* of tests in order, and no two workers share a group:

- ``unit``; ``host`` (every host test drives Nix builds with the machine's one
  set of build users, and Nix kills the processes of a build user it takes, so
  two host tests must never build at once);
- ``versions-<suite>``: one root filesystem's inner run each (build users on
  uids of their own, a mount namespace of its own);
- ``vm-<module>-<suite>``: one test module's guests of one suite (module-scoped
  guests stay on one worker).

Groups start longest first (``EXPECTED_MINUTES``), so the long VM groups do not
end up last on one worker while the other idles. Cache entries that two groups
need (base tarballs, disk images, root filesystems) are built once, under a
lock (recnix_vm.cachelock).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import settings

# Hypothesis switches to its "ci" profile when $CI is set. Under any profile
# but "default", the settings of the parametrized property tests fall back
# through a chain that grows with every case until it overflows the stack
# (Hypothesis 6.170), so the suite runs with the same profile everywhere.
settings.load_profile("default")

TESTS_DIR = Path(__file__).parent

# Minutes each group took on the CI machine (2 cores, TCG, warm caches): used only
# to start the longest groups first. A group not listed counts as one minute.
EXPECTED_MINUTES = {
    "vm-test_remote-bookworm": 12,
    "vm-test_remote-sid": 12,
    "vm-test_scenarios-bookworm": 10,
    "vm-test_service_life-bookworm": 9,
    "vm-test_service_life-trixie": 9,
    "vm-test_service_life-sid": 9,
    "vm-test_lix-lix": 8,
    "versions-trixie": 7,
    "versions-sid": 7,
    "versions-lix": 7,
    "host": 7,
    "vm-test_harness-bookworm": 6,
    "vm-test_hook_output_discarded-bookworm": 4,
    "vm-test_hook_output_discarded-sid": 4,
    "vm-test_run-bookworm": 2,
    "unit": 2,
}


SUITES = ("bookworm", "trixie", "sid", "lix")  # the suites a test id may name


def group_of(nodeid: str) -> str:
    """The group of the test ``nodeid`` (see the module docstring)."""
    path, _, rest = nodeid.partition("::")
    parts = Path(path).parts
    tier = parts[1] if len(parts) > 2 and parts[0] == "tests" else "other"
    params = rest.partition("[")[2].rstrip("]").split("-")
    suite = next((p for p in params if p in SUITES), None)
    if tier == "vm":
        return f"vm-{Path(path).stem}-{suite or 'bookworm'}"
    if tier == "versions":
        return f"versions-{suite or 'all'}"
    return tier


def pytest_configure(config: pytest.Config) -> None:
    # Keep the order below: pytest-xdist >= 3.7 would reorder groups by test count.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Order the groups longest first, keeping each group's own order (pytest has
    already ordered the items of module-scoped parametrized fixtures)."""
    weight = {g: -EXPECTED_MINUTES.get(g, 1) for g in (group_of(i.nodeid) for i in items)}
    items.sort(key=lambda item: weight[group_of(item.nodeid)])


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """pytest-xdist's scope scheduling, with our groups as the scopes (taken from the
    test ids: xdist_group marks do not reach the scheduler under pytest 9)."""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    return GroupScheduling(config, log)


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
        terminalreporter.section("unit and host tiers per Nix version")
        for lines in _inner_runs:
            for line in lines:
                terminalreporter.write_line(line)
