"""Speak the worker protocol directly to a live recnix session socket (host tier).

* :func:`start_live_build` starts an opted-in build (``requiredSystemFeatures =
  ["recnix"]``) that waits for a ``release`` file in its build directory, and
  finds its session (socket, chroot) through the service's ``status`` op.
* :func:`sandbox_socket` connects to the session *as a process of the build*:
  a helper process joins the builder's mount namespace (its root is then the
  sandbox root, as for any process of the build), connects to
  ``/nix/var/nix/daemon-socket/socket`` there and hands the connected socket
  back over SCM_RIGHTS. It stays alive (so the peer check and materialisation,
  which look at its pid, see a sandbox process) until the socket is closed.
* :class:`ProbeClient` is a small blocking client on :class:`ClientConnection`.
"""

from __future__ import annotations

import contextlib
import glob
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recnix.hooks import control
from recnix.protocol import (
    NEED_DATA,
    ClientConnection,
    ConnectionClosed,
    Ctx,
    Data,
    EndOfData,
    ErrorReply,
    HandshakeDone,
    Log,
    Op,
    ProtocolError,
    Reply,
    StderrMessage,
)
from recnix.protocol.stderr import read_stderr
from recnix.protocol.wire import Decoder, ReceiveBuffer
from recnix.sandbox.materialise import find_sandbox_pid
from tests.nixversion import build_top_glob

SANDBOX_SOCKET = "/nix/var/nix/daemon-socket/socket"
IO_TIMEOUT = 60.0

# A build that opts into recnix and waits (at most ~120 s) for ./release.
WAITING_EXPR = """\
{ busybox, tag }:
let bb = builtins.storePath busybox; in
derivation {
  name = "recnix-probe-${tag}";
  system = builtins.currentSystem;
  builder = "${bb}/bin/sh";
  args = [ "-c" ''
    touch started
    i=0
    while [ ! -e release ] && [ "$i" -lt 600 ]; do ${bb}/bin/sleep 0.2; i=$((i + 1)); done
    echo "released after $i" > "$out"
  '' ];
  requiredSystemFeatures = [ "recnix" ];
  inherit tag;
}
"""

# Joins the mount namespace of process `pid` (indented: used inside a try block).
# The sandbox has no Python library: whatever socket.send_fds imports lazily
# (Python 3.14: array, collections, ...) is imported before, by one call.
_JOIN_NAMESPACE = """\
    _a, _b = socket.socketpair()
    socket.send_fds(_a, [b"w"], [_a.fileno()])
    _a.close(), _b.close()
    libc = ctypes.CDLL(None, use_errno=True)
    ns = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY)
    if libc.setns(ns, 0x20000) != 0:
        raise OSError(ctypes.get_errno(), "setns")
    os.chdir("/")
"""

# Runs in a fresh (single-threaded) interpreter: join the mount namespace of
# argv[1], connect to the sandbox's daemon socket, pass the fd over argv[2].
_HELPER = (
    r"""
import ctypes, os, socket, sys
pid, chan_fd = int(sys.argv[1]), int(sys.argv[2])
chan = socket.socket(fileno=chan_fd)
try:
"""
    + _JOIN_NAMESPACE
    + r"""    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[3])
    socket.send_fds(chan, [b"ok"], [s.fileno()])
    s.close()
except BaseException as e:
    chan.sendall(("error " + repr(e)).encode())
chan.recv(1)
"""
)


# Like _HELPER, but opens argv[3] connections, keeps them open and reports how
# many connect() calls succeeded and how many were closed by the server at once.
_FLOOD_HELPER = (
    r"""
import ctypes, os, resource, signal, socket, sys, time
pid, chan_fd, count, path = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
chan = socket.socket(fileno=chan_fd)
resource.setrlimit(resource.RLIMIT_NOFILE, (count + 64, count + 64))
held, failed = [], 0
try:
"""
    + _JOIN_NAMESPACE
    + r"""    def timed_out(signum, frame):
        raise TimeoutError("connect")
    signal.signal(signal.SIGALRM, timed_out)
    for _ in range(count):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # blocking: waits for room
        signal.setitimer(signal.ITIMER_REAL, 2)
        try:
            s.connect(path)
            held.append(s)
        except OSError:
            failed += 1
            s.close()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    time.sleep(2)
    closed = 0
    for s in held:
        s.setblocking(False)
        try:
            if s.recv(1) == b"":
                closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    chan.sendall(f"ok {len(held)} {failed} {closed}".encode())
except BaseException as e:
    chan.sendall(("error " + repr(e)).encode())
chan.recv(1)
"""
)


class ProbeError(AssertionError):
    """The probe could not set up what a test needs (message says what and why)."""


