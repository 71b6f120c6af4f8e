"""recnix.cli.setup's decisions and its files, on a directory standing for the host's root
(systemctl is recorded, not run: the VM tier runs setup for real under systemd)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from recnix.cli import setup
from recnix.cli.nixversion import NixVersion
from recnix.config.loader import load_config

DEBIAN_NIX_CONF = "build-users-group = nixbld\nsandbox = true\n"
BIN = "/usr/local/bin"


def make_host(root: Path, version: str = "2.8.0", implementation: str = "nix", **kw) -> setup.Host:
    values = {
        "root": root,
        "nixos": False,
        "systemd": True,
        "nix": NixVersion(implementation, version),
        "nix_problem": "",
        "recnix": f"{BIN}/recnix",
        "hooks": {name: f"{BIN}/{name}" for name in setup.HOOK_NAMES},
        "python": "/usr/bin/python3",
        "daemon_exec_start": ["/usr/bin/nix-daemon", "nix-daemon", "--daemon"],
        "config": load_config(os.devnull),
    }
    values.update(kw)
    return setup.Host(**values)


def host_with_nix_conf(root: Path, text: str = DEBIAN_NIX_CONF, **kw) -> setup.Host:
    conf = root / "etc/nix/nix.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text(text)
    os.chmod(conf, 0o640)
    (root / "run/systemd/system").mkdir(parents=True)
    return make_host(root, **kw)


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under root (but setup's record) with its hash and mode."""
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


class Commands(list):
    def __call__(self, argv) -> int:
        self.append(list(argv))
        return 0


def run_setup(host: setup.Host) -> tuple[list[str], Commands]:
    commands = Commands()
    nix_conf = host.path(setup.NIX_CONF).read_text()
    changed = setup.apply(host, setup.plan(host, nix_conf), run=commands, out=lambda _: None)
    return changed, commands


def test_setup_writes_its_files_then_changes_nothing_and_undo_restores_every_byte(
    tmp_path: Path,
) -> None:
    host = host_with_nix_conf(tmp_path)
    before = snapshot(tmp_path)
    changed, commands = run_setup(host)
    assert sorted(changed) == sorted(
        [
            setup.NIX_CONF,
            setup.RECNIX_NIX_CONF,
            setup.HOOKS_ENV,
            setup.DAEMON_DROPIN,
            setup.RECNIX_UNIT,
        ]
    )
    assert ["systemctl", "restart", "recnix.service"] in commands
    assert ["systemctl", "restart", "nix-daemon.service"] in commands
    nix_conf = host.path(setup.NIX_CONF).read_text()
    assert nix_conf.startswith(DEBIAN_NIX_CONF) and nix_conf.endswith(setup.INCLUDE_LINE + "\n")
    recnix_conf = host.path(setup.RECNIX_NIX_CONF).read_text()
    assert f"pre-build-hook = {BIN}/recnix-pre-build-hook" in recnix_conf
    assert f"build-hook = {BIN}/recnix-build-hook" in recnix_conf
    assert "ExecStart=/usr/local/bin/recnix daemon" in host.path(setup.RECNIX_UNIT).read_text()
    assert "CapabilityBoundingSet=" in host.path(setup.RECNIX_UNIT).read_text()
    assert "RECNIX_HOOK_SOCKET=/run/recnix/control.sock" in host.path(setup.HOOKS_ENV).read_text()
    assert "ExecStart" not in host.path(setup.DAEMON_DROPIN).read_text()  # Nix 2.8 reads nix.conf

    again, commands = run_setup(host)
    assert again == [] and commands == [], "a second run must change nothing"

    undo_commands = Commands()
    restored = setup.undo(tmp_path, run=undo_commands, out=lambda _: None)
    assert sorted(restored) == sorted(changed)
    assert snapshot(tmp_path) == before  # contents and modes, and nothing left behind
    assert ["systemctl", "disable", "--now", "recnix.service"] in undo_commands
    assert setup.undo(tmp_path, run=undo_commands, out=lambda _: None) == []


def test_nix_2_25_to_2_33_get_the_build_hook_on_nix_daemons_command_line(tmp_path: Path) -> None:
    host = host_with_nix_conf(tmp_path, version="2.26.3")
    run_setup(host)
    dropin = host.path(setup.DAEMON_DROPIN).read_text()
    assert "ExecStart=\n" in dropin
    assert (
        "ExecStart=@/usr/bin/nix-daemon nix-daemon --daemon --option build-hook "
        f"{BIN}/recnix-build-hook\n"
    ) in dropin


