"""recnix's part of nix.conf's ``build-hook``: opted-in builds queue before they
take a build user.

Nix takes a build user for a local build before it runs the pre-build hook, so
an outer recursive build that waits there for a recnix session slot holds a
build user, and its nested builds need more: with more concurrent recursive
builds than build users, every user ends up held by an outer build that waits
(Nix issue #7297), the built-in recursive-nix's as recnix's. Nix asks the build
hook first, before any build user is taken, whether it will build a derivation
remotely, and the hook may answer "postpone": the goal then waits (for
``build-poll-interval`` seconds or until another build ends) and asks again,
holding nothing. So this hook asks the recnix service to *admit* each build that
requires ``recnix`` (the service reserves it a session slot, or lets it wait for
one in its pre-build hook when that is safe: recnix.daemon.admission) and answers
"postpone" otherwise. Everything else goes to Nix's own build
hook (``build-remote``), started only when nix.conf lists remote machines.

The protocol (Nix 2.8 to 2.34: ``HookInstance``, ``tryBuildHook``): on stdin,
Nix's settings as (1, name, value)... 0, then per build "try", am-willing,
system, drv path, required features (Nix wire strings and 64-bit integers);
the hook answers on stderr with a line "# accept" (then the machine's name),
"# decline", "# decline-permanently" or "# postpone"; other lines are log
lines. After "# accept" Nix sends the inputs and wanted outputs, the hook builds
and exits. Standard library only: Nix starts this once per building worker.
"""

from __future__ import annotations

import os
import select
import sys

from recnix.config.names import OPT_IN_FEATURES
from recnix.hooks import control

# Not typing.TypeVar at run time: importing typing costs every start ~3 ms.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import TypeVar

    T = TypeVar("T")

MAX_STRING = 1 << 20


class HookProtocolError(Exception):
    """The stream from Nix is not the build hook protocol."""


class WireReader:
    """Nix wire values from a file descriptor, keeping the raw bytes read."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buf = b""
        self.raw = bytearray()  # everything consumed since the last take_raw()

    def _exact(self, n: int) -> bytes | None:
        while len(self._buf) < n:
            chunk = os.read(self.fd, 65536)
            if not chunk:
                if self._buf:
                    raise HookProtocolError("end of input inside a message")
                return None
            self._buf += chunk
        data, self._buf = self._buf[:n], self._buf[n:]
        self.raw += data
        return data

    def int(self) -> int | None:
        """A 64-bit little-endian integer; None at the end of input."""
        data = self._exact(8)
        return None if data is None else int.from_bytes(data, "little")

    def str(self) -> str:
        """A length-prefixed string padded to 8 bytes."""
        return self.body(self._required(self.int()))

    def body(self, n: int) -> str:
        """The rest of a string whose length ``n`` was read."""
        if n > MAX_STRING:
            raise HookProtocolError(f"string of {n} bytes")
        data = self._required(self._exact(n + (-n % 8)))
        return data[:n].decode(errors="surrogateescape")

    def strs(self) -> list[str]:
        """A counted list of strings."""
        return [self.str() for _ in range(self._required(self.int()))]

    def take_raw(self) -> bytes:
        """The bytes consumed since the last call."""
        raw, self.raw = bytes(self.raw), bytearray()
        return raw

    def take_unread(self) -> bytes:
        """The bytes read from the descriptor but not consumed yet."""
        unread, self._buf = self._buf, b""
        return unread

    @staticmethod
    def _required(value: T | None) -> T:
        if value is None:
            raise HookProtocolError("end of input inside a message")
        return value


def read_settings(reader: WireReader) -> dict[str, str]:
    """Nix's settings, sent first."""
    settings = {}
    while True:
        more = reader.int()
        if more is None:
            raise HookProtocolError("end of input before the end of the settings")
        if more == 0:
            return settings
        if more != 1:
            raise HookProtocolError(f"unexpected {more} in the settings")
        name = reader.str()
        settings[name] = reader.str()


