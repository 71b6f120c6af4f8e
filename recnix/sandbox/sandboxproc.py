"""Processes of a build's sandbox, held by pidfd (docs/security.md, "What root may touch").

recnix runs as root beside builders it does not trust. A pid read once can be reused by
an unrelated host process, and everything under ``/proc/<pid>`` belongs to whichever
process holds the pid *now*. So every root action on a sandboxed process goes through a
:class:`SandboxProcess`: a pidfd taken first (from SO_PEERPIDFD where the kernel has it,
else ``pidfd_open``), then the ``/proc/<pid>`` facts read, then the pidfd checked to be
still alive. A process that is alive (or a zombie) at the end held the pid all along, so
what was read belongs to it. Signals go through the pidfd, never through the pid.

Nothing here opens ``/proc/<pid>/fd/*``, reads through ``/proc/<pid>/root`` beyond a
``stat`` of the root itself, or blocks on anything the builder controls.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Linux >= 6.5

NamespaceId = tuple[int, int]  # (st_dev, st_ino) of a /proc/<pid>/ns/mnt file


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _pidfd_alive(pidfd: int) -> bool:
    """True while the process behind ``pidfd`` has not been reaped (its pid not reusable)."""
    try:
        signal.pidfd_send_signal(pidfd, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # cannot happen for root; alive all the same
        return True
    return True


@dataclass
class SandboxProcess:
    """A process verified to run in the sandbox rooted at ``chroot_root``, held by pidfd.

    Close it when done (or use it as a context manager)."""

    pid: int
    pidfd: int

    @classmethod
    def from_pid(cls, pid: int, chroot_root: Path) -> SandboxProcess | None:
        """The process ``pid`` if it runs in the sandbox now, held by a fresh pidfd."""
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return None
        return cls._verified(pid, pidfd, chroot_root)

    @classmethod
    def from_peer(cls, sock: socket.socket, pid: int, chroot_root: Path) -> SandboxProcess | None:
        """The process at the other end of ``sock`` (SO_PEERCRED ``pid``) if it runs in the
        sandbox; SO_PEERPIDFD (no pid race at all) where the kernel offers it."""
        try:
            pidfd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
        except OSError:
            return cls.from_pid(pid, chroot_root)
        return cls._verified(pid, pidfd, chroot_root)

    @classmethod
    def _verified(cls, pid: int, pidfd: int, chroot_root: Path) -> SandboxProcess | None:
        proc = cls(pid, pidfd)
        if proc.in_sandbox(chroot_root):
            return proc
        proc.close()
        return None

    def __enter__(self) -> SandboxProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the pidfd."""
        if self.pidfd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.pidfd)
            self.pidfd = -1

    def alive(self) -> bool:
        """True while the process has not been reaped."""
        return self.pidfd >= 0 and _pidfd_alive(self.pidfd)

    def in_sandbox(self, chroot_root: Path) -> bool:
        """True if the process's root is the sandbox's chroot (checked against the host's
        ``chroot_root`` by device and inode) and it still held its pid afterwards."""
        try:
            same = _same_file(os.stat(f"/proc/{self.pid}/root"), os.stat(chroot_root))
        except OSError:
            return False
        return same and self.alive()

    def mount_namespace(self) -> tuple[int, NamespaceId] | None:
        """An fd of the process's mount namespace and its identity, or None if it is gone.
        The fd stays valid (and names the same namespace) whatever the process does next."""
        try:
            fd = os.open(f"/proc/{self.pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        st = os.fstat(fd)
        if not self.alive():
            os.close(fd)
            return None
        return fd, (st.st_dev, st.st_ino)

    def mount_namespace_id(self) -> NamespaceId | None:
        """The identity of the process's mount namespace now (None if it is gone)."""
        try:
            st = os.stat(f"/proc/{self.pid}/ns/mnt")
        except OSError:
            return None
        return (st.st_dev, st.st_ino) if self.alive() else None

    def kill(self) -> bool:
        """SIGKILL through the pidfd (never a pid that may have been reused); False if the
        process was already gone."""
        try:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except (ProcessLookupError, OSError):
            return False
        return True


def sandbox_pids(chroot_root: Path) -> list[int]:
    """Pids whose root is the sandbox's chroot, the one that started first (the builder,
    which outlives its children) first: not by pid, since pids wrap and a short-lived child
    can have a lower pid than the builder (unverified: hold one with
    :meth:`SandboxProcess.from_pid` before acting on it)."""
    try:
        want = os.stat(chroot_root)
    except OSError:
        return []
    found: list[tuple[int, int]] = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if _same_file(os.stat(f"/proc/{name}/root"), want):
                found.append((process_start_time(name), int(name)))
        except (OSError, ValueError, IndexError):
            continue
    return [pid for _, pid in sorted(found)]


def process_start_time(pid: int | str) -> int:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[19])


def kill_sandbox(chroot_root: Path) -> int:
    """SIGKILL every process in the sandbox rooted at ``chroot_root``, each through a
    pidfd verified to be in it; returns how many were signalled."""
    killed = 0
    for pid in sandbox_pids(chroot_root):
        proc = SandboxProcess.from_pid(pid, chroot_root)
        if proc is None:
            continue
        with proc:
            killed += proc.kill()
    return killed
