"""``recnix setup`` and ``recnix setup --undo``: recursive builds on a non-NixOS host
with systemd, in one command, and back.

Three steps, as in ``recnix doctor``: :func:`gather` reads the host (``Host``),
:func:`plan` — a plain function — decides every file and command (or refuses,
:class:`SetupRefused`, naming why and what to do), and :func:`apply` carries the
plan out. Before it changes a file, ``apply`` records the file's original bytes
and mode in ``/var/lib/recnix/setup`` (the *record*), so that :func:`undo`
puts back every file byte for byte and stops what setup started, even after a
crash half-way. A second ``setup`` changes nothing when nothing differs.

The files (all paths under ``Host.root``, ``/`` on a real host):

- ``/etc/nix/recnix.conf``: the nix.conf lines of ``recnix nix-conf``;
- ``/etc/nix/nix.conf``: one ``!include`` of it, appended (Nix reads later
  settings over earlier ones; ``!include`` tolerates a missing file);
- ``/etc/recnix/hooks.env``: nix-daemon's environment for the hooks
  (``recnix nix-conf --daemon-env``);
- ``/etc/systemd/system/nix-daemon.service.d/recnix.conf``: that environment
  file, and on Nix 2.25–2.33 (which ignore nix.conf's build-hook)
  ``--option build-hook`` on nix-daemon's command line;
- ``/etc/systemd/system/recnix.service``: the service, hardened as on NixOS
  (``recnix.cli.systemdunit``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from recnix.cli.installpaths import installed_program
from recnix.cli.nixversion import NixVersion
from recnix.cli.systemdunit import render_unit
from recnix.config.loader import Config, hook_environment, render_nix_conf

RECORD_DIR = "/var/lib/recnix/setup"
RECORD_FILE = "record.json"
NIX_CONF = "/etc/nix/nix.conf"
RECNIX_NIX_CONF = "/etc/nix/recnix.conf"
HOOKS_ENV = "/etc/recnix/hooks.env"
DAEMON_DROPIN = "/etc/systemd/system/nix-daemon.service.d/recnix.conf"
RECNIX_UNIT = "/etc/systemd/system/recnix.service"
INCLUDE_LINE = f"!include {RECNIX_NIX_CONF}"
MARK = "# added by `recnix setup` (undo: recnix setup --undo)"
HOOK_NAMES = ("recnix-pre-build-hook", "recnix-post-build-hook", "recnix-build-hook")
OLDEST_NIX = (2, 8)
# What the hooks start Python on (`-I -S`), as `recnix nix-conf --daemon-env` says.
HOOK_ENTRY = str(Path(__file__).resolve().parents[1] / "hooks" / "entry.py")

# A nix.conf line Nix accepts: blank, a comment, an include, or `name = value`.
_CONF_LINE = re.compile(r"\s*(#.*)?|\s*!?include\s+\S.*|\s*[A-Za-z0-9_.-]+\s*=.*")


class SetupRefused(Exception):
    """recnix setup will not touch this host: the message says why and what to do."""


@dataclass(frozen=True)
class Host:
    """What setup needs to know about the host (see :func:`gather`)."""

    root: Path  # "/" on a real host; tests give a directory standing for it
    nixos: bool
    systemd: bool
    nix: NixVersion | None  # the system's Nix (None: none found)
    nix_problem: str  # why nix is None
    recnix: str  # absolute path of the recnix executable
    hooks: dict[str, str]  # hook name -> absolute path of its executable
    python: str  # the interpreter recnix runs on (for the hooks' -I -S start)
    # nix-daemon.service's ExecStart: the program, then its argv (argv[0] first)
    daemon_exec_start: list[str] | None
    config: Config

    def path(self, absolute: str) -> Path:
        """``absolute`` (a host path) under ``root``."""
        return self.root / absolute.lstrip("/")


@dataclass(frozen=True)
class FileChange:
    path: str  # absolute host path
    text: str
    why: str


@dataclass(frozen=True)
class Plan:
    """Every file setup wants and the commands that make the host use them."""

    files: list[FileChange]
    commands: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# -- deciding (no I/O) -----------------------------------------------------------------------


def parse_nix_conf(text: str, where: str = NIX_CONF) -> dict[str, str]:
    """``name -> value`` of a nix.conf (the last setting wins); SetupRefused on a line
    Nix would not accept."""
    settings = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not _CONF_LINE.fullmatch(line):
            raise SetupRefused(
                f"cannot parse {where} line {number}: {line.strip()!r} (not `name = value`, "
                "a comment or an include); fix it (`nix config show` says what Nix makes of "
                "it), then run recnix setup again"
            )
        name, eq, value = line.partition("=")
        if eq and not name.lstrip().startswith(("#", "include", "!include")):
            settings[name.strip()] = value.split("#", 1)[0].strip()
    return settings


def plan(host: Host, nix_conf: str) -> Plan:
    """What setup writes and runs on ``host`` whose nix.conf reads ``nix_conf``."""
    _refuse_nixos(host)
    # before Nix's version: a line Nix cannot read makes every nix command fail
    settings = parse_nix_conf(nix_conf)
    _refuse_nix(host)
    _refuse_settings(host, settings)
    assert host.nix is not None
    lix = host.nix.is_lix
    build_hook = None if lix else host.hooks["recnix-build-hook"]
    lines = render_nix_conf(
        host.config.raw,
        host.hooks["recnix-pre-build-hook"],
        host.hooks["recnix-post-build-hook"],
        lix=lix,
        build_hook=build_hook,
    )
    env = hook_environment(host.config.raw, host.python, HOOK_ENTRY)
    dropin = "[Service]\n" + f"EnvironmentFile={HOOKS_ENV}\n"
    notes = []
    if not lix and host.nix.ignores_conf_build_hook:
        option = ["--option", "build-hook", host.hooks["recnix-build-hook"]]
        # a second run reads the ExecStart its own drop-in made: keep one build-hook
        argv = _without_build_hook(host.daemon_exec_start)
        if argv:
            program, *args = [*argv, *option]
            dropin += f"ExecStart=\nExecStart=@{program} {shlex.join(args)}\n"
        elif host.systemd:
            raise SetupRefused(
                f"Nix {host.nix.version} ignores nix.conf's build-hook, so it must go on "
                "nix-daemon's command line, but nix-daemon.service's ExecStart could not be "
                "read (`systemctl show -p ExecStart nix-daemon.service`)"
            )
        else:  # the steps are printed for a person to adapt
            notes.append(
                f"Nix {host.nix.version} ignores nix.conf's build-hook: start nix-daemon "
                f"with {shlex.join(option)}"
            )
    include = nix_conf if INCLUDE_LINE in nix_conf.splitlines() else _append(nix_conf)
    files = [
        FileChange(
            RECNIX_NIX_CONF,
            "# recnix's nix.conf lines, written by `recnix setup` (see `recnix nix-conf`)\n"
            + lines,
            "recnix's nix.conf settings",
        ),
        FileChange(NIX_CONF, include, f"includes {RECNIX_NIX_CONF}"),
        FileChange(
            HOOKS_ENV,
            "".join(f"{key}={value}\n" for key, value in env.items()),
            "nix-daemon's environment for the hooks",
        ),
        FileChange(DAEMON_DROPIN, dropin, "nix-daemon reads that environment"),
        FileChange(RECNIX_UNIT, render_unit(f"{host.recnix} daemon"), "the recnix service"),
    ]
    sandbox = settings.get("sandbox", "true")
    if sandbox != "true":
        notes.append(
            f"{NIX_CONF} sets sandbox = {sandbox} (Debian's nix.conf does); {RECNIX_NIX_CONF} "
            "sets sandbox = true after it, so every build on this machine now runs "
            "sandboxed (recnix setup --undo puts the old setting back)"
        )
    return Plan(
        files,
        notes=notes,
        commands=[
            ["systemctl", "daemon-reload"],
            ["systemctl", "enable", "recnix.service"],
            ["systemctl", "restart", "recnix.service"],
            ["systemctl", "restart", "nix-daemon.service"],
        ],
    )


def _without_build_hook(argv: Sequence[str] | None) -> list[str] | None:
    """nix-daemon's command line without its ``--option build-hook VALUE``."""
    if argv is None:
        return None
    kept: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--option" and argv[i + 1 : i + 2] == ["build-hook"]:
            i += 3
            continue
        kept.append(argv[i])
        i += 1
    return kept


