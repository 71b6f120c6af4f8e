"""Make host store paths appear inside a running build sandbox (DESIGN step 4, NI §3.4).

Mechanism A (default): `open_tree(OPEN_TREE_CLONE|AT_RECURSIVE)` of the host path in this
process, then in a forked single-threaded child `setns()` into the builder's mount namespace,
create the mount point `/nix/store/<name>` (directory, empty file, or the symlink itself) and
`move_mount()` the cloned tree onto it. One fork serves a whole batch.

Mechanism B (fallback: no open_tree/move_mount, or no process in the sandbox yet): a hard-link
farm under `<chroot_root>/nix/store/<name>`, which *is* the sandbox's `/nix/store` directory.

A target that already exists in the sandbox and was put there neither by Nix (an input) nor by
this view is refused: the builder may write into `/nix/store` and could pre-plant a fake path.

Root acts here only on what the builder cannot change (docs/security.md): the mount namespace
is pinned by fd at the first sighting of a sandboxed process (held by pidfd, see
`recnix.sandbox.sandboxproc`) and never re-read from whichever process connects; inside it, every
entry is made relative to a descriptor of `/nix/store` opened without following symlinks and
checked, by device and inode, to be the host's `<chroot_root>/nix/store`. A builder that
mounts something over `/nix/store` in the namespace gets a refusal, never a root write there.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import signal
import stat
import time
from collections.abc import Iterable
from pathlib import Path

from recnix.formats.storepath import InvalidStorePath, validate_store_path
from recnix.sandbox.sandboxproc import NamespaceId, SandboxProcess, sandbox_pids

# x86-64 / generic syscall numbers (identical on all architectures since Linux 5.2).
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
CLONE_NEWNS = 0x20000
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8
MOUNT_BATCH = 256  # open_tree fds held at once (one fork per batch)
NAMESPACE_HELPER_TIMEOUT = 30.0  # seconds the forked namespace helper may take
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# the helper's step names for failures before any action
STEP_SETNS = "setns"
STEP_STORE = "store"

MECHANISM_MOUNT = "mount"
MECHANISM_LINK = "link"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class MaterialiseError(Exception):
    """A store path could not be made visible in the sandbox (message names path and reason)."""


def peer_in_sandbox(pid: int, chroot_root: Path) -> bool:
    """True if process `pid` runs inside the sandbox whose root on the host is `chroot_root`.

    After Nix's `pivot_root` + `chroot(".")`, `/proc/<pid>/root` of every sandboxed process
    resolves to the chroot directory (same st_dev/st_ino as `chroot_root` seen from the host).
    The pid is held by a pidfd while it is looked at, so a reused pid cannot pass.
    """
    proc = SandboxProcess.from_pid(pid, chroot_root)
    if proc is None:
        return False
    proc.close()
    return True


def find_sandbox_pid(chroot_root: Path) -> int | None:
    """A live process inside the sandbox rooted at `chroot_root` (the one that started
    first: see `sandbox_pids`), or None."""
    pids = sandbox_pids(chroot_root)
    return pids[0] if pids else None


def _open_store_below(root: str | Path) -> int:
    """A descriptor of `<root>/nix/store`, opened component by component without following
    symlinks (OSError if any of them is missing or not a directory)."""
    fd = os.open(root, _OPEN_DIR)
    try:
        for part in ("nix", "store"):
            next_fd = os.open(part, _OPEN_DIR, dir_fd=fd)
            os.close(fd)
            fd = next_fd
        return fd
    except BaseException:
        os.close(fd)
        raise


def store_dir_id(chroot_root: Path) -> NamespaceId | None:
    """(st_dev, st_ino) of the host's `<chroot_root>/nix/store` (see `_open_store_below`);
    None if it is not there."""
    try:
        fd = _open_store_below(chroot_root)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        return (st.st_dev, st.st_ino)
    finally:
        os.close(fd)


def _open_tree(path: str) -> int:
    """Clone the mount tree at `path` (detached); returns an fd or raises OSError."""
    fd = _libc.syscall(
        ctypes.c_long(SYS_OPEN_TREE),
        ctypes.c_int(AT_FDCWD),
        ctypes.c_char_p(path.encode()),
        ctypes.c_uint(OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE),
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


def _read_child(fd: int, pid: int, timeout: float) -> bytes:
    """What the helper ``pid`` writes to ``fd`` until it closes it; the helper is killed
    (and the batch fails) if it takes longer than ``timeout`` seconds."""
    import select

    chunks = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(0.0, left))
        if not ready:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # our own child, not yet reaped: pid is safe
            chunks.append(b"-1 timeout %d\n" % errno.ETIMEDOUT)
            return b"".join(chunks)
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _open_store_dir(store_id: NamespaceId) -> int:
    """In the helper (after setns): `/nix/store` of the namespace, walked from its root
    without following symlinks, if it is the host's `<chroot>/nix/store` (device and
    inode ``store_id``); OSError(EXDEV) if it is anything else."""
    fd = _open_store_below("/")
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != store_id:
        os.close(fd)
        raise OSError(errno.EXDEV, "not the sandbox's store directory")
    return fd


def _run_in_namespace(
    ns_fd: int, store_id: NamespaceId, actions: list[tuple]
) -> list[tuple[int, str, int]]:
    """Fork a child that joins mount namespace `ns_fd` and runs `actions` in order, each
    relative to the namespace's `/nix/store` once it is verified to be the directory
    `store_id` (the host's `<chroot>/nix/store`): no path outside it is ever touched.

    Each action is `(kind, name_bytes, arg)` with `name_bytes` a single store entry name:
    `("dir"|"file", n, tree_fd)` creates the mount point and moves the tree;
    `("symlink", n, target_bytes)` creates a symlink; `("umount", n, None)` detaches a
    mount (the name not followed); `("rmdir"|"unlink", n, None)` removes an entry.
    The child stops at the first failure (except for "umount", which carries on). Returns
    `(index, step, errno)` records: step "ok" for each action done, or the failed step;
    index -1 for a failure before any action (step "setns", "store" or "timeout").
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: single-threaded; only syscalls, then _exit
        code = 0
        try:
            os.close(read_fd)
            if _libc.setns(ns_fd, CLONE_NEWNS) != 0:
                os.write(write_fd, b"-1 %s %d\n" % (STEP_SETNS.encode(), ctypes.get_errno()))
                os._exit(1)
            try:
                store_fd = _open_store_dir(store_id)
                os.fchdir(store_fd)  # every name below is relative to the verified directory
            except OSError as e:
                os.write(write_fd, b"-1 %s %d\n" % (STEP_STORE.encode(), e.errno or 0))
                os._exit(1)
            for i, (kind, name, arg) in enumerate(actions):
                step = kind
                try:
                    if b"/" in name or name in (b"", b".", b".."):
                        raise OSError(errno.EINVAL, "not a store entry name")
                    if kind in ("dir", "file"):
                        step = "mkdir" if kind == "dir" else "create"
                        if kind == "dir":
                            os.mkdir(name, 0o555)
                        else:
                            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                            os.close(os.open(name, flags | os.O_CLOEXEC, 0o444))
                        step = "move_mount"
                        r = _libc.syscall(
                            ctypes.c_long(SYS_MOVE_MOUNT),
                            ctypes.c_int(arg),
                            ctypes.c_char_p(b""),
                            ctypes.c_int(AT_FDCWD),
                            ctypes.c_char_p(name),
                            ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH),
                        )
                        if r != 0:
                            raise OSError(ctypes.get_errno(), "move_mount")
                    elif kind == "symlink":
                        os.symlink(arg, name)
                    elif kind == "umount":
                        if _libc.umount2(name, MNT_DETACH | UMOUNT_NOFOLLOW) != 0:
                            raise OSError(ctypes.get_errno(), "umount2")
                    elif kind == "rmdir":
                        os.rmdir(name)
                    elif kind == "unlink":
                        os.unlink(name)
                except OSError as e:
                    os.write(write_fd, b"%d %s %d\n" % (i, step.encode(), e.errno or 0))
                    code = 1
                    if kind == "umount":
                        continue  # undo as much as possible
                    break
                os.write(write_fd, b"%d ok 0\n" % i)
        except BaseException:
            code = 2
        os._exit(code)
    os.close(write_fd)
    try:
        output = _read_child(read_fd, pid, NAMESPACE_HELPER_TIMEOUT)
    finally:
        os.close(read_fd)
        os.waitpid(pid, 0)
    records = []
    for line in output.decode().splitlines():
        index, step, err = line.split()
        records.append((int(index), step, int(err)))
    return records


