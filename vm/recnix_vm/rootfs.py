"""Per-version root filesystems: the host tier against another Debian's Nix, at native speed.

A suite's mmdebstrap tarball (:func:`recnix_vm.image.build_base`, the one its
VM guests boot from) is unpacked once under ``<cache>/rootfs/<suite>-<key>/``
and adjusted there:

* the ``nixbld`` group and users move to a uid/gid range of their own
  (:data:`UID_BASES`): Nix kills every process of a build user's uid before
  and after each build, so two Nix instances sharing uids but not
  ``/nix/var/nix/userpool`` would kill each other's builders;
* ``/opt/recnix-venv`` is a virtualenv over the suite's own Python and its
  Debian test packages, whose ``.pth`` names the recnix source tree (bind-mounted
  at the same path), with ``bin/recnix``, the hooks and ``bin/pytest`` as
  ``pip install -e`` would make them.

Each root filesystem has its own ``/nix`` (store, database, daemon state).
:func:`command` gives the argv that runs a command inside: a new mount namespace
(``unshare --mount``), the root filesystem bound onto itself, a fresh ``/proc``,
``/dev`` and ``/sys`` bound in, and ``pivot_root`` into it. It is a real root,
not a ``chroot``: entering a build's mount namespace with ``setns`` resets a
process's root to that namespace's, which for a chrooted recnix service would
be the outer machine's filesystem.

``python -m recnix_vm.rootfs --suite sid -- CMD ARGS...`` runs one command.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from recnix.config.names import HOOK_PROGRAMS

from . import lix
from .cachelock import cache_lock
from .image import ImageError, Suite, base_key, build_base, cache_dir, get_suite
from .log import log, nested

# First uid (and the gid) of each suite's build users: far from Debian's
# system range (the host's nixbld users) and from each other (the Lix tarball's
# own checks used 34001.. and 34101..).
UID_BASES = {"trixie": 31000, "sid": 32000, "lix": 33000}
VENV = "/opt/recnix-venv"
OLD_ROOT = "/.oldroot"
HOST_ROOT = "/.host"  # the host's root filesystem, read-only, inside every rootfs
SUITE_ENV = "RECNIX_SUITE"  # set inside: which suite's rootfs this is
ROOTS_ENV = "RECNIX_VERSION_ROOTS"  # suite=path,... : every suite's root as seen from here
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_STAMP = ".recnix-rootfs-ready"


def source_tree() -> Path:
    """The recnix working tree (the directory holding ``recnix/`` and ``vm/``)."""
    return Path(__file__).resolve().parents[2]


def git_common_dir(src: Path) -> Path | None:
    """The git directory of a worktree whose ``.git`` is a file pointing outside it."""
    dot_git = src / ".git"
    if not dot_git.is_file():
        return None
    gitdir = Path(dot_git.read_text().removeprefix("gitdir:").strip())
    common = gitdir / "commondir"
    if common.is_file():
        return (gitdir / common.read_text().strip()).resolve()
    return gitdir


def rootfs_dir(suite: Suite, cache: Path | None = None) -> Path:
    """Where ``suite``'s root filesystem is (or will be) unpacked (the lix suite's name
    has the Lix tarball's hash too; LixUnavailable when there is no tarball)."""
    name = f"{suite.name}-{base_key(suite)}"
    if suite.name == "lix":
        name += "-" + lix.find_tarball(source_tree()).key()
    return cache_dir(cache) / "rootfs" / name


def prepare(suite_name: str, cache: Path | None = None) -> Path:
    """Unpack (once) and adjust ``suite_name``'s root filesystem; return its directory."""
    suite = get_suite(suite_name)
    if suite.name not in UID_BASES:
        raise ImageError(
            f"suite {suite.name} is the host's own: run its host tier natively "
            f"(rootfs suites: {', '.join(UID_BASES)})"
        )
    cache = cache_dir(cache)
    root = rootfs_dir(suite, cache)
    with cache_lock(cache, f"rootfs-{root.name}"):
        _unpack(suite, root, cache)
        _install_venv(root)
    return root