def _daemon_sandbox_off(argv: Sequence[str]) -> str | None:
    """The part of nix-daemon's command line that turns the sandbox off, if any."""
    for i, arg in enumerate(argv):
        if arg == "--no-sandbox":
            return arg
        if arg == "--option" and argv[i + 1 : i + 2] == ["sandbox"]:
            value = argv[i + 2] if i + 2 < len(argv) else ""
            if value != "true":
                return f"--option sandbox {value}"
    return None


def _append(nix_conf: str) -> str:
    sep = "" if not nix_conf or nix_conf.endswith("\n") else "\n"
    return f"{nix_conf}{sep}{MARK}\n{INCLUDE_LINE}\n"


def _refuse_nixos(host: Host) -> None:
    if host.nixos:
        raise SetupRefused(
            "this is NixOS: use the NixOS module instead (imports = "
            "[ recnix.nixosModules.default ]; services.recnix.enable = true;), which "
            "configures Nix, the hooks and the service declaratively"
        )


def _refuse_nix(host: Host) -> None:
    if host.nix is None:
        raise SetupRefused(f"no usable Nix: {host.nix_problem}; install Nix 2.8 or later")
    if not host.nix.is_lix and host.nix.release[:2] < OLDEST_NIX:
        raise SetupRefused(
            f"Nix {host.nix.version} is older than 2.8, the oldest recnix supports; "
            "upgrade Nix first"
        )


