"""``recnix doctor``: check a host's setup the way a recursive build needs it.

Two halves. :func:`gather` does the I/O: it asks the host Nix for its settings
(``nix config show`` / ``nix show-config``, reading ``NIX_CONF_DIR`` like the
daemon does), shakes hands with the nix-daemon recnix forwards to, asks the
recnix service for its status, probes the kernel (user namespaces,
``open_tree``/``move_mount``) and looks at recnix's directories, and returns
:class:`Facts`. The checks are plain functions of those facts (``CHECKS``),
each returning a :class:`Result`. :func:`build_check` is the one exception:
a real opted-in build that calls ``nix-store --add`` inside.

Nothing here changes the host, except that the build check adds what a build
needs to the Nix store: busybox and the Nix bundle (as ``recnix busybox`` and
``recnix bundle-nix`` do; both are content-addressed, so a second run adds
nothing), the build's own ``.drv`` and output, and the file the build adds from
inside. Nothing is GC-rooted; ``--no-build`` skips it.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from recnix.cli.nixversion import NixVersion, NixVersionError, parse_nix_version
from recnix.config.loader import Config
from recnix.config.names import FEATURE, FEATURE_READONLY
from recnix.hooks import control
from recnix.store.nixsettings import build_users, nix_settings, session_bound

OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"
# Nix releases recnix's tests run against (major.minor); others may work.
TESTED_NIX = ("2.8", "2.26", "2.34")
TESTED_LIX = ("2.95",)  # Lix releases the tests run against (the lix suite)
MIN_NIX = (2, 8)
MIN_MINOR, MAX_MINOR = 10, 38  # worker-protocol minors the codec speaks
PRE_HOOK_NAME = "recnix-pre-build-hook"
CHANNEL_NAME = "recnix-hook-channel"  # next to the pre-build hook (recnix.hooks.channel)
POST_HOOK_NAME = "recnix-post-build-hook"
BUILD_HOOK_NAME = "recnix-build-hook"
GCROOTS_DIR = "/nix/var/nix/gcroots"
SYS_OPEN_TREE, SYS_MOVE_MOUNT = 428, 429
OPEN_TREE_CLONE, AT_RECURSIVE = 1, 0x8000
CLONE_NEWUSER = 0x10000000
PROBE_TIMEOUT = 30.0
NIX_CONF_HINT = "`recnix nix-conf` prints the lines recnix needs"


@dataclass(frozen=True)
class Result:
    """One check's outcome: ``status`` is ok, warn (works, but read this), FAIL or skip."""

    name: str
    status: str
    summary: str
    fix: str = ""


@dataclass
class Probe:
    """The outcome of trying something: ``ok``, and what was learnt or the error."""

    ok: bool
    detail: str = ""
    values: dict[str, Any] = field(default_factory=dict)


@dataclass
class Facts:
    """What :func:`gather` found out about the host (the checks' only input)."""

    config: Config
    nix_conf_file: str
    nix_cli_version: str | None  # what `nix --version` printed
    settings: dict[str, Any]
    users: tuple[str, int] | None
    daemon: Probe
    service: Probe
    userns: Probe
    open_tree: Probe
    move_mount: Probe
    which: dict[str, str | None] = field(default_factory=dict)
    paths: dict[str, os.stat_result | None] = field(default_factory=dict)
    daemon_cmdlines: list[list[str]] = field(default_factory=list)  # running nix-daemons
    # the system daemon socket (/nix/var/nix/daemon-socket/socket): None if there is no
    # such file, else whether something accepts connections on it
    socket_answers: bool | None = None
    socket_path: str = ""
    # bin/recnix-hook-channel next to nix.conf's pre-build-hook, and the interpreter its
    # #! line names (None: no such script, or no #! line)
    hook_channel: tuple[str, str | None] = ("", None)


# -- the checks (pure)