def _unpack(suite: Suite, root: Path, cache: Path) -> None:
    """Unpack ``suite``'s base tarball into ``root`` and adjust it, unless done before."""
    if not (root / _STAMP).exists():
        base = build_base(cache, suite)
        partial = root.with_name(root.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        with nested(f"unpacking the {suite.name} rootfs into {root}"):
            _run(["tar", "--numeric-owner", "-xpf", str(base), "-C", str(partial)])
            _move_build_users(partial, UID_BASES[suite.name])
            for d in (OLD_ROOT, HOST_ROOT):
                (partial / d.lstrip("/")).mkdir(exist_ok=True)
            if suite.name == "lix":
                _install_lix(partial, lix.find_tarball(source_tree()))
            (partial / _STAMP).write_text(base.name + "\n")
        shutil.rmtree(root, ignore_errors=True)
        partial.rename(root)


def _run(argv: list[str], **kwargs: object) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)
    if result.returncode != 0:
        raise ImageError(
            f"{shlex.join(argv)} exited with {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result.stdout


def _install_lix(root: Path, tarball: lix.LixTarball) -> None:
    """Replace Debian's Nix in ``root`` by Lix from ``tarball`` (no other Nix on PATH)."""
    with nested(f"installing Lix {tarball.version} from {tarball.tarball}"):
        _run(["tar", "--numeric-owner", "-xJf", str(tarball.tarball), "-C", str(root)])
        installed = _run(
            command(root, ["dpkg-query", "-W", "-f", "${Package} ${Status}\\n"])
        ).splitlines()
        present = {line.split()[0] for line in installed if line.endswith(" installed")}
        missing = [p for p in tarball.runtime_packages if p not in present]
        if missing:
            env = {"DEBIAN_FRONTEND": "noninteractive"}
            apt = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
            _run(command(root, apt, env=env))
        # Debian's nix-bin goes (its libraries and nix-setup-systemd's users stay)
        _run(command(root, ["dpkg", "--purge", "--force-depends", "nix-bin"]))
        _run(command(root, ["ldconfig"]))
        shutil.rmtree(root / "nix/var/nix/db", ignore_errors=True)
        (root / "etc/nix").mkdir(parents=True, exist_ok=True)
        (root / "etc/nix/nix.conf").write_text(lix.NIX_CONF)
        version = _run(command(root, ["nix", "--version"])).splitlines()[0]
        if "Lix" not in version:
            raise ImageError(f"after installing Lix, `nix --version` printed {version!r}")
        log(version)


def _move_build_users(root: Path, uid_base: int) -> None:
    """Give the rootfs's nixbld group gid ``uid_base`` and nixbldN uid ``uid_base + N``."""
    group_file, passwd_file = root / "etc/group", root / "etc/passwd"
    old_gid = None
    lines = []
    for line in group_file.read_text().splitlines():
        fields = line.split(":")
        if fields[0] == "nixbld":
            old_gid = int(fields[2])
            fields[2] = str(uid_base)
        lines.append(":".join(fields))
    if old_gid is None:
        raise ImageError(f"{group_file} has no nixbld group (is nix-setup-systemd installed?)")
    group_file.write_text("\n".join(lines) + "\n")
    lines = []
    moved = 0
    for line in passwd_file.read_text().splitlines():
        fields = line.split(":")
        if fields[0].startswith("nixbld") and fields[0][6:].isdigit():
            fields[2] = str(uid_base + int(fields[0][6:]))
            fields[3] = str(uid_base)
            moved += 1
        lines.append(":".join(fields))
    if not moved:
        raise ImageError(f"{passwd_file} has no nixbldN users")
    passwd_file.write_text("\n".join(lines) + "\n")
    for path in (root / "nix").rglob("*"):
        if not path.is_symlink() and path.lstat().st_gid == old_gid:
            os.chown(path, -1, uid_base)
    log(f"moved {moved} build users to uids {uid_base + 1}.. (gid {uid_base})")


def _install_venv(root: Path) -> None:
    """(Re)write /opt/recnix-venv: the suite's python, the source tree on its path, the scripts."""
    venv = root / VENV.lstrip("/")
    if not (venv / "bin/python3").exists():
        make_venv = ["python3", "-m", "venv", "--system-site-packages", "--without-pip", VENV]
        _run(command(root, make_venv))
    site = sorted(venv.glob("lib/python3*/site-packages"))
    if not site:
        raise ImageError(f"{venv} has no lib/python3*/site-packages")
    src = source_tree()
    (site[0] / "recnix-src.pth").write_text(f"{src}\n{src / 'vm'}\n")
    scripts = {
        "recnix": "from recnix.cli.main import main",
        "recnix-vm": "from recnix_vm.cli import main",
        "pytest": "from pytest import main",
    }
    for name, import_line in scripts.items():
        text = f"#!{VENV}/bin/python3\nimport sys\n{import_line}\nsys.exit(main())\n"
        _write_if_changed(venv / "bin" / name, text)
    for name in HOOK_PROGRAMS:  # recnix-post-build-hook: the pre-build hook's text
        _write_if_changed(venv / "bin" / name, (src / "bin" / name).read_text())


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    path.chmod(0o755)


def version_roots(inside: str | None) -> dict[str, str]:
    """Every suite's root filesystem as seen from ``inside`` (a suite's rootfs; None: the host).

    Roots that are not unpacked yet are left out.
    """
    prefix = HOST_ROOT if inside else ""
    roots = {"bookworm": prefix or "/"}
    for name in UID_BASES:
        try:
            path = rootfs_dir(get_suite(name))
        except lix.LixUnavailable:
            continue
        if (path / _STAMP).exists():
            roots[name] = prefix + str(path)
    return roots


def command(
    root: Path,
    argv: list[str],
    env: dict[str, str] | None = None,
    cwd: str | None = None,
) -> list[str]:
    """The argv that runs ``argv`` as root inside ``root`` (own mount namespace, pivot_root).

    The source tree is bound at its own path (read-write), its git directory
    and Nix's test fixtures (:func:`fixtures_dir`) read-only at theirs, the
    host's root filesystem read-only at ``/.host``. ``env`` is the whole environment inside,
    added to a minimal one (PATH with the venv first, HOME, the suite's name).
    """
    suite = root.name.split("-")[0]
    src = str(source_tree())
    fixtures = fixtures_dir()
    inner_env = {
        "PATH": f"{VENV}/bin:{SYSTEM_PATH}",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "TERM": os.environ.get("TERM", "dumb"),
        SUITE_ENV: suite,
        ROOTS_ENV: ",".join(f"{k}={v}" for k, v in version_roots(suite).items()),
        **({"RECNIX_FIXTURES": str(fixtures)} if fixtures else {}),
        **(env or {}),
    }
    r = shlex.quote(str(root))
    script = "\n".join(
        [
            "set -e",
            f"mount --bind {r} {r}",
            f"mount -t proc proc {r}/proc",
            f"mount --rbind /dev {r}/dev",
            f"mount --rbind /sys {r}/sys",
            f"mkdir -p {r}{shlex.quote(src)}",
            f"mount --bind {shlex.quote(src)} {r}{shlex.quote(src)}",
            *_git_binds(r, src),
            *(_ro_bind(r, fixtures) if fixtures else []),
            f"mount --bind / {r}{HOST_ROOT}",
            f"mount -o remount,bind,ro {r}{HOST_ROOT}",
            f"cd {r}",
            f"pivot_root . .{OLD_ROOT}",
            "cd /",
            f"umount -l {OLD_ROOT}",
            f"cd {shlex.quote(cwd or src)}",
            'exec "$@"',
        ]
    )
    env_args = [f"{k}={v}" for k, v in inner_env.items()]
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "/bin/sh",
        "-c",
        script,
        "recnix-rootfs",
        "/usr/bin/env",
        "-i",
        *env_args,
        *argv,
    ]