def _refuse_settings(host: Host, settings: dict[str, str]) -> None:
    off = _daemon_sandbox_off((host.daemon_exec_start or [])[1:])
    if off:
        raise SetupRefused(
            f"nix-daemon.service runs nix-daemon with {off}: sandboxing is off for every "
            "build, whatever nix.conf says, and recnix gives sandboxed builds their "
            "restricted view; remove that from nix-daemon's ExecStart and run recnix setup "
            "again"
        )
    for setting, name in (
        ("pre-build-hook", "recnix-pre-build-hook"),
        ("post-build-hook", "recnix-post-build-hook"),
    ):
        value = settings.get(setting, "")
        if value and os.path.basename(value.split()[0]) != name:
            section = setting.removesuffix("-hook")
            raise SetupRefused(
                f"{NIX_CONF} sets {setting} = {value}, and Nix has one {setting}: recnix's "
                f"would replace it; move it to recnix's config ([hooks] {section} = "
                f'["{value}"] in /etc/recnix/config.toml: recnix runs it after its own), '
                f"remove the line and run recnix setup again"
            )


# -- reading the host ------------------------------------------------------------------------


def gather(config: Config, root: Path = Path("/")) -> Host:
    """Read the host (changes nothing)."""
    from recnix.cli.nixversion import NixVersionError, nix_version

    recnix = _executable("recnix")
    nix, problem = None, ""
    binary = shutil.which("nix")
    if binary is None:
        problem = "no `nix` on PATH"
    else:
        try:
            nix = nix_version(binary)
        except (NixVersionError, OSError) as e:
            problem = str(e)
    return Host(
        root=root,
        nixos=(root / "etc/NIXOS").exists() or _os_id(root) == "nixos",
        systemd=(root / "run/systemd/system").is_dir(),
        nix=nix,
        nix_problem=problem,
        recnix=recnix,
        hooks={name: _executable(name) for name in HOOK_NAMES},
        python=sys.executable,
        daemon_exec_start=_daemon_exec_start() if root == Path("/") else None,
        config=config,
    )


def _executable(name: str) -> str:
    """The absolute path of recnix's program ``name`` (recnix.cli.installpaths)."""
    found = installed_program(name)
    if found is None:
        raise SetupRefused(f"cannot find {name} (beside recnix or on PATH): is recnix installed?")
    return found


def _os_id(root: Path) -> str:
    try:
        text = (root / "etc/os-release").read_text()
    except OSError:
        return ""
    match = re.search(r"^ID=\"?([^\"\n]*)", text, re.M)
    return match.group(1) if match else ""


