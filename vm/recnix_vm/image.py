"""The guest disk image: Debian from Debian's packages, recnix from the working tree.

One image per suite (:data:`SUITES`): bookworm (Debian 12, Nix 2.8, the
default), trixie (Debian 13, Nix 2.26), sid (Nix 2.34); and lix (:data:`LIX_SUITE`:
trixie with Lix from a prebuilt tarball as the system Nix, Debian's nix-bin purged,
Lix's ``nix-daemon --daemon`` as nix-daemon.service; ``recnix_vm.lix``).

Two cached layers under the cache directory (``$RECNIX_VM_CACHE`` or
``/var/cache/recnix-vm``):

1. ``base/<key>.tar``: the root filesystem made by ``mmdebstrap`` (slow, about
   two minutes), keyed by a hash of the suite, the mirrors, the package list and
   the mmdebstrap options.
2. ``images/<key>/``: ``disk.img`` (raw ext4 made with ``mkfs.ext4 -d``, no
   loop mounts), the guest's own ``vmlinuz`` and ``initrd.img``, the guest's SSH
   host key and ``image.json``; keyed by a hash of the base, the recnix sources,
   the scenario files, the templates and this module (fast, seconds).

Guests never write to ``disk.img``: each boots from its own qcow2 overlay
(:func:`create_overlay`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import jinja2

from recnix.config.names import HOOK_PROGRAMS

from .cachelock import cache_lock
from .log import log, nested

CACHE_ENV = "RECNIX_VM_CACHE"
DEFAULT_CACHE_DIR = Path("/var/cache/recnix-vm")

DEFAULT_SUITE = "bookworm"
BASE_PACKAGES = (
    "systemd-sysv",
    "udev",
    "dbus",
    "libpam-systemd",
    "nix-bin",
    "nix-setup-systemd",
    "python3",
    "python3-venv",  # the setup tests install the recnix wheel into a venv (tests/vm/guest.py)
    "openssh-server",
    "busybox-static",
    "linux-image-amd64",
    "iproute2",
    "procps",
    "less",
)
# What the host tier needs when it runs inside a suite's root filesystem
# (recnix_vm.rootfs): pytest and the test libraries from that suite's Python.
ROOTFS_TEST_PACKAGES = (
    "python3-pytest",
    "python3-pytest-xdist",  # pyproject.toml's addopts name its options (the inner runs pass -n 0)
    "python3-hypothesis",
    "python3-pexpect",
    "python3-jinja2",
    # tests/unit/formats/test_signatures.py checks recnix's Ed25519 against it:
    "python3-cryptography",
    "git",  # tests/host/test_nix_files.py lists the tree's .nix files
)
# Files nobody needs in a test guest: keeps the image small and mkfs fast.
_EXCLUDES = (
    "/usr/share/doc/*",
    "/usr/share/man/*",
    "/usr/share/locale/*",
    "/usr/share/info/*",
)
_MODULE_EXCLUDES = ("gpu", "media", "net/wireless", "infiniband", "staging", "bluetooth", "isdn")
MMDEBSTRAP_OPTIONS = (
    "--variant=apt",
    "--format=tar",
    *(f"--dpkgopt=path-exclude={p}" for p in _EXCLUDES),
    *(
        f"--dpkgopt=path-exclude={prefix}/lib/modules/*/kernel/drivers/{d}/*"
        for d in _MODULE_EXCLUDES
        for prefix in ("", "/usr")
    ),
    "--dpkgopt=path-exclude=/lib/modules/*/kernel/sound/*",
    "--dpkgopt=path-exclude=/usr/lib/modules/*/kernel/sound/*",
)


@dataclass(frozen=True)
class Suite:
    """A Debian release the guests and the per-version root filesystems are made from."""

    name: str
    nix: str  # the nix-bin version this suite ships (major.minor), for the docs and messages
    mirrors: tuple[str, ...]
    extra_packages: tuple[str, ...] = ()
    extra_options: tuple[str, ...] = ()
    release: str = ""  # the Debian release mmdebstrap installs (default: ``name``)

    @property
    def debian(self) -> str:
        """The Debian release (codename) this suite is made from."""
        return self.release or self.name

    @property
    def packages(self) -> tuple[str, ...]:
        return BASE_PACKAGES + self.extra_packages

    @property
    def options(self) -> tuple[str, ...]:
        return MMDEBSTRAP_OPTIONS + self.extra_options


# The mirror may be a snapshot whose Release files have expired by the time a
# cache is rebuilt: newer suites accept that (bookworm keeps its cache key).
_NO_VALID_UNTIL = ('--aptopt=Acquire::Check-Valid-Until "false"',)
SUITES = {
    "bookworm": Suite(
        name="bookworm",
        nix="2.8",
        mirrors=(
            "deb http://deb.debian.org/debian bookworm main",
            "deb http://deb.debian.org/debian bookworm-updates main",
            "deb http://deb.debian.org/debian-security bookworm-security main",
        ),
    ),
    "trixie": Suite(
        name="trixie",
        nix="2.26",
        mirrors=(
            "deb http://deb.debian.org/debian trixie main",
            "deb http://deb.debian.org/debian trixie-updates main",
            "deb http://deb.debian.org/debian-security trixie-security main",
        ),
        extra_packages=ROOTFS_TEST_PACKAGES,
        extra_options=_NO_VALID_UNTIL,
    ),
    "sid": Suite(
        name="sid",
        nix="2.34",
        mirrors=("deb http://deb.debian.org/debian sid main",),
        # sid's openssh-server no longer pulls in the client, which Nix's ssh://
        # and ssh-ng:// stores run (distributed builds, tests/vm/test_remote.py).
        extra_packages=ROOTFS_TEST_PACKAGES + ("openssh-client",),
        extra_options=_NO_VALID_UNTIL,
    ),
}


# Lix 2.95 (a prebuilt tarball, recnix_vm.lix) on trixie: made from trixie's base
# rootfs (the same mmdebstrap tarball); a root-filesystem suite and a guest image.
LIX_SUITE = Suite(
    name="lix",
    nix="Lix 2.95",
    mirrors=SUITES["trixie"].mirrors,
    extra_packages=SUITES["trixie"].extra_packages,
    extra_options=SUITES["trixie"].extra_options,
    release="trixie",
)
ROOTFS_SUITES = {**SUITES, "lix": LIX_SUITE}


def get_suite(name: str | None) -> Suite:
    """The suite called ``name`` (``None``: bookworm); a clear error for unknown names."""
    name = name or DEFAULT_SUITE
    try:
        return ROOTFS_SUITES[name]
    except KeyError:
        raise ImageError(
            f"unknown suite {name!r}: choose one of {', '.join(ROOTFS_SUITES)}"
        ) from None


KEEP_IMAGES = 3  # older disk images in the cache are deleted after a new one is built
DISK_SIZE = "6G"  # sparse; the Nix store in the guest grows into it
KERNEL_CMDLINE = "console=ttyS0,115200 root=/dev/vda rw net.ifnames=0 panic=-1"
PRE_BUILD_HOOK = "/usr/local/bin/recnix-pre-build-hook"
POST_BUILD_HOOK = "/usr/local/bin/recnix-post-build-hook"
BUILD_HOOK = "/usr/local/bin/recnix-build-hook"
READY_MARKER = "RECNIX-VM-READY"
GUEST_RECNIX_DIR = "/opt/recnix"
GUEST_SCENARIOS_DIR = "/opt/recnix-tests/scenarios"
# nix.conf lines only the guest needs (the recnix lines come from recnix.config.loader).
GUEST_NIX_SETTINGS = {
    "build-users-group": "nixbld",
    "substituters": "",
    "trusted-users": "root",
    "max-jobs": "2",
}
# recnix's experimental-features list plus what the guest's tooling needs.
GUEST_EXTRA_EXPERIMENTAL_FEATURES = ("nix-command",)

TEMPLATES_DIR = Path(__file__).with_name("templates")
HOOK_SCRIPTS = tuple(Path(__file__).resolve().parents[2] / "bin" / name for name in HOOK_PROGRAMS)


class ImageError(Exception):
    """Building the base rootfs or the disk image failed."""


def cache_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The cache directory: explicit > ``$RECNIX_VM_CACHE`` > ``/var/cache/recnix-vm``."""
    if explicit:
        return Path(explicit)
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR)


