"""A session's socket inside its build's chroot, independent of the pre-build hook's output.

Nix (2.8 … 2.34) bind-mounts what the pre-build hook prints (``extra-sandbox-paths``);
Lix 2.93–2.95 runs the hook but drops its output. Both build the sandbox from the chroot
directory the hook gets as its second argument: what is made under it before the builder
starts is what the builder sees. So the service binds a second listening socket of the
session at ``<chroot>/nix/var/nix/daemon-socket/socket``, which an unmodified client in
the builder finds by itself (the ``auto`` store: ``/nix/var/nix`` is root's, not writable).

No mounts: Nix binds the chroot onto itself non-recursively, so a host mount under it would
not reach the builder, and Nix's recursive delete of the chroot would walk into it. A socket
file in the chroot is just a name: when Nix deletes the chroot, nothing of the session is
lost. Where Nix honours the hook's output, its bind mount of the session directory covers
this directory inside the sandbox; both sockets serve the same session, so the two never
conflict. A restarted service binds a new socket under a temporary name and renames it over
the old one (atomic: a client sees the old socket or the new one, never none).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import stat
from pathlib import Path

from recnix.config.names import SANDBOX_SOCKET_DIR

SOCKET_NAME = "socket"
SANDBOX_SOCKET = f"{SANDBOX_SOCKET_DIR}/{SOCKET_NAME}"
_DIR_PARTS = ("nix", "var", "nix", "daemon-socket")
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class PlacementError(Exception):
    """The session's socket cannot be put under (or is not in place in) the chroot."""


def _open_socket_dir(chroot: Path, create: bool) -> int:
    """A descriptor of ``<chroot>/nix/var/nix/daemon-socket`` (directories made 0755 if
    missing and ``create``: the builder must traverse them, and Nix's client stats
    ``/nix/var/nix/profiles/…`` at start-up), opened component by component without
    following symlinks."""
    fd = os.open(chroot, _OPEN_DIR)
    try:
        for part in _DIR_PARTS:
            made = False
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
                    made = True
            next_fd = os.open(part, _OPEN_DIR, dir_fd=fd)
            os.close(fd)
            fd = next_fd
            if made:
                # 0755 whatever the service's umask (the unit's is 0077): the builder
                # must traverse these, and Nix's client stats /nix/var/nix/profiles/...
                os.fchmod(fd, 0o755)
        st = os.fstat(fd)
        if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
            raise PlacementError(
                f"{chroot}{SANDBOX_SOCKET_DIR} is not ours or is writable by others "
                f"(uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o})"
            )
        return fd
    except BaseException:
        os.close(fd)
        raise


def place(chroot: Path) -> tuple[socket.socket, int]:
    """Bind and listen on a new socket at ``<chroot>/nix/var/nix/daemon-socket/socket``
    (replacing an old one atomically); return it and its inode number.

    The path may exceed sun_path's 108 bytes, so the socket is bound through
    ``/proc/self/fd``. PlacementError names the path and the cause.
    """
    try:
        dir_fd = _open_socket_dir(chroot, create=True)
    except OSError as e:
        raise PlacementError(f"cannot make {chroot}{SANDBOX_SOCKET_DIR}: {e}") from None
    tmp = f".{SOCKET_NAME}-{secrets.token_hex(6)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(f"/proc/self/fd/{dir_fd}/{tmp}")
        os.chmod(tmp, 0o666, dir_fd=dir_fd)
        sock.listen(128)
        os.rename(tmp, SOCKET_NAME, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        inode = os.stat(SOCKET_NAME, dir_fd=dir_fd, follow_symlinks=False).st_ino
    except (OSError, NotImplementedError) as e:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise PlacementError(
            f"cannot bind the session socket at {chroot}{SANDBOX_SOCKET}: {e}"
        ) from None
    finally:
        os.close(dir_fd)
    sock.setblocking(False)
    return sock, inode


def in_place(chroot: Path, inode: int) -> bool:
    """True if ``<chroot>/nix/var/nix/daemon-socket/socket`` is the socket ``inode``."""
    try:
        dir_fd = _open_socket_dir(chroot, create=False)
    except (OSError, PlacementError):
        return False
    try:
        st = os.stat(SOCKET_NAME, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return False
    finally:
        os.close(dir_fd)
    return stat.S_ISSOCK(st.st_mode) and st.st_ino == inode


def seen_by(pid: int) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the socket process ``pid`` finds at the sandbox socket path
    (resolved in its own mount namespace), or None if there is no socket there."""
    try:
        st = os.stat(f"/proc/{pid}/root{SANDBOX_SOCKET}")
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISSOCK(st.st_mode) else None
