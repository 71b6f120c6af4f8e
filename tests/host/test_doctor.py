"""`recnix doctor` against a private nix-daemon with recnix's hooks and service (issue 14).

A correct setup passes, test build included. Each broken setting (one per
test) makes exactly the check that names it FAIL and the exit status non-zero.
doctor reads nix.conf through NIX_CONF_DIR, as the daemon does; a broken
nix.conf is a copy of the test daemon's with one line changed, a broken recnix
setting a copy of the service's config with one key changed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import nixversion
from tests.host.conftest import (
    BUILD_HOOK,
    POST_BUILD_HOOK,
    PRE_BUILD_HOOK,
    RECNIX_BIN,
    NixHost,
    RecnixService,
    start_nix_host,
    start_recnix_service,
    stop_nix_host,
    stop_recnix_service,
)

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def setup() -> Iterator[RecnixService]:
    """Its own daemon and service: the tests below read them and never change them."""
    host = start_nix_host(hooks=True)
    service = start_recnix_service(host)
    yield service
    stop_recnix_service(service)
    stop_nix_host(host)


def doctor(
    host: NixHost,
    config: Path,
    *args: str,
    conf_dir: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    env = {**host.env, "NIX_CONF_DIR": str(conf_dir or host.conf_dir)}
    return subprocess.run(
        [str(RECNIX_BIN), "doctor", "--config", str(config), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def doctor_json(host: NixHost, config: Path, **kw: Path) -> tuple[int, dict[str, dict]]:
    proc = doctor(host, config, "--json", "--no-build", **kw)
    assert proc.stderr == "", proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] == (proc.returncode == 0)
    return proc.returncode, {c["name"]: c for c in report["checks"]}


def failing(checks: dict[str, dict]) -> list[str]:
    return [name for name, c in checks.items() if c["status"] == "FAIL"]


def nix_conf_with(host: NixHost, tmp_path: Path, drop: str = "", add: str = "") -> Path:
    """A copy of the daemon's conf dir whose nix.conf lacks lines starting with ``drop``
    and ends with ``add``."""
    conf = tmp_path / "conf"
    shutil.copytree(host.conf_dir, conf)
    lines = (conf / "nix.conf").read_text().splitlines()
    kept = [line for line in lines if not (drop and line.startswith(drop))]
    assert len(kept) < len(lines) or not drop, f"{drop!r} not in nix.conf"
    (conf / "nix.conf").write_text("\n".join(kept) + "\n" + add)
    return conf


def config_with(service: RecnixService, tmp_path: Path, **daemon: object) -> Path:
    """A copy of the service's config with keys of [daemon] replaced."""
    text = service.config_path.read_text()
    out = []
    for line in text.splitlines():
        key = line.split("=", 1)[0].strip()
        if key in daemon:
            value = daemon.pop(key)
            line = f'{key} = "{value}"' if isinstance(value, str) else f"{key} = {value}"
        out.append(line)
    assert not daemon, f"keys not in the config: {daemon}"
    path = tmp_path / "recnix.toml"
    path.write_text("\n".join(out) + "\n")
    return path


