"""Put a Nix usable inside sandboxed builds into the store on a host that is not NixOS.

Debian's ``nix`` lives in ``/usr``, outside the store, so a build cannot run it.
``bundle_nix`` adds three things to the store, all content-addressed or
input-addressed, so a second run gives the same paths:

* ``busybox_store_path()``: Debian's static busybox as ``<path>/bin/busybox``
  plus a symlink per applet (``bin/sh``, ``bin/mkdir``, ...), a builder shell
  that needs nothing else;
* ``nix_files_store_path()``: the multi-call ``nix`` binary as
  ``libexec/nix`` with every library ``ldd`` lists (and the dynamic loader)
  in ``lib/``;
* the bundle itself, built by a tiny derivation so its wrapper scripts can
  name their own dependencies and the store records them as references:
  ``bin/nix``, ``bin/nix-build``, ... each
  ``exec <files>/lib/ld-linux-x86-64.so.2 --argv0 <name> --library-path <files>/lib
  <files>/libexec/nix "$@"`` under ``#!<busybox>/bin/sh``.

The Nix bundled is the ``nix`` found on ``PATH`` or the one given (``recnix
bundle-nix --nix PATH``), Nix or Lix: symlinks are followed to the multi-call
binary, and its version is parsed as each prints it (``recnix.cli.nixversion``).

Run once per machine (``recnix bundle-nix``), not per build.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from recnix.cli.nixversion import NixVersionError, parse_nix_version

BUSYBOX_BINARY = "/bin/busybox"
NIX_BINARY = "/usr/bin/nix"  # Debian's, when no nix is on PATH
BUSYBOX_NAME = "busybox-static"
NIX_FILES_NAME = "nix-files"
BUNDLE_NAME_FORMAT = "nix-{version}-bundle"
LOADER_NAME = "ld-linux-x86-64.so.2"
# Libraries Nix loads with dlopen (not listed by ldd); copied when present.
DLOPENED_LIBRARIES = ("libnss_dns.so.2", "libnss_files.so.2")
SYSTEM_LIBRARY_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu")
# Where Debian's nix-bin keeps Nix's own libraries (its RUNPATH), for a sysroot's nix.
NIX_LIBRARY_DIRS = ("/usr/lib/nix", "/usr/lib/x86_64-linux-gnu/nix")
# The names Debian's nix-bin links to the multi-call binary.
NIX_COMMANDS = (
    "nix",
    "nix-build",
    "nix-channel",
    "nix-collect-garbage",
    "nix-copy-closure",
    "nix-daemon",
    "nix-env",
    "nix-hash",
    "nix-instantiate",
    "nix-prefetch-url",
    "nix-shell",
    "nix-store",
)

_BUNDLE_EXPRESSION = r"""
{ busybox, files, name, commands }:
let
  bb = builtins.storePath busybox;
  nixFiles = builtins.storePath files;
