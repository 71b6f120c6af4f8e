"""How the suite's groups share the machine's cores on parallel workers (pytest-xdist).

A *group* (``group_of``) is what one worker runs in order, and no two workers share
one: the unit tier, the host tier (one set of build users: two host tests must never
build at once), one root filesystem's inner run, one VM test module on one guest
suite (its module-scoped guests).

Groups start longest first (``EXPECTED_MINUTES``), within a *load budget*: a group
weighs what it keeps busy — the guests it boots at once (the distributed-build
module boots two), or one core for the native tiers — and a worker starts a group
only while its weight and what the other workers run fit into the cores plus one.
Without the budget two remote-build modules on two cores booted four TCG guests at
once, and their boots ran past the boot timeout.

Pure functions and one scheduler class; tests/conftest.py wires them in, and
tests/unit/harness/test_scheduling.py checks the policy on a simulated clock.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

SUITES = ("bookworm", "trixie", "sid", "lix")  # the suites a test id may name

# Minutes each group took in a whole run on the CI machine (2 cores, TCG, fresh
# caches, both workers busy; 2026-12-07): used only to start the longest groups
# first. A group not listed counts as one minute.
EXPECTED_MINUTES = {
    "vm-test_remote-sid": 17,
    "vm-test_remote-bookworm": 14,
    "vm-test_lix-lix": 13,
    "vm-test_service_life-sid": 12,
    "vm-test_service_life-bookworm": 10,
    "vm-test_scenarios-bookworm": 10,
    "vm-test_setup-trixie": 8,
    "host": 6,
    "vm-test_hook_output_discarded-sid": 6,
    "vm-test_setup-bookworm": 6,
    "vm-test_setup-sid": 6,
    "vm-test_harness-bookworm": 5,
    "versions-lix": 5,
    "versions-sid": 4,
    "versions-trixie": 4,
    "vm-test_run-bookworm": 3,
    "vm-test_demo-bookworm": 2,
    "unit": 1,
}

# Guests a VM module boots at once (one unless listed).
GUESTS = {"test_remote": 2}


def group_of(nodeid: str) -> str:
    """The group of the test ``nodeid``."""
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


def weight(group: str) -> int:
    """What ``group`` keeps busy: the guests it boots at once, else one core."""
    if group.startswith("vm-"):
        module = group[3:].rsplit("-", 1)[0]
        return GUESTS.get(module, 1)
    return 1


def budget(cores: int | None = None) -> int:
    """The load the workers may run at once: the cores, plus one."""
    return (cores or os.cpu_count() or 1) + 1


def longest_first(groups: list[str]) -> list[str]:
    """``groups`` (each once, in order of first appearance) sorted longest first;
    equal ones keep their order."""
    unique = list(dict.fromkeys(groups))
    return sorted(unique, key=lambda g: -EXPECTED_MINUTES.get(g, 1))


def pick(queue: list[str], others: int, limit: int, stuck: bool) -> str | None:
    """The first group of ``queue`` whose weight fits beside ``others`` (the weight the
    other workers run) within ``limit``; when none fits, None — unless every worker
    is ``stuck`` (waiting for work to finish its last test), then the first."""
    for group in queue:
        if others + weight(group) <= limit:
            return group
    return queue[0] if stuck and queue else None


def make_scheduler(config: Any, log: Any) -> Any:
    """pytest-xdist's scope scheduling with our groups as the scopes and the budget."""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):  # type: ignore[misc]
        limit = budget()

        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

        def _running(self, node: Any) -> int:
            """The weight ``node`` runs now: its heaviest unfinished group (its groups
            run one after the other)."""
            unfinished = [
                weight(scope)
                for scope, tests in self.assigned_work.get(node, {}).items()
                if not all(tests.values())
            ]
            return max(unfinished, default=0)

        def _assign_work_unit(self, node: Any) -> None:
            others = sum(self._running(n) for n in self.nodes if n is not node)
            stuck = all(self._pending_of(self.assigned_work.get(n, {})) <= 1 for n in self.nodes)
            scope = pick(list(self.workqueue), others, self.limit, stuck)
            if scope is None:
                return  # waits: a worker that runs will finish something and ask again
            work_unit = self.workqueue.pop(scope)
            self.assigned_work.setdefault(node, {})[scope] = work_unit
            collection = self.registered_collections[node]
            node.send_runtest_some(
                [collection.index(nodeid) for nodeid, done in work_unit.items() if not done]
            )

        def mark_test_complete(self, node: Any, item_index: int, duration: float = 0) -> None:
            super().mark_test_complete(node, item_index, duration)
            for other in self.nodes:  # what waited for room may fit now
                if other is not node:
                    self._reschedule(other)

    return GroupScheduling(config, log)
