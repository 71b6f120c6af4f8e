"""recnix installed as users install a Python tool: the wheel `pip wheel .` builds, in
a virtualenv of its own (what pipx makes), with nothing from the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.host.test_readme import readme_block
from tests.wheel import build_wheel, copy_sources

REPO = Path(__file__).resolve().parents[2]
HOOKS = ("recnix-pre-build-hook", "recnix-post-build-hook", "recnix-build-hook")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # pip builds the wheel; a root filesystem of the versions tier has no pip (and the
    # wheel does not depend on the Nix version): there these tests skip, saying so.
    pytest.importorskip("pip", reason="no pip for this Python: the wheel is built where pip is")
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def test_the_wheel_holds_recnix_and_its_hooks_but_not_the_vm_harness(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith("recnix_vm")], "the VM harness is in the wheel"
    for hook in HOOKS:
        assert any(n.endswith(f".data/scripts/{hook}") for n in names), hook
    for data in ("recnix/config/config-keys.toml", "recnix/cli/unit.toml", "recnix/hooks/entry.py"):
        assert data in names, data


def test_installed_in_a_venv_of_its_own_setup_names_that_venv(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin/pip"), "install", "-q", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
    )
    assert_installed(venv, venv / "bin" / "recnix", tmp_path)


def test_the_readmes_install_commands_with_pipx(tmp_path: Path) -> None:
    """The README's install block as a user runs it, in a copy of the checkout: `pip
    wheel`, then `pipx install` (pipx from Debian); then its `recnix setup` as
    ``--dry-run`` (the real one runs in a guest: tests/vm/test_setup.py)."""
    if shutil.which("pipx") is None:
        pytest.skip("no pipx here (setup.sh installs Debian's): the install block runs where it is")
    build, install, setup = [
        line.split("#", 1)[0].strip()
        for line in readme_block("pip wheel --no-deps -w dist .").splitlines()
    ]
    assert setup == "recnix setup", setup
    checkout = copy_sources(tmp_path / "checkout")
    home = tmp_path / "pipx"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "PIPX_HOME": str(home),
        "PIPX_BIN_DIR": str(tmp_path / "bin"),
    }
    for command in (build, install):
        done = subprocess.run(
            ["sh", "-c", command], cwd=checkout, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, f"{command}: {done.stdout}{done.stderr}"[-3000:]
    assert_installed(home / "venvs" / "recnix", tmp_path / "bin" / "recnix", tmp_path)


def assert_installed(venv: Path, recnix: Path, cwd: Path) -> None:
    """recnix in ``venv`` (its console script at ``recnix``): the hooks' sh fast paths
    beside its Python, and `recnix setup --dry-run` naming that venv's paths."""
    # `recnix nix-conf` finds the hooks beside itself, not only on PATH (pipx links only
    # the console script): a bare name in nix.conf would stop Nix from starting
    conf = subprocess.run(
        [str(recnix), "nix-conf", "--lix"],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert conf.returncode == 0, conf.stderr
    for hook in ("pre-build-hook", "post-build-hook"):
        assert f"{hook} = {venv}/bin/recnix-{hook}\n" in conf.stdout, conf.stdout
    for hook in HOOKS:  # the sh fast paths beside the console script
        assert (venv / "bin" / hook).read_text().startswith("#!/bin/sh"), hook
    hook = subprocess.run([str(venv / "bin/recnix-pre-build-hook")], capture_output=True, text=True)
    assert hook.returncode == 2 and "Nix runs it for every build" in hook.stderr
    dry = subprocess.run(
        [str(recnix), "setup", "--dry-run"],
        capture_output=True,
        text=True,
        cwd=cwd,  # nothing from the checkout
    )
    text = dry.stdout + dry.stderr
    assert dry.returncode in (0, 1), text  # 1: refused on this host, with the reason
    if dry.returncode == 0:
        assert f"pre-build-hook = {venv}/bin/recnix-pre-build-hook" in text, text
        assert f"ExecStart={venv}/bin/recnix daemon" in text, text
        assert f"RECNIX_HOOK_PYTHON={venv}/bin/python" in text, text
    else:
        assert text.startswith("recnix setup: refused: "), text
