"""The recnix daemon: control socket for the hooks, one session per opted-in build.

Control requests (see ``recnix.control``): ``open`` (pre-build hook), ``finalise``
(post-build hook), ``status``. A watcher ends sessions whose build died. Sessions
are journaled (``recnix.journal``), so a restarted service resumes those of builds
that still run.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import resource
import secrets
import shutil
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from recnix import control, sandboxsocket
from recnix.audit import AuditLog
from recnix.buildqueue import PLAIN_SUFFIX
from recnix.config import Config, hook_marks_dir
from recnix.derivation import Derivation, DerivationError, read_derivation
from recnix.gcroots import sweep
from recnix.invalidate import InvalidateError, invalidate_paths, invalidated_message
from recnix.journal import SessionRecord, journals, replay
from recnix.nixsettings import build_users, fsync_paths, nix_settings, session_bound
from recnix.offloop import DRV_TIMEOUT, PROC_TIMEOUT, OffLoopTimeout, off_loop
from recnix.policy import Limits, opt_in_mode
from recnix.protocol import PathInfo
from recnix.register import FinaliseError, StoreQueries, finalise_outputs, outputs_of
from recnix.remote import Guards, take_remote_mark
from recnix.sandboxproc import SandboxProcess, kill_sandbox
from recnix.session import ClientProtocol, ResumeError, Session, SessionContext, SessionState
from recnix.upstream import Upstream, UpstreamError

log = logging.getLogger("recnix.service")

WATCH_INTERVAL = 1.0
CHROOT_GRACE = 3600.0  # seconds a chroot without builder may stay (output registration)
# seconds a slot reserved by `admit` waits for its build's pre-build hook (Nix takes a
# build user and sets up the sandbox in between; longer if it waits for a build user)
RESERVATION_TTL = 300.0
# The build hook's <drv>.plain hints to the pre-build hook (recnix.buildqueue) are
# swept this many seconds after they were made (a pre-build hook without one reads
# the .drv instead).
PLAIN_MARK_TTL = 600.0


FAILURES_KEPT = 50  # builds recnix failed itself, kept for `recnix status`

FD_LIMIT_WANTED = 1 << 16


def raise_fd_limit() -> None:
    """Raise the soft open-files limit towards the hard one (sessions hold many sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = FD_LIMIT_WANTED if hard == resource.RLIM_INFINITY else min(hard, FD_LIMIT_WANTED)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, target, e)