def test_nix_2_26_setup_again_keeps_one_build_hook_option(tmp_path: Path) -> None:
    """A second run reads the ExecStart the first one's drop-in made (found in a trixie
    guest: it added the option again, so setup was not idempotent)."""
    ours = ["--option", "build-hook", f"{BIN}/recnix-build-hook"]
    argv = ["/usr/bin/nix-daemon", "nix-daemon", "--daemon"]
    first = setup.plan(
        host_with_nix_conf(tmp_path / "a", version="2.26.3", daemon_exec_start=argv),
        DEBIAN_NIX_CONF,
    )
    again = setup.plan(
        host_with_nix_conf(tmp_path / "b", version="2.26.3", daemon_exec_start=[*argv, *ours]),
        DEBIAN_NIX_CONF,
    )
    dropins = [
        next(c.text for c in wanted.files if c.path == setup.DAEMON_DROPIN)
        for wanted in (first, again)
    ]
    assert dropins[0] == dropins[1] and dropins[0].count("--option build-hook") == 1, dropins


def test_nix_2_26_without_a_readable_exec_start(tmp_path: Path) -> None:
    """Under systemd an unreadable ExecStart is a refusal; without systemd (the steps are
    printed for a person) a note says where the build-hook must go."""
    host = host_with_nix_conf(tmp_path, version="2.26.3", daemon_exec_start=None)
    with pytest.raises(setup.SetupRefused, match="ExecStart could not be read"):
        setup.plan(host, DEBIAN_NIX_CONF)
    host = make_host(tmp_path, version="2.26.3", daemon_exec_start=None, systemd=False)
    wanted = setup.plan(host, DEBIAN_NIX_CONF)
    assert any(
        f"start nix-daemon with --option build-hook {BIN}/recnix-build-hook" in note
        for note in wanted.notes
    ), wanted.notes


def test_lix_gets_no_build_hook_and_no_builtin_recursive_nix(tmp_path: Path) -> None:
    host = host_with_nix_conf(tmp_path, version="2.95.3", implementation="lix")
    run_setup(host)
    recnix_conf = host.path(setup.RECNIX_NIX_CONF).read_text()
    assert "build-hook" not in recnix_conf.replace("pre-build-hook", "").replace(
        "post-build-hook", ""
    )
    assert "recursive-nix" not in recnix_conf
    assert "ExecStart" not in host.path(setup.DAEMON_DROPIN).read_text()


def test_a_nix_conf_that_already_includes_it_is_left_alone(tmp_path: Path) -> None:
    text = f"sandbox = true\n{setup.INCLUDE_LINE}\n"
    host = host_with_nix_conf(tmp_path, text)
    changed, _ = run_setup(host)
    assert setup.NIX_CONF not in changed
    assert host.path(setup.NIX_CONF).read_text() == text


def test_a_nix_conf_without_a_final_newline(tmp_path: Path) -> None:
    host = host_with_nix_conf(tmp_path, "sandbox = true")
    run_setup(host)
    assert host.path(setup.NIX_CONF).read_text() == (
        f"sandbox = true\n{setup.MARK}\n{setup.INCLUDE_LINE}\n"
    )
    setup.undo(tmp_path, run=Commands(), out=lambda _: None)
    assert host.path(setup.NIX_CONF).read_text() == "sandbox = true"


def test_a_crash_half_way_is_undone_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    host = host_with_nix_conf(tmp_path)
    before = snapshot(tmp_path)
    real_write = setup._write
    calls = []

    def write_then_crash(path: Path, text: str, mode: int) -> None:
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        real_write(path, text, mode)

    monkeypatch.setattr(setup, "_write", write_then_crash)
    with pytest.raises(OSError):
        run_setup(host)
    monkeypatch.setattr(setup, "_write", real_write)
    setup.undo(tmp_path, run=Commands(), out=lambda _: None)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"nixos": True}, "this is NixOS: use the NixOS module"),
        ({"nix": NixVersion("nix", "2.7.0")}, "older than 2.8"),
        ({"nix": None, "nix_problem": "no `nix` on PATH"}, "no usable Nix: no `nix` on PATH"),
    ],
)
def test_refusals_of_the_host(tmp_path: Path, change: dict, message: str) -> None:
    host = host_with_nix_conf(tmp_path, **change)
    with pytest.raises(setup.SetupRefused, match=message):
        setup.plan(host, DEBIAN_NIX_CONF)