@dataclass
class LiveBuild:
    """An opted-in build waiting for ``release``, and its recnix session."""

    drv_path: str
    out_path: str
    process: subprocess.Popen[str]
    build_dir: Path
    session: dict[str, Any]
    builder_pid: int

    @property
    def socket_path(self) -> Path:
        return Path(self.session["socket"])

    @property
    def chroot(self) -> Path:
        return Path(self.session["chroot"])

    def sandbox_path(self, store_path: str) -> str:
        """Where ``store_path`` is seen from inside the sandbox (through the builder's root)."""
        pid = find_sandbox_pid(self.chroot) or self.builder_pid
        return f"/proc/{pid}/root{store_path}"

    def release(self) -> None:
        (self.build_dir / "release").touch()

    def finish(self, timeout: float = 60.0) -> tuple[int, str, str]:
        """Release the build and wait for nix-store --realise to exit."""
        if self.build_dir.exists():
            self.release()
        try:
            stdout, stderr = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            stdout, stderr = self.process.communicate()
            return -1, stdout, stderr + f"\n(killed after {timeout} s)"
        return self.process.returncode, stdout, stderr


def service_sessions(control_socket: Path) -> list[dict[str, Any]]:
    """The ``status`` op's session list."""
    return list(control.request(control_socket, {"op": "status"}, timeout=10)["sessions"])


