"""What a first-time user reads (issue 14): doctor's checks on given facts, the
`recnix status` table, and the error messages for a wrong config, a missing
nix-daemon socket and a hook run by hand."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

from recnix.cli import doctor
from recnix.cli.status import build_name, human_age, human_bytes, render_status
from recnix.config.loader import ConfigError, load_config
from recnix.store.upstream import Upstream, UpstreamError

BIN = Path(__file__).resolve().parents[3] / "bin"
HOOK = "/opt/x/bin/recnix-pre-build-hook"
POST = "/opt/x/bin/recnix-post-build-hook"
BUILD = "/opt/x/bin/recnix-build-hook"
CHANNEL = "/opt/x/bin/recnix-hook-channel"


def facts(**changes: object) -> doctor.Facts:
    """Facts of a host where everything holds; ``changes`` break one thing."""
    executable = os.stat(BIN / "recnix-pre-build-hook")
    root_dir = os.stat("/")
    base = doctor.Facts(
        config=load_config(Path(os.devnull)),
        nix_conf_file="/etc/nix/nix.conf",
        nix_cli_version="nix (Nix) 2.8.0",
        settings={
            "sandbox": True,
            "sandbox-fallback": False,
            "pre-build-hook": HOOK,
            "post-build-hook": POST,
            "build-hook": BUILD,
            "system-features": ["kvm", "recnix", "recnix-readonly"],
            "build-users-group": "nixbld",
        },
        users=("nixbld", 10),
        daemon=doctor.Probe(True, values={"minor": 34, "nix_version": "2.8.0", "where": "/s"}),
        service=doctor.Probe(True, values={"sessions": 0}),
        userns=doctor.Probe(True),
        open_tree=doctor.Probe(True),
        move_mount=doctor.Probe(True),
        which={},
        paths={
            HOOK: executable,
            POST: executable,
            BUILD: executable,
            CHANNEL: executable,
            "/bin/bash": executable,
            "/run/recnix": root_dir,
        },
        hook_channel=(CHANNEL, "/bin/bash"),
    )
    for key, value in changes.items():
        setattr(base, key, value)
    return base


def statuses(f: doctor.Facts) -> dict[str, str]:
    return {r.name: r.status for r in doctor.run_checks(f)}


def test_all_good() -> None:
    results = doctor.run_checks(facts())
    assert doctor.passed(results), doctor.render(results)
    assert [r.name for r in results if r.status != doctor.OK] == []
    assert doctor.render(results).endswith("everything a recursive build needs is in place\n")


@pytest.mark.parametrize(
    "hook_channel", [(CHANNEL, "/nonexistent/bash"), (CHANNEL, None), ("/opt/y/x", "/bin/bash")]
)
def test_a_hook_channel_that_cannot_run_is_a_warning_that_says_why(hook_channel) -> None:
    """Without it opted-in builds' hooks start Python: slower, not broken."""
    results = doctor.run_checks(facts(hook_channel=hook_channel))
    warned = [r for r in results if r.status != doctor.OK]
    assert [(r.name, r.status) for r in warned] == [("hook-channel", doctor.WARN)]
    assert "start Python" in warned[0].summary and "reinstall recnix" in warned[0].fix


def test_the_hook_channel_of_this_checkout_is_found(tmp_path: Path) -> None:
    """gather() reads the #! line of the script beside nix.conf's pre-build-hook."""
    script = BIN / "recnix-hook-channel"
    assert doctor._interpreter(str(script)) == "/bin/bash"
    assert doctor._interpreter(str(tmp_path / "absent")) is None


@pytest.mark.parametrize(
    ("setting", "value", "check"),
    [
        ("sandbox", False, "sandbox"),
        ("sandbox", "relaxed", "sandbox"),
        ("sandbox-fallback", True, "sandbox-fallback"),
        ("pre-build-hook", "", "pre-build-hook"),
        ("post-build-hook", "/bin/true", "post-build-hook"),
        ("system-features", ["recnix"], "system-features"),
    ],
)
def test_one_bad_setting_fails_one_check(setting: str, value: object, check: str) -> None:
    f = facts()
    f.settings = {**f.settings, setting: value}
    results = doctor.run_checks(f)
    assert [r.name for r in results if r.status == doctor.FAIL] == [check]
    line = next(line for line in doctor.render(results).splitlines() if f"  {check} " in line)
    assert line.startswith("FAIL") and "/etc/nix/nix.conf" in line