@dataclass(frozen=True)
class Image:
    """A built guest image: everything needed to boot it."""

    directory: Path
    disk: Path
    kernel: Path
    initrd: Path
    cmdline: str
    ssh_key: Path
    ssh_host_key: Path
    suite: str = DEFAULT_SUITE

    @classmethod
    def load(cls, directory: Path, ssh_key: Path) -> Image:
        meta = json.loads((directory / "image.json").read_text())
        return cls(
            directory=directory,
            disk=directory / "disk.img",
            kernel=directory / "vmlinuz",
            initrd=directory / "initrd.img",
            cmdline=meta["cmdline"],
            ssh_key=ssh_key,
            ssh_host_key=directory / "ssh_host_ed25519_key.pub",
            suite=meta.get("suite", DEFAULT_SUITE),
        )


def _run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, check=True, text=True, capture_output=True, **kwargs)
    except FileNotFoundError as e:
        raise ImageError(f"{argv[0]} not found: install it (see setup.sh)") from e
    except subprocess.CalledProcessError as e:
        raise ImageError(
            f"{' '.join(argv)} failed with exit status {e.returncode}\n"
            f"stdout:\n{e.stdout}\nstderr:\n{e.stderr}"
        ) from e


def base_key(suite: Suite | None = None) -> str:
    """Hash of everything that determines the mmdebstrap rootfs of ``suite``."""
    suite = suite or get_suite(None)
    spec = json.dumps(
        {
            "suite": suite.debian,
            "mirrors": suite.mirrors,
            "packages": suite.packages,
            "opts": suite.options,
        }
    )
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def build_base(cache: Path, suite: Suite | None = None) -> Path:
    """Return the cached base rootfs tarball of ``suite``, running mmdebstrap if it is missing."""
    suite = suite or get_suite(None)
    key = base_key(suite)
    target = cache / "base" / f"{key}.tar"
    if target.exists():
        log(f"base rootfs: reusing {target}")
        return target
    with cache_lock(cache, f"base-{key}"):
        if target.exists():  # built while this process waited for the lock
            return target
        return _mmdebstrap(suite, target)