in
derivation {
  inherit name;
  system = builtins.currentSystem;
  builder = "${bb}/bin/sh";
  args = [ "-e" "-c" ''
    ${bb}/bin/busybox mkdir -p $out/bin
    for c in ${commands}; do
      ${bb}/bin/busybox printf '#!%s\nexec %s --argv0 %s --library-path %s %s "$@"\n' \
        ${bb}/bin/sh ${nixFiles}/lib/ld-linux-x86-64.so.2 "$c" ${nixFiles}/lib \
        ${nixFiles}/libexec/nix > $out/bin/$c
      ${bb}/bin/busybox chmod 555 $out/bin/$c
    done
  '' ];
}
"""


class BundleError(RuntimeError):
    """A step of making the bundle failed (message names the command and its output)."""


def _run(argv: list[str], env: dict[str, str] | None) -> str:
    result = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BundleError(
            f"{' '.join(argv)} exited with {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result.stdout


def _client_env(nix_env: dict[str, str] | None) -> dict[str, str]:
    """``nix_env`` (default: this process's), the local store instead of a dead daemon
    socket (recnix.store.storeenv)."""
    from recnix.store.storeenv import client_env

    env = client_env(nix_env)
    env.setdefault("PATH", os.environ.get("PATH", "/usr/bin:/bin"))
    return env


def _store_add(directory: Path, nix_env: dict[str, str] | None) -> str:
    """``nix-store --add`` a directory; its basename becomes the store path's name."""
    out = _run(["nix-store", "--add", str(directory)], _client_env(nix_env)).strip()
    if not out.startswith("/nix/store/"):
        raise BundleError(f"nix-store --add printed {out!r}, not a store path")
    return out


def _sysroot_loader(sysroot: str) -> list[str]:
    """The dynamic loader of another root filesystem, told to find libraries only there."""
    dirs = [os.path.join(sysroot, d.lstrip("/")) for d in (*SYSTEM_LIBRARY_DIRS, *NIX_LIBRARY_DIRS)]
    loader = resolve_in(sysroot, os.path.join(sysroot, "lib64", LOADER_NAME))
    return [loader, "--library-path", ":".join(dirs)]


def resolve_in(sysroot: str, path: str, limit: int = 40) -> str:
    """``path`` (a host path below ``sysroot``) with its symlinks followed as they would
    be inside ``sysroot``: absolute targets are below ``sysroot`` too."""
    root = os.path.realpath(sysroot)
    inner = "/" + os.path.relpath(path, sysroot).lstrip("/")
    for _ in range(limit):
        parts = [p for p in inner.split("/") if p]
        for i in range(len(parts)):
            host = os.path.join(root, *parts[: i + 1])
            if os.path.islink(host):
                target = os.readlink(host)
                base = "/" + "/".join(parts[:i])
                rest = parts[i + 1 :]
                joined = target if target.startswith("/") else os.path.join(base, target)
                inner = os.path.normpath(os.path.join(joined, *rest))
                break
        else:
            return os.path.join(root, *parts)
    raise BundleError(f"{path}: too many levels of symbolic links inside {sysroot}")


def shared_libraries(binary: str, sysroot: str = "/") -> dict[str, str]:
    """Map each library name ``ldd`` lists for ``binary`` to its file on this host.

    The dynamic loader is included under ``LOADER_NAME``. With ``sysroot`` (another
    Debian's root filesystem, e.g. to bundle a different Nix version), ``binary`` is a
    path inside it and the libraries are resolved there, by its own loader.
    """
    if sysroot == "/":
        listing = _run(["ldd", binary], None)
    else:
        target = os.path.join(sysroot, binary.lstrip("/"))
        listing = _run([*_sysroot_loader(sysroot), "--list", target], None)
    libraries: dict[str, str] = {}
    for line in listing.splitlines():
        resolved = re.match(r"\s*(\S+) => (/\S+) \(0x[0-9a-f]+\)", line)
        if resolved:
            libraries[os.path.basename(resolved.group(1))] = resolved.group(2)
            continue
        loader = re.match(r"\s*(/\S+) \(0x[0-9a-f]+\)", line)
        if loader:
            libraries[os.path.basename(loader.group(1))] = loader.group(1)
            continue
        if "not found" in line:
            raise BundleError(f"ldd {binary}: a library is missing: {line.strip()}")
    if LOADER_NAME not in libraries:
        raise BundleError(f"ldd {binary} names no {LOADER_NAME}:\n{listing}")
    if sysroot != "/":
        libraries[LOADER_NAME] = os.path.join(sysroot, "lib64", LOADER_NAME)
        libraries = {n: resolve_in(sysroot, p) for n, p in libraries.items()}
        inside = sysroot.rstrip("/") + "/"
        outside = {n: p for n, p in libraries.items() if not p.startswith(inside)}
        if outside:
            raise BundleError(f"{binary} in {sysroot}: libraries found outside it: {outside}")
    return libraries


def busybox_store_path(
    nix_env: dict[str, str] | None = None, busybox_binary: str = BUSYBOX_BINARY
) -> str:
    """Add a static busybox to the store; return the path (``bin/sh``, one link per applet)."""
    applets = _run([busybox_binary, "--list"], None).split()
    with tempfile.TemporaryDirectory(prefix="recnix-busybox-") as scratch:
        bin_dir = Path(scratch, BUSYBOX_NAME, "bin")
        bin_dir.mkdir(parents=True)
        shutil.copyfile(busybox_binary, bin_dir / "busybox")
        (bin_dir / "busybox").chmod(0o555)
        for applet in sorted(set(applets) | {"sh"}):
            if applet != "busybox" and "/" not in applet:
                (bin_dir / applet).symlink_to("busybox")
        return _store_add(bin_dir.parent, nix_env)


def nix_files_store_path(
    nix_env: dict[str, str] | None = None, nix_binary: str = NIX_BINARY, sysroot: str = "/"
) -> str:
    """Add the nix binary (``libexec/nix``) and its libraries (``lib/``) to the store
    (``nix_binary`` and its libraries from ``sysroot``: see :func:`shared_libraries`)."""
    libraries = shared_libraries(nix_binary, sysroot)
    for name in DLOPENED_LIBRARIES:
        for directory in SYSTEM_LIBRARY_DIRS:
            candidate = os.path.join(sysroot, directory.lstrip("/"), name)
            if os.path.exists(candidate):
                libraries.setdefault(name, candidate)
                break
    with tempfile.TemporaryDirectory(prefix="recnix-nix-files-") as scratch:
        top = Path(scratch, NIX_FILES_NAME)
        (top / "lib").mkdir(parents=True)
        (top / "libexec").mkdir()
        shutil.copyfile(os.path.join(sysroot, nix_binary.lstrip("/")), top / "libexec" / "nix")
        (top / "libexec" / "nix").chmod(0o555)
        for name, source in sorted(libraries.items()):
            shutil.copyfile(source, top / "lib" / name)  # follows symlinks
            (top / "lib" / name).chmod(0o555)
        return _store_add(top, nix_env)


def find_nix_binary(nix: str | None = None, path: str | None = None) -> str:
    """The multi-call binary of ``nix`` (a path or a command name), default the ``nix``
    on ``path`` (this process's PATH), else Debian's /usr/bin/nix; symlinks followed."""
    given = nix or shutil.which("nix", path=path) or NIX_BINARY
    found = given if "/" in given else shutil.which(given, path=path)
    if found is None or not os.path.isfile(found):
        raise BundleError(f"no nix binary at {given!r}; give its path with --nix PATH")
    real = os.path.realpath(found)
    if not os.access(real, os.X_OK):
        raise BundleError(f"{real} (from {given!r}) is not executable")
    return real


def bundle_nix(
    nix_env: dict[str, str] | None = None,
    gc_root: str | None = None,
    nix_binary: str | None = None,
    sysroot: str = "/",
) -> str:
    """Make a Nix (or Lix) runnable inside builds; return the bundle's store path.

    ``nix_binary`` is the ``nix`` to bundle (default: see ``find_nix_binary``).
    ``nix_env`` is the environment for the nix CLI (e.g. ``NIX_REMOTE``,
    ``NIX_CONF_DIR``); ``None`` means this process's environment. The bundle
    has ``bin/<command>`` for every name in ``NIX_COMMANDS``; its closure
    holds the busybox and nix-files paths. ``gc_root``, if given, becomes an
    indirect GC root (``nix-build --out-link``) for the bundle. ``sysroot``:
    bundle the nix of another Debian root filesystem instead (another version;
    ``nix_binary`` is then a path inside it, default Debian's /usr/bin/nix).
    """
    busybox = busybox_store_path(nix_env)
    binary = find_nix_binary(nix_binary) if sysroot == "/" else (nix_binary or NIX_BINARY)
    files = nix_files_store_path(nix_env, binary, sysroot=sysroot)
    if sysroot == "/":
        version_argv = [binary, "--version"]
    else:  # run as the wrappers will: only the bundled libraries (NSS modules too)
        lib = os.path.join(files, "lib")
        loader = os.path.join(lib, LOADER_NAME)
        version_argv = [loader, "--library-path", lib, os.path.join(files, "libexec/nix")]
        version_argv.append("--version")
    # no locale: another release's glibc may not read this system's locale files
    text = _run(version_argv, None if sysroot == "/" else {"LC_ALL": "C"})
    try:
        found = parse_nix_version(text)
    except NixVersionError as e:
        raise BundleError(f"cannot tell the version of {binary}: {e}") from None
    version = found.version if not found.is_lix else f"lix-{found.version}"
    link_args = ["--out-link", gc_root] if gc_root else ["--no-out-link"]
    argv = [
        "nix-build",
        "--quiet",
        "-E",
        _BUNDLE_EXPRESSION,
        *link_args,
        "--argstr",
        "busybox",
        busybox,
        "--argstr",
        "files",
        files,
        "--argstr",
        "name",
        BUNDLE_NAME_FORMAT.format(version=version),
        "--argstr",
        "commands",
        " ".join(NIX_COMMANDS),
    ]
    lines = _run(argv, _client_env(nix_env)).split()
    if not lines or not lines[-1].startswith("/nix/store/"):
        raise BundleError(f"nix-build printed no store path: {lines!r}")
    return lines[-1]