def test_versions() -> None:
    def version_check(cli: str, daemon: str | None) -> doctor.Result:
        probe = doctor.Probe(True, values={"minor": 35, "nix_version": daemon, "where": "/s"})
        return doctor.check_nix_version(facts(nix_cli_version=cli, daemon=probe))

    assert version_check("nix (Nix) 2.26.1", "2.26.1").status == doctor.OK
    assert version_check("nix (Nix) 2.20.0", None).status == doctor.WARN
    lix_text = (
        "nix (Lix, like Nix) 2.93.0\nSystem type: x86_64-linux\nStore directory: /nix/store\n"
    )
    lix = version_check(lix_text, "2.93.0")
    assert lix.status == doctor.WARN and "Lix 2.93.0" in lix.summary, lix
    assert "not one recnix's tests run against" in lix.summary and "Lix 2.95" in lix.fix, lix
    tested = version_check(lix_text.replace("2.93.0", "2.95.3"), "2.95.3")
    assert tested.status == doctor.OK and "Lix 2.95.3" in tested.summary, tested
    assert version_check("nix (Nix) 2.3.16", None).status == doctor.FAIL
    assert (
        "Lix 2.94.2 (`nix --version`)"
        in version_check(lix_text.replace("2.93.0", "2.94.2"), None).summary
    )


def test_build_hook() -> None:
    assert statuses(facts())["build-hook"] == "ok"
    other = facts(settings={**facts().settings, "build-hook": "/usr/bin/nix __build-remote"})
    result = next(r for r in doctor.run_checks(other) if r.name == "build-hook")
    assert result.status == "warn" and "Nix #7297" in result.summary, result
    lix = facts(nix_cli_version="nix (Lix, like Nix) 2.94.2", settings=other.settings)
    assert statuses(lix)["build-hook"] == "ok"  # Lix keeps its own hook
    # Nix 2.25-2.33 ignore nix.conf's build-hook: only the daemon's command line counts
    trixie = facts(nix_cli_version="nix (Nix) 2.26.3")
    result = next(r for r in doctor.run_checks(trixie) if r.name == "build-hook")
    assert result.status == "warn" and "--option build-hook" in result.fix, result
    given = [["nix-daemon", "--option", "build-hook", BUILD]]
    assert (
        statuses(facts(nix_cli_version="nix (Nix) 2.26.3", daemon_cmdlines=given))["build-hook"]
        == "ok"
    )


LIX = "nix (Lix, like Nix) 2.95.3\nSystem type: x86_64-linux\n"


def test_build_hook_of_recnix_fails_on_lix() -> None:
    """Issue 20: recnix's build-hook in a Lix nix.conf (or on its daemon's command line)
    fails every build: doctor FAILs and says which line to remove."""
    result = doctor.check_build_hook(facts(nix_cli_version=LIX))
    assert result.status == doctor.FAIL, result
    assert BUILD in result.summary and "in /etc/nix/nix.conf" in result.summary, result
    assert "remove the build-hook line from /etc/nix/nix.conf" in result.fix, result
    own = {k: v for k, v in facts().settings.items() if k != "build-hook"}
    on_cmdline = facts(
        nix_cli_version=LIX,
        settings=own,
        daemon_cmdlines=[["nix-daemon", "--option", "build-hook", BUILD]],
    )
    result = doctor.check_build_hook(on_cmdline)
    assert result.status == doctor.FAIL and "command line" in result.summary, result
    lix_own = {**own, "build-hook": ["/usr/local/libexec/lix/build-remote"]}
    assert doctor.check_build_hook(facts(nix_cli_version=LIX, settings=lix_own)).status == "ok"
    assert doctor.check_build_hook(facts(nix_cli_version=LIX, settings=own)).status == "ok"


@pytest.mark.parametrize(
    ("cli", "answers", "status"),
    [
        ("nix (Nix) 2.8.0", None, doctor.OK),
        ("nix (Nix) 2.8.0", True, doctor.OK),
        ("nix (Nix) 2.8.0", False, doctor.WARN),
        (LIX, None, doctor.OK),
        (LIX, True, doctor.OK),
        (LIX, False, doctor.FAIL),
    ],
)
def test_daemon_socket_nobody_answers_on(cli: str, answers: bool | None, status: str) -> None:
    f = facts(nix_cli_version=cli, socket_answers=answers, socket_path="/s/socket")
    result = doctor.check_daemon_socket(f)
    assert result.status == status, result
    if answers is False:
        assert "/s/socket exists but nobody answers on it" in result.summary, result
        assert "remove /s/socket" in result.fix, result
        assert ("root's too" in result.summary) == (status == doctor.FAIL), result