def start_live_build(
    env: dict[str, str],
    daemon_build_dir: Path,
    control_socket: Path,
    busybox: str,
    tag: str,
    work_dir: Path,
    timeout: float = 60.0,
) -> LiveBuild:
    """Instantiate and start the waiting build; return once its session is open."""
    expr = work_dir / "waiting.nix"
    expr.write_text(WAITING_EXPR)
    inst = subprocess.run(
        ["nix-instantiate", str(expr), "--argstr", "busybox", busybox, "--argstr", "tag", tag],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if inst.returncode != 0:
        raise ProbeError(f"nix-instantiate failed:\n{inst.stderr}")
    drv_path = inst.stdout.strip()
    out_path = subprocess.run(
        ["nix-store", "-q", "--outputs", drv_path],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    process = subprocess.Popen(
        ["nix-store", "--realise", drv_path],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    name = os.path.basename(drv_path)[33:].removesuffix(".drv")
    deadline = time.monotonic() + timeout
    build_dir: Path | None = None
    session: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            _, err = process.communicate()
            raise ProbeError(f"the waiting build exited early ({process.returncode}):\n{err}")
        if build_dir is None:
            found = [Path(d) for d in glob.glob(build_top_glob(daemon_build_dir, name))]
            if found and (found[0] / "started").exists():
                build_dir = found[0]
        if build_dir is not None and session is None:
            for s in service_sessions(control_socket):
                if s["drv"] == drv_path and s["state"] == "open":
                    session = s
        if build_dir is not None and session is not None:
            pid = find_sandbox_pid(Path(session["chroot"]))
            if pid is not None:
                return LiveBuild(drv_path, out_path, process, build_dir, session, pid)
        time.sleep(0.1)
    process.kill()
    _, err = process.communicate()
    raise ProbeError(
        f"the waiting build {drv_path} did not start with a recnix session within "
        f"{timeout} s (build dir {build_dir}, session {session}):\n{err}"
    )


@contextlib.contextmanager
def sandbox_socket(live: LiveBuild, path: str = SANDBOX_SOCKET) -> Iterator[socket.socket]:
    """A socket connected to ``path`` by a process inside ``live``'s sandbox."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    helper = subprocess.Popen(
        [sys.executable, "-c", _HELPER, str(live.builder_pid), str(theirs.fileno()), path],
        pass_fds=[theirs.fileno()],
    )
    theirs.close()
    sock: socket.socket | None = None
    try:
        ours.settimeout(IO_TIMEOUT)
        msg, fds, _, _ = socket.recv_fds(ours, 4096, 1)
        if msg != b"ok" or len(fds) != 1:
            raise ProbeError(f"in-sandbox helper could not connect to {path}: {msg.decode()}")
        sock = socket.socket(fileno=fds[0])
        sock.settimeout(IO_TIMEOUT)
        yield sock
    finally:
        if sock is not None:
            sock.close()
        ours.close()
        try:
            helper.wait(timeout=10)
        except subprocess.TimeoutExpired:
            helper.kill()
            helper.wait()


@dataclass
class Flood:
    """Connections a sandbox process opened and holds."""

    connected: int
    failed: int
    closed_by_server: int


@contextlib.contextmanager
def sandbox_flood(live: LiveBuild, count: int, path: str = SANDBOX_SOCKET) -> Iterator[Flood]:
    """A process in ``live``'s sandbox opens ``count`` connections and holds them open."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    argv = [sys.executable, "-c", _FLOOD_HELPER, str(live.builder_pid), str(theirs.fileno())]
    helper = subprocess.Popen([*argv, str(count), path], pass_fds=[theirs.fileno()])
    theirs.close()
    try:
        ours.settimeout(IO_TIMEOUT + count * 0.05)
        msg = ours.recv(4096).decode()
        if not msg.startswith("ok "):
            raise ProbeError(f"in-sandbox flood helper failed: {msg}")
        connected, failed, closed = (int(x) for x in msg.split()[1:])
        yield Flood(connected, failed, closed)
    finally:
        ours.close()
        try:
            helper.wait(timeout=30)
        except subprocess.TimeoutExpired:
            helper.kill()
            helper.wait()


def recv_until_closed(sock: socket.socket, timeout: float = IO_TIMEOUT) -> bytes:
    """Everything the peer sends until it closes the connection (ProbeError on timeout)."""
    sock.settimeout(timeout)
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise ProbeError(f"the peer kept the connection open for {timeout} s") from None
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def decode_stderr_messages(data: bytes, minor: int) -> list[StderrMessage]:
    """Parse a sequence of STDERR_* messages (e.g. what a server sent before closing)."""
    buf = ReceiveBuffer()
    buf.feed(data)
    buf.eof = True
    ctx = Ctx(minor)
    messages = []
    while len(buf):
        dec = Decoder(read_stderr(ctx), "stderr message")
        dec.step(buf)
        messages.append(dec.value)
    return messages


@dataclass
class CallResult:
    """One request's outcome: the reply (or error), log messages, and NAR bytes if any."""

    reply: Reply | None
    error: ErrorReply | None
    logs: list[StderrMessage] = field(default_factory=list)
    nar: bytes = b""

    @property
    def value(self) -> Any:
        if self.reply is None:
            raise ProbeError(f"expected a reply, got error: {self.error_message}")
        return self.reply.value

    @property
    def error_message(self) -> str:
        if self.error is None:
            raise ProbeError(f"expected an error, got reply {self.reply!r}")
        return self.error.error.message


class ProbeClient:
    """Blocking worker-protocol client over a connected socket."""

    def __init__(self, sock: socket.socket, client_minor: int = 35) -> None:
        self.sock = sock
        self.conn = ClientConnection(client_minor=client_minor)
        self.handshake: HandshakeDone | None = None

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def _event(self) -> Any:
        while True:
            ev = self.conn.next_event()
            if ev is not NEED_DATA:
                return ev
            self._flush()
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            self.conn.receive_data(data)

    def do_handshake(self) -> HandshakeDone:
        self.conn.initiate()
        ev = self._event()
        if not isinstance(ev, HandshakeDone):
            raise ProbeError(f"handshake gave {ev!r}")
        self.handshake = ev
        return ev

    @property
    def minor(self) -> int:
        assert self.handshake is not None
        return self.handshake.minor

    def call(self, op: Op, args: dict[str, Any], data: Iterable[bytes] | None = None) -> CallResult:
        """Send a request (and its framed stream when ``data`` is given); read its outcome."""
        self.conn.send_request(op, args)
        if data is not None:
            for chunk in data:
                self.conn.send_data(chunk)
            self.conn.send_end_of_data()
        self._flush()
        logs: list[StderrMessage] = []
        while True:
            ev = self._event()
            if isinstance(ev, Log):
                logs.append(ev.msg)
            elif isinstance(ev, ErrorReply):
                return CallResult(None, ev, logs)
            elif isinstance(ev, Reply):
                result = CallResult(ev, None, logs)
                if op is Op.NAR_FROM_PATH:
                    result.nar = self._read_nar()
                return result
            else:
                raise ProbeError(f"{op.name}: unexpected {ev!r}")

    def _read_nar(self) -> bytes:
        chunks = []
        while True:
            ev = self._event()
            if isinstance(ev, Data):
                chunks.append(ev.data)
            elif isinstance(ev, EndOfData):
                return b"".join(chunks)
            else:
                raise ProbeError(f"unexpected {ev!r} inside a NAR")

    def is_closed(self) -> bool:
        """True if the server has closed the connection (reads EOF, no stray data)."""
        try:
            ev = self._event()
        except ProtocolError as e:
            raise ProbeError(f"server sent garbage before closing: {e}") from None
        return isinstance(ev, ConnectionClosed)


__all__ = [
    "CallResult",
    "LiveBuild",
    "ProbeClient",
    "ProbeError",
    "decode_stderr_messages",
    "recv_until_closed",
    "sandbox_flood",
    "sandbox_socket",
    "service_sessions",
    "start_live_build",
]
