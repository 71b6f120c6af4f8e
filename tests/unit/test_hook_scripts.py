"""The hooks' sh fast paths (bin/): Python starts only for opted-in builds or chained hooks."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

BIN = Path(__file__).resolve().parents[2] / "bin"
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


def run_hook(hook_dir: Path, hook: str, drv: Path, config: Path) -> str | None:
    env = {"PATH": os.environ["PATH"], "RECNIX_CONFIG": str(config), "DRV_PATH": str(drv)}
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
    pre-build hook goes on to Python (recnix.remote's guard); the post-build hook
    has nothing to finalise."""
    config = tmp_path / "config.toml"
    config.write_text("")
    called = run_hook(hook_dir, hook, tmp_path / "absent.drv", config)
    if hook == HOOKS[0]:
        assert called is not None and called.startswith("pre-build-hook"), called
    else:
        assert called is None