def check_nix_version(f: Facts) -> Result:
    """Nix >= 2.8 and whether recnix is tested against it (Lix: known, untested)."""
    daemon_version = f.daemon.values.get("nix_version") if f.daemon.ok else None
    if daemon_version == "unknown":
        daemon_version = None
    try:
        cli = parse_nix_version(f.nix_cli_version) if f.nix_cli_version else None
    except NixVersionError:
        cli = None
    version = daemon_version or (cli.version if cli else None)
    if not version:
        return Result(
            "nix-version",
            FAIL,
            "cannot tell the Nix version: no `nix` on PATH and no daemon answered",
            "install Nix (Debian: apt install nix-bin nix-setup-systemd)",
        )
    where = "the nix-daemon" if daemon_version else "`nix --version`"
    numbers = NixVersion("nix", version).release
    if (cli is not None and cli.is_lix) or "lix" in version.lower():
        if ".".join(map(str, numbers[:2])) in TESTED_LIX:
            return Result("nix-version", OK, f"Lix {version} ({where}), a tested version")
        return Result(
            "nix-version",
            WARN,
            f"Lix {version} ({where}) is not one recnix's tests run against",
            f"tested: Lix {', '.join(TESTED_LIX)}, Nix {', '.join(TESTED_NIX)}",
        )
    if not numbers or numbers[:2] < MIN_NIX:
        return Result(
            "nix-version",
            FAIL,
            f"Nix {version} ({where}) is older than 2.8",
            "upgrade Nix to 2.8 or later",
        )
    major_minor = f"{numbers[0]}.{numbers[1]}"
    if major_minor in TESTED_NIX:
        return Result("nix-version", OK, f"Nix {version} ({where}), a tested version")
    return Result(
        "nix-version",
        WARN,
        f"Nix {version} ({where}) is not one recnix's tests run against",
        f"tested: Nix {', '.join(TESTED_NIX)}; other versions from 2.8 on should work",
    )


def check_sandbox(f: Facts) -> Result:
    """``sandbox = true``: sessions are only given to sandboxed builds."""
    value = f.settings.get("sandbox")
    if value is True:
        return Result("sandbox", OK, "sandbox = true")
    return Result(
        "sandbox",
        FAIL,
        f"sandbox = {_show(value)} in {f.nix_conf_file}: an opted-in build needs the sandbox "
        "(its session socket is mounted into it)",
        f"set `sandbox = true` in {f.nix_conf_file} and restart nix-daemon",
    )


def check_sandbox_fallback(f: Facts) -> Result:
    """``sandbox-fallback = false``: no silent unsandboxed builds."""
    value = f.settings.get("sandbox-fallback")
    if value is False:
        return Result("sandbox-fallback", OK, "sandbox-fallback = false")
    return Result(
        "sandbox-fallback",
        FAIL,
        f"sandbox-fallback = {_show(value)} in {f.nix_conf_file}: Nix may run a build "
        "without its sandbox, and then it gets no recnix session",
        f"set `sandbox-fallback = false` in {f.nix_conf_file} and restart nix-daemon",
    )


def _check_hook(f: Facts, setting: str, name: str) -> Result:
    value = f.settings.get(setting)
    if isinstance(value, list):  # build-hook is a list of words since Nix 2.19
        value = " ".join(str(v) for v in value)
    fix = (
        f"set `{setting} = {f.which.get(name) or '/path/to/' + name}` in {f.nix_conf_file} "
        f"and restart nix-daemon ({NIX_CONF_HINT}); other hooks go into recnix's [hooks] table"
    )
    if not isinstance(value, str) or not value.strip():
        return Result(setting, FAIL, f"{setting} is not set in {f.nix_conf_file}", fix)
    if os.path.basename(value) != name:
        return Result(setting, FAIL, f"{setting} = {value} is not recnix's {name}", fix)
    st = f.paths.get(value)
    if st is None or not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o111:
        return Result(setting, FAIL, f"{setting} = {value}: no executable file there", fix)
    return Result(setting, OK, f"{setting} = {value}")


def check_pre_build_hook(f: Facts) -> Result:
    """nix.conf's pre-build-hook is recnix's (and exists)."""
    return _check_hook(f, "pre-build-hook", PRE_HOOK_NAME)


def check_post_build_hook(f: Facts) -> Result:
    """nix.conf's post-build-hook is recnix's (and exists)."""
    return _check_hook(f, "post-build-hook", POST_HOOK_NAME)