def read_try(reader: WireReader) -> tuple[str, list[str], bool] | None:
    """The next "try" request: (drv path, required features, whether Nix would build it
    locally now: below max-jobs); None at the end of input."""
    length = reader.int()
    if length is None:
        return None
    word = reader.body(length)
    if word != "try":
        raise HookProtocolError(f"expected 'try', got {word!r}")
    local_now = bool(reader.int())
    reader.str()  # the system
    drv_path = reader.str()
    return drv_path, reader.strs(), local_now


def machines_configured(settings: dict[str, str]) -> bool:
    """Whether nix.conf's ``builders`` lists any machine (else Nix's build-remote would
    decline every build, and need not be started)."""
    for entry in settings.get("builders", "").replace(";", "\n").splitlines():
        entry = entry.split("#", 1)[0].strip()
        if not entry:
            continue
        if not entry.startswith("@"):
            return True
        try:
            with open(entry[1:], encoding="utf-8", errors="replace") as f:
                if machines_configured({"builders": f.read()}):
                    return True
        except OSError:
            continue
    return False


class NixBuildHook:
    """Nix's own build hook, started on first use, fed the settings, asked per build."""

    def __init__(
        self, argv: list[str], env: dict[str, str], settings_raw: bytes, argv0: str = ""
    ) -> None:
        self.argv = argv
        self.argv0 = argv0 or argv[0]
        self.env = env
        self.settings_raw = settings_raw
        self.pid: int | None = None
        self.stdin = -1
        self.stderr = -1
        self._lines = b""

    def start(self) -> None:
        to_hook, self.stdin = os.pipe()
        self.stderr, from_hook = os.pipe()
        actions = [
            (os.POSIX_SPAWN_DUP2, to_hook, 0),
            (os.POSIX_SPAWN_DUP2, from_hook, 2),
            (os.POSIX_SPAWN_CLOSE, to_hook),
            (os.POSIX_SPAWN_CLOSE, from_hook),
            (os.POSIX_SPAWN_CLOSE, self.stdin),
            (os.POSIX_SPAWN_CLOSE, self.stderr),
        ]
        argv = [self.argv0, *self.argv[1:]]
        self.pid = os.posix_spawn(self.argv[0], argv, self.env, file_actions=actions)
        os.close(to_hook)
        os.close(from_hook)
        _write_all(self.stdin, self.settings_raw)

    def ask(self, request_raw: bytes) -> str:
        """Forward one "try"; pass its log lines on; return its answer line."""
        if self.pid is None:
            self.start()
        _write_all(self.stdin, request_raw)
        while True:
            line = self.line()
            if line is None:
                return "# decline-permanently"  # it died: Nix treats EPIPE alike
            if line.startswith("# "):
                return line
            _write_all(2, (line + "\n").encode(errors="surrogateescape"))

    def line(self) -> str | None:
        while b"\n" not in self._lines:
            chunk = os.read(self.stderr, 65536)
            if not chunk:
                return None
            self._lines += chunk
        line, self._lines = self._lines.split(b"\n", 1)
        return line.decode(errors="surrogateescape")

    def stop(self) -> None:
        if self.pid is None:
            return
        os.close(self.stdin)
        os.close(self.stderr)
        os.kill(self.pid, 9)
        os.waitpid(self.pid, 0)
        self.pid = None

    def take_over(self, rest_of_input: bytes) -> int:
        """After "# accept": relay stdin to it and its stderr to ours until it exits."""
        _write_all(self.stdin, rest_of_input)
        if self._lines:
            _write_all(2, self._lines)
        sources = {0: self.stdin, self.stderr: 2}
        while sources:
            readable, _, _ = select.select(list(sources), [], [])
            for fd in readable:
                data = os.read(fd, 65536)
                if data:
                    _write_all(sources[fd], data)
                    continue
                if fd == 0:
                    os.close(self.stdin)  # Nix is done sending: so is the hook's input
                del sources[fd]
                if fd == self.stderr:
                    sources.pop(0, None)
        assert self.pid is not None
        _, status = os.waitpid(self.pid, 0)
        return os.waitstatus_to_exitcode(status)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def admitted(
    service: control.ControlConnection,
    drv_path: str,
    worker: int | None = None,
    max_jobs: int | None = None,
) -> bool:
    """Whether the service admits ``drv_path`` now (a session slot reserved for it, or
    a safe wait for one in its pre-build hook), asked for Nix process ``worker`` that
    runs at most ``max_jobs`` builds. An unreachable service admits: the pre-build
    hook then reports the error."""
    request = {"op": "admit", "drv": drv_path, "worker": worker, "max_jobs": max_jobs}
    try:
        reply = service.request(request, timeout=60)
    except control.ControlError as e:
        print(f"recnix build-hook: cannot ask the recnix service: {e}", file=sys.stderr)
        return True
    return bool(reply.get("admit", True))


