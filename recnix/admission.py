"""Session slots: ``daemon.max-sessions`` top-level recursive builds at a time.

Two ways in: the build hook's ``admit`` (recnix.buildqueue) reserves a slot
before Nix takes a build user for the build, so a build that would have to wait
waits without holding one; a pre-build hook's ``open`` takes a slot (the
reserved one, or waits for one). Nested builds take none: their parent holds
one and waits for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path

from recnix.buildqueue import PLAIN_SUFFIX

log = logging.getLogger("recnix.admission")

# seconds a slot reserved by `admit` waits for its build's pre-build hook (Nix takes a
# build user and sets up the sandbox in between; longer if it waits for a build user)
RESERVATION_TTL = 300.0
# The build hook's <drv>.plain hints to the pre-build hook (recnix.buildqueue) are
# swept this many seconds after they were made (a pre-build hook without one reads
# the .drv instead).
PLAIN_MARK_TTL = 600.0


class OpenRefused(Exception):
    """A session cannot be opened (the message goes to the build's log)."""


class Admission:
    """The session slots, the reservations the build hook made, and its hints."""

    def __init__(self, max_sessions: int, marks_dir: Path) -> None:
        self.max_sessions = max_sessions
        self.marks_dir = marks_dir  # the build hook's <drv>.plain hints
        self._slots = asyncio.Semaphore(max_sessions)
        self._waiting = 0
        # drv path -> when the slot reserved for it by `admit` goes back (monotonic)
        self._reserved: dict[str, float] = {}

    @property
    def full(self) -> bool:
        """Every slot is held or reserved."""
        return self._slots.locked()

    def renew(self, drv_path: str) -> bool:
        """Whether ``drv_path`` holds a reservation (then renewed for RESERVATION_TTL)."""
        if drv_path not in self._reserved:
            return False
        self._reserved[drv_path] = time.monotonic() + RESERVATION_TTL
        return True

    async def reserve(self, drv_path: str) -> bool:
        """Reserve a slot for the top-level recursive build ``drv_path``; False (it is
        postponed) while every slot is taken."""
        if self.full:
            log.info(
                "%s waits for a free recnix session slot before it takes a build user "
                "(daemon.max-sessions = %d in use or reserved)",
                drv_path,
                self.max_sessions,
            )
            return False
        await self._slots.acquire()
        self._reserved[drv_path] = time.monotonic() + RESERVATION_TTL
        return True

    def unreserve(self, drv_path: str) -> None:
        """Give back the slot reserved for ``drv_path`` (it is built elsewhere)."""
        if self._reserved.pop(drv_path, None) is not None:
            self._slots.release()

    def expire(self) -> None:
        """Give back the slots of admitted builds that never opened their session."""
        now = time.monotonic()
        for drv_path, until in list(self._reserved.items()):
            if until <= now:
                del self._reserved[drv_path]
                self._slots.release()
                log.info("%s was admitted but did not start: its session slot is free", drv_path)

    async def take(self, drv_path: str, worker: int | None, holders: Iterable[int | None]) -> None:
        """Take a slot for the top-level session of ``drv_path``: its reservation, a free
        slot, or wait for one. ``holders`` are the Nix processes (pre-build hook
        workers) of the sessions holding slots: OpenRefused when all are ``worker``,
        since Nix runs pre-build hooks synchronously and that process could never run
        the post-build hooks that free a slot while this one waits."""
        if self._reserved.pop(drv_path, None) is not None:
            return  # admitted by the build hook with a slot reserved
        if not self.full:
            await self._slots.acquire()
            return
        held_by = list(holders)
        if worker is not None and held_by and all(w == worker for w in held_by):
            raise OpenRefused(
                f"{drv_path} needs a recnix session, but all daemon.max-sessions = "
                f"{self.max_sessions} slots are held by other builds of the same Nix process "
                f"(pid {worker}), which runs one pre-build hook at a time and could never "
                "free a slot while this one waits; build fewer opted-in derivations at once "
                "(--max-jobs / max-jobs in nix.conf at most daemon.max-sessions) or raise "
                "daemon.max-sessions (it needs more build users)"
            )
        self._waiting += 1
        log.info(
            "%s waits for a free recnix session slot (%d in use, %d waiting; "
            "daemon.max-sessions = %d)",
            drv_path,
            self.max_sessions,
            self._waiting,
            self.max_sessions,
        )
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1

    async def take_for_resume(self) -> bool:
        """A slot for a resumed session that held one; False if none is free
        (``daemon.max-sessions`` was lowered while the service was down)."""
        if self.full:
            return False
        await self._slots.acquire()  # free, so this does not wait
        return True

    def release(self) -> None:
        """Give back a slot a session held."""
        self._slots.release()

    def sweep_plain_marks(self) -> None:
        """Remove the build hook's ``<drv>.plain`` hints older than PLAIN_MARK_TTL
        (blocking: run it off the loop)."""
        too_old = time.time() - PLAIN_MARK_TTL
        try:
            entries = list(os.scandir(self.marks_dir))
        except OSError:
            return
        for entry in entries:
            if entry.name.endswith(PLAIN_SUFFIX):
                with contextlib.suppress(OSError):
                    if entry.stat(follow_symlinks=False).st_mtime < too_old:
                        os.unlink(entry.path)
