"""The recnix daemon: wiring. Serves the control socket for the hooks and opens one
session per opted-in build.

Each concern lives in its own module; the service holds the sessions and passes
each build's data one way through them:

- ``recnix.daemon.controlserver`` decodes control requests; ``CONTROL_OPS`` below says which
  method serves each op: ``open`` (pre-build hook), ``admit``/``unadmit`` (build hook),
  ``finalise`` (post-build hook), ``guard`` (remote builds), ``status``;
  ``recnix.daemon.hookchannel`` serves ``open`` and ``finalise`` to the bash hooks too;
- ``recnix.daemon.admission`` holds the ``daemon.max-sessions`` slots;
- ``recnix.daemon.sessions`` opens, resumes and ends sessions; ``recnix.daemon.session`` serves
  one build's clients; ``recnix.daemon.chroot`` puts its socket into the build's chroot;
- ``recnix.daemon.finalisation`` registers the outputs' references (or invalidates them);
- ``recnix.daemon.watcher`` looks at the builds and says which sessions end;
- ``recnix.store.upstreampool`` connects to the real nix-daemon.

Sessions are journaled (``recnix.daemon.journal``), so a restarted service resumes those of
builds that still run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from recnix.config.loader import Config, hook_channel_dir, hook_marks_dir
from recnix.daemon.admission import HINT_TTL, Admission, OpenRefused
from recnix.daemon.audit import AuditLog
from recnix.daemon.controlserver import ControlServer
from recnix.daemon.daemonenv import notify_systemd, raise_fd_limit
from recnix.daemon.finalisation import Finaliser
from recnix.daemon.hookchannel import ChannelSetupError, HookChannel
from recnix.daemon.session import Session, SessionContext
from recnix.daemon.sessions import Sessions
from recnix.daemon.watcher import WATCH_INTERVAL, Action, Watcher
from recnix.formats.derivation import DerivationError
from recnix.remote.guards import Guards, take_remote_mark
from recnix.sandbox import sandboxsocket
from recnix.store.gcroots import sweep
from recnix.store.nixsettings import build_users, fsync_paths, nix_settings, session_bound
from recnix.store.offloop import read_build_derivation
from recnix.store.policy import Limits, opt_in_mode
from recnix.store.register import FinaliseError
from recnix.store.upstream import UpstreamError
from recnix.store.upstreampool import UpstreamPool

log = logging.getLogger("recnix.daemon.service")

# The control socket's ops: op -> the Service method that serves it (a request is one
# JSON line, recnix.hooks.control; docs/architecture.md lists the fields).
CONTROL_OPS = {
    "open": "_op_open",  # pre-build hook: a session (socket) for this build
    "admit": "_op_admit",  # recnix.hooks.buildqueue: may this build start now?
    "unadmit": "_op_unadmit",  # recnix.hooks.buildqueue: it went to a remote machine after all
    "finalise": "_op_finalise",  # post-build hook: register the outputs' references
    "guard": "_op_guard",  # recnix.remote.guards: a build whose .drv is not in this store
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
        # builds without a .drv here; each guard takes a session's connection limit
        self.guards = Guards(self.state_dir, self.limits.max_connections, self.audit)
        self.control = ControlServer(
            {op: getattr(self, method) for op, method in CONTROL_OPS.items()}, REFUSALS
        )
        # The same ops for the opted-in builds' bash hooks (no Python start).
        self.hook_channel = HookChannel(
            hook_channel_dir(config.raw), self.control.dispatch, REFUSALS
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
            upstreams=self.pool,
        )
        self.sessions = Sessions(
            self.session_context,
            self.limits,
            policy.readonly_only,
            self.admission,
            self.finaliser,
            self.audit,
            self.marks_dir,
        )

    # -- lifecycle

    async def run(self) -> None:
        """Resume journaled sessions, serve until SIGTERM/SIGINT, then detach from the
        sessions (the next run resumes those whose build still runs)."""
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        raise_fd_limit()
        await self.sessions.resume_all()
        self.sessions.remove_stale_dirs()
        self.guards.remove_stale()
        for sid in sweep(self.gc_roots_dir, self.sessions.by_sid):
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
        try:
            self.hook_channel.open()
        except ChannelSetupError as e:
            log.warning("%s; the hooks use the control socket", e)
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
            self.hook_channel.close()
            server.close()
            await self.sessions.wait_closed()  # finalised sessions still closing
            await self.pool.close()
            await self.guards.close()
            # Running builds keep their sessions: the next run of the service resumes them.
            await self.sessions.detach_all()
            if control_path.exists():
                control_path.unlink()
            log.info("recnix service stopped")

    def stop(self) -> None:
        """Ask :meth:`run` to return."""
        self._stopping.set()

    # -- control ops (CONTROL_OPS)

    async def _op_open(self, message: dict[str, Any]) -> dict[str, Any]:
        chroot = message.get("chroot")
        worker = message.get("worker")
        session = await self.sessions.open(
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
            "sessions": [s.summary() for s in self.sessions.by_sid.values()],
            "failures": self.watcher.failures,
        }

    # -- sessions

    async def admit(
        self, drv_path: str, worker: int | None = None, max_jobs: int | None = None
    ) -> bool:
        """Whether the build of ``drv_path`` may start now (recnix.hooks.buildqueue asks before
        Nix process ``worker``, running at most ``max_jobs`` builds, takes a build user
        for it): recnix.daemon.admission decides for a top-level recursive build; builds that
        do not opt in and nested ones always are."""
        if self.admission.renew(drv_path):
            return True
        try:
            if opt_in_mode(await read_build_derivation(drv_path)) is None:
                return True
        except (OSError, DerivationError):
            return True  # the pre-build hook reports it
        if await self.sessions.parent_of(drv_path) is not None:
            return True
        return await self.admission.admit(drv_path, worker, max_jobs)

    async def finalise(self, drv_path: str, out_paths: list[str]) -> list[str]:
        """Post-build: add the references the outputs have to session paths; end the session.

        All or nothing: if that fails for any reason, the outputs are made invalid (the
        FinaliseError says so). A second call for a session being finalised waits for the
        first one's outcome.
        """
        session = self.sessions.for_drv(drv_path)
        if session is None:
            self.sessions.drop_mark(drv_path)
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
            await self.sessions.end(session, "aborted", f"finalise failed: {error}")
            raise
        # The references are registered: the post-build hook has its answer before the
        # session's upstream connections, roots and journal are let go (~1-4 ms).
        await self.sessions.end_finalised(session)
        return messages

    # -- liveness (recnix.daemon.watcher decides, the service acts)

    async def _watch(self) -> None:
        """End sessions whose build is gone (failed, killed) without a post-build hook;
        give back the slots of admitted builds that did not start."""
        swept = time.monotonic()
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            self.admission.expire()
            if time.monotonic() - swept > HINT_TTL / 10:
                swept = time.monotonic()
                await asyncio.get_running_loop().run_in_executor(None, self.admission.sweep_hints)
            for session in self.sessions.open_ones():
                try:
                    await self._act_on_liveness(session)
                except Exception:
                    log.exception("session %s: liveness check failed", session.sid)

    async def _act_on_liveness(self, session: Session) -> None:
        verdict = await self.watcher.check(session)
        if verdict.action is Action.END:
            await self.sessions.end(session, "aborted", verdict.reason)
        elif verdict.action is Action.FAIL:
            await self.watcher.fail(session, verdict.reason)
            await self.sessions.end(session, "aborted", verdict.reason)
        elif verdict.action is Action.FINALISE:
            # Its outputs are valid and may lack references: finalise them now, or
            # (finalise fails) invalidate them.
            log.warning("session %s: %s", session.sid, verdict.reason)
            with contextlib.suppress(FinaliseError):  # finalise logged and audited it
                await self.finalise(session.drv_path, [])