def _mmdebstrap(suite: Suite, target: Path) -> Path:
    """Run mmdebstrap for ``suite`` into the tarball ``target`` (via a partial file)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".tar.partial-{os.getpid()}")
    argv = [
        "mmdebstrap",
        *suite.options,
        "--include=" + ",".join(suite.packages),
        suite.debian,
        str(partial),
        *suite.mirrors,
    ]
    log_path = target.with_suffix(".log")
    with nested(f"building the {suite.name} base rootfs with mmdebstrap (~2 min; log: {log_path})"):
        with log_path.open("w") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, text=True)
            _follow(proc, log_path)
        if proc.returncode != 0:
            partial.unlink(missing_ok=True)
            tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
            raise ImageError(f"mmdebstrap failed (exit {proc.returncode}):\n{tail}")
        partial.rename(target)
    return target


def _follow(proc: subprocess.Popen[str], log_path: Path) -> None:
    """Wait for ``proc``, logging its latest output line every 15 s."""
    while True:
        try:
            proc.wait(timeout=15)
            return
        except subprocess.TimeoutExpired:
            lines = log_path.read_text(errors="replace").splitlines()
            log(f"... {lines[-1][:100] if lines else '(no output yet)'}")


def ensure_ssh_key(cache: Path) -> Path:
    """The per-cache-dir SSH key for root in the guests (generated once)."""
    key = cache / "ssh" / "id_ed25519"
    if key.exists():  # as build_base: no lock once it is made
        return key
    with cache_lock(cache, "ssh-key"):
        if not key.exists():
            key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            argv = ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "recnix-vm", "-f"]
            _run([*argv, str(key)])
    return key


def source_dirs() -> tuple[Path, Path]:
    """The ``recnix`` package directory and the scenario directory of the working tree."""
    import recnix

    package = Path(recnix.__file__).resolve().parent
    return package, package.parent / "tests" / "scenarios"


def _tree_files(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith(".pyc")
    )


def _hash_tree(h: hashlib._Hash, label: str, root: Path) -> None:
    for path in _tree_files(root):
        h.update(f"{label}/{path.relative_to(root)}\0".encode())
        h.update(path.read_bytes())
        h.update(b"\0")


def image_key(base: Path, recnix_dir: Path, scenarios_dir: Path, extra: str = "") -> str:
    """Hash of every input of the disk image (``extra``: the lix suite's tarball key)."""
    h = hashlib.sha256()
    h.update(base.name.encode())
    if extra:
        h.update(f"\0{extra}\0".encode())
    _hash_tree(h, "recnix", recnix_dir)
    _hash_tree(h, "scenarios", scenarios_dir)
    _hash_tree(h, "templates", TEMPLATES_DIR)
    for hook in HOOK_SCRIPTS:
        h.update(hook.read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:16]


def render_nix_conf(lix: bool = False) -> str:
    """The guest's /etc/nix/nix.conf: recnix's lines (as `recnix nix-conf` prints them on
    Nix or Lix) plus the guest-only lines."""
    from recnix.config.loader import load_defaults
    from recnix.config.loader import render_nix_conf as recnix_lines

    raw = load_defaults()
    features = [
        f for f in raw["nix"].get("experimental-features", []) if not lix or f != "recursive-nix"
    ]
    features += [f for f in GUEST_EXTRA_EXPERIMENTAL_FEATURES if f not in features]
    lines = recnix_lines(raw, PRE_BUILD_HOOK, POST_BUILD_HOOK, lix=lix, build_hook=BUILD_HOOK)
    if lix:
        lines += f"experimental-features = {' '.join(features)}\n"
    else:
        raw["nix"]["experimental-features"] = features
        lines = recnix_lines(raw, PRE_BUILD_HOOK, POST_BUILD_HOOK, build_hook=BUILD_HOOK)
    return (
        _templates()
        .get_template("nix.conf.j2")
        .render(recnix_lines=lines, guest_settings=GUEST_NIX_SETTINGS)
    )


def render_recnix_unit() -> str:
    """The guest's recnix.service: the unit `recnix setup` installs (recnix.cli.systemdunit)."""
    from recnix.cli.systemdunit import render_unit

    return render_unit("/usr/local/bin/recnix daemon")


def render_recnix_config() -> str:
    """The guest's /etc/recnix/config.toml (recnix's defaults, as the NixOS module writes)."""
    from recnix.config.loader import DEFAULTS_FILE

    return _templates().get_template("config.toml.j2").render(defaults=DEFAULTS_FILE.read_text())


def _templates() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )


def _write(root: Path, guest_path: str, text: str, mode: int = 0o644) -> None:
    path = root / guest_path.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def _enable(root: Path, unit: str, target: str, unit_dir: str = "/etc/systemd/system") -> None:
    wants = root / "etc/systemd/system" / f"{target}.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / unit
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(f"{unit_dir}/{unit}")


def _mask(root: Path, unit: str) -> None:
    link = root / "etc/systemd/system" / unit
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to("/dev/null")


def _wrapper(import_line: str, call: str) -> str:
    return (
        "#!/usr/bin/python3\n"
        "import sys\n"
        f"sys.path.insert(0, {GUEST_RECNIX_DIR!r})\n"
        f"{import_line}\n"
        f"sys.exit({call})\n"
    )


# Lix's daemon does socket activation only with one instance per connection (Accept=yes,
# `--for-socket-activation`); nix-setup-systemd's nix-daemon.socket is Accept=no, for
# Debian's Nix. The lix guest runs Lix's nix-daemon as Lix's own nix-daemon.service does
# (`nix-daemon --daemon`, which makes the socket itself) and masks that socket unit.
LIX_DAEMON_DROPIN = """[Service]
ExecStart=
ExecStart=@/usr/local/bin/nix-daemon nix-daemon --daemon
"""


def install_lix(root: Path) -> None:
    """Make Lix (the tarball of ``recnix_vm.lix``) the system Nix of an unpacked rootfs:
    Debian's nix-bin purged (no other Nix on PATH), nix-setup-systemd's build users
    kept and its nix-daemon.service pointed at Lix's nix-daemon (its socket unit is
    masked in :func:`customise_rootfs`)."""
    from . import lix

    tarball = lix.find_tarball(Path(__file__).resolve().parents[2])
    _run(["tar", "--numeric-owner", "-xJf", str(tarball.tarball), "-C", str(root)])
    _run(["chroot", str(root), "dpkg", "--purge", "--force-depends", "nix-bin"])
    _run(["ldconfig", "-r", str(root)])
    _write(root, "/etc/systemd/system/nix-daemon.service.d/lix.conf", LIX_DAEMON_DROPIN)
    version = _run(["chroot", str(root), "/usr/local/bin/nix", "--version"]).stdout.splitlines()[0]
    if "Lix" not in version:
        raise ImageError(f"after installing Lix, the guest's nix --version says {version!r}")
    log(version)