def check_hook_channel(f: Facts) -> Result:
    """bin/recnix-hook-channel and its bash are next to the pre-build hook: opted-in
    builds' hooks then start no Python (where nix-daemon's environment names the
    channel: RECNIX_HOOK_CHANNEL, `recnix nix-conf --daemon-env`)."""
    name = "hook-channel"
    if os.path.basename(_hook_value(f, "pre-build-hook")) != PRE_HOOK_NAME:
        return Result(name, SKIP, "nix.conf's pre-build-hook is not recnix's (see above)")
    script, interpreter = f.hook_channel
    fix = (
        f"reinstall recnix: its package puts {CHANNEL_NAME} beside {PRE_HOOK_NAME} "
        "(and install bash, which it runs on)"
    )
    st = f.paths.get(script)
    if st is None or not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o111:
        problem = f"no executable {script}"
    elif interpreter is None or f.paths.get(interpreter) is None:
        problem = f"{script} names an interpreter that is not there ({interpreter or 'no #!'})"
    else:
        return Result(name, OK, f"{script} ({interpreter}): opted-in builds' hooks start no Python")
    return Result(
        name,
        WARN,
        f"{problem}: opted-in builds' pre- and post-build hooks start Python instead "
        "(about 10 ms more per build)",
        fix,
    )


def _hook_value(f: Facts, setting: str) -> str:
    value = f.settings.get(setting)
    if isinstance(value, list):  # build-hook is a list of words since Nix 2.19
        value = " ".join(str(v) for v in value)
    return value.strip() if isinstance(value, str) else ""


def _is_lix(f: Facts) -> bool:
    try:
        return bool(f.nix_cli_version) and parse_nix_version(f.nix_cli_version).is_lix
    except NixVersionError:
        return False


def check_build_hook(f: Facts) -> Result:
    """nix.conf's build-hook is recnix's (not on Lix): recursive builds then wait for a
    session before Nix takes a build user, and ssh-ng:// builders send closures back."""
    if _is_lix(f):
        configured = _hook_value(f, "build-hook")
        on_cmdline = [
            args[i + 2]
            for args in f.daemon_cmdlines
            for i in range(len(args) - 2)
            if args[i] == "--option" and args[i + 1] == "build-hook"
        ]
        recnix_hook = [
            v
            for v in [configured, *on_cmdline]
            if v and BUILD_HOOK_NAME in os.path.basename(v.split()[0])
        ]
        if recnix_hook:
            where = (
                f"in {f.nix_conf_file}"
                if configured in recnix_hook
                else "on nix-daemon's command line"
            )
            return Result(
                "build-hook",
                FAIL,
                f"build-hook = {recnix_hook[0]} ({where}): recnix's build-hook cannot serve Lix "
                "(Cap'n Proto since 2.94): every build that Lix asks it about fails (older "
                "recnix: hangs for ever)",
                f"remove the build-hook line from {f.nix_conf_file} (or --option build-hook "
                "from nix-daemon's command line) and restart nix-daemon; `recnix nix-conf` "
                "prints the lines for Lix (NixOS: services.recnix.lix = true)",
            )
        return Result(
            "build-hook",
            OK,
            "Lix keeps its own build-hook (Cap'n Proto since 2.94): recursive builds wait "
            "for a session holding a build user; start at most as many at once as there "
            "are build users, less one",
        )
    try:
        cli = parse_nix_version(f.nix_cli_version) if f.nix_cli_version else None
    except NixVersionError:
        cli = None
    if cli is not None and cli.ignores_conf_build_hook:
        given = any("build-hook" in args for args in f.daemon_cmdlines)
        hook = f.which.get(BUILD_HOOK_NAME) or f"/path/to/{BUILD_HOOK_NAME}"
        if not given:
            return Result(
                "build-hook",
                WARN,
                f"Nix {cli.version} ignores nix.conf's build-hook (2.25-2.33 reset it to "
                "their own after reading nix.conf), and no running nix-daemon has it on its "
                "command line: recursive builds wait for a session holding a build user "
                "(more at once than build users deadlock, Nix #7297)",
                f"start nix-daemon with `--option build-hook {hook}` (systemd: a drop-in "
                "with `ExecStart=` and `ExecStart=/usr/bin/nix-daemon --option build-hook "
                f"{hook}`)",
            )
        return Result(
            "build-hook",
            OK,
            f"nix-daemon runs with --option build-hook (Nix {cli.version} ignores nix.conf's)",
        )
    result = _check_hook(f, "build-hook", BUILD_HOOK_NAME)
    if result.status == OK:
        return Result(
            "build-hook",
            OK,
            f"{result.summary} (recursive builds wait for a session before they take a build user)",
        )
    return Result(
        "build-hook",
        WARN,
        f"{result.summary}: recursive builds then wait for a session holding a build user "
        "(more at once than build users deadlock, Nix #7297), and outer builds sent to "
        "ssh-ng:// builders come back without what they built inside",
        result.fix,
    )