def test_correct_setup_passes_with_the_build_check(setup: RecnixService) -> None:
    proc = doctor(setup.host, setup.config_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    by_name = {line.split()[1]: line for line in lines[:-1]}
    assert all(not line.startswith("FAIL") for line in lines), proc.stdout
    build = by_name["build"]
    assert build.startswith("ok "), build
    assert "nix-store --add" in build and "references /nix/store/" in build
    assert by_name["service"].startswith("ok ") and str(setup.control_socket) in by_name["service"]
    assert by_name["nix-daemon"].startswith("ok ") and "protocol 1." in by_name["nix-daemon"]
    version = nixversion.version_string()
    assert by_name["nix-version"].startswith("ok ") and version in by_name["nix-version"]
    assert lines[-1] == "recnix doctor: everything a recursive build needs is in place"


def test_json_lists_every_check(setup: RecnixService) -> None:
    rc, checks = doctor_json(setup.host, setup.config_path)
    assert rc == 0, checks
    assert failing(checks) == []
    assert checks["build"]["status"] == "skip"
    for name in (
        "nix-version", "nix-daemon", "sandbox", "sandbox-fallback", "pre-build-hook",
        "post-build-hook", "build-hook", "system-features", "build-users", "service",
        "user-namespaces",
        "mount-syscalls", "state-dir", "gc-roots-dir",
    ):  # fmt: skip
        assert checks[name]["status"] in ("ok", "warn"), checks[name]


def test_sandbox_off(setup: RecnixService, tmp_path: Path) -> None:
    conf = nix_conf_with(setup.host, tmp_path, add="sandbox = false\n")
    rc, checks = doctor_json(setup.host, setup.config_path, conf_dir=conf)
    assert rc == 1 and failing(checks) == ["sandbox"], checks
    assert "sandbox = true" in checks["sandbox"]["fix"] and str(conf) in checks["sandbox"]["fix"]


def test_sandbox_fallback_on(setup: RecnixService, tmp_path: Path) -> None:
    conf = nix_conf_with(setup.host, tmp_path, drop="sandbox-fallback")
    rc, checks = doctor_json(setup.host, setup.config_path, conf_dir=conf)
    assert rc == 1 and failing(checks) == ["sandbox-fallback"], checks
    assert "sandbox-fallback = false" in checks["sandbox-fallback"]["fix"]


def test_pre_build_hook_missing(setup: RecnixService, tmp_path: Path) -> None:
    conf = nix_conf_with(setup.host, tmp_path, drop="pre-build-hook")
    rc, checks = doctor_json(setup.host, setup.config_path, conf_dir=conf)
    assert rc == 1 and failing(checks) == ["pre-build-hook"], checks
    assert "is not set" in checks["pre-build-hook"]["summary"]


def test_post_build_hook_not_recnix(setup: RecnixService, tmp_path: Path) -> None:
    conf = nix_conf_with(
        setup.host, tmp_path, drop="post-build-hook", add="post-build-hook = /bin/true\n"
    )
    rc, checks = doctor_json(setup.host, setup.config_path, conf_dir=conf)
    assert rc == 1 and failing(checks) == ["post-build-hook"], checks
    assert "/bin/true is not recnix's" in checks["post-build-hook"]["summary"]


def test_build_hook_not_recnix_is_a_warning(setup: RecnixService, tmp_path: Path) -> None:
    if nixversion.is_lix():
        pytest.skip(
            f"{nixversion.label()} keeps its own build-hook (nix.conf has none of recnix's): "
            "test_recnix_build_hook_on_lix_fails checks this check there"
        )
    conf = nix_conf_with(setup.host, tmp_path, drop="build-hook", add="build-hook = /bin/false\n")
    rc, checks = doctor_json(setup.host, setup.config_path, conf_dir=conf)
    assert rc == 0 and failing(checks) == [], checks
    hook = checks["build-hook"]
    if nixversion.ignores_conf_build_hook():
        # nix.conf's line does not count: the test daemon has it on its command line
        assert hook["status"] == "ok" and "--option build-hook" in hook["summary"], hook
        return
    assert hook["status"] == "warn" and "/bin/false is not recnix's" in hook["summary"], hook
    assert "Nix #7297" in hook["summary"] and "recnix-build-hook" in hook["fix"], hook


def test_recnix_build_hook_on_lix_fails(setup: RecnixService, tmp_path: Path) -> None:
    """Issue 20: the real doctor on a Lix whose nix.conf names recnix's build-hook."""
    if not nixversion.is_lix():
        pytest.skip(f"{nixversion.label()} is served by recnix's build-hook: Lix only")
    conf = nix_conf_with(setup.host, tmp_path, add=f"build-hook = {BUILD_HOOK}\n")
    rc, checks = doctor_json(setup.host, setup.config_path, conf_dir=conf)
    assert rc == 1 and failing(checks) == ["build-hook"], checks
    hook = checks["build-hook"]
    assert f"build-hook = {BUILD_HOOK} (in {conf / 'nix.conf'})" in hook["summary"], hook
    assert f"remove the build-hook line from {conf / 'nix.conf'}" in hook["fix"], hook


def test_hook_file_missing(setup: RecnixService, tmp_path: Path) -> None:
    gone = tmp_path / "bin" / PRE_BUILD_HOOK.name
    conf = nix_conf_with(
        setup.host, tmp_path, drop="pre-build-hook", add=f"pre-build-hook = {gone}\n"
    )
    rc, checks = doctor_json(setup.host, setup.config_path, conf_dir=conf)
    assert rc == 1 and failing(checks) == ["pre-build-hook"], checks
    assert "no executable file" in checks["pre-build-hook"]["summary"]
    assert POST_BUILD_HOOK.exists()


def test_feature_missing(setup: RecnixService, tmp_path: Path) -> None:
    conf = nix_conf_with(
        setup.host, tmp_path, drop="extra-system-features", add="extra-system-features = recnix\n"
    )
    rc, checks = doctor_json(setup.host, setup.config_path, conf_dir=conf)
    assert rc == 1 and failing(checks) == ["system-features"], checks
    assert "lack recnix-readonly" in checks["system-features"]["summary"]


def test_too_few_build_users(setup: RecnixService, tmp_path: Path) -> None:
    # The root group has no supplementary members: builds would have no user to spare.
    conf = nix_conf_with(
        setup.host, tmp_path, drop="build-users-group", add="build-users-group = root\n"
    )
    rc, checks = doctor_json(setup.host, setup.config_path, conf_dir=conf)
    assert rc == 1 and failing(checks) == ["build-users"], checks
    assert "0 build user(s)" in checks["build-users"]["summary"]


def test_max_sessions_above_build_users_is_a_warning(setup: RecnixService, tmp_path: Path) -> None:
    import grp

    users = len(grp.getgrnam("nixbld").gr_mem)
    config = config_with(setup, tmp_path, **{"max-sessions": users + 5})
    rc, checks = doctor_json(setup.host, config)
    assert rc == 0 and failing(checks) == [], checks
    assert checks["build-users"]["status"] == "warn"
    assert f"allows {users - 1} concurrent" in checks["build-users"]["summary"]
    assert f"max-sessions = {users - 1}" in checks["build-users"]["fix"]


def test_daemon_unreachable(setup: RecnixService, tmp_path: Path) -> None:
    missing = tmp_path / "no-daemon.sock"
    config = config_with(setup, tmp_path, upstream=f"unix://{missing}")
    rc, checks = doctor_json(setup.host, config)
    assert rc == 1 and failing(checks) == ["nix-daemon"], checks
    assert str(missing) in checks["nix-daemon"]["summary"]
    assert 'daemon.upstream = "stdio"' in checks["nix-daemon"]["fix"]


def test_service_down(setup: RecnixService, tmp_path: Path) -> None:
    # What doctor sees of a stopped service: nothing listens on the control socket.
    socket = tmp_path / "control.sock"
    config = config_with(setup, tmp_path, **{"control-socket": str(socket)})
    rc, checks = doctor_json(setup.host, config)
    assert rc == 1 and failing(checks) == ["service"], checks
    assert str(socket) in checks["service"]["summary"]
    assert "systemctl start recnix" in checks["service"]["fix"]


def test_build_check_fails_while_the_service_is_down(setup: RecnixService, tmp_path: Path) -> None:
    """The build check is a real build: with the service stopped it fails and says so."""
    host = setup.host
    stop_recnix_service(setup)
    try:
        proc = doctor(host, setup.config_path)
    finally:
        restarted = start_recnix_service(host)
        setup.process = restarted.process
    assert proc.returncode == 1, proc.stdout
    lines = {line.split()[1]: line for line in proc.stdout.splitlines()[:-1]}
    assert lines["service"].startswith("FAIL"), proc.stdout
    assert lines["build"].startswith("FAIL"), proc.stdout
    assert "test build failed" in lines["build"]
    # What the user's opted-in build says: the socket and how to start the service.
    assert f"no control socket at {setup.control_socket}" in lines["build"]
    assert "systemctl start recnix" in lines["build"]
    assert "service, build" in proc.stdout.splitlines()[-1]


def test_sessions_name_a_missing_upstream_socket_and_the_fixes(
    setup: RecnixService, tmp_path: Path
) -> None:
    """A service whose upstream socket does not exist: the opted-in build fails with
    the socket's path and both fixes (start nix-daemon, or upstream = "stdio")."""
    host = setup.host
    missing = tmp_path / "no-daemon.sock"
    stop_recnix_service(setup)
    try:
        broken = start_recnix_service(host, daemon={"upstream": f"unix://{missing}"})
        try:
            proc = doctor(host, broken.config_path)
        finally:
            stop_recnix_service(broken)
    finally:
        restarted = start_recnix_service(host)
        setup.process = restarted.process
    lines = {line.split()[1]: line for line in proc.stdout.splitlines()[:-1]}
    assert proc.returncode == 1, proc.stdout
    assert lines["nix-daemon"].startswith("FAIL") and str(missing) in lines["nix-daemon"]
    build = lines["build"]
    assert build.startswith("FAIL") and f"cannot connect to the nix-daemon at {missing}" in build
    assert "systemctl start nix-daemon" in build and 'daemon.upstream = "stdio"' in build


def test_gc_roots_dir_outside_gcroots(setup: RecnixService, tmp_path: Path) -> None:
    config = config_with(setup, tmp_path, **{"gc-roots-dir": str(tmp_path / "roots")})
    rc, checks = doctor_json(setup.host, config)
    assert rc == 1 and failing(checks) == ["gc-roots-dir"], checks
    assert "not under /nix/var/nix/gcroots" in checks["gc-roots-dir"]["summary"]


def test_the_vm_example_builds(setup: RecnixService, tmp_path: Path) -> None:
    """`recnix-vm run`'s /root/example.nix, here with this host's bundle and busybox."""
    from recnix_vm.guestprep import example_text

    from recnix.cli.bundle import bundle_nix, busybox_store_path

    host = setup.host
    example = tmp_path / "example.nix"
    example.write_text(example_text(bundle_nix(host.env), busybox_store_path(host.env)))
    out = host.run(["nix-build", "--no-out-link", str(example)]).stdout.strip()
    closure = host.run(["nix-store", "-qR", out]).stdout.split()
    inner = Path(out, "inner").resolve()
    note = Path(out, "note").resolve()
    assert str(inner) in closure and inner.name.endswith("-example-inner"), closure
    assert (
        str(note) in closure and note.read_text() == "a file the outer build added to the store\n"
    )
    assert inner.read_text() == "built inside the outer build\n"


def test_stdio_upstream_is_checked_by_starting_nix_daemon(
    setup: RecnixService, tmp_path: Path
) -> None:
    config = config_with(setup, tmp_path, upstream="stdio")
    rc, checks = doctor_json(setup.host, config)
    assert rc == 0 and failing(checks) == [], checks
    assert "nix-daemon --stdio answers, protocol 1." in checks["nix-daemon"]["summary"]
