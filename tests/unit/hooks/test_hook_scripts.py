"""The hooks' sh fast paths (bin/): Python starts only for opted-in builds or chained hooks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(__file__).resolve().parents[3] / "bin"
HOOKS = ("recnix-pre-build-hook", "recnix-post-build-hook")


@pytest.fixture
def hook_dir(tmp_path: Path) -> Path:
    """The hook scripts next to a fake `recnix` that records how it was called."""
    for hook in HOOKS:
        shutil.copy(BIN / hook, tmp_path / hook)
    fake = tmp_path / "recnix"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/called\n')
    fake.chmod(0o755)
    return tmp_path


def run_hook(
    hook_dir: Path, hook: str, drv: Path, config: Path, extra_env: dict[str, str] | None = None
) -> str | None:
    env = {"PATH": os.environ["PATH"], "RECNIX_CONFIG": str(config), "DRV_PATH": str(drv)}
    env.update(extra_env or {})
    args = [str(drv), "/nix/store/x.drv.chroot"] if hook == HOOKS[0] else []
    proc = subprocess.run([str(hook_dir / hook), *args], env=env, check=False)
    assert proc.returncode == 0
    called = hook_dir / "called"
    if not called.exists():
        return None
    text = called.read_text()
    called.unlink()
    return text.strip()


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize(
    ("drv_text", "config_text", "python"),
    [
        ('Derive([("out","/nix/store/a-x","","")],[],[],"x86_64-linux","/bin/sh")', "", False),
        ('Derive([],[],[],"x",("requiredSystemFeatures","recnix"))', "", True),
        ("plain", "[hooks]\npre-build = []\npost-build = []\n", False),
        ("plain", '[hooks]\npre-build = ["/x"]\npost-build = ["/y"]\n', True),
        ("plain", "[hooks]\npre-build = [\n  '/x',\n]\npost-build = [\n '/y' ]\n", True),
        ("plain", "[hooks]\npre-build = [ ] # none\npost-build = [ ]\n", False),
    ],
    ids=["plain", "opted-in", "empty-chain", "chained", "chained-multiline", "empty-spaced"],
)
def test_fast_path(hook_dir, tmp_path, hook, drv_text, config_text, python):
    drv = tmp_path / "x.drv"
    drv.write_text(drv_text)
    config = tmp_path / "config.toml"
    config.write_text(config_text)
    called = run_hook(hook_dir, hook, drv, config)
    if python:
        expected = "pre-build-hook" if hook == HOOKS[0] else "post-build-hook"
        assert called is not None and called.startswith(expected), called
    else:
        assert called is None, f"{hook} started Python for a build that did not opt in"


def test_missing_config_is_the_defaults(hook_dir, tmp_path):
    drv = tmp_path / "x.drv"
    drv.write_text("plain")
    assert run_hook(hook_dir, HOOKS[0], drv, tmp_path / "absent.toml") is None


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize(
    ("config_text", "passed"),
    [
        ('[daemon]\ncontrol-socket = "/run/x/control.sock" # c\n', "/run/x/control.sock"),
        ('[daemon] # the service\n  "control-socket"="/a b/c.sock"\n', None),
        ('[daemon]\ncontrol-socket="/a b/c.sock"\n', "/a b/c.sock"),
        ("[daemon]\ncontrol-socket = '/run/x/control.sock'\n", None),
        ('[daemon]\ncontrol-socket = "/run/\\u0078/control.sock"\n', None),
        ('[policy]\ncontrol-socket = "/run/x/control.sock"\n', None),
        ('daemon.control-socket = "/run/x/control.sock"\n', None),
        (
            '[daemon]\ncontrol-socket = "/s"\n[hooks]\npre-build = ["/x"]\npost-build = ["/y"]\n',
            None,
        ),
        ("", None),
    ],
    ids=[
        "plain",
        "quoted-key",
        "spaces",
        "literal-string",
        "escape",
        "other-table",
        "dotted-key",
        "chained",
        "absent",
    ],
)
def test_control_socket_passed_on(hook_dir, tmp_path, hook, config_text, passed):
    """The script hands Python the control socket when it can read it for sure
    (sparing Python the TOML parser); otherwise Python reads the config."""
    drv = tmp_path / "x.drv"
    drv.write_text('Derive([],[],[],"x",("requiredSystemFeatures","recnix"))')
    config = tmp_path / "config.toml"
    config.write_text(config_text)
    called = run_hook(hook_dir, hook, drv, config)
    assert called is not None
    kind = "pre-build-hook" if hook == HOOKS[0] else "post-build-hook"
    option = [] if passed is None else ["--control-socket", passed]
    rest = [str(drv), "/nix/store/x.drv.chroot"] if hook == HOOKS[0] else []
    assert called == " ".join([kind, *option, *rest])


def test_post_build_hook_is_the_same_script():
    """One script serves both hooks; the name it is called by picks the kind."""
    assert (BIN / HOOKS[1]).resolve() == (BIN / HOOKS[0]).resolve()


@pytest.mark.parametrize("hook", HOOKS)
def test_absent_drv_reaches_python_for_a_guard(hook_dir, tmp_path, hook):
    """A .drv that is not in the store (a remote BuildDerivation, issue 12): the
    pre-build hook goes on to Python (recnix.remote.guards's guard); the post-build hook
    has nothing to finalise."""
    config = tmp_path / "config.toml"
    config.write_text("")
    called = run_hook(hook_dir, hook, tmp_path / "absent.drv", config)
    if hook == HOOKS[0]:
        assert called is not None and called.startswith("pre-build-hook"), called
    else:
        assert called is None


OPTED_IN = 'Derive([],[],[],"x",("requiredSystemFeatures","recnix"))'
CHAINING = '[daemon]\ncontrol-socket = "/c"\n[hooks]\npre-build = ["/x"]\npost-build = ["/y"]\n'


def hook_args(hook: str, drv: Path) -> list[str]:
    return [str(drv), "/nix/store/x.drv.chroot"] if hook == HOOKS[0] else []


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize(
    ("drv_text", "python"),
    [
        ("plain", False),
        ("", False),
        (OPTED_IN, True),
        (OPTED_IN + "\n", True),
        ('Derive([],[],[],"x",\n("requiredSystemFeatures","recnix"))', True),
        ("recnix", True),
    ],
    ids=["plain", "empty", "opted-in", "newline-at-end", "recnix-on-line-2", "no-newline"],
)
def test_drv_check_with_builtins(hook_dir, tmp_path, hook, drv_text, python):
    """The .drv is read with the shell's read builtin, every line of it (no grep)."""
    drv = tmp_path / "x.drv"
    drv.write_text(drv_text)
    called = run_hook(hook_dir, hook, drv, tmp_path / "absent.toml", {"PATH": "/nonexistent"})
    assert (called is not None) == python, called


@pytest.mark.parametrize("hook", HOOKS[1:])
def test_unreadable_drv_did_not_opt_in(hook_dir, tmp_path, hook):
    """Nix #9272: the .drv may not exist; the post-build hook leaves quietly (the
    pre-build hook gives such a build a guard: test_absent_drv_reaches_python_for_a_guard)."""
    env = {"PATH": os.environ["PATH"], "RECNIX_CONFIG": str(tmp_path / "absent.toml")}
    env["DRV_PATH"] = str(tmp_path / "missing.drv")
    proc = subprocess.run(
        [str(hook_dir / hook), *hook_args(hook, tmp_path / "missing.drv")],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    assert not (hook_dir / "called").exists()


@pytest.mark.parametrize("hook", HOOKS)
def test_rendered_socket_skips_the_config(hook_dir, tmp_path, hook):
    """With RECNIX_HOOK_SOCKET (rendered from the config) the script does not read the
    config: a config that chains hooks no longer starts Python for plain builds, and
    opted-in builds get the rendered socket."""
    config = tmp_path / "config.toml"
    config.write_text(CHAINING)
    plain = tmp_path / "plain.drv"
    plain.write_text("plain")
    env = {"RECNIX_HOOK_SOCKET": "/run/y/control.sock"}
    assert run_hook(hook_dir, hook, plain, config) is not None  # the config chains
    assert run_hook(hook_dir, hook, plain, config, env) is None
    drv = tmp_path / "x.drv"
    drv.write_text(OPTED_IN)
    kind = "pre-build-hook" if hook == HOOKS[0] else "post-build-hook"
    called = run_hook(hook_dir, hook, drv, config, env)
    assert called == " ".join(
        [kind, "--control-socket", "/run/y/control.sock", *hook_args(hook, drv)]
    )


@pytest.mark.parametrize("hook", HOOKS)
def test_minimal_python_entry(hook_dir, tmp_path, hook):
    """RECNIX_HOOK_PYTHON and RECNIX_HOOK_ENTRY: Python starts as `PYTHON -I -S ENTRY`."""
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\necho "$@" >> {hook_dir}/called\n')
    python.chmod(0o755)
    drv = tmp_path / "x.drv"
    drv.write_text(OPTED_IN)
    env = {
        "RECNIX_HOOK_SOCKET": "/s",
        "RECNIX_HOOK_PYTHON": str(python),
        "RECNIX_HOOK_ENTRY": "/e/recnix/hooks/entry.py",
    }
    called = run_hook(hook_dir, hook, drv, tmp_path / "absent.toml", env)
    kind = "pre-build-hook" if hook == HOOKS[0] else "post-build-hook"
    expected = ["-I", "-S", "/e/recnix/hooks/entry.py", kind, "--control-socket", "/s"]
    assert called == " ".join(expected + hook_args(hook, drv))


ENTRY = Path(__file__).resolve().parents[3] / "recnix" / "hooks" / "entry.py"


def run_entry(args: list[str], cwd: Path, env: dict[str, str] | None = None):
    return subprocess.run(
        [sys.executable, "-I", "-S", str(ENTRY), *args],
        cwd=cwd,
        env=env or {},
        capture_output=True,
        text=True,
        check=False,
    )


def test_entry_runs_without_site(tmp_path):
    """hooks/entry.py finds the recnix package itself under -I -S (no site-packages,
    no script directory on sys.path), from any working directory."""
    plain = tmp_path / "plain.drv"
    plain.write_text("plain")
    socket = str(tmp_path / "absent.sock")
    done = run_entry(["pre-build-hook", "--control-socket", socket, str(plain), "/c"], tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    done = run_entry(
        ["post-build-hook", "--control-socket", socket], tmp_path, {"DRV_PATH": str(plain)}
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    # An opted-in build with the service down fails with recnix's message.
    drv = tmp_path / "x.drv"
    out = "/nix/store/" + "a" * 32 + "-x"
    drv.write_text(
        f'Derive([("out","{out}","","")],[],[],"x86_64-linux","/bin/sh",[],'
        f'[("out","{out}"),("requiredSystemFeatures","recnix")])'
    )
    done = run_entry(["pre-build-hook", "--control-socket", socket, str(drv), "/c"], tmp_path)
    assert done.returncode == 0 and done.stdout.startswith("recnix: cannot open a recnix session")
    done = run_entry(["other"], tmp_path)
    assert done.returncode == 2 and "usage" in done.stderr


def imports_of(code: str, cwd: Path, status: int = 0) -> set[str]:
    """The modules ``python -I -S -c code`` imports (``status``: its exit status)."""
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-X", "importtime", "-c", code],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == status, done.stderr
    return {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()}


def test_entry_imports_no_site(tmp_path):
    """The point of the entry: no site (and its .pth scan) in the hook's Python."""
    code = (
        f"import sys, runpy; sys.argv = ['x', 'nothing']; "
        f"runpy.run_path({str(ENTRY)!r}, run_name='__main__')"
    )
    assert "site" not in imports_of(code, tmp_path, status=2)


def test_marks_spare_the_post_build_hook_the_drv(hook_dir, tmp_path):
    """With RECNIX_HOOK_MARKS the pre-build hook marks a .drv that mentions recnix
    (making the directory root-only when missing), and the post-build hook starts
    Python only for a marked .drv; it never reads the .drv, and it leaves the mark to
    the service (which removes it with the session: test_sessions_marks.py), starting
    no process of its own for it."""
    marks = tmp_path / "state" / "hook-marks"
    env = {"RECNIX_HOOK_SOCKET": "/s", "RECNIX_HOOK_MARKS": str(marks)}
    absent = tmp_path / "absent.toml"
    drv = tmp_path / "x.drv"
    drv.write_text(OPTED_IN)
    assert run_hook(hook_dir, HOOKS[0], drv, absent, env) is not None
    assert (marks / "x.drv").exists() and marks.stat().st_mode & 0o777 == 0o700
    drv.write_text("plain")  # not read again: the mark says
    assert run_hook(hook_dir, HOOKS[1], drv, absent, env) is not None
    assert (marks / "x.drv").exists()
    # Unmarked: the post-build hook leaves at once, even for a .drv naming recnix.
    (marks / "x.drv").unlink()
    drv.write_text(OPTED_IN)
    assert run_hook(hook_dir, HOOKS[1], drv, absent, env) is None
    plain = tmp_path / "plain.drv"
    plain.write_text("plain")
    assert run_hook(hook_dir, HOOKS[0], plain, absent, env) is None
    assert not (marks / "plain.drv").exists()


def test_the_build_hooks_plain_hint_spares_the_pre_build_hook_the_drv(hook_dir, tmp_path):
    """recnix's build hook marks <drv>.plain for a build that does not require recnix
    (recnix.hooks.buildqueue): the pre-build hook then leaves without reading the .drv, here
    one that cannot be read (without the hint it would go on to Python for a guard)."""
    marks = tmp_path / "hook-marks"
    marks.mkdir(mode=0o700)
    env = {"RECNIX_HOOK_SOCKET": "/s", "RECNIX_HOOK_MARKS": str(marks)}
    absent = tmp_path / "absent.toml"
    drv = tmp_path / "gone.drv"  # absent: the guard path, had the hook looked
    assert run_hook(hook_dir, HOOKS[0], drv, absent, env) is not None
    (marks / "gone.drv.plain").touch()
    assert run_hook(hook_dir, HOOKS[0], drv, absent, env) is None


def test_the_build_hooks_recnix_hint_spares_the_pre_build_hook_the_drv(hook_dir, tmp_path):
    """...and <drv>.recnix for a build that requires recnix: the pre-build hook then
    marks it and goes on without reading the .drv (here one that names recnix nowhere:
    without the hint the hook would leave)."""
    marks = tmp_path / "hook-marks"
    marks.mkdir(mode=0o700)
    env = {"RECNIX_HOOK_SOCKET": "/s", "RECNIX_HOOK_MARKS": str(marks)}
    absent = tmp_path / "absent.toml"
    drv = tmp_path / "x.drv"
    drv.write_text("plain")
    assert run_hook(hook_dir, HOOKS[0], drv, absent, env) is None
    assert not (marks / "x.drv").exists()
    (marks / "x.drv.recnix").touch()
    assert run_hook(hook_dir, HOOKS[0], drv, absent, env) is not None
    assert (marks / "x.drv").exists()


def test_unwritable_mark_fails_the_build(hook_dir, tmp_path):
    """A mark that cannot be written would let the post-build hook skip the build's
    finalisation: the pre-build hook prints a line Nix fails the build with instead."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    env = {"RECNIX_HOOK_SOCKET": "/s", "RECNIX_HOOK_MARKS": str(blocker / "marks")}
    drv = tmp_path / "x.drv"
    drv.write_text(OPTED_IN)
    base = {"PATH": os.environ["PATH"], "RECNIX_CONFIG": str(tmp_path / "absent.toml")}
    proc = subprocess.run(
        [str(hook_dir / HOOKS[0]), str(drv), "/c"],
        env={**base, **env},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0
    assert proc.stdout.startswith("recnix: cannot write ") and "RECNIX_HOOK_MARKS" in proc.stdout
    assert not (hook_dir / "called").exists()


def test_nix_conf_daemon_env(tmp_path, capsys):
    """`recnix nix-conf --daemon-env` renders the config's decisions for the hook script."""
    from recnix.cli.main import main

    config = tmp_path / "config.toml"
    config.write_text('[daemon]\ncontrol-socket = "/run/x/c.sock"\nstate-dir = "/run/x"\n')
    assert main(["nix-conf", "--daemon-env", "--config", str(config)]) == 0
    env = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines())
    assert env["RECNIX_HOOK_SOCKET"] == "/run/x/c.sock"
    assert env["RECNIX_HOOK_MARKS"] == "/run/x/hook-marks"
    assert env["RECNIX_HOOK_PYTHON"] == sys.executable
    assert Path(env["RECNIX_HOOK_ENTRY"]) == ENTRY
    config.write_text('[hooks]\npost-build = ["/upload"]\n')
    assert main(["nix-conf", "--daemon-env", "--config", str(config)]) == 0
    env = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines())
    assert set(env) == {"RECNIX_HOOK_PYTHON", "RECNIX_HOOK_ENTRY"}  # the script reads the config


@pytest.mark.parametrize("hook", HOOKS)
def test_opted_in_builds_go_to_the_hook_channel(hook_dir, tmp_path, hook):
    """RECNIX_HOOK_CHANNEL: a sandboxed opted-in build whose .drv is here goes to
    bin/recnix-hook-channel (bash, no Python) with the Python hook's arguments; an SSH
    client's build, or a channel script that is not there or whose interpreter is not,
    goes to Python."""
    channel = hook_dir / "recnix-hook-channel"
    channel.write_text(f'#!/bin/sh\necho channel "$@" >> {hook_dir}/called\n')
    channel.chmod(0o755)
    drv = tmp_path / "x.drv"
    drv.write_text(OPTED_IN)
    env = {"RECNIX_HOOK_SOCKET": "/s", "RECNIX_HOOK_CHANNEL": "/c"}
    kind = "pre-build-hook" if hook == HOOKS[0] else "post-build-hook"
    python_args = " ".join([kind, "--control-socket", "/s", *hook_args(hook, drv)])
    absent = tmp_path / "absent.toml"
    assert run_hook(hook_dir, hook, drv, absent, env) == "channel " + python_args
    assert run_hook(hook_dir, hook, drv, absent, {**env, "SSH_CONNECTION": "a"}) == python_args
    # an interpreter that is not there (bash missing): the exec would fail the build
    channel.write_text(f'#!/nonexistent/bash\necho channel "$@" >> {hook_dir}/called\n')
    assert run_hook(hook_dir, hook, drv, absent, env) == python_args
    channel.unlink()
    assert run_hook(hook_dir, hook, drv, absent, env) == python_args


def test_the_build_hook_imports_nothing_heavy(tmp_path):
    """Nix starts the build hook once per building process: it loads the modules that
    serve the protocol and none of the standard library's heavy ones (shutil and
    pathlib alone cost it ~15 ms of its ~25)."""
    repo = str(ENTRY.parents[2])
    code = (
        f"import sys; sys.path.insert(0, {repo!r}); "
        "import recnix.hooks.buildhook, recnix.hooks.buildqueue, recnix.hooks.lixhook"
    )
    imported = imports_of(code, tmp_path)
    assert "recnix.hooks.buildqueue" in imported
    heavy = {"shutil", "pathlib", "re", "enum", "contextlib", "typing", "json", "subprocess"}
    assert imported & heavy == set()


def test_the_build_hooks_which_finds_what_shutil_finds(tmp_path):
    from recnix.hooks.buildhook import which

    (tmp_path / "tool").write_text("#!/bin/sh\n")
    (tmp_path / "tool").chmod(0o755)
    (tmp_path / "plain").write_text("")
    (tmp_path / "dir").mkdir(mode=0o755)
    path = f"/nonexistent:{tmp_path}"
    for name in ("tool", "plain", "dir", "sh"):
        assert which(name, path) == shutil.which(name, path=path)
    assert which("sh", "/usr/bin:/bin") == shutil.which("sh", path="/usr/bin:/bin")