def check_system_features(f: Facts) -> Result:
    """``system-features`` (after ``extra-system-features``) has recnix's two features."""
    value = f.settings.get("system-features")
    features = set(value.split() if isinstance(value, str) else value or [])
    missing = [x for x in (FEATURE, FEATURE_READONLY) if x not in features]
    if not missing:
        return Result(
            "system-features", OK, f"system-features include {FEATURE}, {FEATURE_READONLY}"
        )
    return Result(
        "system-features",
        FAIL,
        f"system-features lack {', '.join(missing)}: Nix refuses to build derivations "
        "that require them",
        f"add `extra-system-features = {FEATURE} {FEATURE_READONLY}` to {f.nix_conf_file} "
        "and restart nix-daemon",
    )


def check_build_users(f: Facts) -> Result:
    """Enough build users for an outer build plus its nested ones (Nix #7297)."""
    configured = f.config.settings.daemon.max_sessions
    if f.settings.get("auto-allocate-uids") is True:
        return Result("build-users", OK, "auto-allocate-uids = true: no build-user bound")
    if f.users is None:
        group = f.settings.get("build-users-group")
        if not group:
            return Result("build-users", OK, "no build-users-group: no build-user bound")
        return Result(
            "build-users",
            FAIL,
            f"build-users-group = {group}, but there is no such group",
            "create the group and its users (Debian: apt install nix-setup-systemd), "
            f"or fix build-users-group in {f.nix_conf_file}",
        )
    group, count = f.users
    allowed, why = session_bound(configured, f.users)
    if count < 2:
        return Result(
            "build-users",
            FAIL,
            f"group {group!r} has {count} build user(s): a nested build needs one more "
            "than its outer build and would wait forever (Nix #7297)",
            f"add build users to {group!r} or set `auto-allocate-uids = true`",
        )
    if why:
        return Result(
            "build-users",
            WARN,
            f"daemon.max-sessions = {configured}, but {group!r} has {count} build users: "
            f"the service allows {allowed} concurrent session(s)",
            f"set daemon.max-sessions = {allowed} in {_config_file(f)}, or add build users",
        )
    return Result(
        "build-users",
        OK,
        f"{count} build users in {group!r} for daemon.max-sessions = {configured}",
    )


def check_daemon(f: Facts) -> Result:
    """The nix-daemon the sessions forward to answers the worker protocol."""
    upstream = f.config.settings.daemon.upstream
    if not f.daemon.ok:
        return Result("nix-daemon", FAIL, f.daemon.detail, f.daemon.values.get("fix", ""))
    minor = f.daemon.values.get("minor", 0)
    where = f.daemon.values.get("where", upstream)
    version = f.daemon.values.get("nix_version") or "version not sent"
    summary = f"daemon.upstream = {upstream!r}: {where} answers, protocol 1.{minor} ({version})"
    if not MIN_MINOR <= minor <= MAX_MINOR:
        return Result(
            "nix-daemon",
            FAIL,
            summary + f"; recnix speaks 1.{MIN_MINOR} to 1.{MAX_MINOR}",
            "use Nix 2.8 or later",
        )
    return Result("nix-daemon", OK, summary)


def check_service(f: Facts) -> Result:
    """The recnix service runs and answers on its control socket."""
    if f.service.ok:
        return Result(
            "service",
            OK,
            f"recnix service answers on {f.config.control_socket} "
            f"({f.service.values.get('sessions', 0)} open session(s))",
        )
    return Result(
        "service",
        FAIL,
        f.service.detail,
        "start it: `systemctl start recnix` (or `recnix daemon --config FILE`); "
        "its log: `journalctl -u recnix`",
    )


def check_daemon_socket(f: Facts) -> Result:
    """No daemon socket file that nobody answers on (a killed daemon leaves it behind,
    and Lix >= 2.94 then sends every root command to it)."""
    if f.socket_answers is None:
        return Result("daemon-socket", OK, f"no daemon socket at {f.socket_path}")
    if f.socket_answers:
        return Result("daemon-socket", OK, f"a nix-daemon answers on {f.socket_path}")
    lix = _is_lix(f)
    return Result(
        "daemon-socket",
        FAIL if lix else WARN,
        f"{f.socket_path} exists but nobody answers on it (a nix-daemon that was killed "
        "left it behind)"
        + (
            ": Lix sends every command, root's too, to that socket, and they all fail"
            if lix
            else ""
        ),
        f"start the nix-daemon (`systemctl start nix-daemon`), or remove {f.socket_path}",
    )