def notify_systemd(message: bytes) -> None:
    """sd_notify: tell systemd (Type=notify units) about our state; no-op without it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message, address)
    except OSError as e:
        log.warning("cannot notify systemd at %s: %s", address, e)


# Written into the sandbox so `nix` (new CLI) works there and never tries the
# network (Nix issues #3275, #8698).
SANDBOX_NIX_CONF = """\
# written by recnix for the Nix client inside this build
experimental-features = nix-command
substituters =
"""


QUERY_TIMEOUT = 120.0  # seconds for one path-info query during finalisation
# Fresh daemon connections kept ready: every session's keeper and each of
# finalisation's path-info queries needs one (see Service.fresh_upstream).
SPARE_UPSTREAMS = 2


class DaemonQueries(StoreQueries):
    """Finalisation's store queries over the worker protocol, each on a fresh connection.

    Cheaper than a `nix` process per query; a fresh connection means a fresh daemon
    worker, whose cache cannot predate a re-registration. Called from the executor
    thread that runs ``finalise_outputs``; the queries run on the service's loop.
    """

    def __init__(self, service: Service, loop: asyncio.AbstractEventLoop) -> None:
        self.service = service
        self.loop = loop

    async def _query(self, path: str) -> PathInfo:
        try:
            upstream = await self.service.fresh_upstream()
            try:
                info = await upstream.query_path_info(path)
            finally:
                await upstream.close()
        except (UpstreamError, OSError) as e:
            raise FinaliseError(f"cannot query the path info of {path}: {e}") from None
        if info is None:
            raise FinaliseError(f"{path} is not valid")
        return info

    def _info(self, path: str) -> PathInfo:
        future = asyncio.run_coroutine_threadsafe(self._query(path), self.loop)
        try:
            return future.result(QUERY_TIMEOUT)
        except TimeoutError:
            future.cancel()
            raise FinaliseError(
                f"the nix-daemon did not answer a path-info query for {path} "
                f"within {QUERY_TIMEOUT:.0f} s"
            ) from None

    def path_info(self, path: str) -> dict:
        info = self._info(path)
        return {
            "narHash": f"sha256:{info.nar_hash}",
            "narSize": info.nar_size,
            "references": list(info.references),
            "deriver": info.deriver or "",
        }

    def references(self, path: str) -> set[str]:
        return set(self._info(path).references)


async def read_build_derivation(drv_path: str) -> Derivation:
    """``read_derivation`` off the event loop: a nested build's .drv is the build's text,
    of any size (DerivationError also when it takes longer than offloop.DRV_TIMEOUT)."""
    try:
        return await off_loop(
            read_derivation, drv_path, timeout=DRV_TIMEOUT, what=f"reading {drv_path}"
        )
    except OffLoopTimeout as e:
        raise DerivationError(str(e)) from None


class OpenRefused(Exception):
    """A session cannot be opened (the message goes to the build's log)."""


def write_sandbox_nix_conf(chroot: Path) -> None:
    """Give the sandbox an /etc/nix/nix.conf for the Nix inside, unless Nix put one there."""
    conf_dir = chroot / "etc" / "nix"
    conf = conf_dir / "nix.conf"
    if conf.exists() or conf.is_symlink():
        return
    conf_dir.mkdir(parents=True, exist_ok=True)
    conf.write_text(SANDBOX_NIX_CONF)
    conf.chmod(0o444)


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


class Service:
    """Owns the sessions; serves the control socket."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.state_dir = config.state_dir
        self.gc_roots_dir = Path(config["daemon"]["gc-roots-dir"])
        self.sessions: dict[str, Session] = {}
        self.opened_at: dict[str, float] = {}  # sid -> when this service opened/resumed it
        self.failures: list[dict[str, Any]] = []  # builds recnix failed itself (newest last)
        audit_path = config["daemon"]["audit-log"]
        self.audit = AuditLog(Path(audit_path) if audit_path else None)
        self.limits = Limits.from_policy(config.policy)
        settings = nix_settings()
        self.max_sessions, bound_reason = session_bound(
            config["daemon"]["max-sessions"], build_users(settings)
        )
        # Sessions fsync what they add or build before the build sees it.
        self.fsync_paths = fsync_paths(config["daemon"]["fsync-paths"], settings)
        # seconds a finished build's session waits for the post-build hook
        self.finalise_grace = float(config["daemon"]["finalise-grace"])
        if bound_reason:
            log.warning("%s", bound_reason)
        # Nested builds that open no session may skip nix.conf's hooks, unless
        # recnix chains further hooks (which must see every build).
        hooks = config["hooks"]
        self.hooks_optional = bool(
            config.policy["nested-builds-skip-hooks"]
            and not hooks["pre-build"]
            and not hooks["post-build"]
        )
        self._slots = asyncio.Semaphore(self.max_sessions)
        self._waiting = 0
        # drv path -> when the slot reserved for it by `admit` goes back (monotonic)
        self._reserved: dict[str, float] = {}
        self._server: asyncio.base_events.Server | None = None
        self._stopping = asyncio.Event()
        self._spares: list[Upstream] = []
        self._filling: asyncio.Task | None = None
        # sid -> (server, inode) of each session's socket inside its chroot
        self._sandbox_sockets: dict[str, tuple[asyncio.base_events.Server, int]] = {}
        self.guards = Guards(self.state_dir, self.audit)  # builds without a .drv here
        self._finalising: dict[str, asyncio.Future[list[str]]] = {}  # sid -> its finalisation
        self.session_context = SessionContext(
            state_dir=self.state_dir,
            gc_roots_dir=self.gc_roots_dir,
            audit=self.audit,
            fsync_paths=self.fsync_paths,
            hooks_optional=self.hooks_optional,
            fresh_upstream=self.fresh_upstream,
            connect_upstream=self.connect_upstream,
        )

    # -- upstream

    async def connect_upstream(self, hooks: bool = True) -> Upstream:
        """A new connection to the real nix-daemon, as configured; ``hooks=False``:
        builds on it skip nix.conf's pre- and post-build hooks."""
        return await Upstream.connect(self.config["daemon"]["upstream"], hooks=hooks)

    async def fresh_upstream(self) -> Upstream:
        """A connection whose daemon worker has answered nothing yet, so it holds no
        cached path info from before a re-registration.

        Taken from the spares kept ready (saving a daemon fork and handshake on
        the critical path of opening and finalising a session), else made now.
        """
        up = None
        while self._spares and up is None:
            spare = self._spares.pop(0)
            if spare.reusable:
                up = spare
            else:
                await spare.close()
        if self._filling is None or self._filling.done():
            self._filling = asyncio.ensure_future(self._fill_spares())
        return up or await self.connect_upstream()

    async def _fill_spares(self) -> None:
        while len(self._spares) < SPARE_UPSTREAMS and not self._stopping.is_set():
            try:
                self._spares.append(await self.connect_upstream())
            except (UpstreamError, OSError) as e:
                log.debug("cannot open a spare nix-daemon connection: %s", e)
                return

    # -- lifecycle

    async def run(self) -> None:
        """Resume journaled sessions, serve until SIGTERM/SIGINT, then detach from the
        sessions (the next run resumes those whose build still runs)."""
        self._prepare_dirs()
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
            self._server = await asyncio.start_unix_server(self._control, path=str(control_path))
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
            self.config["daemon"]["upstream"],
            self.max_sessions,
            "on" if self.fsync_paths else "off",
        )
        notify_systemd(b"READY=1")
        watcher = asyncio.ensure_future(self._watch())
        try:
            await self._stopping.wait()
        finally:
            watcher.cancel()
            self._server.close()
            if self._filling is not None:
                self._filling.cancel()
            for spare in self._spares:
                await spare.close()
            await self.guards.close()
            # Running builds keep their sessions: the next run of the service resumes them.
            for session in list(self.sessions.values()):
                await session.detach()
                self._drop_sandbox_socket(session, unlink=False)
            if control_path.exists():
                control_path.unlink()
            log.info("recnix service stopped")

    def stop(self) -> None:
        """Ask :meth:`run` to return."""
        self._stopping.set()

    def _prepare_dirs(self) -> None:
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)

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
            error = await self._invalidate(
                record.drv_path,
                [],
                "the recnix service stopped while finalising it",
                record.sid,
                set(record.allowed),
            )
            return str(error)
        if not chroot.is_dir():
            return await self._finish_ended(record)
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
            await self._place_sandbox_socket(session)
        except (ResumeError, UpstreamError, OSError, sandboxsocket.PlacementError) as e:
            self._drop_sandbox_socket(session)
            await session.close("not resumed")
            return str(e)
        if session.holds_slot:
            if self._slots.locked():  # daemon.max-sessions was lowered meanwhile
                session.holds_slot = False
            else:
                await self._slots.acquire()
        self.sessions[record.sid] = session
        self.opened_at[record.sid] = time.time()
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

    async def _finish_ended(self, record: SessionRecord) -> str:
        """A journaled session whose build ended while the service was down: its valid
        outputs may lack references (no post-build hook reached recnix): finalise them
        with the journaled session paths (GC-rooted until the service has started), or
        invalidate them. Returns what happened."""
        ended = "the build ended while recnix was not running"
        loop = asyncio.get_running_loop()
        try:
            outputs = await loop.run_in_executor(None, outputs_of, record.drv_path, os.environ)
            upstream = await self.fresh_upstream()
            try:
                valid = await upstream.query_valid_paths(sorted(outputs.values()))
            finally:
                await upstream.close()
        except (FinaliseError, UpstreamError, OSError) as e:
            return f"{ended}; {await self._invalidate(record.drv_path, [], str(e), record.sid)}"
        if not valid:
            return ended  # it failed, or the post-build hook invalidated its outputs
        try:
            report = await loop.run_in_executor(
                None,
                finalise_outputs,
                record.drv_path,
                set(record.allowed),
                list(self.config["signing"]["secret-key-files"]),
                dict(os.environ),
            )
        except FinaliseError as e:
            error = await self._invalidate(
                record.drv_path, [], str(e), record.sid, set(record.allowed)
            )
            return f"{ended}; {error}"
        self.audit.write(
            "finalised",
            record.sid,
            drv=record.drv_path,
            outputs=sorted(report.outputs.values()),
            added_refs={k: sorted(v) for k, v in report.added_refs.items()},
        )
        added = sum(len(refs) for refs in report.added_refs.values())
        return f"{ended}; its outputs were finalised now ({added} reference(s) added)"

    # -- control socket

    async def _control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            try:
                message = control.decode_request(line)
                reply = await self._dispatch(message)
            except (ValueError, KeyError, TypeError) as e:
                reply = {"ok": False, "error": f"bad control request: {e}"}
            except (OpenRefused, FinaliseError, UpstreamError) as e:
                reply = {"ok": False, "error": str(e)}
            writer.write(control.encode_reply(reply))
            await writer.drain()
        except (ConnectionError, OSError) as e:
            log.info("control connection lost: %s", e)
        except Exception:
            log.exception("control request failed")
            try:
                writer.write(control.encode_reply({"ok": False, "error": "internal error"}))
                await writer.drain()
            except (ConnectionError, OSError):
                pass
        finally:
            writer.close()

    async def _dispatch(self, message: dict[str, Any]) -> dict[str, Any]:
        op = message["op"]
        if op not in CONTROL_OPS:
            raise ValueError(f"unknown control op {op!r} (known: {', '.join(CONTROL_OPS)})")
        handler: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
        handler = getattr(self, CONTROL_OPS[op])
        return await handler(message)

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
        return {"ok": True, "admit": await self.admit(str(message["drv"]))}

    async def _op_unadmit(self, message: dict[str, Any]) -> dict[str, Any]:
        self.unadmit(str(message["drv"]))
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
            "sessions": [self._describe(s) for s in self.sessions.values()],
            "failures": self.failures,
        }

    def _refuse_self_blocking_wait(self, drv_path: str, worker: int | None) -> None:
        """OpenRefused when every session slot is held by builds of ``worker``: Nix runs
        pre-build hooks synchronously, so that process could never run the post-build
        hooks that free a slot, and waiting would hang it for good."""
        holders = [s for s in self.sessions.values() if s.holds_slot]
        if worker is None or not holders:
            return
        if all(s.worker == worker for s in holders):
            raise OpenRefused(
                f"{drv_path} needs a recnix session, but all daemon.max-sessions = "
                f"{self.max_sessions} slots are held by other builds of the same Nix process "
                f"(pid {worker}), which runs one pre-build hook at a time and could never "
                "free a slot while this one waits; build fewer opted-in derivations at once "
                "(--max-jobs / max-jobs in nix.conf at most daemon.max-sessions) or raise "
                "daemon.max-sessions (it needs more build users)"
            )

    def _describe(self, s: Session) -> dict[str, Any]:
        return {
            "session": s.sid,
            "drv": s.drv_path,
            "socket": str(s.socket_path),
            "chroot": str(s.chroot),
            "depth": s.depth,
            "readonly": s.readonly,
            "state": s.state.value,
            "added": len(s.added),
            "builds": s.builds,
            "added_bytes": s.added_bytes,
            "connections": s.connections,
            "opened": self.opened_at.get(s.sid),
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

    async def admit(self, drv_path: str) -> bool:
        """Whether the build of ``drv_path`` may start now (recnix.buildqueue asks before
        Nix takes a build user for it): a top-level recursive build is admitted with a
        session slot reserved for it (for RESERVATION_TTL seconds), or not while all are
        taken; builds that do not opt in and nested ones always are."""
        if drv_path in self._reserved:
            self._reserved[drv_path] = time.monotonic() + RESERVATION_TTL
            return True
        try:
            if opt_in_mode(await read_build_derivation(drv_path)) is None:
                return True
        except (OSError, DerivationError):
            return True  # the pre-build hook reports it
        if await self._parent_of(drv_path) is not None:
            return True
        if self._slots.locked():
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

    def _sweep_plain_marks(self) -> None:
        """Remove the build hook's ``<drv>.plain`` hints older than PLAIN_MARK_TTL."""
        too_old = time.time() - PLAIN_MARK_TTL
        try:
            entries = list(os.scandir(hook_marks_dir(self.config.raw)))
        except OSError:
            return
        for entry in entries:
            if entry.name.endswith(PLAIN_SUFFIX):
                with contextlib.suppress(OSError):
                    if entry.stat(follow_symlinks=False).st_mtime < too_old:
                        os.unlink(entry.path)

    def unadmit(self, drv_path: str) -> None:
        """Give back the slot reserved for ``drv_path`` (it is built elsewhere)."""
        if self._reserved.pop(drv_path, None) is not None:
            self._slots.release()

    def _expire_reservations(self) -> None:
        """Give back the slots of admitted builds that never opened their session."""
        now = time.monotonic()
        for drv_path, until in list(self._reserved.items()):
            if until <= now:
                del self._reserved[drv_path]
                self._slots.release()
                log.info("%s was admitted but did not start: its session slot is free", drv_path)

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
        readonly = mode == "readonly" or bool(self.config.policy["readonly-only"])
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
        if parent is None and self._reserved.pop(drv_path, None) is not None:
            pass  # admitted by the build hook with a slot reserved (admit)
        elif parent is None:
            if self._slots.locked():
                self._refuse_self_blocking_wait(drv_path, worker)
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
            else:
                await self._slots.acquire()
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
                self._slots.release()
            await session.close("failed to start")
            raise OpenRefused(f"cannot open a recnix session for {drv_path}: {e}") from e
        try:
            write_sandbox_nix_conf(chroot)
        except OSError as e:
            await self._end(session, None, "failed to start")
            raise OpenRefused(f"cannot write /etc/nix/nix.conf into {chroot}: {e}") from e
        try:
            await self._place_sandbox_socket(session)
        except sandboxsocket.PlacementError as e:
            await self._end(session, None, "failed to start")
            raise OpenRefused(f"cannot give {drv_path} its recnix socket: {e}") from e
        self.sessions[sid] = session
        self.opened_at[sid] = time.time()
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
            raise await self._invalidate(
                drv_path,
                out_paths,
                "recnix has no session for its build (was the recnix service restarted "
                "during the build?), so the references to what it built recursively cannot "
                "be added",
            )
        task = self._finalising.get(session.sid)
        if task is None:
            task = asyncio.ensure_future(self._finalise_session(session, out_paths))
            self._finalising[session.sid] = task
            task.add_done_callback(lambda _: self._finalising.pop(session.sid, None))
        return await asyncio.shield(task)

    async def _finalise_session(self, session: Session, out_paths: list[str]) -> list[str]:
        started = time.perf_counter()
        drv_path = session.drv_path
        session.begin_finalising()
        nix_env = dict(os.environ)
        loop = asyncio.get_running_loop()
        try:
            report = await loop.run_in_executor(
                None,
                finalise_outputs,
                drv_path,
                set(session.added),
                list(self.config["signing"]["secret-key-files"]),
                nix_env,
                DaemonQueries(self, loop),
                session.take_registrar(),
            )
        except Exception as e:
            if not isinstance(e, FinaliseError):
                log.exception("session %s: finalisation failed", session.sid)
            reason = str(e) if isinstance(e, FinaliseError) else f"internal error: {e!r}"
            error = await self._invalidate(
                drv_path, out_paths, reason, session.sid, set(session.added)
            )
            await self._end(session, "aborted", f"finalise failed: {error}")
            raise error from None
        messages = []
        for out, refs in sorted(report.added_refs.items()):
            if refs:
                messages.append(
                    f"added {len(refs)} reference(s) to {out}: {' '.join(sorted(refs))}"
                )
        self.audit.write(
            "finalised",
            session.sid,
            drv=drv_path,
            outputs=sorted(report.outputs.values()),
            added_refs={k: sorted(v) for k, v in report.added_refs.items()},
        )
        await self._end(session, None, "finalised")
        log.info(
            "session %s finalised in %.1f ms (%d reference(s) added)",
            session.sid,
            1e3 * (time.perf_counter() - started),
            sum(len(refs) for refs in report.added_refs.values()),
        )
        return messages

    async def _invalidate(
        self,
        drv_path: str,
        out_paths: list[str],
        reason: str,
        sid: str | None = None,
        session_paths: set[str] | None = None,
    ) -> FinaliseError:
        """Make the outputs of ``drv_path`` invalid because ``reason``; the error that
        says what happened. If they cannot be (a valid path outside them refers to one),
        register their references to ``session_paths`` unchecked instead, so that at
        least their closure is complete."""
        loop = asyncio.get_running_loop()
        outputs = set(out_paths)
        try:
            named = await loop.run_in_executor(None, outputs_of, drv_path, os.environ)
            outputs |= set(named.values())
            await loop.run_in_executor(None, invalidate_paths, sorted(outputs))
        except (FinaliseError, InvalidateError) as e:
            self.audit.write(
                "invalidation-failed",
                sid or "",
                drv=drv_path,
                outputs=sorted(outputs),
                error=str(e),
            )
            log.error("cannot invalidate the outputs of %s: %s (after: %s)", drv_path, e, reason)
            completed = await self._complete_closure(drv_path, session_paths or set())
            return FinaliseError(
                f"{reason}; and recnix could not invalidate the outputs of {drv_path} ({e}): "
                f"they stay valid, {completed}; delete them with "
                "`nix-store --delete --ignore-liveness` once the build is over"
            )
        self.audit.write(
            "invalidated", sid or "", drv=drv_path, outputs=sorted(outputs), reason=reason
        )
        message = invalidated_message(outputs, reason)
        log.warning("%s", message)
        return FinaliseError(message)

    async def _complete_closure(self, drv_path: str, session_paths: set[str]) -> str:
        """The fallback when outputs cannot be invalidated: add their references to
        ``session_paths`` without checking allowedReferences & co.; what happened."""
        if not session_paths:
            return "and may lack references"
        try:
            await asyncio.get_running_loop().run_in_executor(
                None,
                functools.partial(
                    finalise_outputs,
                    drv_path,
                    session_paths,
                    list(self.config["signing"]["secret-key-files"]),
                    dict(os.environ),
                    check=False,
                ),
            )
        except FinaliseError as e:
            return f"and may lack references (registering them failed too: {e})"
        return (
            "with the references recnix found registered unchecked (their closure is "
            "complete, but they may break the derivation's constraints)"
        )

    async def _end(self, session: Session, audit_event: str | None, reason: str) -> None:
        if audit_event:
            self.audit.write(audit_event, session.sid, drv=session.drv_path, reason=reason)
        self.sessions.pop(session.sid, None)
        self._drop_sandbox_socket(session)
        self.opened_at.pop(session.sid, None)
        if reason != "finalised":
            # no post-build hook will come to remove its hook mark (RECNIX_HOOK_MARKS)
            with contextlib.suppress(OSError):
                os.unlink(hook_marks_dir(self.config.raw) / os.path.basename(session.drv_path))
        await session.close(reason)
        if getattr(session, "holds_slot", False):
            session.holds_slot = False
            self._slots.release()

    async def _watch(self) -> None:
        """End sessions whose build is gone (failed, killed) without a post-build hook;
        give back the slots of admitted builds that did not start."""
        swept = time.monotonic()
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            self._expire_reservations()
            if time.monotonic() - swept > PLAIN_MARK_TTL / 10:
                swept = time.monotonic()
                await asyncio.get_running_loop().run_in_executor(None, self._sweep_plain_marks)
            for session in list(self.sessions.values()):
                if session.state is not SessionState.OPEN:
                    continue
                try:
                    await self._check_alive(session)
                except Exception:
                    log.exception("session %s: liveness check failed", session.sid)

    async def _check_alive(self, session: Session) -> None:
        """End the session of a build that is over without a post-build hook call.

        While the chroot exists the build is starting, running, or Nix is
        registering its outputs (slow for big outputs): wait. Once Nix has
        removed the chroot, a build whose outputs are not valid failed; one
        whose outputs are valid gets ``daemon.finalise-grace`` seconds for its hook.
        """
        now = time.monotonic()
        if session.chroot.is_dir():
            try:
                pid = await off_loop(
                    session.view.sandbox_pid,
                    timeout=PROC_TIMEOUT,
                    what=f"looking for the builder of {session.drv_path}",
                )
                if pid is not None and not session.seen_process:
                    reason = await off_loop(
                        self._builder_misses_socket,
                        session,
                        pid,
                        timeout=PROC_TIMEOUT,
                        what=f"looking at the sandbox socket of {session.drv_path}",
                    )
                    if reason is not None:
                        await self._fail_builder(session, reason)
                        return
            except OffLoopTimeout as e:
                log.warning("session %s: %s; trying again later", session.sid, e)
                return
            if pid is not None or not session.seen_process:
                session.seen_process = session.seen_process or pid is not None
                session.ended_since = None
                return
            # the builder is gone but Nix still holds the chroot
            if session.ended_since is None:
                session.ended_since = now
            if now - session.ended_since > CHROOT_GRACE:
                await self._end(session, "aborted", "the builder is gone and Nix kept its chroot")
            return
        if session.ended_since is None or session.ended_since < 0:
            session.ended_since = now
        outputs = [o.path for o in session.drv.outputs.values() if o.path]
        succeeded = False
        if outputs and session.keeper is not None and not session.keeper.closed:
            valid = await session.keeper.query_valid_paths(outputs)
            succeeded = len(valid) == len(outputs)
        if not succeeded:
            await self._end(session, "aborted", "the build failed or was killed")
        elif now - session.ended_since > self.finalise_grace:
            # Its outputs are valid and may lack references: finalise them now, or
            # (finalise fails) invalidate them.
            log.warning(
                "session %s: the build of %s ended without a post-build hook call "
                "(is recnix's post-build-hook in nix.conf?); finalising its outputs now",
                session.sid,
                session.drv_path,
            )
            with contextlib.suppress(FinaliseError):  # finalise logged and audited it
                await self.finalise(session.drv_path, [])

    # -- the session's socket inside the build's chroot (see recnix.sandboxsocket)

    async def _place_sandbox_socket(self, session: Session) -> None:
        """Listen for ``session`` also at <chroot>/nix/var/nix/daemon-socket/socket, which
        the builder sees whether or not Nix honours the pre-build hook's output (Lix
        drops it); replaces the socket of a previous run. PlacementError if it is not in
        place afterwards."""
        self._drop_sandbox_socket(session, unlink=False)
        sock, inode = sandboxsocket.place(session.chroot)
        try:
            server = await asyncio.get_running_loop().create_unix_server(
                lambda: ClientProtocol(session), sock=sock
            )
        except OSError as e:
            sock.close()
            raise sandboxsocket.PlacementError(f"cannot serve the chroot socket: {e}") from e
        self._sandbox_sockets[session.sid] = (server, inode)
        if not sandboxsocket.in_place(session.chroot, inode):
            raise sandboxsocket.PlacementError(
                f"{session.chroot}{sandboxsocket.SANDBOX_SOCKET} is not the session's socket "
                "right after it was made there"
            )

    def _drop_sandbox_socket(self, session: Session, unlink: bool = True) -> None:
        """Stop serving the chroot socket of ``session``; with ``unlink``, remove its name
        too (if it is still ours; Nix may have deleted the chroot already)."""
        entry = self._sandbox_sockets.pop(session.sid, None)
        if entry is None:
            return
        server, inode = entry
        server.close()
        if unlink and sandboxsocket.in_place(session.chroot, inode):
            try:
                os.unlink(f"{session.chroot}{sandboxsocket.SANDBOX_SOCKET}")
            except OSError as e:
                log.debug("session %s: cannot remove its chroot socket: %s", session.sid, e)

    def _builder_misses_socket(self, session: Session, pid: int) -> str | None:
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

    async def _fail_builder(self, session: Session, reason: str) -> None:
        """Fail the build of ``session``: kill every process of its sandbox through pidfds
        verified to be in it (never a pid read earlier) and end the session. The reason
        goes to the service's log, the audit log and ``recnix status`` (``failures``):
        channels the builder cannot redirect. Nothing is written through the builder's
        descriptors (``/proc/<pid>/fd/*`` would reopen whatever the builder put there)."""
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
        await self._end(session, "aborted", reason)