PLAIN_SUFFIX = ".plain"
OPTED_IN_SUFFIX = ".recnix"
HINT_SUFFIXES = (PLAIN_SUFFIX, OPTED_IN_SUFFIX)
# A hint or a hook mark: an empty root-only file, never opened through a symlink.
MARK_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


def hint(marks_dir: str, drv_path: str, opted_in: bool) -> None:
    """Tell the pre-build hook whether ``drv_path`` requires recnix (a file
    ``<marks>/<drv name>.recnix`` or ``.plain``), so that it need not read the ``.drv``
    (a system call per byte in sh). Only a hint: without it the hook reads the ``.drv``.
    The service sweeps old ones (Admission.sweep_hints)."""
    suffix = OPTED_IN_SUFFIX if opted_in else PLAIN_SUFFIX
    try:
        fd = os.open(f"{marks_dir}/{drv_path.rpartition('/')[2]}{suffix}", MARK_FLAGS, 0o600)
    except OSError:
        return  # no marks directory yet (the pre-build hook makes it): no hint
    os.close(fd)


def unadmit(service: control.ControlConnection, drv_path: str) -> None:
    """Give the slot reserved for ``drv_path`` back (it goes to a remote machine)."""
    try:
        service.request({"op": "unadmit", "drv": drv_path}, timeout=60)
    except control.ControlError as e:
        print(f"recnix build-hook: cannot tell the recnix service: {e}", file=sys.stderr)


def serve(
    nix_hook_argv: list[str], nix_hook_env: dict[str, str], control_socket: str, argv0: str = ""
) -> int:
    """Answer Nix's build hook requests on fds 0 and 2 (see the module docstring)."""
    marks_dir = os.environ.get("RECNIX_HOOK_MARKS", "")
    if marks_dir:
        try:  # noqa: SIM105 - no contextlib import on this path
            os.mkdir(marks_dir, 0o700)  # as the pre-build hook makes it
        except OSError:
            pass  # there already, or no state directory (no service): no hints
    reader = WireReader(0)
    service = control.ControlConnection(control_socket)  # one for every build asked about
    settings = read_settings(reader)
    worker = control.nix_worker_pid()
    max_jobs = int(settings["max-jobs"]) if settings.get("max-jobs", "").isdigit() else None
    nix_hook = (
        NixBuildHook(nix_hook_argv, nix_hook_env, reader.take_raw(), argv0)
        if machines_configured(settings)
        else None
    )
    while True:
        request = read_try(reader)
        if request is None:
            return 0
        drv_path, features, local_now = request
        raw = reader.take_raw()
        recursive = any(f in OPT_IN_FEATURES for f in features)
        if marks_dir:
            hint(marks_dir, drv_path, recursive)
        # Only a build Nix would start now takes a slot (at max-jobs, a declined build
        # waits for a build slot and is asked about again).
        if recursive and local_now and not admitted(service, drv_path, worker, max_jobs):
            answer = "# postpone"
        elif nix_hook is None:
            answer = "# decline"
        else:
            answer = nix_hook.ask(raw)
            if answer == "# decline-permanently":
                # Nix would stop asking this worker: recnix's builds still need asking.
                nix_hook.stop()
                nix_hook, answer = None, "# decline"
            elif answer == "# accept":
                if recursive:  # built on a remote machine: no local session slot needed
                    unadmit(service, drv_path)
                machine = nix_hook.line()
                _write_all(2, f"{answer}\n{machine or ''}\n".encode(errors="surrogateescape"))
                return nix_hook.take_over(reader.take_unread())
        _write_all(2, f"{answer}\n".encode())