def customise_rootfs(
    root: Path, recnix_dir: Path, scenarios_dir: Path, ssh_pub: str, lix: bool = False
) -> None:
    """Install recnix, the scenarios and the guest configuration into an unpacked rootfs
    (``lix``: with Lix as the system Nix)."""
    if lix:
        install_lix(root)
    env = _templates()
    shutil.copytree(
        recnix_dir,
        root / GUEST_RECNIX_DIR.lstrip("/") / "recnix",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    scen_target = root / GUEST_SCENARIOS_DIR.lstrip("/")
    if scenarios_dir.is_dir():
        shutil.copytree(
            scenarios_dir, scen_target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    else:
        scen_target.mkdir(parents=True)
    _write(
        root, "/usr/local/bin/recnix", _wrapper("from recnix.cli.main import main", "main()"), 0o755
    )
    for hook in HOOK_SCRIPTS:  # the sh fast paths, exactly as pip installs them
        _write(root, f"/usr/local/bin/{hook.name}", hook.read_text(), 0o755)

    _write(root, "/etc/nix/nix.conf", render_nix_conf(lix=lix))
    _write(root, "/etc/recnix/config.toml", render_recnix_config())
    _write(
        root,
        "/etc/systemd/system/recnix.service",
        render_recnix_unit(),
    )
    _write(
        root,
        "/etc/systemd/system/recnix-vm-ready.service",
        env.get_template("recnix-vm-ready.service.j2").render(marker=READY_MARKER),
    )
    _write(
        root,
        "/etc/systemd/network/10-qemu-user.network",
        env.get_template("10-qemu-user.network.j2").render(),
    )
    _write(
        root,
        "/etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf",
        env.get_template("serial-autologin.conf.j2").render(),
    )
    _write(root, "/etc/hostname", "recnix-vm\n")
    _write(root, "/etc/hosts", "127.0.0.1 localhost\n127.0.1.1 recnix-vm\n")
    _write(root, "/etc/fstab", "/dev/vda / ext4 rw,errors=remount-ro 0 0\n")
    _write(root, "/etc/environment", "NIX_PAGER=cat\nPAGER=cat\nSYSTEMD_PAGER=cat\n")
    ssh_dir = root / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    _write(root, "/root/.ssh/authorized_keys", ssh_pub, 0o600)
    (root / "etc/machine-id").write_text("")  # systemd generates one per boot

    _enable(root, "recnix.service", "multi-user.target")
    _enable(root, "recnix-vm-ready.service", "multi-user.target")
    _enable(root, "systemd-networkd.service", "multi-user.target", "/lib/systemd/system")
    _enable(root, "systemd-networkd.socket", "sockets.target", "/lib/systemd/system")
    if lix:
        _enable(root, "nix-daemon.service", "multi-user.target", "/lib/systemd/system")
        socket_link = root / "etc/systemd/system/sockets.target.wants/nix-daemon.socket"
        if socket_link.is_symlink():
            socket_link.unlink()
        _mask(root, "nix-daemon.socket")
    else:
        _enable(root, "nix-daemon.socket", "sockets.target", "/lib/systemd/system")
    _enable(root, "ssh.service", "multi-user.target", "/lib/systemd/system")
    for unit in (
        "apt-daily.timer",
        "apt-daily-upgrade.timer",
        "e2scrub_reap.service",
        "systemd-timesyncd.service",
        "fstrim.timer",
    ):
        _mask(root, unit)


def build_image(
    cache_path: str | os.PathLike[str] | None = None, suite: str | None = None
) -> Image:
    """Build (or reuse) the cached disk image of ``suite`` (default bookworm) and return it."""
    cache = cache_dir(cache_path)
    cache.mkdir(parents=True, exist_ok=True)
    chosen = get_suite(suite)
    label = chosen.nix if chosen.nix.startswith("Lix") else f"Nix {chosen.nix}"
    with nested(f"{chosen.name} guest image, {label} (cache: {cache})"):
        base = build_base(cache, chosen)
        ssh_key = ensure_ssh_key(cache)
        recnix_dir, scenarios_dir = source_dirs()
        extra = ""
        if chosen.name == "lix":
            from . import lix

            extra = "lix-" + lix.find_tarball(Path(__file__).resolve().parents[2]).key()
        key = image_key(base, recnix_dir, scenarios_dir, extra)
        final = cache / "images" / key
        with cache_lock(cache, f"image-{key}"):
            if (final / "image.json").exists():
                log(f"disk image: reusing {final}")
                os.utime(final)  # mark as recently used for prune_images
                return Image.load(final, ssh_key)
            final.parent.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix=f"{key}.partial-", dir=final.parent))
            try:
                _assemble(work, base, recnix_dir, scenarios_dir, ssh_key, chosen.name)
                work.rename(final)
            except BaseException:
                shutil.rmtree(work, ignore_errors=True)
                raise
        prune_images(final.parent, keep=final)
        return Image.load(final, ssh_key)


