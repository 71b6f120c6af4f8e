"""The recnix daemon: wiring. Serves the control socket for the hooks and opens one
session per opted-in build.

Each concern lives in its own module; the service holds the sessions and passes
each build's data one way through them:

- ``recnix.controlserver`` decodes control requests; ``CONTROL_OPS`` below says which
  method serves each op: ``open`` (pre-build hook), ``admit``/``unadmit`` (build hook),
  ``finalise`` (post-build hook), ``guard`` (remote builds), ``status``;
- ``recnix.admission`` holds the ``daemon.max-sessions`` slots;
- ``recnix.session`` serves one build's clients; ``recnix.chroot`` puts its socket
  into the build's chroot;
- ``recnix.finalisation`` registers the outputs' references (or invalidates them);
- ``recnix.watcher`` looks at the builds and says which sessions end;
- ``recnix.upstreampool`` connects to the real nix-daemon.

Sessions are journaled (``recnix.journal``), so a restarted service resumes those of
builds that still run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from recnix import sandboxsocket
from recnix.admission import PLAIN_MARK_TTL, Admission, OpenRefused
from recnix.audit import AuditLog
from recnix.chroot import ChrootSockets, write_sandbox_nix_conf
from recnix.config import Config, hook_marks_dir
from recnix.controlserver import ControlServer
from recnix.daemonenv import notify_systemd, raise_fd_limit
from recnix.derivation import DerivationError
from recnix.finalisation import Finaliser
from recnix.gcroots import sweep
from recnix.journal import SessionRecord, journals, replay
from recnix.nixsettings import build_users, fsync_paths, nix_settings, session_bound
from recnix.offloop import read_build_derivation
from recnix.policy import Limits, opt_in_mode
from recnix.register import FinaliseError
from recnix.remote import Guards, take_remote_mark
from recnix.session import ResumeError, Session, SessionContext, SessionState
from recnix.upstream import UpstreamError
from recnix.upstreampool import UpstreamPool
from recnix.watcher import WATCH_INTERVAL, Action, Watcher

log = logging.getLogger("recnix.service")

# The control socket's ops: op -> the Service method that serves it (a request is one
# JSON line, recnix.control; docs/architecture.md lists the fields).
CONTROL_OPS = {
    "open": "_op_open",  # pre-build hook: a session (socket) for this build
    "admit": "_op_admit",  # recnix.buildqueue: may this build start now?
    "unadmit": "_op_unadmit",  # recnix.buildqueue: it went to a remote machine after all
    "finalise": "_op_finalise",  # post-build hook: register the outputs' references
    "guard": "_op_guard",  # recnix.remote: a build whose .drv is not in this store
    "status": "_op_status",  # `recnix status`
}
# What a control request's handler may answer with instead of a reply.
REFUSALS = (OpenRefused, FinaliseError, UpstreamError)


class Service:
    """Owns the sessions; serves the control socket."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.state_dir = config.state_dir
        daemon = config.settings.daemon
        self.gc_roots_dir = daemon.gc_roots_dir
        self.sessions: dict[str, Session] = {}
        self.audit = AuditLog(Path(daemon.audit_log) if daemon.audit_log else None)
        self.limits = Limits.from_policy(config.settings.policy)
        settings = nix_settings()
        users = build_users(settings)
        max_sessions, bound_reason = session_bound(daemon.max_sessions, users)
        if bound_reason:
            log.warning("%s", bound_reason)
        self.marks_dir = hook_marks_dir(config.raw)
        self.admission = Admission(max_sessions, self.marks_dir, users[1] if users else None)
        self.pool = UpstreamPool(daemon.upstream)
        self.finaliser = Finaliser(
            self.pool, self.audit, list(config.settings.signing.secret_key_files)
        )
        self.watcher = Watcher(float(daemon.finalise_grace))
        self.chroot_sockets = ChrootSockets()
        self.guards = Guards(self.state_dir, self.audit)  # builds without a .drv here
        self.control = ControlServer(
            {op: getattr(self, method) for op, method in CONTROL_OPS.items()}, REFUSALS
        )
        self._stopping = asyncio.Event()
        self._finalising: dict[str, asyncio.Future[list[str]]] = {}  # sid -> its finalisation
        # Nested builds that open no session may skip nix.conf's hooks, unless
        # recnix chains further hooks (which must see every build).
        hooks, policy = config.settings.hooks, config.settings.policy
        self.session_context = SessionContext(
            state_dir=self.state_dir,
            gc_roots_dir=self.gc_roots_dir,
            audit=self.audit,
            # sessions fsync what they add or build before the build sees it
            fsync_paths=fsync_paths(daemon.fsync_paths, settings),
            hooks_optional=bool(
                policy.nested_builds_skip_hooks and not hooks.pre_build and not hooks.post_build
            ),
            fresh_upstream=self.pool.fresh,
            connect_upstream=self.pool.connect,
        )

    # -- lifecycle

    async def run(self) -> None:
        """Resume journaled sessions, serve until SIGTERM/SIGINT, then detach from the
        sessions (the next run resumes those whose build still runs)."""
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        raise_fd_limit()
        await self._resume_sessions()
        self._remove_stale_dirs()
        self.guards.remove_stale()
        for sid in sweep(self.gc_roots_dir, self.sessions):
            log.info("dropped the GC roots of session %s (not resumed)", sid)
        control_path = self.config.control_socket
        control_path.parent.mkdir(parents=True, exist_ok=True)
        if control_path.exists() or control_path.is_symlink():
            control_path.unlink()
        old_umask = os.umask(0o177)
        try:
            server = await asyncio.start_unix_server(self.control.serve, path=str(control_path))
        finally:
            os.umask(old_umask)
        os.chmod(control_path, 0o600)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        log.info(
            "recnix service listening on %s (upstream %s, max %d concurrent sessions, "
            "fsync of session paths %s)",
            control_path,
            self.pool.address,
            self.admission.max_sessions,
            "on" if self.session_context.fsync_paths else "off",
        )
        notify_systemd(b"READY=1")
        watcher = asyncio.ensure_future(self._watch())
        try:
            await self._stopping.wait()
        finally:
            watcher.cancel()
            server.close()
            await self.pool.close()
            await self.guards.close()
            # Running builds keep their sessions: the next run of the service resumes them.
            for session in list(self.sessions.values()):
                await session.detach()
                self.chroot_sockets.drop(session, unlink=False)
            if control_path.exists():
                control_path.unlink()
            log.info("recnix service stopped")

    def stop(self) -> None:
        """Ask :meth:`run` to return."""
        self._stopping.set()

    def _remove_stale_dirs(self) -> None:
        """Socket directories of a previous run that no resumed session owns."""
        live = {s.socket_dir for s in self.sessions.values()}
        for stale in self.state_dir.glob("s-*"):
            if stale not in live:
                shutil.rmtree(stale, ignore_errors=True)

    async def _resume_sessions(self) -> None:
        """Take over the sessions of running builds that a previous run journaled."""
        records: list[tuple[Path, SessionRecord]] = []
        for path in journals(self.state_dir):
            try:
                records.append((path, replay(path)))
            except (OSError, ValueError) as e:
                log.warning("dropping unreadable session journal %s: %s", path, e)
                path.unlink(missing_ok=True)
        for path, record in sorted(records, key=lambda item: item[1].depth):
            reason = await self._resume(record)
            if reason is not None:
                self.audit.write("aborted", record.sid, drv=record.drv_path, reason=reason)
                log.warning("session %s (%s) not resumed: %s", record.sid, record.drv_path, reason)
                path.unlink(missing_ok=True)

    async def _resume(self, record: SessionRecord) -> str | None:
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
        parent = self.sessions.get(record.parent) if record.parent else None
        session = Session(
            self.session_context,
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
        except (ResumeError, UpstreamError, OSError, sandboxsocket.PlacementError) as e:
            self.chroot_sockets.drop(session)
            await session.close("not resumed")
            return str(e)
        if session.holds_slot:  # none left if daemon.max-sessions was lowered meanwhile
            session.holds_slot = await self.admission.take_for_resume()
        self._add(session)
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

    # -- control ops (CONTROL_OPS)

    async def _op_open(self, message: dict[str, Any]) -> dict[str, Any]:
        chroot = message.get("chroot")
        worker = message.get("worker")
        session = await self.open_session(
            str(message["drv"]),
            Path(str(chroot)) if chroot else None,
            worker if isinstance(worker, int) else None,
        )
        if session is None:
            return {"ok": True, "socket": None}
        return {
            "ok": True,
            "socket": str(session.socket_path),
            "socket_dir": str(session.socket_dir),
            "session": session.sid,
            "sandbox_socket": f"{session.chroot}{sandboxsocket.SANDBOX_SOCKET}",
        }

    async def _op_admit(self, message: dict[str, Any]) -> dict[str, Any]:
        worker, max_jobs = message.get("worker"), message.get("max_jobs")
        admit = await self.admit(
            str(message["drv"]),
            worker if isinstance(worker, int) else None,
            max_jobs if isinstance(max_jobs, int) else None,
        )
        return {"ok": True, "admit": admit}

    async def _op_unadmit(self, message: dict[str, Any]) -> dict[str, Any]:
        self.admission.unreserve(str(message["drv"]))
        return {"ok": True}

    async def _op_finalise(self, message: dict[str, Any]) -> dict[str, Any]:
        messages = await self.finalise(str(message["drv"]), list(message.get("out_paths", [])))
        return {"ok": True, "messages": messages}

    async def _op_guard(self, message: dict[str, Any]) -> dict[str, Any]:
        guard = await self.guards.open(str(message["drv"]), Path(str(message["chroot"])))
        return {"ok": True, "socket_dir": str(guard.directory)}

    async def _op_status(self, message: dict[str, Any]) -> dict[str, Any]:
        return {
            "ok": True,
            "sessions": [s.summary() for s in self.sessions.values()],
            "failures": self.watcher.failures,
        }

    # -- sessions

    async def _parent_of(self, drv_path: str) -> Session | None:
        """The open session whose build request builds ``drv_path`` (the deepest if several):
        the target itself, else a dependency of a target. A session that only added
        the .drv is not its parent: the build may come from outside."""
        open_sessions = [s for s in self.sessions.values() if s.state is SessionState.OPEN]
        parents = [s for s in open_sessions if s.requested_directly(drv_path)]
        if not parents:
            loop = asyncio.get_running_loop()
            for s in open_sessions:
                if s.build_requests and await loop.run_in_executor(None, s.requested, drv_path):
                    parents.append(s)
        return max(parents, key=lambda s: s.depth, default=None)

    async def admit(
        self, drv_path: str, worker: int | None = None, max_jobs: int | None = None
    ) -> bool:
        """Whether the build of ``drv_path`` may start now (recnix.buildqueue asks before
        Nix process ``worker``, running at most ``max_jobs`` builds, takes a build user
        for it): recnix.admission decides for a top-level recursive build; builds that
        do not opt in and nested ones always are."""
        if self.admission.renew(drv_path):
            return True
        try:
            if opt_in_mode(await read_build_derivation(drv_path)) is None:
                return True
        except (OSError, DerivationError):
            return True  # the pre-build hook reports it
        if await self._parent_of(drv_path) is not None:
            return True
        return await self.admission.admit(drv_path, worker, max_jobs)

    async def open_session(
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
        readonly = mode == "readonly" or self.config.settings.policy.readonly_only
        parent = await self._parent_of(drv_path)
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
            holders = (s.worker for s in self.sessions.values() if s.holds_slot)
            await self.admission.take(drv_path, worker, holders)
        sid = secrets.token_hex(8)
        session = Session(
            self.session_context, sid, drv_path, drv, chroot, readonly, depth, parent, self.limits
        )
        session.holds_slot = parent is None
        session.worker = worker
        try:
            await session.start()
        except Exception as e:
            if session.holds_slot:
                self.admission.release(worker)
            await session.close("failed to start")
            raise OpenRefused(f"cannot open a recnix session for {drv_path}: {e}") from e
        try:
            write_sandbox_nix_conf(chroot)
        except OSError as e:
            await self._end(session, None, "failed to start")
            raise OpenRefused(f"cannot write /etc/nix/nix.conf into {chroot}: {e}") from e
        try:
            await self.chroot_sockets.place(session)
        except sandboxsocket.PlacementError as e:
            await self._end(session, None, "failed to start")
            raise OpenRefused(f"cannot give {drv_path} its recnix socket: {e}") from e
        self._add(session)
        self.audit.write(
            "opened",
            sid,
            drv=drv_path,
            depth=depth,
            readonly=readonly,
            parent=parent.sid if parent else None,
            inputs=len(session.inputs),
        )
        log.info(
            "session %s opened for %s (depth %d%s, %d input paths) in %.1f ms",
            sid,
            drv_path,
            depth,
            ", read-only" if readonly else "",
            len(session.inputs),
            1e3 * (time.perf_counter() - started),
        )
        # The registrar starts with the session's first added or built path (Session.allow):
        # a build that adds nothing registers nothing.
        return session

    def _add(self, session: Session) -> None:
        session.opened_at = time.time()
        self.sessions[session.sid] = session

    def _session_for(self, drv_path: str) -> Session | None:
        found = [
            s
            for s in self.sessions.values()
            if s.drv_path == drv_path and s.state is not SessionState.CLOSED
        ]
        return found[-1] if found else None

    async def finalise(self, drv_path: str, out_paths: list[str]) -> list[str]:
        """Post-build: add the references the outputs have to session paths; end the session.

        All or nothing: if that fails for any reason, the outputs are made invalid (the
        FinaliseError says so). A second call for a session being finalised waits for the
        first one's outcome.
        """
        session = self._session_for(drv_path)
        if session is None:
            try:
                opted_in = opt_in_mode(await read_build_derivation(drv_path)) is not None
            except (OSError, DerivationError):
                opted_in = False
            if not opted_in:
                return []
            if take_remote_mark(self.state_dir, drv_path):
                return [f"{drv_path} was built on a remote builder (recnix build-hook)"]
            raise await self.finaliser.invalidate(
                drv_path,
                out_paths,
                "recnix has no session for its build (was the recnix service restarted "
                "during the build?), so the references to what it built recursively cannot "
                "be added",
            )
        task = self._finalising.get(session.sid)
        if task is None:
            task = asyncio.ensure_future(self._finalise_and_end(session, out_paths))
            self._finalising[session.sid] = task
            task.add_done_callback(lambda _: self._finalising.pop(session.sid, None))
        return await asyncio.shield(task)

    async def _finalise_and_end(self, session: Session, out_paths: list[str]) -> list[str]:
        try:
            messages = await self.finaliser.finalise(session, out_paths)
        except FinaliseError as error:
            await self._end(session, "aborted", f"finalise failed: {error}")
            raise
        await self._end(session, None, "finalised")
        return messages

    async def _end(self, session: Session, audit_event: str | None, reason: str) -> None:
        if audit_event:
            self.audit.write(audit_event, session.sid, drv=session.drv_path, reason=reason)
        self.sessions.pop(session.sid, None)
        self.chroot_sockets.drop(session)
        if reason != "finalised":
            # no post-build hook will come to remove its hook mark (RECNIX_HOOK_MARKS)
            with contextlib.suppress(OSError):
                os.unlink(self.marks_dir / os.path.basename(session.drv_path))
        await session.close(reason)
        if session.holds_slot:
            session.holds_slot = False
            self.admission.release(session.worker)

    # -- liveness (recnix.watcher decides, the service acts)

    async def _watch(self) -> None:
        """End sessions whose build is gone (failed, killed) without a post-build hook;
        give back the slots of admitted builds that did not start."""
        swept = time.monotonic()
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            self.admission.expire()
            if time.monotonic() - swept > PLAIN_MARK_TTL / 10:
                swept = time.monotonic()
                await asyncio.get_running_loop().run_in_executor(
                    None, self.admission.sweep_plain_marks
                )
            for session in list(self.sessions.values()):
                if session.state is not SessionState.OPEN:
                    continue
                try:
                    await self._act_on_liveness(session)
                except Exception:
                    log.exception("session %s: liveness check failed", session.sid)

    async def _act_on_liveness(self, session: Session) -> None:
        verdict = await self.watcher.check(session)
        if verdict.action is Action.END:
            await self._end(session, "aborted", verdict.reason)
        elif verdict.action is Action.FAIL:
            await self.watcher.fail(session, verdict.reason)
            await self._end(session, "aborted", verdict.reason)
        elif verdict.action is Action.FINALISE:
            # Its outputs are valid and may lack references: finalise them now, or
            # (finalise fails) invalidate them.
            log.warning("session %s: %s", session.sid, verdict.reason)
            with contextlib.suppress(FinaliseError):  # finalise logged and audited it
                await self.finalise(session.drv_path, [])
