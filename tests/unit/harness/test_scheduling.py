"""tests/scheduling.py: the groups of the suite's parallel workers and their budget."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.scheduling import EXPECTED_MINUTES, budget, group_of, longest_first, pick, weight

REPO = Path(__file__).resolve().parents[3]


def test_groups_from_test_ids() -> None:
    assert group_of("tests/unit/protocol/test_nar.py::test_x[3]") == "unit"
    assert group_of("tests/host/test_service.py::test_gc[honoured]") == "host"
    assert group_of("tests/versions/test_tiers_per_version.py::test_t[lix]") == "versions-lix"
    assert group_of("tests/vm/test_remote.py::test_o[sid-inner-root]") == "vm-test_remote-sid"
    assert group_of("tests/vm/test_harness.py::test_boot") == "vm-test_harness-bookworm"
    assert group_of("tests/vm/test_service_life.py::test_r[trixie]") == (
        "vm-test_service_life-trixie"
    )


def test_weights_and_budget() -> None:
    assert weight("vm-test_remote-sid") == 2  # two guests at once
    assert weight("vm-test_scenarios-bookworm") == 1
    assert weight("host") == weight("unit") == weight("versions-sid") == 1
    assert budget(2) == 3


def test_two_remote_modules_never_run_at_once_on_two_cores() -> None:
    queue = ["vm-test_remote-sid", "vm-test_scenarios-bookworm"]
    assert pick(queue, others=2, limit=budget(2), stuck=False) == "vm-test_scenarios-bookworm"
    assert pick(queue[:1], others=2, limit=budget(2), stuck=False) is None  # waits
    assert pick(queue[:1], others=2, limit=budget(2), stuck=True) == "vm-test_remote-sid"
    assert pick(queue, others=1, limit=budget(2), stuck=False) == "vm-test_remote-sid"


def test_longest_first_keeps_the_order_of_equals() -> None:
    groups = ["unit", "vm-test_remote-sid", "host", "unit", "vm-test_remote-bookworm"]
    assert longest_first(groups) == [
        "vm-test_remote-sid",
        "vm-test_remote-bookworm",
        "host",
        "unit",
    ]


def test_every_group_of_the_suite_has_an_expected_duration() -> None:
    # Collecting tests/vm loads the VM harness, which needs paramiko (the suite's test
    # dependencies); a root filesystem of the versions tier has none: skipped there.
    pytest.importorskip("paramiko", reason="collecting tests/vm needs the VM harness's deps")
    done = subprocess.run(
        # unit and host are one group each; the VM and versions tiers have many
        [sys.executable, "-m", "pytest", "--co", "-q", "-n", "0", "-p", "no:cacheprovider"]
        + ["tests/vm", "tests/versions"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    ids = [line for line in done.stdout.splitlines() if "::" in line]
    assert len(ids) > 50, done.stdout[-2000:] + done.stderr[-2000:]
    missing = ({group_of(i) for i in ids} | {"unit", "host"}) - set(EXPECTED_MINUTES)
    assert not missing, f"groups without an entry in EXPECTED_MINUTES: {sorted(missing)}"