def check_user_namespaces(f: Facts) -> Result:
    """Nix's sandbox runs builds in a user namespace."""
    if f.userns.ok:
        return Result("user-namespaces", OK, "user namespaces available")
    return Result(
        "user-namespaces",
        FAIL,
        f"cannot create a user namespace: {f.userns.detail}; Nix's sandbox needs them",
        "allow them: sysctl user.max_user_namespaces=10000 "
        "(and kernel.unprivileged_userns_clone=1 on older Debian kernels)",
    )


def check_mount_syscalls(f: Facts) -> Result:
    """open_tree/move_mount (new paths appear in a running sandbox by mounts)."""
    if f.open_tree.ok and f.move_mount.ok:
        return Result(
            "mount-syscalls",
            OK,
            "open_tree and move_mount available: new paths are mounted into running sandboxes",
        )
    missing = [
        name for name, p in (("open_tree", f.open_tree), ("move_mount", f.move_mount)) if not p.ok
    ]
    details = "; ".join(p.detail for p in (f.open_tree, f.move_mount) if not p.ok and p.detail)
    return Result(
        "mount-syscalls",
        WARN,
        f"{' and '.join(missing)} unavailable ({details}): recnix uses its fallback, hard "
        "links into the sandbox's /nix/store (works; no directories shared by mount)",
        "a Linux kernel >= 5.2 (and no seccomp filter denying them) gives the mount mechanism",
    )


def _check_dir(
    f: Facts, name: str, key: str, must_be_under: str | None, made_at_start: bool
) -> Result:
    path = str(f.config["daemon"][key])
    st = f.paths.get(path)
    if must_be_under and not (path + "/").startswith(must_be_under.rstrip("/") + "/"):
        return Result(
            name,
            FAIL,
            f"daemon.{key} = {path} is not under {must_be_under}: the garbage collector "
            "would not see its roots",
            f"set daemon.{key} to a directory under {must_be_under} in {_config_file(f)}",
        )
    if st is None:
        if not made_at_start:
            return Result(name, OK, f"daemon.{key} = {path} (made when a session roots a path)")
        if f.service.ok:
            return Result(
                name,
                FAIL,
                f"daemon.{key} = {path} does not exist although the service runs",
                "restart the service (`systemctl restart recnix`); check its log",
            )
        return Result(name, OK, f"daemon.{key} = {path} (created when the service starts)")
    if not stat.S_ISDIR(st.st_mode):
        return Result(
            name, FAIL, f"daemon.{key} = {path} is not a directory", f"remove or move {path}"
        )
    if st.st_uid != 0 or st.st_mode & 0o022:
        return Result(
            name,
            FAIL,
            f"daemon.{key} = {path} is writable by others than root "
            f"(owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o})",
            f"chown root {path} && chmod go-w {path}",
        )
    return Result(name, OK, f"daemon.{key} = {path}")


def check_state_dir(f: Facts) -> Result:
    """The state directory (session sockets, journals) is root's."""
    return _check_dir(f, "state-dir", "state-dir", None, made_at_start=True)


def check_gc_roots_dir(f: Facts) -> Result:
    """The per-session GC roots live under Nix's gcroots."""
    return _check_dir(f, "gc-roots-dir", "gc-roots-dir", GCROOTS_DIR, made_at_start=False)


CHECKS: tuple[Callable[[Facts], Result], ...] = (
    check_nix_version,
    check_daemon,
    check_sandbox,
    check_sandbox_fallback,
    check_pre_build_hook,
    check_post_build_hook,
    check_hook_channel,
    check_build_hook,
    check_system_features,
    check_build_users,
    check_service,
    check_daemon_socket,
    check_user_namespaces,
    check_mount_syscalls,
    check_state_dir,
    check_gc_roots_dir,
)


def run_checks(facts: Facts) -> list[Result]:
    """Every check in ``CHECKS`` on ``facts``, in order."""
    return [check(facts) for check in CHECKS]


def passed(results: list[Result]) -> bool:
    """True when nothing FAILed (warnings and skips pass)."""
    return all(r.status != FAIL for r in results)


NAME_WIDTH = 16


