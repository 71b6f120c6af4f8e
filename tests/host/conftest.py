"""Host tier: a private nix-daemon (Debian's nix-bin) with real sandboxed builds.

Fixtures (all session-scoped):

* ``nix_host``: daemon without the recnix hooks (Nix's built-in
  ``recursive-nix`` is on: the oracle).
* ``nix_host_recnix``: daemon with ``pre-build-hook``/``post-build-hook`` set
  to the venv's recnix hooks and ``RECNIX_CONFIG=<root>/recnix.toml`` in its
  environment (the service fixture writes that file). Parametrized by
  ``hook_output`` (see ``HOOK_OUTPUT_MODES``): "honoured" (Nix bind-mounts the
  hook's extra-sandbox-paths) and "discarded" (nix.conf's pre-build-hook is a
  wrapper that drops the hook's stdout: Lix 2.93–2.95's behaviour). Select the
  modes with ``RECNIX_TEST_HOOK_OUTPUT=honoured,discarded`` (the default).
* ``busybox``, ``nix_bundle``: store paths (see ``recnix.cli.bundle``).
* ``oracle_runner``: a ``ScenarioRunner`` on ``nix_host``.

Both daemons share the machine's real /nix/store; each has its own socket,
NIX_CONF_DIR and build directory (TMPDIR).
"""

from __future__ import annotations

import contextlib
import grp
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from recnix.cli.bundle import bundle_nix, busybox_store_path
from tests import nixversion
from tests.nixversion import (
    build_dir_conf,
    daemon_build_root,
    has_builtin_recursive_nix,
    ignores_conf_build_hook,
    is_lix,
    no_builtin_reason,
    uses_recnix_build_hook,
)
from tests.scenarios.runner import ScenarioRunner

SCENARIO_DIR = Path(__file__).resolve().parents[1] / "scenarios"
VENV_BIN = Path(sys.executable).parent
PRE_BUILD_HOOK = VENV_BIN / "recnix-pre-build-hook"
POST_BUILD_HOOK = VENV_BIN / "recnix-post-build-hook"
BUILD_HOOK = VENV_BIN / "recnix-build-hook"
RECNIX_BIN = VENV_BIN / "recnix"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DAEMON_START_TIMEOUT = 20.0
DAEMON_STOP_TIMEOUT = 20.0
TEST_GC_ROOTS = Path("/nix/var/nix/gcroots/recnix-test")
# How Nix treats the pre-build hook's output: "honoured" (Nix), "discarded" (Lix
# 2.93–2.95, emulated by a wrapper hook that drops the output).
HOOK_OUTPUT_MODES = ("honoured", "discarded")


def hook_output_modes() -> list[str]:
    """The modes selected by RECNIX_TEST_HOOK_OUTPUT (comma-separated; default: all, and
    on Lix "honoured" only: there nix.conf names recnix's hook as a Lix user's does, and
    Lix itself drops its output, so the emulating wrapper would add nothing)."""
    default = "honoured" if is_lix() else ",".join(HOOK_OUTPUT_MODES)
    wanted = os.environ.get("RECNIX_TEST_HOOK_OUTPUT", default)
    modes = [m.strip() for m in wanted.split(",") if m.strip()]
    unknown = [m for m in modes if m not in HOOK_OUTPUT_MODES]
    if unknown or not modes:
        raise ValueError(
            f"RECNIX_TEST_HOOK_OUTPUT={wanted!r}: use a comma-separated subset of "
            f"{', '.join(HOOK_OUTPUT_MODES)}"
        )
    return modes


def discarding_hook_text(hook: Path, after: str = "") -> str:
    """A pre-build hook that runs ``hook`` and drops its stdout, as Lix 2.93–2.95 drops
    the hook's output (its exit status is kept); ``after``: shell run afterwards."""
    return (
        "#!/bin/sh\n"
        "# recnix test mode: Nix never sees the hook's output (Lix 2.93-2.95)\n"
        f'"{hook}" "$@" > /dev/null || exit $?\n'
        f"{after}"
    )


class NixCommandError(AssertionError):
    """A nix command run by a test failed (message has the command and its output)."""


def require_host_prerequisites() -> None:
    """Fail (never skip) when this machine cannot run the host tier."""
    problems = []
    if os.geteuid() != 0:
        problems.append("not running as root")
    for tool in ("nix-daemon", "nix-build", "nix-store", "ldd"):
        if shutil.which(tool, path=SYSTEM_PATH) is None:
            problems.append(f"{tool} not found")
    if not os.path.exists("/bin/busybox"):
        problems.append("/bin/busybox (busybox-static) not found")
    try:
        grp.getgrnam("nixbld")
    except KeyError:
        problems.append("group nixbld (nix-setup-systemd) missing")
    if problems:
        pytest.fail(
            "host tier prerequisites missing: " + "; ".join(problems) + " — run ./setup.sh as root",
            pytrace=False,
        )


