"""Session slots: ``daemon.max-sessions`` top-level recursive builds at a time.

Two ways in: the build hook's ``admit`` (recnix.hooks.buildqueue), asked before Nix
takes a build user for the build, reserves a slot, admits the build to wait for
one, or postpones it (see ``Admission``); a pre-build hook's ``open`` takes a
slot (the reserved one, or waits for one). Nested builds take none: their parent
holds one and waits for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter
from pathlib import Path

from recnix.hooks.buildqueue import HINT_SUFFIXES

log = logging.getLogger("recnix.daemon.admission")

# seconds a slot reserved by `admit` waits for its build's pre-build hook (Nix takes a
# build user and sets up the sandbox in between; longer if it waits for a build user)
RESERVATION_TTL = 300.0
# The build hook's <drv>.plain and <drv>.recnix hints to the pre-build hook
# (recnix.hooks.buildqueue) are swept this many seconds after they were made (a
# pre-build hook without one reads the .drv instead).
HINT_TTL = 600.0


class OpenRefused(Exception):
    """A session cannot be opened (the message goes to the build's log)."""


class Admission:
    """The session slots, the build hook's reservations and admits, and its hints.

    A build the build hook asks about gets a slot reserved for it while one is free.
    When none is, it is still admitted (it will wait for a slot in its pre-build
    hook, woken the moment one frees) if that wait is safe: its Nix process runs at
    most ``daemon.max-sessions`` builds at once (``max-jobs``), so it can never be
    the one holding every slot while it waits; and the outer builds that hold or
    wait for slots leave a build user free for nested builds. Otherwise it is
    postponed: Nix asks again after ``build-poll-interval`` seconds, holding nothing.
    A reservation is its Nix process's: any build of that process may use it.
    """

    def __init__(self, max_sessions: int, marks_dir: Path, build_users: int | None) -> None:
        self.max_sessions = max_sessions
        self.marks_dir = marks_dir  # the build hook's <drv>.plain hints
        self.build_users = build_users  # None: unbounded (auto-allocate-uids, no group)
        self._slots = asyncio.Semaphore(max_sessions)
        # drv path -> (when it lapses (monotonic), the Nix process that asked):
        self._reserved: dict[str, tuple[float, int | None]] = {}  # a slot reserved
        self._admitted: dict[str, tuple[float, int | None]] = {}  # admitted to wait
        # Nix process (None: unknown, e.g. a resumed session) -> its count of:
        self._holding: Counter[int | None] = Counter()  # sessions holding a slot
        self._waiting: Counter[int | None] = Counter()  # pre-build hooks waiting for one
        self._max_jobs: dict[int, int] = {}  # Nix process -> its max-jobs (build hook)

    @property
    def full(self) -> bool:
        """Every slot is held or reserved."""
        return self._slots.locked()

    def renew(self, drv_path: str) -> bool:
        """Whether ``drv_path`` was admitted already (its reservation or admission is
        renewed for RESERVATION_TTL)."""
        for table in (self._reserved, self._admitted):
            if drv_path in table:
                table[drv_path] = (time.monotonic() + RESERVATION_TTL, table[drv_path][1])
                return True
        return False

    async def admit(self, drv_path: str, worker: int | None, max_jobs: int | None) -> bool:
        """Admit the top-level recursive build ``drv_path`` asked about by the build hook
        of Nix process ``worker`` (running at most ``max_jobs`` builds): with a slot
        reserved, or to wait for one; False (it is postponed) when waiting is unsafe."""
        until = time.monotonic() + RESERVATION_TTL
        if worker is not None and max_jobs is not None:
            self._max_jobs[worker] = max_jobs
        if not self.full:
            await self._slots.acquire()  # free, so this does not wait
            self._reserved[drv_path] = (until, worker)
            return True
        why_not = self._why_not_wait(worker, max_jobs)
        if why_not:
            log.info(
                "%s waits for a free recnix session slot before it takes a build user "
                "(daemon.max-sessions = %d in use or reserved; %s)",
                drv_path,
                self.max_sessions,
                why_not,
            )
            return False
        self._admitted[drv_path] = (until, worker)
        return True

    def _why_not_wait(self, worker: int | None, max_jobs: int | None) -> str:
        """Why a build of ``worker`` may not wait for a slot in its pre-build hook ("" if
        it may)."""
        if worker is None or max_jobs is None or max_jobs > self.max_sessions:
            return (
                "its Nix process may run more builds than there are slots (max-jobs), "
                "and a wait in its pre-build hook would stop them all"
            )
        outer = self.outer_builds(also=worker)
        if self.build_users is not None and outer > self.build_users - 1:
            return (
                f"{outer} outer builds could hold build users at once with it: that would "
                f"leave no build user of {self.build_users} for nested builds"
            )
        return ""

    def outer_builds(self, also: int | None = None) -> int:
        """How many top-level recursive builds could hold build users at once: those
        holding or reserving a slot, admitted to wait for one or waiting (and one more
        of Nix process ``also``), each Nix process counted at most up to its max-jobs."""
        builds = self._builds_by_process()
        if also is not None:
            builds[also] += 1
        return sum(
            min(count, self._max_jobs.get(worker, count)) if worker is not None else count
            for worker, count in builds.items()
        )

    def _builds_by_process(self) -> Counter[int | None]:
        """Nix process -> its top-level recursive builds that hold, reserve or wait for a
        slot, or are admitted to wait for one."""
        builds: Counter[int | None] = self._holding + self._waiting
        for table in (self._reserved, self._admitted):
            builds.update(worker for _, worker in table.values())
        return builds

    def unreserve(self, drv_path: str) -> None:
        """Forget ``drv_path``'s admission; give back its reserved slot (it is built
        elsewhere)."""
        self._admitted.pop(drv_path, None)
        if self._reserved.pop(drv_path, None) is not None:
            self._slots.release()

    def expire(self) -> None:
        """Give back the slots of admitted builds that never opened their session."""
        now = time.monotonic()
        for drv_path, (until, _) in list(self._admitted.items()):
            if until <= now:
                del self._admitted[drv_path]
        for drv_path, (until, _) in list(self._reserved.items()):
            if until <= now:
                del self._reserved[drv_path]
                self._slots.release()
                log.info("%s was admitted but did not start: its session slot is free", drv_path)
        for worker in set(self._max_jobs) - set(self._builds_by_process()):
            del self._max_jobs[worker]

    async def take(self, drv_path: str, worker: int | None) -> None:
        """Take a slot for the top-level session of ``drv_path``: its reservation, one its
        Nix process ``worker`` holds for another of its builds, a free slot, or wait
        for one. OpenRefused when every slot is held by sessions of ``worker`` itself,
        since Nix runs pre-build hooks synchronously and that process could never run
        the post-build hooks that free a slot while this one waits."""
        self._admitted.pop(drv_path, None)
        if self._reserved.pop(drv_path, None) is None and not self._take_reserved_by(worker):
            await self._acquire(drv_path, worker)
        self._holding[worker] += 1

    def _take_reserved_by(self, worker: int | None) -> bool:
        """Take a slot reserved for another build of Nix process ``worker`` (that build,
        when it starts, takes another)."""
        if worker is None:
            return False
        for other, (_, reserved_by) in self._reserved.items():
            if reserved_by == worker:
                del self._reserved[other]
                return True
        return False

    async def _acquire(self, drv_path: str, worker: int | None) -> None:
        """A free slot, or wait for one (refused when that wait could never end)."""
        if not self.full:
            await self._slots.acquire()
            return
        held_by = {w for w, sessions in self._holding.items() if sessions > 0}
        if worker is not None and held_by == {worker}:
            raise OpenRefused(
                f"{drv_path} needs a recnix session, but all daemon.max-sessions = "
                f"{self.max_sessions} slots are held by other builds of the same Nix process "
                f"(pid {worker}), which runs one pre-build hook at a time and could never "
                "free a slot while this one waits; build fewer opted-in derivations at once "
                "(--max-jobs / max-jobs in nix.conf at most daemon.max-sessions) or raise "
                "daemon.max-sessions (it needs more build users)"
            )
        self._waiting[worker] += 1
        log.info(
            "%s waits for a free recnix session slot (%d in use, %d waiting; "
            "daemon.max-sessions = %d)",
            drv_path,
            self.max_sessions,
            self._waiting.total(),
            self.max_sessions,
        )
        try:
            await self._slots.acquire()
        finally:
            self._waiting[worker] -= 1

    async def take_for_resume(self) -> bool:
        """A slot for a resumed session that held one; False if none is free
        (``daemon.max-sessions`` was lowered while the service was down)."""
        if self.full:
            return False
        await self._slots.acquire()  # free, so this does not wait
        self._holding[None] += 1
        return True

    def release(self, worker: int | None) -> None:
        """Give back a slot a session of Nix process ``worker`` held."""
        self._holding[worker] -= 1
        self._slots.release()

    def sweep_hints(self) -> None:
        """Remove the build hook's ``<drv>.plain`` and ``<drv>.recnix`` hints older than HINT_TTL
        (blocking: run it off the loop)."""
        too_old = time.time() - HINT_TTL
        try:
            entries = list(os.scandir(self.marks_dir))
        except OSError:
            return
        for entry in entries:
            if entry.name.endswith(HINT_SUFFIXES):
                with contextlib.suppress(OSError):
                    if entry.stat(follow_symlinks=False).st_mtime < too_old:
                        os.unlink(entry.path)