def render_line(r: Result) -> str:
    """``status  name  what was found — what to do`` (the fix only when not ok)."""
    line = f"{r.status:<4}  {r.name:<{NAME_WIDTH}}  {r.summary}"
    if r.fix and r.status in (FAIL, WARN):
        line += f" — {r.fix}"
    return line + "\n"


def verdict(results: list[Result]) -> str:
    """The closing line: which checks failed, or that all is in place."""
    failed = [r.name for r in results if r.status == FAIL]
    if failed:
        return f"recnix doctor: {len(failed)} check(s) failed: {', '.join(failed)}\n"
    return "recnix doctor: everything a recursive build needs is in place\n"


def render(results: list[Result]) -> str:
    """Every result's line, then the verdict."""
    return "".join(render_line(r) for r in results) + verdict(results)


def to_json(results: list[Result]) -> dict[str, Any]:
    """``{"ok": bool, "checks": [{name, status, summary, fix}, ...]}`` for scripts."""
    return {"ok": passed(results), "checks": [asdict(r) for r in results]}


def _show(value: object) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _config_file(f: Facts) -> str:
    return str(f.config.source) if f.config.source else "/etc/recnix/config.toml"


# -- gathering the facts (I/O)


def nix_conf_file(env: Mapping[str, str]) -> str:
    """The nix.conf the daemon reads ($NIX_CONF_DIR/nix.conf, else /etc/nix/nix.conf)."""
    return os.path.join(env.get("NIX_CONF_DIR") or "/etc/nix", "nix.conf")