def _image_suite(directory: Path) -> str:
    try:
        return json.loads((directory / "image.json").read_text()).get("suite", DEFAULT_SUITE)
    except (OSError, ValueError):
        return DEFAULT_SUITE


def prune_images(images_dir: Path, keep: Path, count: int = KEEP_IMAGES) -> None:
    """Delete all but the ``count`` newest disk images of ``keep``'s suite and stale
    partial builds.

    Only images unused for an hour go (a running guest or a kept overlay may
    still need its backing file); ``keep`` never does.
    """
    now = time.time()
    built = []
    suite = _image_suite(keep)
    for entry in images_dir.iterdir():
        if ".partial-" in entry.name:
            if now - entry.stat().st_mtime > 3600:
                shutil.rmtree(entry, ignore_errors=True)
        elif entry != keep and (entry / "image.json").exists() and _image_suite(entry) == suite:
            built.append(entry)
    built.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for old in built[max(0, count - 1) :]:
        log(f"removing old disk image {old}")
        shutil.rmtree(old, ignore_errors=True)


def _assemble(
    work: Path, base: Path, recnix_dir: Path, scenarios_dir: Path, key: Path, suite: str
) -> None:
    root = work / "root"
    root.mkdir()
    with nested("unpacking base rootfs"):
        _run(["tar", "--numeric-owner", "-xpf", str(base), "-C", str(root)])
    with nested("installing recnix, scenarios and guest configuration"):
        customise_rootfs(
            root,
            recnix_dir,
            scenarios_dir,
            key.with_suffix(".pub").read_text(),
            lix=suite == "lix",
        )
        kernel, initrd = _find_boot_files(root)
        shutil.copyfile(kernel, work / "vmlinuz")
        shutil.copyfile(initrd, work / "initrd.img")
        shutil.copyfile(
            root / "etc/ssh/ssh_host_ed25519_key.pub", work / "ssh_host_ed25519_key.pub"
        )
    with nested(f"mkfs.ext4 -d ({DISK_SIZE}, sparse)"):
        _run(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-L",
                "recnix-root",
                "-d",
                str(root),
                str(work / "disk.img"),
                DISK_SIZE,
            ]
        )
    shutil.rmtree(root)
    (work / "image.json").write_text(
        json.dumps(
            {"cmdline": KERNEL_CMDLINE, "base": base.name, "kernel": kernel.name, "suite": suite},
            indent=1,
        )
    )


def _find_boot_files(root: Path) -> tuple[Path, Path]:
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise ImageError(f"no /boot/vmlinuz-* in the rootfs ({root})")
    kernel = kernels[-1]
    initrd = root / "boot" / ("initrd.img-" + kernel.name.removeprefix("vmlinuz-"))
    if not initrd.exists():
        raise ImageError(f"no {initrd.relative_to(root)} in the rootfs")
    return kernel, initrd


def create_overlay(image: Image, overlay: Path) -> Path:
    """Create a qcow2 overlay backed by the image's (read-only) disk."""
    overlay.parent.mkdir(parents=True, exist_ok=True)
    _run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            str(image.disk),
            "-F",
            "raw",
            str(overlay),
        ]
    )
    return overlay