@pytest.mark.parametrize(
    ("nix_conf", "message"),
    [
        ("sandbox = true\nthis is not nix.conf\n", "cannot parse /etc/nix/nix.conf line 2"),
        ("pre-build-hook = /opt/site-hook\n", r"\[hooks\] pre-build = \[\"/opt/site-hook\"\]"),
        ("post-build-hook = /opt/upload\n", "sets post-build-hook = /opt/upload"),
    ],
)
def test_refusals_of_the_nix_conf(tmp_path: Path, nix_conf: str, message: str) -> None:
    host = host_with_nix_conf(tmp_path, nix_conf)
    with pytest.raises(setup.SetupRefused, match=message):
        setup.plan(host, nix_conf)
    assert host.path(setup.NIX_CONF).read_text() == nix_conf  # nothing touched


def test_a_bad_nix_conf_line_is_named_even_though_nix_itself_fails_on_it(tmp_path: Path) -> None:
    """Nix refuses to start with a line it cannot read: setup names the line, not "no
    usable Nix" (found in a guest: tests/vm/test_setup.py)."""
    nix_conf = "this is not a setting\n"
    problem = "`/usr/bin/nix --version` exited with 1: error: illegal configuration line"
    host = host_with_nix_conf(tmp_path, nix_conf, nix=None, nix_problem=problem)
    with pytest.raises(setup.SetupRefused, match="cannot parse /etc/nix/nix.conf line 1"):
        setup.plan(host, nix_conf)


def test_recnix_own_hooks_in_nix_conf_are_not_a_refusal(tmp_path: Path) -> None:
    text = f"pre-build-hook = {BIN}/recnix-pre-build-hook\nsandbox = true\n"
    host = host_with_nix_conf(tmp_path, text)
    assert setup.plan(host, text).files


def test_dry_run_describes_every_file_and_command(tmp_path: Path) -> None:
    host = host_with_nix_conf(tmp_path)
    text = setup.describe(setup.plan(host, DEBIAN_NIX_CONF))
    for path in (setup.NIX_CONF, setup.RECNIX_NIX_CONF, setup.HOOKS_ENV, setup.RECNIX_UNIT):
        assert f"--- {path} (" in text
    assert "systemctl restart nix-daemon.service" in text


@pytest.mark.parametrize("argv_tail", [["--option", "sandbox", "false"], ["--no-sandbox"]])
def test_a_daemon_started_without_sandbox_is_refused(tmp_path: Path, argv_tail: list[str]) -> None:
    argv = ["/usr/bin/nix-daemon", "nix-daemon", "--daemon", *argv_tail]
    host = host_with_nix_conf(tmp_path, daemon_exec_start=argv)
    with pytest.raises(setup.SetupRefused, match="sandboxing is off for every build"):
        setup.plan(host, DEBIAN_NIX_CONF)


def test_debians_sandbox_false_is_overridden_with_a_note(tmp_path: Path) -> None:
    debian = "# see https://nixos.org/nix/manual/#sec-conf-file\nsandbox = false\n"
    host = host_with_nix_conf(tmp_path, debian)
    wanted = setup.plan(host, debian)
    assert any("sets sandbox = false (Debian's nix.conf does)" in n for n in wanted.notes)
    assert "sandbox = true" in host_file(wanted, setup.RECNIX_NIX_CONF)


def host_file(wanted: setup.Plan, path: str) -> str:
    return next(f.text for f in wanted.files if f.path == path)


def test_systemctl_shows_exec_start_as_program_and_argv() -> None:
    shown = (
        "{ path=/usr/bin/nix-daemon ; argv[]=nix-daemon --daemon ; ignore_errors=no ; "
        "start_time=[n/a] ; stop_time=[n/a] ; pid=0 ; code=(null) ; status=0/0 }\n"
    )
    assert setup.parse_exec_start(shown) == ["/usr/bin/nix-daemon", "nix-daemon", "--daemon"]
    assert setup.parse_exec_start("") is None