def fixtures_dir() -> Path | None:
    """Nix's upstream test fixtures the unit tier reads (``$RECNIX_FIXTURES``, else
    ``../shared/fixtures/nix-upstream`` next to the tree), resolved; None if absent."""
    default = source_tree().parent / "shared/fixtures/nix-upstream"
    path = Path(os.environ.get("RECNIX_FIXTURES") or default).resolve()
    return path if path.is_dir() else None


def _ro_bind(r: str, path: Path) -> list[str]:
    p = shlex.quote(str(path))
    return [f"mkdir -p {r}{p}", f"mount --bind {p} {r}{p}", f"mount -o remount,bind,ro {r}{p}"]


def _git_binds(r: str, src: str) -> list[str]:
    """Shell lines binding a worktree's git directory (read-only), so git works inside."""
    git = git_common_dir(Path(src))
    if git is None or Path(src) in git.parents:
        return []
    return _ro_bind(r, git)


def main(argv: list[str] | None = None) -> int:
    """``python -m recnix_vm.rootfs --suite SUITE [-- CMD ARGS...]``: run CMD (default: a shell)."""
    parser = argparse.ArgumentParser(
        prog="python -m recnix_vm.rootfs",
        description="Run a command as root inside a suite's root filesystem "
        "(own mount namespace, pivot_root; its own Nix and /nix store).",
    )
    parser.add_argument("--suite", required=True, choices=sorted(UID_BASES))
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("command", nargs="*", default=["/bin/bash"])
    args = parser.parse_args(argv)
    try:
        root = prepare(args.suite, args.cache)
    except ImageError as e:
        print(f"recnix_vm.rootfs: {e}", file=sys.stderr)
        return 1
    return subprocess.call(command(root, args.command))


if __name__ == "__main__":
    sys.exit(main())