def test_probe_socket_file(tmp_path: Path) -> None:
    import socket

    path = str(tmp_path / "socket")
    assert doctor.probe_socket_file(path) is None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(path)
        s.listen(1)
        assert doctor.probe_socket_file(path) is True
    assert doctor.probe_socket_file(path) is False  # the file stays; nobody listens
    (tmp_path / "plain").write_text("")
    assert doctor.probe_socket_file(str(tmp_path / "plain")) is None


def test_build_users() -> None:
    assert statuses(facts(users=("nixbld", 1)))["build-users"] == doctor.FAIL
    warn = doctor.check_build_users(facts(users=("nixbld", 3)))
    assert warn.status == doctor.WARN and "allows 2" in warn.summary
    auto = facts(users=None)
    auto.settings = {**auto.settings, "auto-allocate-uids": True}
    assert doctor.check_build_users(auto).status == doctor.OK


def test_link_fallback_is_a_warning_that_says_so() -> None:
    r = doctor.check_mount_syscalls(facts(open_tree=doctor.Probe(False, "open_tree: ENOSYS")))
    assert r.status == doctor.WARN and "hard links" in r.summary


def test_json_shape() -> None:
    f = facts(service=doctor.Probe(False, "the recnix service does not answer on /x"))
    report = doctor.to_json(doctor.run_checks(f))
    assert report["ok"] is False
    service = next(c for c in report["checks"] if c["name"] == "service")
    assert service == {
        "name": "service",
        "status": "FAIL",
        "summary": "the recnix service does not answer on /x",
        "fix": service["fix"],
    }
    assert "systemctl start recnix" in service["fix"]


def test_probes_on_this_machine_do_not_crash() -> None:
    for probe in (doctor.probe_user_namespaces(), doctor.probe_move_mount()):
        assert isinstance(probe.ok, bool)


def test_status_table() -> None:
    assert render_status([], 0) == "no open recnix sessions\n"
    drv = "/nix/store/" + "a" * 32 + "-outer.drv"
    text = render_status(
        [
            {
                "session": "s1", "drv": drv, "depth": 2, "readonly": False, "state": "open",
                "builds": 3, "added": 4, "added_bytes": 3 * 1024 * 1024, "connections": 1,
                "opened": 1000.0,
            }
        ],
        1075.0,
    )  # fmt: skip
    header, row = text.splitlines()[:2]
    assert header.split() == [
        "SESSION", "BUILD", "DEPTH", "MODE", "STATE", "AGE", "BUILDS", "ADDED", "CONNS"
    ]  # fmt: skip
    assert row.split() == [
        "s1",
        "outer",
        "2",
        "full",
        "open",
        "1m15s",
        "3",
        "4",
        "(3.0",
        "MiB)",
        "1",
    ]
    assert drv in text
    assert build_name("x.drv") == "x" and human_age(None) == "?" and human_bytes(10) == "10 B"


def test_config_errors_name_file_key_and_fix(tmp_path: Path) -> None:
    bad = tmp_path / "config.toml"
    bad.write_text("[daemon]\nmax-sesions = 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert str(bad) in str(e.value) and "did you mean 'daemon.max-sessions'" in str(e.value)
    bad.write_text('[daemon]\nmax-sessions = "3"\n')
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert 'must be an integer, not "3" (e.g. max-sessions = 4)' in str(e.value)
    bad.write_text("[policy]\nmax-depth = true\n")
    with pytest.raises(ConfigError, match="must be an integer, not true"):
        load_config(bad)
    bad.write_text("[daemon]\nmax-sessions = 0\n")
    with pytest.raises(ConfigError, match=f"{bad}.*at least 1"):
        load_config(bad)
    bad.write_text('[daemon]\nfsync-paths = "yes"\n')
    with pytest.raises(ConfigError, match='fsync-paths.*use "nix", "always", "never"'):
        load_config(bad)


def test_missing_daemon_socket_names_path_and_fixes(tmp_path: Path) -> None:
    sock = tmp_path / "daemon.sock"
    with pytest.raises(UpstreamError) as e:
        asyncio.run(Upstream.connect(f"unix://{sock}"))
    message = str(e.value)
    assert str(sock) in message and "No such file or directory" in message
    assert "systemctl start nix-daemon" in message and 'daemon.upstream = "stdio"' in message


@pytest.mark.parametrize("hook", ["recnix-pre-build-hook", "recnix-post-build-hook"])
def test_hook_run_by_hand_says_what_it_is(hook: str) -> None:
    proc = subprocess.run(
        [str(BIN / hook)], env={"PATH": os.environ["PATH"]}, capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "Nix runs it for every build" in proc.stderr and "recnix doctor" in proc.stderr
