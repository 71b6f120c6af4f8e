"""Liveness of the builds that hold sessions: is each still running, over, or unable
to reach its session?

``Watcher.check`` looks at one session and returns a ``Verdict`` (data); the
service acts on it (ends the session, finalises it, or has ``Watcher.fail`` kill
the build). Every look at what the builder controls (its ``/proc`` entries, its
view of the sandbox) runs off the event loop, time-bounded (recnix.store.offloop).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import time
from typing import Any

from recnix.daemon.session import Session
from recnix.sandbox import sandboxsocket
from recnix.sandbox.sandboxproc import SandboxProcess, kill_sandbox
from recnix.store.offloop import PROC_TIMEOUT, OffLoopTimeout, off_loop

log = logging.getLogger("recnix.daemon.watcher")

WATCH_INTERVAL = 1.0  # seconds between two looks at every open session
CHROOT_GRACE = 3600.0  # seconds a chroot without builder may stay (output registration)
FAILURES_KEPT = 50  # builds recnix failed itself, kept for `recnix status`


class Action(enum.Enum):
    """What the service does with a session after a look at its build."""

    WAIT = "wait"  # starting, running, or Nix is registering its outputs
    END = "end"  # over without a post-build hook, nothing to finalise: end the session
    FINALISE = "finalise"  # over with valid outputs and no post-build hook: finalise now
    FAIL = "fail"  # the builder cannot reach its session: fail the build


@dataclasses.dataclass(frozen=True)
class Verdict:
    action: Action
    reason: str = ""


WAIT = Verdict(Action.WAIT)


class Watcher:
    """Looks at the builds of open sessions; fails those that cannot reach theirs."""

    def __init__(self, finalise_grace: float) -> None:
        # seconds a finished build's session waits for the post-build hook
        self.finalise_grace = finalise_grace
        self.failures: list[dict[str, Any]] = []  # builds failed by recnix (newest last)

    async def check(self, session: Session) -> Verdict:
        """A look at the build of ``session``.

        While the chroot exists the build is starting, running, or Nix is
        registering its outputs (slow for big outputs): wait. Once Nix has
        removed the chroot, a build whose outputs are not valid failed; one
        whose outputs are valid gets ``daemon.finalise-grace`` seconds for its hook.
        """
        now = time.monotonic()
        if session.chroot.is_dir():
            return await self._check_running(session, now)
        if session.ended_since is None or session.ended_since < 0:
            session.ended_since = now
        if not await session.valid_outputs():
            return Verdict(Action.END, "the build failed or was killed")
        if now - session.ended_since > self.finalise_grace:
            return Verdict(
                Action.FINALISE,
                f"the build of {session.drv_path} ended without a post-build hook call "
                "(is recnix's post-build-hook in nix.conf?); finalising its outputs now",
            )
        return WAIT

    async def _check_running(self, session: Session, now: float) -> Verdict:
        """A look at a build whose chroot is still there."""
        try:
            pid = await off_loop(
                session.view.sandbox_pid,
                timeout=PROC_TIMEOUT,
                what=f"looking for the builder of {session.drv_path}",
            )
            if pid is not None and not session.seen_process:
                reason = await off_loop(
                    builder_misses_socket,
                    session,
                    pid,
                    timeout=PROC_TIMEOUT,
                    what=f"looking at the sandbox socket of {session.drv_path}",
                )
                if reason is not None:
                    return Verdict(Action.FAIL, reason)
        except OffLoopTimeout as e:
            log.warning("session %s: %s; trying again later", session.sid, e)
            return WAIT
        if pid is not None or not session.seen_process:
            session.seen_process = session.seen_process or pid is not None
            session.ended_since = None
            return WAIT
        # the builder is gone but Nix still holds the chroot
        if session.ended_since is None:
            session.ended_since = now
        if now - session.ended_since > CHROOT_GRACE:
            return Verdict(Action.END, "the builder is gone and Nix kept its chroot")
        return WAIT

    async def fail(self, session: Session, reason: str) -> None:
        """Fail the build of ``session``: kill every process of its sandbox through pidfds
        verified to be in it (never a pid read earlier); the service then ends the
        session. The reason goes to the service's log and ``recnix status``
        (``failures``): channels the builder cannot redirect. Nothing is written
        through the builder's descriptors (``/proc/<pid>/fd/*`` would reopen whatever
        the builder put there)."""
        log.error("session %s: %s; failing the build", session.sid, reason)
        self.failures.append({"drv": session.drv_path, "reason": reason, "at": time.time()})
        del self.failures[:-FAILURES_KEPT]
        try:
            killed = await off_loop(
                kill_sandbox,
                session.view.chroot_root,
                timeout=PROC_TIMEOUT,
                what=f"killing the sandbox of {session.drv_path}",
            )
            log.info("session %s: killed %d process(es) of its sandbox", session.sid, killed)
        except OffLoopTimeout as e:
            log.warning("session %s: %s", session.sid, e)


def builder_misses_socket(session: Session, pid: int) -> str | None:
    """Why the builder ``pid`` (first seen) cannot reach its session, or None if the
    socket it finds at the sandbox socket path is one of the session's.

    Runs off the loop: it looks through the builder's own view (``/proc/<pid>/root``),
    which the builder controls. So the answer can only be wrong to the builder's own
    cost (its build is failed); nothing is written or opened through that view."""
    ours = set()
    for path in (
        str(session.socket_path),
        f"{session.chroot}{sandboxsocket.SANDBOX_SOCKET}",
    ):
        try:
            st = os.stat(path)
        except OSError:
            continue
        ours.add((st.st_dev, st.st_ino))
    proc = SandboxProcess.from_pid(pid, session.view.chroot_root)
    if proc is None:
        return None  # gone, or not in the sandbox: it proves nothing
    with proc:
        seen = sandboxsocket.seen_by(pid)
        if seen is not None and seen in ours:
            return None
        # Conclude only about a process still in the sandbox *after* the look: one that
        # exited meanwhile (a zombie, e.g. a `sleep` of the builder's, has no root to
        # look through) proves nothing, and failing on it would abort a healthy build.
        if not proc.in_sandbox(session.view.chroot_root):
            return None
    what = "no socket" if seen is None else "a socket that is not its session's"
    return (
        f"{session.drv_path} requires recnix, but its builder finds {what} at "
        f"{sandboxsocket.SANDBOX_SOCKET}: this Nix made the sandbox from neither the "
        "pre-build hook's extra-sandbox-paths nor the chroot recnix prepared"
    )
