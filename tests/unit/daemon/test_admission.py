"""recnix.daemon.admission's rules: when a recursive build gets a slot, waits for one in its
pre-build hook, or is postponed by the build hook (the host tier runs them under
real nix-daemons: tests/host/test_buildqueue.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from recnix.daemon.admission import Admission, OpenRefused

W, V, U, X = 100, 200, 300, 400  # Nix processes (pids)


def drv(name: str) -> str:
    return f"/nix/store/{'a' * 32}-{name}.drv"


def run(coro):
    return asyncio.run(coro)


def admission(max_sessions: int = 2, users: int | None = 10) -> Admission:
    return Admission(max_sessions, Path("/nonexistent"), users)


def test_free_slots_are_reserved_then_builds_wait_in_their_hook_when_safe() -> None:
    async def scenario() -> None:
        a = admission()
        assert await a.admit(drv("0"), W, 1) and await a.admit(drv("1"), W, 1)
        assert a.full
        # one Nix process running one build at a time: waiting in its pre-build hook
        # is safe (woken the moment a slot frees, not after build-poll-interval)
        assert await a.admit(drv("2"), W, 1)
        assert a.renew(drv("2")) and a.renew(drv("0")) and not a.renew(drv("9"))

    run(scenario())


@pytest.mark.parametrize(
    ("worker", "max_jobs"),
    [(None, 1), (W, None), (W, 3)],
    ids=["unknown process", "unknown max-jobs", "max-jobs above max-sessions"],
)
def test_builds_that_could_stop_their_own_process_are_postponed(worker, max_jobs) -> None:
    async def scenario() -> None:
        a = admission()
        assert await a.admit(drv("0"), V, 1) and await a.admit(drv("1"), V, 1)
        assert not await a.admit(drv("2"), worker, max_jobs)
        assert not a.renew(drv("2"))

    run(scenario())


def test_waiting_builds_always_leave_a_build_user_for_nested_builds() -> None:
    async def scenario() -> None:
        a = admission(max_sessions=2, users=5)  # outer builds holding users <= 5 - 1
        for i in range(2):
            assert await a.admit(drv(f"r{i}"), V, 2)
        assert await a.admit(drv("w0"), W, 2)
        assert await a.admit(drv("w1"), W, 2)
        assert a.outer_builds() == 4
        assert not await a.admit(drv("w2"), U, 1)  # would hold the last build user
        a.unreserve(drv("w0"))  # built elsewhere after all: room again
        assert await a.admit(drv("w2"), U, 1)

    run(scenario())


def test_a_process_counts_at_most_its_max_jobs_of_outer_builds() -> None:
    """A Nix process running one build at a time with many opted-in builds queued
    (nix-build --max-jobs 1 of ten) holds at most one build user with them: none of
    its builds is postponed (each postponement costs build-poll-interval)."""

    async def scenario() -> None:
        a = admission(max_sessions=3, users=4)
        assert all([await a.admit(drv(f"{i}"), W, 1) for i in range(10)])
        assert a.outer_builds() == 1
        await a.take(drv("0"), W)
        a.release(W)  # built: the next build of W takes a reservation of W
        assert a.outer_builds() == 1
        # another process with max-jobs 2 adds 2 more: 3 = users - 1 is the bound
        assert await a.admit(drv("v0"), V, 2) and await a.admit(drv("v1"), V, 2)
        assert not await a.admit(drv("u0"), U, 1)
        assert a.outer_builds() == 3

    run(scenario())


def test_sessions_holding_slots_count_for_their_process() -> None:
    async def scenario() -> None:
        a = admission(max_sessions=2, users=4)
        await a.take(drv("s0"), V)
        await a.take(drv("s1"), V)
        assert a.outer_builds() == 2  # V's max-jobs is not known: each counts
        assert await a.admit(drv("w0"), W, 1)
        assert not await a.admit(drv("u0"), U, 1)
        a.release(V)
        a.release(V)
        assert a.outer_builds() == 1

    run(scenario())


def test_without_a_build_user_bound_only_max_jobs_limits_waiting() -> None:
    async def scenario() -> None:
        a = admission(max_sessions=1, users=None)
        assert await a.admit(drv("0"), V, 1)
        assert all([await a.admit(drv(f"w{i}"), W, 1) for i in range(50)])

    run(scenario())


def test_a_reservation_serves_any_build_of_its_nix_process() -> None:
    async def scenario() -> None:
        a = admission(max_sessions=2)
        assert await a.admit(drv("reserved"), W, 1)
        await a.take(drv("v"), V)  # a session of another process holds the other slot
        # Nix started another of its builds first: it takes W's reservation
        await asyncio.wait_for(a.take(drv("other"), W), 1)
        assert a.full
        # the reserved build, when it starts, waits for a slot like any other
        waiter = asyncio.ensure_future(a.take(drv("reserved"), W))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        a.release(V)
        await asyncio.wait_for(waiter, 1)

    run(scenario())


def test_a_process_holding_every_slot_is_refused_not_made_to_wait() -> None:
    async def scenario() -> None:
        a = admission(max_sessions=1)
        await a.take(drv("0"), W)
        with pytest.raises(OpenRefused, match="same Nix process"):
            await a.take(drv("1"), W)

    run(scenario())


def test_admissions_lapse(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        a = admission(max_sessions=1, users=4)
        assert await a.admit(drv("0"), V, 1)
        assert await a.admit(drv("w0"), W, 1) and await a.admit(drv("w1"), X, 1)
        assert not await a.admit(drv("w2"), U, 1)
        monkeypatch.setattr("recnix.daemon.admission.RESERVATION_TTL", -1.0)
        assert a.renew(drv("0")) and a.renew(drv("w0")) and a.renew(drv("w1"))
        a.expire()
        assert not a.full and not a.renew(drv("w0"))
        assert await a.admit(drv("w2"), U, 1)  # a reservation again: a slot is free

    run(scenario())
