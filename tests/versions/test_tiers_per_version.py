"""The host tier against Nix 2.26 (trixie), 2.34 (sid) and Lix 2.95 (lix), at native
speed, and the unit tier on sid's Python (the newest; the host's runs it too).

Each suite's root filesystem (``recnix_vm.rootfs``: the suite's own nix-bin,
Python and /nix store, build users on uids of their own, entered with its own
mount namespace and ``pivot_root``) runs ``pytest tests/host`` (sid:
``tests/unit tests/host``) with the suite's Python. One test per suite; its report lists every inner
failure, and the terminal summary gives the counts and every inner skip with
its reason (a skip is never silent).
"""

from __future__ import annotations

import subprocess
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from recnix_vm import lix, rootfs
from recnix_vm.image import ROOTFS_SUITES, ImageError

from tests.conftest import INNER_RUN_PROPERTY

pytestmark = pytest.mark.versions

INNER_TIERS = ("tests/host",)
# The unit tier is pure Python: run once more on the newest Python, not per Nix.
INNER_TIERS_OF = {"sid": ("tests/unit", "tests/host")}
INNER_TIMEOUT = 3600.0


@dataclass
class InnerRun:
    """What one suite's inner pytest run reported (from its JUnit XML)."""

    suite: str
    nix: str
    seconds: float
    passed: int = 0
    failed: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.suite} ({self.nix}): {self.passed} passed, {len(self.failed)} failed, "
            f"{len(self.skipped)} skipped in {self.seconds:.0f} s"
        )

    def summary_lines(self) -> list[str]:
        """The summary, then one line per inner skip with its reason."""
        return [self.summary()] + [f"  SKIPPED {n}: {why}" for n, why in self.skipped]


def read_junit(path: Path, run: InnerRun) -> None:
    """Count the passed, failed and skipped test cases of a JUnit XML report."""
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        skipped = case.find("skipped")
        if case.find("failure") is not None or case.find("error") is not None:
            run.failed.append(name)
        elif skipped is not None:
            run.skipped.append((name, skipped.get("message", "")))
        else:
            run.passed += 1


# Lix last: its cross-version test uses the other suites' root filesystems.
SUITE_ORDER = sorted(rootfs.UID_BASES, key=lambda s: (s == "lix", s))


@pytest.mark.parametrize("suite", SUITE_ORDER)
def test_unit_and_host_tiers(suite: str, record_property) -> None:
    try:
        if suite == "lix":
            lix.find_tarball(rootfs.source_tree())
        for other in SUITE_ORDER:  # tests/host/test_cross_version.py uses the others' too
            if other not in ("lix", suite):
                rootfs.prepare(other)
        root = rootfs.prepare(suite)
    except lix.LixUnavailable as e:
        pytest.skip(f"lix suite: {e}")
    except ImageError as e:
        pytest.fail(f"cannot make the {suite} root filesystem: {e}", pytrace=False)
    junit = f"/tmp/recnix-{suite}-junit.xml"
    (root / junit.lstrip("/")).unlink(missing_ok=True)
    argv = rootfs.command(
        root,
        ["pytest", "-p", "no:cacheprovider", "-n", "0", "-q", "-ra", "-m", "not vm"]
        + [f"--junitxml={junit}", *INNER_TIERS_OF.get(suite, INNER_TIERS)],
    )
    start = time.monotonic()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=INNER_TIMEOUT)
    version = subprocess.run(
        rootfs.command(root, ["nix", "--version"]), capture_output=True, text=True
    ).stdout.strip()
    run = InnerRun(
        suite,
        version.splitlines()[0] if version else ROOTFS_SUITES[suite].nix,
        time.monotonic() - start,
    )
    report = root / junit.lstrip("/")
    if not report.exists():
        pytest.fail(
            f"{suite}: pytest in the root filesystem wrote no report (exit {result.returncode})\n"
            f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}",
            pytrace=False,
        )
    read_junit(report, run)
    record_property(INNER_RUN_PROPERTY, run.summary_lines())
    print(run.summary())
    tail = "\n".join(result.stdout.splitlines()[-60:])
    assert not run.failed and result.returncode == 0, (
        f"{run.summary()}\nfailed:\n  " + "\n  ".join(run.failed) + f"\n\n{tail}"
    )