def nix_conf_text(
    hooks: bool,
    extra: str = "",
    pre_build_hook: Path = PRE_BUILD_HOOK,
    build_hook: str | None = None,
) -> str:
    """The private nix.conf of a test daemon (``build_hook``: instead of recnix's, which
    is left out on Lix, as ``recnix nix-conf`` leaves it out; so is the built-in
    recursive-nix, which Lix no longer has)."""
    features = "nix-command recursive-nix" if has_builtin_recursive_nix() else "nix-command"
    lines = [
        "build-users-group = nixbld",
        "sandbox = true",
        "sandbox-fallback = false",
        "substituters =",
        f"experimental-features = {features}",
        "extra-system-features = recnix recnix-readonly",
        "keep-failed = false",
        "max-jobs = 4",
        "cores = 1",
        "fsync-metadata = false",
    ]
    if hooks:  # as `recnix nix-conf` prints them
        lines += [f"pre-build-hook = {pre_build_hook}", f"post-build-hook = {POST_BUILD_HOOK}"]
        if build_hook or uses_recnix_build_hook():
            lines += [f"build-hook = {build_hook or BUILD_HOOK}", "build-poll-interval = 1"]
    elif build_hook:
        lines += [f"build-hook = {build_hook}"]
    return "\n".join(lines) + "\n" + extra


