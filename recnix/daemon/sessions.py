"""The open sessions: opening one for an opted-in build (its parent, depth, slot,
socket and chroot), resuming journaled ones after a restart, ending them.

The service (recnix.service) decides when; this module does it, through
recnix.daemon.admission (slots), recnix.daemon.chroot (what goes into the build's chroot) and
recnix.daemon.finalisation (builds that ended while the service was down).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import time
from pathlib import Path

from recnix.daemon.admission import Admission, OpenRefused
from recnix.daemon.audit import AuditLog
from recnix.daemon.chroot import ChrootSockets, write_sandbox_nix_conf
from recnix.daemon.finalisation import Finaliser
from recnix.daemon.journal import SessionRecord, journals, replay
from recnix.daemon.session import ResumeError, Session, SessionContext, SessionState
from recnix.formats.derivation import DerivationError
from recnix.hooks.buildqueue import MARK_FLAGS
from recnix.sandbox import sandboxsocket
from recnix.store.offloop import read_build_derivation
from recnix.store.policy import Limits, opt_in_mode
from recnix.store.seam import StoreError

log = logging.getLogger("recnix.daemon.sessions")


class Sessions:
    """The service's sessions by id, and their lifecycle: open, resume, end."""

    def __init__(
        self,
        context: SessionContext,
        limits: Limits,
        readonly_only: bool,
        admission: Admission,
        finaliser: Finaliser,
        audit: AuditLog,
        marks_dir: Path,
    ) -> None:
        self.context = context
        self.limits = limits
        self.readonly_only = readonly_only  # policy.readonly-only: every session read-only
        self.admission = admission
        self.finaliser = finaliser
        self.audit = audit
        self.marks_dir = marks_dir  # the hooks' marks (RECNIX_HOOK_MARKS)
        self.chroot_sockets = ChrootSockets()
        self.by_sid: dict[str, Session] = {}
        self._closing: set[asyncio.Task[None]] = set()  # finalised sessions letting go

    def open_ones(self) -> list[Session]:
        """The sessions whose build runs (not finalising, not closed)."""
        return [s for s in self.by_sid.values() if s.state is SessionState.OPEN]

    async def parent_of(self, drv_path: str) -> Session | None:
        """The open session whose build request builds ``drv_path`` (the deepest if several):
        the target itself, else a dependency of a target. A session that only added
        the .drv is not its parent: the build may come from outside."""
        open_sessions = self.open_ones()
        parents = [s for s in open_sessions if s.requested_directly(drv_path)]
        if not parents:
            loop = asyncio.get_running_loop()
            for s in open_sessions:
                if s.build_requests and await loop.run_in_executor(None, s.requested, drv_path):
                    parents.append(s)
        return max(parents, key=lambda s: s.depth, default=None)

    async def open(
        self, drv_path: str, chroot: Path | None, worker: int | None = None
    ) -> Session | None:
        """Open a session for the build of ``drv_path`` (waits for a free slot if needed).

        ``worker`` is the pid of the Nix process whose pre-build hook asks: it is
        refused rather than made to wait when only its own builds hold the slots.

        None if the derivation did not opt in (requiredSystemFeatures); OpenRefused
        if it did but cannot have a session (no sandbox, a limit, a bad parent).
        """
        started = time.perf_counter()
        try:
            drv = await read_build_derivation(drv_path)
        except FileNotFoundError:
            return None  # Nix issue #9272: BuildDerivation without a .drv; not ours
        except (OSError, DerivationError) as e:
            raise OpenRefused(f"cannot read {drv_path}: {e}") from e
        mode = opt_in_mode(drv)
        if mode is None:
            return None
        if chroot is None:
            raise OpenRefused(
                f"{drv_path} requires recnix but is not built in a sandbox; "
                "set `sandbox = true` and `sandbox-fallback = false` in nix.conf"
            )
        readonly = mode == "readonly" or self.readonly_only
        parent = await self.parent_of(drv_path)
        depth = 1 if parent is None else parent.depth + 1
        if self.limits.max_depth and depth > self.limits.max_depth:
            raise OpenRefused(
                f"{drv_path} would be recursive build level {depth}, above policy.max-depth = "
                f"{self.limits.max_depth}; raise it in the recnix configuration"
            )
        if parent is not None and parent.readonly:
            raise OpenRefused(f"{drv_path} was started from a read-only session")
        # Only top-level sessions take a slot: a nested build's parent already
        # holds one and waits for it, so making it wait too would deadlock.
        if parent is None:
            await self.admission.take(drv_path, worker)
        sid = secrets.token_hex(8)
        session = Session(
            self.context,
            sid,
            drv_path,
            drv,
            chroot,
            readonly,
            depth,
            parent,
            self.limits,
            worker=worker,
            holds_slot=parent is None,
        )
        try:
            await session.start()
        except Exception as e:
            if session.drop_slot():
                self.admission.release(worker)
            await session.close("failed to start")
            raise OpenRefused(f"cannot open a recnix session for {drv_path}: {e}") from e
        try:
            write_sandbox_nix_conf(chroot)
        except OSError as e:
            await self.end(session, None, "failed to start")
            raise OpenRefused(f"cannot write /etc/nix/nix.conf into {chroot}: {e}") from e
        try:
            await self.chroot_sockets.place(session)
        except sandboxsocket.PlacementError as e:
            await self.end(session, None, "failed to start")
            raise OpenRefused(f"cannot give {drv_path} its recnix socket: {e}") from e
        self.by_sid[session.sid] = session
        self.mark(drv_path)
        self.audit.write(
            "opened",
            sid,
            drv=drv_path,
            depth=depth,
            readonly=readonly,
            parent=parent.sid if parent else None,
        )
        log.info(
            "session %s opened for %s (depth %d%s) in %.1f ms",
            sid,
            drv_path,
            depth,
            ", read-only" if readonly else "",
            1e3 * (time.perf_counter() - started),
        )
        # The registrar starts with the session's first added or built path (Session.allow):
        # a build that adds nothing registers nothing.
        return session

    def for_drv(self, drv_path: str) -> Session | None:
        """The latest session of the build of ``drv_path`` that is not closed."""
        found = [
            s
            for s in self.by_sid.values()
            if s.drv_path == drv_path and s.state is not SessionState.CLOSED
        ]
        return found[-1] if found else None

    async def end(self, session: Session, audit_event: str | None, reason: str) -> None:
        """End ``session`` (``reason``; audited as ``audit_event`` if given): what others
        see of it (:meth:`retire`), its clients and what its sandbox was given, then its
        upstream connections, roots and journal."""
        self.retire(session, audit_event, reason)
        await session.close(reason)

    async def end_finalised(self, session: Session) -> None:
        """End a finalised ``session`` as :meth:`end` does, but let go of its upstream
        connections and roots in the background: its post-build hook need not wait for
        that (:meth:`wait_closed` awaits it). What its sandbox was given is undone and
        its journal removed first, while the chroot is still its build's and before the
        hook hears that the outputs are final."""
        self.retire(session, None, "finalised")
        if not await session.stop_serving():
            return
        await session.release_sandbox()
        session.forget()
        task = asyncio.ensure_future(session.let_go("finalised"))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def retire(self, session: Session, audit_event: str | None, reason: str) -> None:
        """Take ``session`` out of the service's view: gone from the sessions, its chroot
        socket no longer served, its build's hook mark removed, its slot given back."""
        if audit_event:
            self.audit.write(audit_event, session.sid, drv=session.drv_path, reason=reason)
        self.by_sid.pop(session.sid, None)
        self.chroot_sockets.drop(session)
        if self.for_drv(session.drv_path) is None:  # else another build's mark
            self.drop_mark(session.drv_path)
        if session.drop_slot():
            self.admission.release(session.worker)

    async def wait_closed(self) -> None:
        """Wait for the finalised sessions that are still letting go (:meth:`end_finalised`)."""
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def mark(self, drv_path: str) -> None:
        """Mark the build of ``drv_path`` for its post-build hook (RECNIX_HOOK_MARKS), as
        its pre-build hook did: again, in case an earlier session of the same .drv
        ended between the hook's mark and this session."""
        with contextlib.suppress(OSError):
            os.close(os.open(self.marks_dir / os.path.basename(drv_path), MARK_FLAGS, 0o600))

    def drop_mark(self, drv_path: str) -> None:
        """Remove the mark of ``drv_path``: its build is over (its post-build hook
        came, or will not come)."""
        with contextlib.suppress(OSError):
            os.unlink(self.marks_dir / os.path.basename(drv_path))

    async def resume_all(self) -> None:
        """Take over the sessions of running builds that a previous run journaled."""
        records: list[tuple[Path, SessionRecord]] = []
        for path in journals(self.context.state_dir):
            try:
                records.append((path, replay(path)))
            except (OSError, ValueError) as e:
                log.warning("dropping unreadable session journal %s: %s", path, e)
                path.unlink(missing_ok=True)
        for path, record in sorted(records, key=lambda item: item[1].depth):
            reason = await self._resume_one(record)
            if reason is not None:
                self.audit.write("aborted", record.sid, drv=record.drv_path, reason=reason)
                log.warning("session %s (%s) not resumed: %s", record.sid, record.drv_path, reason)
                path.unlink(missing_ok=True)

    async def _resume_one(self, record: SessionRecord) -> str | None:
        """Resume one journaled session; the reason it cannot be resumed, or None."""
        chroot = Path(record.chroot)
        if record.finalising:
            # The hook that asked got no answer and invalidates the outputs itself; make
            # sure of it (never finish here: that could race with the hook's invalidation).
            error = await self.finaliser.invalidate(
                record.drv_path,
                [],
                "the recnix service stopped while finalising it",
                record.sid,
                set(record.allowed),
            )
            return str(error)
        if not chroot.is_dir():
            return await self.finaliser.finish_ended(record)
        try:
            drv = await read_build_derivation(record.drv_path)
        except (OSError, DerivationError) as e:
            return f"cannot read {record.drv_path}: {e}"
        parent = self.by_sid.get(record.parent) if record.parent else None
        session = Session(
            self.context,
            record.sid,
            record.drv_path,
            drv,
            chroot,
            record.readonly,
            record.depth,
            parent,
            self.limits,
        )
        try:
            await session.resume(record)
            await self.chroot_sockets.place(session)
        except (ResumeError, StoreError, OSError, sandboxsocket.PlacementError) as e:
            self.chroot_sockets.drop(session)
            await session.close("not resumed")
            return str(e)
        # none left if daemon.max-sessions was lowered meanwhile
        if session.holds_slot and not await self.admission.take_for_resume():
            session.drop_slot()
        self.by_sid[session.sid] = session
        if session.added:
            session.start_registrar()
        self.audit.write("resumed", record.sid, drv=record.drv_path, paths=len(session.added))
        log.info(
            "session %s resumed for %s (depth %d, %d path(s) added or built before)",
            record.sid,
            record.drv_path,
            record.depth,
            len(session.added),
        )
        return None

    def remove_stale_dirs(self) -> None:
        """Socket directories of a previous run that no resumed session owns."""
        live = {s.socket_dir for s in self.by_sid.values()}
        for stale in self.context.state_dir.glob("s-*"):
            if stale not in live:
                shutil.rmtree(stale, ignore_errors=True)

    async def detach_all(self) -> None:
        """Leave every session to the next run of the service (it resumes those whose
        build still runs): their journals, sockets and GC roots stay."""
        for session in list(self.by_sid.values()):
            await session.detach()
            self.chroot_sockets.drop(session, unlink=False)