def _nix_cli_version(env: Mapping[str, str]) -> str | None:
    try:
        proc = subprocess.run(
            ["nix", "--version"], capture_output=True, text=True, env=dict(env), timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def upstream_target(upstream: str, env: Mapping[str, str]) -> str:
    """Where ``daemon.upstream`` leads: a socket path, or ``nix-daemon --stdio``."""
    if upstream == "stdio":
        return "nix-daemon --stdio"
    if upstream.startswith("unix://"):
        return upstream[len("unix://") :]
    from recnix.store.upstream import DEFAULT_SOCKET

    return env.get("NIX_DAEMON_SOCKET_PATH") or DEFAULT_SOCKET


def probe_daemon(upstream: str, env: Mapping[str, str], config_file: str) -> Probe:
    """Handshake with the daemon ``daemon.upstream`` names, as a session would."""
    from recnix.store.upstream import Upstream, UpstreamError

    where = upstream_target(upstream, env)
    if upstream == "stdio" and shutil.which("nix-daemon", path=env.get("PATH")) is None:
        return Probe(
            False,
            'daemon.upstream = "stdio", but there is no nix-daemon on PATH',
            {"fix": "install Nix (nix-daemon) or set daemon.upstream to a daemon socket"},
        )

    async def handshake() -> dict[str, Any]:
        up = await asyncio.wait_for(Upstream.connect(upstream), PROBE_TIMEOUT)
        try:
            return {"minor": up.minor, "nix_version": up.nix_version, "where": where}
        finally:
            await up.close()

    try:
        return Probe(True, values=asyncio.run(handshake()))
    except (UpstreamError, OSError, TimeoutError) as e:
        if upstream == "stdio":
            fix = "check that `nix-daemon --stdio` runs as root"
        else:
            fix = (
                f"start the nix-daemon (`systemctl start nix-daemon`) so that {where} "
                f'exists, or set daemon.upstream = "stdio" in {config_file}'
            )
        reason = e.__cause__.strerror if isinstance(e.__cause__, OSError) else None
        if isinstance(e, TimeoutError):
            reason = f"no handshake within {PROBE_TIMEOUT:.0f} s"
        detail = f"cannot reach the nix-daemon at {where}: {reason or e}"
        return Probe(False, detail, {"fix": fix})


def probe_service(config: Config) -> Probe:
    """Ask the service for its status on the configured control socket."""
    try:
        reply = control.request(config.control_socket, {"op": "status"}, timeout=PROBE_TIMEOUT)
    except control.ControlError as e:
        cause = e.__cause__
        if isinstance(cause, PermissionError):
            detail = (
                f"no permission to use the control socket {config.control_socket} "
                "(it is root-only: run recnix doctor as root)"
            )
        elif isinstance(cause, OSError):
            detail = (
                f"the recnix service does not answer on {config.control_socket}: "
                f"{cause.strerror or cause}"
            )
        else:
            detail = f"the recnix service at {config.control_socket}: {e}"
        return Probe(False, detail)
    return Probe(True, values={"sessions": len(reply.get("sessions", []))})


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def probe_user_namespaces() -> Probe:
    """Create a user namespace in a forked child (the parent is left as it was)."""
    pid = os.fork()
    if pid == 0:  # child: only async-signal-safe work, then _exit
        rc = _libc.unshare(ctypes.c_int(CLONE_NEWUSER))
        os._exit(0 if rc == 0 else min(ctypes.get_errno(), 255) or 255)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 0:
        return Probe(True)
    return Probe(False, os.strerror(code) if 0 < code < 255 else f"exit status {code}")


def probe_open_tree(path: str = "/nix/store") -> Probe:
    """Clone the mount tree at ``path`` (detached, dropped again at once)."""
    fd = _libc.syscall(
        ctypes.c_long(SYS_OPEN_TREE),
        ctypes.c_int(-100),  # AT_FDCWD
        ctypes.c_char_p(path.encode()),
        ctypes.c_uint(OPEN_TREE_CLONE | os.O_CLOEXEC | AT_RECURSIVE),
    )
    if fd >= 0:
        os.close(fd)
        return Probe(True)
    err = ctypes.get_errno()
    if err == errno.EPERM:
        return Probe(False, "open_tree: not permitted (run recnix doctor as root)")
    return Probe(False, f"open_tree: {os.strerror(err)}")


def probe_move_mount() -> Probe:
    """Call move_mount with a bad descriptor: EBADF means it exists, ENOSYS that it does not."""
    rc = _libc.syscall(
        ctypes.c_long(SYS_MOVE_MOUNT),
        ctypes.c_int(-1),
        ctypes.c_char_p(b""),
        ctypes.c_int(-1),
        ctypes.c_char_p(b""),
        ctypes.c_uint(0),
    )
    err = ctypes.get_errno() if rc < 0 else 0
    if err in (errno.ENOSYS, errno.EPERM):
        return Probe(False, f"move_mount: {os.strerror(err)}")
    return Probe(True)


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def probe_socket_file(path: str) -> bool | None:
    """None if there is no socket at ``path``, else whether a connect() there succeeds."""
    from recnix.store.storeenv import probe_socket

    return probe_socket(path, PROBE_TIMEOUT)


def running_daemon_cmdlines() -> list[list[str]]:
    """The command lines of the nix-daemon processes running on this machine."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/comm", encoding="utf-8") as f:
                if f.read().strip() != "nix-daemon":
                    continue
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                found.append([a.decode(errors="replace") for a in f.read().split(b"\0") if a])
        except OSError:
            continue
    return found


def gather(config: Config, env: Mapping[str, str] | None = None) -> Facts:
    """Collect everything the checks look at (reads only; changes nothing)."""
    env = dict(os.environ if env is None else env)
    settings = nix_settings(env)
    which = {
        name: shutil.which(name, path=env.get("PATH"))
        for name in (PRE_HOOK_NAME, POST_HOOK_NAME, BUILD_HOOK_NAME)
    }
    hooks = ("pre-build-hook", "post-build-hook", "build-hook")
    paths = [str(settings.get(hook) or "") for hook in hooks]
    paths += [str(config.state_dir), str(config.settings.daemon.gc_roots_dir)]
    pre_build = paths[0].split()[0] if paths[0].strip() else ""
    channel = os.path.join(os.path.dirname(pre_build), CHANNEL_NAME) if pre_build else ""
    interpreter = _interpreter(channel) if channel else None
    paths += [channel, interpreter or ""]
    return Facts(
        config=config,
        nix_conf_file=nix_conf_file(env),
        nix_cli_version=_nix_cli_version(env),
        settings=settings,
        users=build_users(settings),
        daemon=probe_daemon(
            config.settings.daemon.upstream,
            env,
            str(config.source or "/etc/recnix/config.toml"),
        ),
        service=probe_service(config),
        userns=probe_user_namespaces(),
        open_tree=probe_open_tree(),
        move_mount=probe_move_mount(),
        which=which,
        daemon_cmdlines=running_daemon_cmdlines(),
        paths={p: _stat(p) for p in paths if p},
        socket_answers=probe_socket_file(system_socket(env)),
        socket_path=system_socket(env),
        hook_channel=(channel, interpreter),
    )


def _interpreter(script: str) -> str | None:
    """The program a script's ``#!`` line names (None: unreadable, or no ``#!``)."""
    try:
        with open(script, "rb") as f:
            first = f.readline(4096)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = first[2:].decode(errors="replace").split()
    return words[0] if words else None


def system_socket(env: Mapping[str, str]) -> str:
    """The daemon socket Nix's ``auto`` store looks at (``NIX_DAEMON_SOCKET_PATH``, else
    ``/nix/var/nix/daemon-socket/socket``)."""
    from recnix.store.upstream import DEFAULT_SOCKET

    return env.get("NIX_DAEMON_SOCKET_PATH") or DEFAULT_SOCKET


# -- the build check (I/O: a real build)

BUILD_EXPRESSION = r"""
{ nix, busybox, nonce }:
derivation {
  name = "recnix-doctor";
  system = builtins.currentSystem;
  builder = "${builtins.storePath busybox}/bin/sh";
  requiredSystemFeatures = [ "recnix" ];
  PATH = "${builtins.storePath busybox}/bin:${builtins.storePath nix}/bin";
  inherit nonce;
  args = [ "-c" ''
    echo "added by recnix doctor's build $nonce" > note
    nix-store --add note > $out
  '' ];
}
"""


def build_check(
    env: Mapping[str, str] | None = None,
    nix: str | None = None,
    busybox: str | None = None,
    timeout: float = 600.0,
) -> Result:
    """Build a derivation that opts in and runs ``nix-store --add`` in its sandbox; the
    output names the added path, which must then be in the output's closure (the
    post-build hook's work). ``nix``/``busybox``: store paths; by default
    ``recnix bundle-nix`` / ``recnix busybox`` (which add them to the store)."""
    from recnix.cli.bundle import BundleError, bundle_nix, busybox_store_path

    env = dict(os.environ if env is None else env)
    try:
        busybox = busybox or busybox_store_path(env)
        nix = nix or bundle_nix(env)
    except (BundleError, OSError) as e:
        return Result(
            "build",
            FAIL,
            f"cannot put busybox and Nix into the store for the test build: {e}",
            "pass store paths with --nix and --busybox (on NixOS: pkgs.nix, pkgs.busybox), "
            "or skip this check with --no-build",
        )
    with tempfile.TemporaryDirectory(prefix="recnix-doctor-") as scratch:
        expr = Path(scratch, "doctor.nix")
        expr.write_text(BUILD_EXPRESSION)
        argv = [
            "nix-build", "--no-out-link", str(expr),
            "--argstr", "nix", nix, "--argstr", "busybox", busybox,
            "--argstr", "nonce", str(time.time_ns()),
        ]  # fmt: skip
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, env=env, timeout=timeout, cwd=scratch
            )
        except subprocess.TimeoutExpired:
            return Result(
                "build",
                FAIL,
                f"the test build did not finish within {timeout:.0f} s",
                "look at `journalctl -u recnix` and the nix-daemon's log",
            )
        except OSError as e:
            return Result("build", FAIL, f"cannot run nix-build: {e}", "install Nix")
    lines = proc.stderr.strip().splitlines()
    errors = [line.strip() for line in lines if line.lstrip().startswith("error:")]
    log_tail = " | ".join(errors or lines[-4:])
    out = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if proc.returncode != 0 or not out.startswith("/nix/store/"):
        return Result(
            "build",
            FAIL,
            f"the opted-in test build failed (nix-build exit {proc.returncode}): {log_tail}",
            "fix the failing checks above; `journalctl -u recnix` has the service's side",
        )
    try:
        added = Path(out).read_text().strip()
        closure = subprocess.run(
            ["nix-store", "--query", "--requisites", out],
            capture_output=True, text=True, env=env, timeout=120, check=True,
        ).stdout.split()  # fmt: skip
    except (OSError, subprocess.SubprocessError) as e:
        return Result("build", FAIL, f"cannot inspect the test build's output {out}: {e}")
    if added not in closure:
        return Result(
            "build",
            FAIL,
            f"the test build added {added} from inside, but it is not in the closure of {out}: "
            "the post-build hook did not register the reference",
            "check post-build-hook in nix.conf and `journalctl -u recnix`",
        )
    return Result(
        "build",
        OK,
        f"an opted-in build ran `nix-store --add` in its sandbox; {out} references {added}",
    )