@dataclass
class NixHost:
    """A running private nix-daemon and how to reach it."""

    root: Path
    hooks: bool
    process: subprocess.Popen[bytes]
    daemon_env: dict[str, str]
    env: dict[str, str] = field(default_factory=dict)
    hook_output: str = "honoured"

    @property
    def socket(self) -> Path:
        return self.root / "daemon.sock"

    @property
    def conf_dir(self) -> Path:
        return self.root / "conf"

    @property
    def build_dir(self) -> Path:
        """The daemon's TMPDIR and build-dir: builds run below it (where:
        ``tests.nixversion.build_top_glob``)."""
        return daemon_build_root(self.root)

    @property
    def log_path(self) -> Path:
        return self.root / "daemon.log"

    @property
    def recnix_config(self) -> Path:
        """Where RECNIX_CONFIG points for a daemon with hooks (written by the service fixture)."""
        return self.root / "recnix.toml"

    @property
    def gc_roots_dir(self) -> Path:
        """The recnix service's daemon.gc-roots-dir for this host (one per host: a
        service removes the roots of sessions it does not know when it starts)."""
        return TEST_GC_ROOTS / self.root.name

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def run(
        self,
        args: Sequence[str],
        check: bool = True,
        input: str | None = None,
        timeout: float = 300.0,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a nix client command against this daemon; text output captured."""
        result = subprocess.run(
            list(args),
            env={**self.env, **(env or {})},
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise NixCommandError(
                f"{shlex.join(args)} exited with {result.returncode}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            )
        return result

    def exec(self, argv: list[str], timeout: float) -> tuple[int, str, str]:
        """The ``Exec`` callable for ``ScenarioRunner``."""
        result = self.run(argv, check=False, timeout=timeout)
        return result.returncode, result.stdout, result.stderr

    def stop(self) -> list[str]:
        """Stop the daemon; return descriptions of processes that were left over (and killed)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(DAEMON_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(DAEMON_STOP_TIMEOUT)
        leftovers = []
        deadline = time.monotonic() + DAEMON_STOP_TIMEOUT
        while True:
            leftovers = processes_with_env("NIX_CONF_DIR", str(self.conf_dir))
            if not leftovers or time.monotonic() > deadline:
                break
            time.sleep(0.2)  # connection workers exit once their client is gone
        for pid, _ in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.gc_roots_dir, ignore_errors=True)
        if self.root not in self.build_dir.parents:
            shutil.rmtree(self.build_dir, ignore_errors=True)
        return [f"pid {pid}: {cmdline}" for pid, cmdline in leftovers]


def processes_with_env(name: str, value: str) -> list[tuple[int, str]]:
    """Processes whose environment has ``name=value`` (i.e. started by one test daemon)."""
    wanted = f"{name}={value}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if wanted in environ:
            found.append((int(entry), cmdline))
    return found


def start_nix_host(
    hooks: bool = False,
    daemon_env: Mapping[str, str] | None = None,
    extra_conf: str = "",
    hook_output: str = "honoured",
    after_hook: str = "",
    build_hook: str | None = None,
    rendered_env: bool = False,
) -> NixHost:
    """Start Debian's nix-daemon on a private socket and nix.conf.

    ``hook_output="discarded"``: nix.conf's pre-build-hook is a wrapper that runs
    recnix's and drops its stdout (then runs ``after_hook``, shell with the hook's
    arguments in "$@"). ``rendered_env``: the daemon's environment carries what
    `recnix nix-conf --daemon-env` renders for the service that
    :func:`start_recnix_service` starts (its control socket, hook marks and hook
    channel), so that opted-in builds' hooks use the hook channel.
    """
    if hook_output not in HOOK_OUTPUT_MODES:
        raise ValueError(f"hook_output {hook_output!r} is not one of {HOOK_OUTPUT_MODES}")
    require_host_prerequisites()
    if hooks:
        for hook in (PRE_BUILD_HOOK, POST_BUILD_HOOK):
            if not os.access(hook, os.X_OK):
                pytest.fail(f"{hook} missing — run ./setup.sh as root", pytrace=False)
    root = Path(tempfile.mkdtemp(prefix="recnix-host-"))
    (root / "conf").mkdir()
    builds = daemon_build_root(root)
    builds.mkdir(mode=0o700, parents=True)
    # Nix 2.26 on: build-dir (2.30 on ignore TMPDIR)
    extra_conf = build_dir_conf(builds) + extra_conf
    pre_build_hook = PRE_BUILD_HOOK
    if hook_output == "discarded":
        pre_build_hook = root / "discarding-pre-build-hook"
        pre_build_hook.write_text(discarding_hook_text(PRE_BUILD_HOOK, after_hook))
        pre_build_hook.chmod(0o755)
    conf_text = nix_conf_text(hooks, extra_conf, pre_build_hook, build_hook)
    (root / "conf" / "nix.conf").write_text(conf_text)
    common = {
        "PATH": SYSTEM_PATH,
        "HOME": os.environ.get("HOME", "/root"),
        "NIX_CONF_DIR": str(root / "conf"),
        "NIX_DAEMON_SOCKET_PATH": str(root / "daemon.sock"),
    }
    rendered = rendered_service_env(root / "recnix") if rendered_env else {}
    env_for_daemon = {**common, "TMPDIR": str(builds), **rendered, **(daemon_env or {})}
    if hooks:
        env_for_daemon.setdefault("RECNIX_CONFIG", str(root / "recnix.toml"))
    log = open(root / "daemon.log", "wb")  # noqa: SIM115 - handed to the daemon
    # Nix 2.25-2.33 take build-hook from the command line only (as recnix's README says)
    argv = ["nix-daemon"]
    if hooks and ignores_conf_build_hook():
        argv += ["--option", "build-hook", build_hook or str(BUILD_HOOK)]
    process = subprocess.Popen(
        argv,
        env=env_for_daemon,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    host = NixHost(
        root=root, hooks=hooks, process=process, daemon_env=env_for_daemon, hook_output=hook_output
    )
    host.env = {
        **common,
        "NIX_REMOTE": f"unix://{root / 'daemon.sock'}",
        "NIX_PAGER": "cat",
        "TMPDIR": "/tmp",
    }
    deadline = time.monotonic() + DAEMON_START_TIMEOUT
    while not _accepts(host.socket):
        if process.poll() is not None or time.monotonic() > deadline:
            host.stop()
            pytest.fail(
                f"nix-daemon did not start (exit {process.poll()}):\n{host.log_text()}",
                pytrace=False,
            )
        time.sleep(0.05)
    return host


def _accepts(path: Path) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def stop_nix_host(host: NixHost) -> None:
    """Stop a host from ``start_nix_host``, fail on leftover processes, remove its files."""
    leftovers = host.stop()
    if leftovers:
        pytest.fail(
            "processes were left after stopping the test nix-daemon:\n" + "\n".join(leftovers),
            pytrace=False,
        )
    shutil.rmtree(host.root, ignore_errors=True)


@pytest.fixture(scope="session")
def nix_host() -> Iterator[NixHost]:
    """A private nix-daemon without recnix hooks (built-in recursive-nix available)."""
    host = start_nix_host(hooks=False)
    yield host
    stop_nix_host(host)


@pytest.fixture(scope="session", params=hook_output_modes())
def hook_output(request: pytest.FixtureRequest) -> str:
    """How the test Nix treats the pre-build hook's output: "honoured" or "discarded"."""
    return request.param


@pytest.fixture(scope="session")
def nix_host_recnix(hook_output: str) -> Iterator[NixHost]:
    """A private nix-daemon whose pre/post-build hooks are recnix's (the pre-build
    hook's output honoured or discarded, see ``hook_output``)."""
    host = start_nix_host(hooks=True, hook_output=hook_output)
    yield host
    stop_nix_host(host)


@pytest.fixture(scope="session")
def busybox(nix_host: NixHost) -> str:
    """Store path of Debian's static busybox (bin/sh and one link per applet)."""
    return busybox_store_path(nix_host.env)


@pytest.fixture(scope="session")
def nix_bundle(nix_host: NixHost, busybox: str) -> str:
    """Store path of the nix bundle (bin/nix-build etc.), GC-rooted for the session."""
    gc_root = nix_host.root / "nix-bundle"
    return bundle_nix(nix_host.env, gc_root=str(gc_root))


def scenario_runner(host: NixHost, busybox: str, nix_bundle: str) -> ScenarioRunner:
    """A ScenarioRunner for the scenarios in this tree against ``host``."""
    return ScenarioRunner(host.exec, str(SCENARIO_DIR), busybox, nix_bundle)


def concurrent_builds(
    host: NixHost,
    busybox: str,
    nix: str,
    feature: str,
    outer: int,
    nested: int,
    timeout: float,
) -> tuple[float, int, int]:
    """``outer`` concurrent outer builds (tests/scenarios/many.nix, separate nix-build
    processes) of ``nested`` nested builds each: (wall seconds, failures, hangs: builds
    still running after ``timeout`` seconds, then killed)."""
    from tests.scenarios.checks import fresh_tag

    runner = scenario_runner(host, busybox, nix)
    procs = []
    t0 = time.perf_counter()
    for _ in range(outer):
        tag = fresh_tag()
        argv = runner.build_argv("many", feature, tag, {"innerTag": tag, "n": nested})
        procs.append(
            subprocess.Popen(
                argv, env=host.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
        )
    failures = hangs = 0
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            _, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            if proc.returncode != 0:
                failures += 1
                print(f"{feature} build failed: {stderr[-2000:]}", file=sys.stderr)
        except subprocess.TimeoutExpired:
            hangs += 1
            proc.kill()
            proc.communicate()
    return time.perf_counter() - t0, failures, hangs


@pytest.fixture(scope="session")
def oracle_runner(nix_host: NixHost, busybox: str, nix_bundle: str) -> ScenarioRunner:
    """Scenarios against the daemon without hooks (for Nix's built-in recursive-nix);
    skipped, with the reason, where there is no built-in (Lix)."""
    require_builtin_recursive_nix()
    return scenario_runner(nix_host, busybox, nix_bundle)


def require_recnix_build_hook() -> None:
    """Skip the calling test, saying why, where recnix's build-hook is not used (Lix)."""
    if not uses_recnix_build_hook():
        pytest.skip(
            f"{nixversion.label()} keeps its own build hook (Cap'n Proto since Lix 2.94), so "
            "recnix's build-hook and its build queue are not used: recursive builds wait "
            "for a session in the pre-build hook (README, Lix)"
        )


def other_build_hook(tmp_path: Path) -> str | None:
    """A build hook other than recnix's, as Lix has: on Lix its own (None: nix.conf
    leaves build-hook out), on Nix one that declines every build (NO_QUEUE_HOOK)."""
    if not uses_recnix_build_hook():
        return None
    hook = tmp_path / "no-queue-build-hook"
    hook.write_text(NO_QUEUE_HOOK)
    hook.chmod(0o755)
    return str(hook)


# A Nix build hook that never builds anything remotely (and never queues).
NO_QUEUE_HOOK = "#!/bin/sh\nprintf '# decline-permanently\\n' >&2\nexec cat > /dev/null\n"


def require_builtin_recursive_nix() -> None:
    """Skip the calling test, saying why, where Nix has no built-in recursive-nix (Lix)."""
    if not has_builtin_recursive_nix():
        pytest.skip(no_builtin_reason())


@dataclass
class RecnixService:
    """A running ``recnix daemon`` wired to a NixHost with hooks."""

    host: NixHost
    root: Path
    config_path: Path
    process: subprocess.Popen[bytes]

    @property
    def control_socket(self) -> Path:
        return self.root / "control.sock"

    @property
    def audit_log(self) -> Path:
        return self.root / "audit.jsonl"

    @property
    def log_path(self) -> Path:
        return self.root / "service.log"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def audit_events(self) -> list[dict]:
        import json

        if not self.audit_log.exists():
            return []
        return [json.loads(line) for line in self.audit_log.read_text().splitlines() if line]

    def session_dirs(self) -> list[Path]:
        return sorted(self.root.glob("s-*"))

    def status(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``recnix status [args]`` against this service (output captured, not checked)."""
        return subprocess.run(
            [str(RECNIX_BIN), "status", "--config", str(self.config_path), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


def rendered_service_env(service_root: Path) -> dict[str, str]:
    """`recnix nix-conf --daemon-env` for the config :func:`recnix_config_text` writes
    for a service whose files are under ``service_root``."""
    from recnix.cli.setup import HOOK_ENTRY
    from recnix.config.loader import hook_environment, load_defaults

    raw = load_defaults()
    raw["daemon"]["control-socket"] = str(service_root / "control.sock")
    raw["daemon"]["state-dir"] = str(service_root)
    return hook_environment(raw, sys.executable, HOOK_ENTRY)


def recnix_config_text(
    root: Path, host: NixHost, extra: str = "", daemon: Mapping[str, object] | None = None
) -> str:
    """The service's config for the host tier (sections of recnix/config/config-keys.toml).

    ``daemon`` overrides keys of the ``[daemon]`` table; ``extra`` appends other tables.
    """
    settings: dict[str, object] = {
        "control-socket": str(root / "control.sock"),
        "state-dir": str(root),
        "gc-roots-dir": str(host.gc_roots_dir),
        "upstream": f"unix://{host.socket}",
        "audit-log": str(root / "audit.jsonl"),
        "max-sessions": 3,
        "log-level": "debug",
        **(daemon or {}),
    }
    lines = ["[daemon]"]
    for key, value in settings.items():
        lines.append(f'{key} = "{value}"' if isinstance(value, str) else f"{key} = {value}")
    return "\n".join(lines) + "\n" + extra


def start_recnix_service(
    host: NixHost,
    extra_config: str = "",
    daemon: Mapping[str, object] | None = None,
    env: Mapping[str, str] | None = None,
) -> RecnixService:
    """Write ``host.recnix_config`` and start ``recnix daemon`` on it (``env``: changes to
    its environment, the daemon's)."""
    root = host.root / "recnix"
    root.mkdir(mode=0o700, exist_ok=True)
    host.recnix_config.write_text(recnix_config_text(root, host, extra_config, daemon))
    service = launch_recnix_service(host, env)
    try:
        wait_until_ready(service, timeout=20, poll=0.05)
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    return service


def launch_recnix_service(host: NixHost, env: Mapping[str, str] | None = None) -> RecnixService:
    """Start ``recnix daemon`` on ``host.recnix_config`` (already written); do not wait."""
    root = host.root / "recnix"
    env = {**host.daemon_env, "RECNIX_CONFIG": str(host.recnix_config), **(env or {})}
    env.pop("TMPDIR", None)
    log = open(root / "service.log", "ab")  # noqa: SIM115 - handed to the service
    process = subprocess.Popen(
        [str(RECNIX_BIN), "daemon", "--config", str(host.recnix_config)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    return RecnixService(host, root, host.recnix_config, process)


def wait_until_ready(service: RecnixService, timeout: float, poll: float) -> None:
    """Poll (every ``poll`` s) until the service's control socket accepts a connection;
    kill it and raise RuntimeError with its log if it exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not _accepts(service.control_socket):
        if service.process.poll() is not None or time.monotonic() > deadline:
            service.process.kill()
            raise RuntimeError(f"recnix daemon did not start:\n{service.log_text()}")
        time.sleep(poll)


def stop_recnix_service(service: RecnixService) -> None:
    """SIGTERM the service and wait; it must exit cleanly (sessions of running builds stay
    journaled for the next run)."""
    if service.process.poll() is None:
        service.process.terminate()
        try:
            service.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            service.process.kill()
            service.process.wait()
            pytest.fail(f"recnix daemon ignored SIGTERM:\n{service.log_text()}", pytrace=False)


@pytest.fixture(scope="session")
def recnix_service(nix_host_recnix: NixHost) -> Iterator[RecnixService]:
    """The recnix service serving ``nix_host_recnix``'s opted-in builds."""
    service = start_recnix_service(nix_host_recnix)
    yield service
    stop_recnix_service(service)


@pytest.fixture(scope="session")
def recnix_runner(
    nix_host_recnix: NixHost, recnix_service: RecnixService, busybox: str, nix_bundle: str
) -> ScenarioRunner:
    """Scenarios against the daemon whose hooks are recnix's, with the service running."""
    return scenario_runner(nix_host_recnix, busybox, nix_bundle)