def _link_farm(source: str, target: str) -> None:
    """Recreate `source` at `target` with hard links (copies across filesystems)."""
    st = os.lstat(source)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(source), target)
    elif stat.S_ISREG(st.st_mode):
        try:
            os.link(source, target, follow_symlinks=False)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            shutil.copy2(source, target, follow_symlinks=False)
    elif stat.S_ISDIR(st.st_mode):
        os.mkdir(target, 0o700)
        for entry in sorted(os.listdir(source)):
            _link_farm(os.path.join(source, entry), os.path.join(target, entry))
        os.chmod(target, stat.S_IMODE(st.st_mode))
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    else:
        raise OSError(errno.EINVAL, "not a regular file, directory or symlink", source)


class SandboxView:
    """What this service made visible inside one build's sandbox, and how to undo it."""

    def __init__(
        self,
        chroot_root: Path | str,
        builder_pid: int | None = None,
        known_present: Iterable[str] = (),
        mechanism: str | None = None,
    ) -> None:
        """`chroot_root`: the pre-build hook's argv[2]; `builder_pid`: a process known to run
        in the sandbox (its mount namespace is pinned at the first mount); `known_present`:
        paths Nix put there (the build's input closure); `mechanism`: None = mount with link
        fallback, `"mount"` or `"link"` to force one.

        Made before the builder starts (pre-build hook), it records the host's
        `<chroot_root>/nix/store` by device and inode: the one directory it writes into."""
        if mechanism not in (None, MECHANISM_MOUNT, MECHANISM_LINK):
            raise ValueError(f"unknown mechanism {mechanism!r}")
        self.chroot_root = Path(chroot_root)
        self.builder_pid = builder_pid
        self.known_present = set(known_present)
        self.forced_mechanism = mechanism
        self.materialised: dict[str, str] = {}  # store path -> mechanism used
        self._mount_unavailable = False
        self.store_id = store_dir_id(self.chroot_root)
        # the sandbox's mount namespace, pinned at its first sighting: (fd, identity)
        self._namespace: tuple[int, NamespaceId] | None = None

    # --- the sandbox's mount namespace ----------------------------------------------------

    def pin(self, proc: SandboxProcess) -> bool:
        """Pin the mount namespace of ``proc`` (a process verified to be in the sandbox) if
        none is pinned yet; True if ``proc`` is in the pinned namespace. A client whose
        namespace differs (the builder made one of its own) is not served by this view."""
        if self._namespace is None:
            ns = proc.mount_namespace()
            if ns is None:
                return False
            self._namespace = ns
            self.builder_pid = proc.pid
            return True
        return proc.mount_namespace_id() == self._namespace[1]

    def _pinned_namespace(self) -> int | None:
        """The pinned namespace's fd, pinning it now from `builder_pid` or any sandboxed
        process if nothing was pinned yet; None if no process runs in the sandbox."""
        if self._namespace is None:
            candidates = [self.builder_pid] if self.builder_pid is not None else []
            candidates += sandbox_pids(self.chroot_root)
            for pid in candidates:
                proc = SandboxProcess.from_pid(pid, self.chroot_root)
                if proc is None:
                    continue
                with proc:
                    if self.pin(proc):
                        break
        return self._namespace[0] if self._namespace is not None else None

    def close(self) -> None:
        """Release the pinned namespace."""
        if self._namespace is not None:
            with contextlib.suppress(OSError):
                os.close(self._namespace[0])
            self._namespace = None

    # --- queries --------------------------------------------------------------------------

    def _host_target(self, store_path: str) -> str:
        return str(self.chroot_root) + store_path

    def sandbox_pid(self) -> int | None:
        """A live process inside the sandbox: the recorded one if still there, else any."""
        if self.builder_pid is not None and peer_in_sandbox(self.builder_pid, self.chroot_root):
            return self.builder_pid
        pid = find_sandbox_pid(self.chroot_root)
        if pid is not None:
            self.builder_pid = pid
        return pid

    def is_alive(self) -> bool:
        """True while the chroot directory exists and some process runs inside it."""
        return self.chroot_root.is_dir() and self.sandbox_pid() is not None

    def visible(self, store_path: str) -> bool:
        """True if `store_path` exists (as a file, directory or symlink) inside the sandbox
        (for tests and diagnostics: it looks through the builder's own view)."""
        pid = self.sandbox_pid() if self.chroot_root.is_dir() else None
        if pid is not None:
            probe = f"/proc/{pid}/root{store_path}"  # resolves in the builder's namespace
        else:
            probe = self._host_target(store_path)
        return os.path.lexists(probe)

    # --- materialisation ------------------------------------------------------------------

    def materialise(self, store_path: str) -> None:
        """Make `store_path` visible inside the sandbox; MaterialiseError on any problem."""
        self.materialise_many([store_path])

    def materialise_many(self, store_paths: Iterable[str]) -> None:
        """Make every path visible (one namespace switch for the batch); idempotent."""
        todo: list[str] = []
        for path in dict.fromkeys(store_paths):
            try:
                validate_store_path(path)
            except InvalidStorePath as e:
                raise MaterialiseError(f"cannot materialise {path!r}: {e}") from None
            if path in self.materialised:
                continue
            if not os.path.lexists(path):
                raise MaterialiseError(f"cannot materialise {path}: it does not exist on the host")
            if os.path.lexists(self._host_target(path)):
                if path in self.known_present:
                    continue  # an input: Nix put it there
                raise MaterialiseError(
                    f"cannot materialise {path}: it already exists in the sandbox "
                    f"but was not put there by Nix or recnix (pre-planted by the builder?)"
                )
            todo.append(path)
        if not todo:
            return
        self._check_store_dir(todo[0])
        if self.forced_mechanism is None:
            # Regular files (.drv files, text adds) are hard-linked from the host,
            # as Nix itself does for non-directory inputs: no namespace switch.
            files = [p for p in todo if stat.S_ISREG(os.lstat(p).st_mode)]
            for path in files:
                self._link_path(path)
            todo = [p for p in todo if p not in files]
            if not todo:
                return
        if self.forced_mechanism != MECHANISM_LINK and not self._mount_unavailable:
            ns_fd = self._pinned_namespace()
            if ns_fd is not None:
                mounted_all = True
                for start in range(0, len(todo), MOUNT_BATCH):
                    if not self._mount_paths(ns_fd, todo[start : start + MOUNT_BATCH]):
                        mounted_all = False
                        todo = todo[start:]
                        break
                if mounted_all:
                    return
            elif self.forced_mechanism == MECHANISM_MOUNT:
                raise MaterialiseError(
                    f"cannot materialise {todo[0]}: no process runs in sandbox {self.chroot_root}"
                )
        for path in todo:
            self._link_path(path)

    def _check_store_dir(self, path: str) -> None:
        """Refuse unless the host's `<chroot>/nix/store` is still the directory recorded
        when the view was made (the sandbox is gone, or something replaced it)."""
        if not self.chroot_root.is_dir():
            raise MaterialiseError(f"cannot materialise {path}: sandbox {self.chroot_root} is gone")
        now = store_dir_id(self.chroot_root)
        if self.store_id is None:
            self.store_id = now
        if now is None or now != self.store_id:
            raise MaterialiseError(
                f"cannot materialise {path}: {self.chroot_root}/nix/store is not the "
                "sandbox's store directory recnix recorded before the build started"
            )

    def _mount_paths(self, ns_fd: int, paths: list[str]) -> bool:
        """Mechanism A. False if the syscalls are unavailable (caller falls back)."""
        assert self.store_id is not None  # _check_store_dir ran
        tree_fds: list[int] = []
        actions: list[tuple] = []
        try:
            for path in paths:
                name = os.path.basename(path).encode()
                st = os.lstat(path)
                if stat.S_ISLNK(st.st_mode):
                    actions.append(("symlink", name, os.readlink(path).encode()))
                    continue
                kind = "dir" if stat.S_ISDIR(st.st_mode) else "file"
                try:
                    fd = _open_tree(path)
                except OSError as e:
                    if e.errno == errno.ENOSYS and self.forced_mechanism is None:
                        self._mount_unavailable = True
                        return False
                    raise MaterialiseError(
                        f"cannot materialise {path}: open_tree failed: {e.strerror}"
                    ) from None
                tree_fds.append(fd)
                actions.append((kind, name, fd))
            records = _run_in_namespace(ns_fd, self.store_id, actions)
        finally:
            for fd in tree_fds:
                os.close(fd)
        done = 0
        for index, step, err in records:
            if step == "ok":
                self.materialised[paths[index]] = MECHANISM_MOUNT
                done += 1
                continue
            if index < 0:
                raise MaterialiseError(_helper_failure(paths[0], step, err))
            path = paths[index]
            if err == errno.EEXIST:
                reason = "it already exists in the sandbox (pre-planted by the builder?)"
            else:
                reason = f"{step} failed: {os.strerror(err)}"
                if step == "move_mount":
                    self.materialised[path] = MECHANISM_MOUNT  # remove the mount point later
            raise MaterialiseError(f"cannot materialise {path}: {reason}")
        if done != len(paths):
            raise MaterialiseError(
                f"cannot materialise {paths[done]}: namespace helper died unexpectedly"
            )
        return True

    def _link_path(self, path: str) -> None:
        """Mechanism B: hard-link farm under chroot_root/nix/store."""
        target = self._host_target(path)
        try:
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode):
                os.mkdir(target, 0o700)  # EEXIST here means someone raced us: refuse
                self.materialised[path] = MECHANISM_LINK
                for entry in sorted(os.listdir(path)):
                    _link_farm(os.path.join(path, entry), os.path.join(target, entry))
                os.chmod(target, stat.S_IMODE(st.st_mode))
                os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
            else:
                _link_farm(path, target)
                self.materialised[path] = MECHANISM_LINK
        except FileExistsError:
            raise MaterialiseError(
                f"cannot materialise {path}: it already exists in the sandbox "
                f"(pre-planted by the builder?)"
            ) from None
        except OSError as e:
            raise MaterialiseError(f"cannot materialise {path}: {e}") from None

    # --- cleanup --------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Undo every mount and link farm this view made; safe if the sandbox is gone."""
        mounted = [p for p, m in self.materialised.items() if m == MECHANISM_MOUNT]
        if mounted and self._namespace is not None and self.store_id is not None:
            actions = [
                ("umount", os.path.basename(p).encode(), None)
                for p in mounted
                if not os.path.islink(self._host_target(p))
            ]
            if actions and self.chroot_root.is_dir():
                _run_in_namespace(self._namespace[0], self.store_id, actions)
        for path, mechanism in list(self.materialised.items()):
            target = self._host_target(path)
            try:
                if mechanism == MECHANISM_LINK and os.path.isdir(target):
                    if not os.path.islink(target):
                        shutil.rmtree(target)
                elif os.path.isdir(target) and not os.path.islink(target):
                    os.rmdir(target)  # a mount point: never recurse into what may be mounted
                else:
                    os.unlink(target)
            except FileNotFoundError:
                pass
            except OSError as e:
                if self.chroot_root.is_dir():
                    raise MaterialiseError(f"cannot remove {target}: {e.strerror}") from None
            del self.materialised[path]
        self.close()


def _helper_failure(path: str, step: str, err: int) -> str:
    """The message for a namespace helper that failed before its first action."""
    if step == STEP_STORE:
        return (
            f"cannot materialise {path}: /nix/store in the build's mount namespace is not "
            "the sandbox's store directory (the builder covered or replaced it"
            + ("" if err == errno.EXDEV else f": {os.strerror(err)}")
            + "), so recnix will not write there"
        )
    if step == "timeout":
        return (
            f"cannot materialise {path}: the namespace helper took longer than "
            f"{NAMESPACE_HELPER_TIMEOUT:.0f} s and was killed"
        )
    return f"cannot materialise {path}: {step} into the build's namespace: {os.strerror(err)}"


__all__ = [
    "MaterialiseError",
    "SandboxView",
    "find_sandbox_pid",
    "peer_in_sandbox",
]