def _daemon_exec_start() -> list[str] | None:
    """nix-daemon.service's ExecStart: its program, then its argv (``systemctl show``)."""
    try:
        done = subprocess.run(
            ["systemctl", "show", "--property=ExecStart", "--value", "nix-daemon.service"],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_exec_start(done.stdout)


def parse_exec_start(shown: str) -> list[str] | None:
    """``{ path=/usr/bin/nix-daemon ; argv[]=nix-daemon --daemon ; ... }`` -> the program,
    then argv; None if ``shown`` has no ExecStart."""
    path = re.search(r"\bpath=([^;]*);", shown)
    argv = re.search(r"\bargv\[\]=([^;]*);", shown)
    if not path or not argv:
        return None
    return [path.group(1).strip(), *shlex.split(argv.group(1))]


# -- changing the host -----------------------------------------------------------------------

Run = Callable[[Sequence[str]], int]


def run_command(argv: Sequence[str]) -> int:
    """Run ``argv``, its output to ours; its exit status."""
    return subprocess.run(list(argv), check=False).returncode


def _record_path(root: Path) -> Path:
    return root / RECORD_DIR.lstrip("/") / RECORD_FILE


def read_record(root: Path) -> dict[str, dict]:
    """What setup changed so far: host path -> {"existed", "mode", "data" (base64)}."""
    try:
        return json.loads(_record_path(root).read_text())["files"]
    except FileNotFoundError:
        return {}


def _replace_file(path: Path, data: bytes, mode: int) -> None:
    """Make ``path`` hold ``data`` with ``mode``, all at once (a partial file renamed over
    it): a crash leaves the old file or the new one, never half of either."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.recnix-setup")
    partial.write_bytes(data)
    os.chmod(partial, mode)
    partial.replace(path)


def _write_record(root: Path, files: dict[str, dict]) -> None:
    path = _record_path(root)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    text = json.dumps({"files": files}, indent=1, sort_keys=True) + "\n"
    _replace_file(path, text.encode(), 0o600)


def _write(path: Path, text: str, mode: int) -> None:
    _replace_file(path, text.encode(), mode)


def apply(
    host: Host, wanted: Plan, run: Run = run_command, out: Callable[[str], None] = print
) -> list[str]:
    """Write the plan's files that differ (recording each original first), then run its
    commands if any file changed. Returns the host paths changed."""
    record = read_record(host.root)
    changed = []
    for change in wanted.files:
        path = host.path(change.path)
        try:
            old = path.read_bytes()
            mode = path.stat().st_mode & 0o7777
        except FileNotFoundError:
            old, mode = None, None
        if old == change.text.encode():
            continue
        if change.path not in record:  # the original: kept from the first change on
            record[change.path] = {
                "existed": old is not None,
                "mode": mode,
                "data": base64.b64encode(old).decode() if old is not None else None,
            }
            _write_record(host.root, record)
        _write(path, change.text, mode if mode is not None else 0o644)
        record[change.path]["wrote"] = hashlib.sha256(change.text.encode()).hexdigest()
        _write_record(host.root, record)
        changed.append(change.path)
        out(f"recnix setup: wrote {change.path} ({change.why})")
    if not changed:
        out("recnix setup: nothing to change: every file is as recnix setup writes it")
        return changed
    for argv in wanted.commands:
        out(f"recnix setup: running {shlex.join(argv)}")
        status = run(argv)
        if status != 0:
            raise SetupRefused(
                f"`{shlex.join(argv)}` failed (exit {status}); the files are in place: see "
                f"`journalctl -xe`, fix the cause and run recnix setup again, or undo with "
                f"recnix setup --undo"
            )
    return changed


def undo(root: Path, run: Run = run_command, out: Callable[[str], None] = print) -> list[str]:
    """Put back every file setup changed, byte for byte, and stop and disable
    recnix.service. Returns the host paths restored."""
    record = read_record(root)
    if not record:
        out("recnix setup --undo: nothing to undo (no record in " + RECORD_DIR + ")")
        return []
    if (root / "run/systemd/system").is_dir():
        run(["systemctl", "disable", "--now", "recnix.service"])
    restored = []
    for host_path, original in sorted(record.items()):
        path = root / host_path.lstrip("/")
        current = path.read_bytes() if path.exists() else None
        wrote = original.get("wrote")
        if current is not None and wrote and hashlib.sha256(current).hexdigest() != wrote:
            out(f"recnix setup --undo: {host_path} changed since setup wrote it; restoring anyway")
        if original["existed"]:
            _replace_file(path, base64.b64decode(original["data"]), original["mode"])
        else:
            path.unlink(missing_ok=True)
            _remove_empty_parents(path.parent, root)
        restored.append(host_path)
        out(f"recnix setup --undo: restored {host_path}")
    if (root / "run/systemd/system").is_dir():
        for argv in (
            ["systemctl", "daemon-reload"],
            ["systemctl", "restart", "nix-daemon.service"],
        ):
            out(f"recnix setup --undo: running {shlex.join(argv)}")
            run(argv)
    _record_path(root).unlink()
    _remove_empty_parents(_record_path(root).parent, root)
    return restored


def _remove_empty_parents(directory: Path, root: Path) -> None:
    """Remove ``directory`` and its parents while empty, stopping at /etc, /var/lib."""
    keep = {root / "etc", root / "etc/nix", root / "etc/systemd/system", root / "var/lib"}
    while directory not in keep and directory != root and directory.is_dir():
        try:
            directory.rmdir()
        except OSError:
            return
        directory = directory.parent


def describe(wanted: Plan) -> str:
    """Every file of the plan with its content, then the commands (for --dry-run and for
    hosts without systemd)."""
    parts = []
    for change in wanted.files:
        parts.append(f"--- {change.path} ({change.why})\n{change.text}")
    parts.append("--- then run:\n" + "".join(shlex.join(c) + "\n" for c in wanted.commands))
    return "\n".join(parts)
