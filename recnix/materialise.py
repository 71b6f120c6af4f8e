"""Make host store paths appear inside a running build sandbox (DESIGN step 4, NI §3.4).

Mechanism A (default): `open_tree(OPEN_TREE_CLONE|AT_RECURSIVE)` of the host path in this
process, then in a forked single-threaded child `setns()` into the builder's mount namespace,
create the mount point `/nix/store/<name>` (directory, empty file, or the symlink itself) and
`move_mount()` the cloned tree onto it. One fork serves a whole batch.

Mechanism B (fallback: no open_tree/move_mount, or no process in the sandbox yet): a hard-link
farm under `<chroot_root>/nix/store/<name>`, which *is* the sandbox's `/nix/store` directory.

A target that already exists in the sandbox and was put there neither by Nix (an input) nor by
this view is refused: the builder may write into `/nix/store` and could pre-plant a fake path.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path

from recnix.storepath import InvalidStorePath, validate_store_path

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
MOUNT_BATCH = 256  # open_tree fds held at once (one fork per batch)

MECHANISM_MOUNT = "mount"
MECHANISM_LINK = "link"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class MaterialiseError(Exception):
    """A store path could not be made visible in the sandbox (message names path and reason)."""


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def peer_in_sandbox(pid: int, chroot_root: Path) -> bool:
    """True if process `pid` runs inside the sandbox whose root on the host is `chroot_root`.

    After Nix's `pivot_root` + `chroot(".")`, `/proc/<pid>/root` of every sandboxed process
    resolves to the chroot directory (same st_dev/st_ino as `chroot_root` seen from the host).
    """
    try:
        return _same_file(os.stat(f"/proc/{pid}/root"), os.stat(chroot_root))
    except OSError:
        return False


def find_sandbox_pid(chroot_root: Path) -> int | None:
    """A live process inside the sandbox rooted at `chroot_root`, or None: the one that
    started first (the builder, which outlives its children), not the lowest pid: pids
    wrap (pid_max may be 32768), and a short-lived child of the builder can have a lower
    pid than the builder and be gone by the time its namespace is entered."""
    try:
        want = os.stat(chroot_root)
    except OSError:
        return None
    found: list[tuple[int, int]] = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        try:
            if _same_file(os.stat(f"/proc/{pid}/root"), want):
                found.append((_start_time(pid), pid))
        except (OSError, ValueError):
            continue
    return min(found)[1] if found else None


def _start_time(pid: int) -> int:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[19])


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


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _run_in_namespace(ns_fd: int, actions: list[tuple]) -> list[tuple[int, str, int]]:
    """Fork a child that joins mount namespace `ns_fd` and runs `actions` in order.

    Each action is `(kind, path_bytes, arg)`: `("dir"|"file", p, tree_fd)` creates the mount
    point and moves the tree; `("symlink", p, target_bytes)` creates a symlink;
    `("umount", p, None)` detaches a mount; `("rmdir"|"unlink", p, None)` removes an entry.
    The child stops at the first failure (except for "umount", which carries on). Returns
    `(index, step, errno)` records: step "ok" for each action done, or the failed step.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: single-threaded; only syscalls, then _exit
        code = 0
        try:
            os.close(read_fd)
            if _libc.setns(ns_fd, CLONE_NEWNS) != 0:
                os.write(write_fd, b"-1 setns %d\n" % ctypes.get_errno())
                os._exit(1)
            for i, (kind, path, arg) in enumerate(actions):
                step = kind
                try:
                    if kind in ("dir", "file"):
                        step = "mkdir" if kind == "dir" else "create"
                        if kind == "dir":
                            os.mkdir(path, 0o555)
                        else:
                            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                            os.close(os.open(path, flags | os.O_CLOEXEC, 0o444))
                        step = "move_mount"
                        r = _libc.syscall(
                            ctypes.c_long(SYS_MOVE_MOUNT),
                            ctypes.c_int(arg),
                            ctypes.c_char_p(b""),
                            ctypes.c_int(AT_FDCWD),
                            ctypes.c_char_p(path),
                            ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH),
                        )
                        if r != 0:
                            raise OSError(ctypes.get_errno(), "move_mount")
                    elif kind == "symlink":
                        os.symlink(arg, path)
                    elif kind == "umount":
                        if _libc.umount2(path, MNT_DETACH) != 0:
                            raise OSError(ctypes.get_errno(), "umount2")
                    elif kind == "rmdir":
                        os.rmdir(path)
                    elif kind == "unlink":
                        os.unlink(path)
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
        output = _read_all(read_fd)
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
        """`chroot_root`: the pre-build hook's argv[2]; `known_present`: paths Nix put there
        (the build's input closure); `mechanism`: None = mount with link fallback,
        `"mount"` or `"link"` to force one."""
        if mechanism not in (None, MECHANISM_MOUNT, MECHANISM_LINK):
            raise ValueError(f"unknown mechanism {mechanism!r}")
        self.chroot_root = Path(chroot_root)
        self.builder_pid = builder_pid
        self.known_present = set(known_present)
        self.forced_mechanism = mechanism
        self.materialised: dict[str, str] = {}  # store path -> mechanism used
        self._mount_unavailable = False

    # --- queries --------------------------------------------------------------------------

    def _host_target(self, store_path: str) -> str:
        return str(self.chroot_root) + store_path

    def set_builder_pid(self, pid: int) -> None:
        """Record a process known to run in the sandbox (e.g. the first client's SO_PEERCRED)."""
        if not peer_in_sandbox(pid, self.chroot_root):
            raise MaterialiseError(f"process {pid} does not run in sandbox {self.chroot_root}")
        self.builder_pid = pid

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
        """True if `store_path` exists (as a file, directory or symlink) inside the sandbox."""
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
        if not self.chroot_root.is_dir():
            raise MaterialiseError(
                f"cannot materialise {todo[0]}: sandbox {self.chroot_root} is gone"
            )
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
            pid = self.sandbox_pid()
            if pid is not None:
                mounted_all = True
                for start in range(0, len(todo), MOUNT_BATCH):
                    if not self._mount_paths(pid, todo[start : start + MOUNT_BATCH]):
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

    def _mount_paths(self, pid: int, paths: list[str]) -> bool:
        """Mechanism A. False if the syscalls are unavailable (caller falls back)."""
        tree_fds: list[int] = []
        actions: list[tuple] = []
        try:
            for path in paths:
                st = os.lstat(path)
                if stat.S_ISLNK(st.st_mode):
                    actions.append(("symlink", path.encode(), os.readlink(path).encode()))
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
                actions.append((kind, path.encode(), fd))
            try:
                ns_fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise MaterialiseError(
                    f"cannot materialise {paths[0]}: builder {pid} is gone: {e.strerror}"
                ) from None
            try:
                if not peer_in_sandbox(pid, self.chroot_root):  # pid reused meanwhile?
                    raise MaterialiseError(
                        f"cannot materialise {paths[0]}: process {pid} left the sandbox"
                    )
                records = _run_in_namespace(ns_fd, actions)
            finally:
                os.close(ns_fd)
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
                raise MaterialiseError(
                    f"cannot materialise {paths[0]}: setns into builder {pid}: {os.strerror(err)}"
                )
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
        if mounted and self.chroot_root.is_dir():
            pid = self.sandbox_pid()
            if pid is not None:
                actions = [
                    ("umount", p.encode(), None)
                    for p in mounted
                    if not os.path.islink(self._host_target(p))
                ]
                try:
                    ns_fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    ns_fd = -1
                if ns_fd >= 0:
                    try:
                        if peer_in_sandbox(pid, self.chroot_root):
                            _run_in_namespace(ns_fd, actions)
                    finally:
                        os.close(ns_fd)
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


__all__ = [
    "MaterialiseError",
    "SandboxView",
    "find_sandbox_pid",
    "peer_in_sandbox",
]
