"""recnix installed as users install a Python tool: the wheel `pip wheel .` builds, in
a virtualenv of its own (what pipx makes), with nothing from the checkout."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HOOKS = ("recnix-pre-build-hook", "recnix-post-build-hook", "recnix-build-hook")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # pip builds the wheel; a root filesystem of the versions tier has no pip (and the
    # wheel does not depend on the Nix version): there these tests skip, saying so.
    pytest.importorskip("pip", reason="no pip for this Python: the wheel is built where pip is")
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(REPO)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (built,) = out.glob("recnix-*.whl")
    return built


def test_the_wheel_holds_recnix_and_its_hooks_but_not_the_vm_harness(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith("recnix_vm")], "the VM harness is in the wheel"
    for hook in HOOKS:
        assert any(n.endswith(f".data/scripts/{hook}") for n in names), hook
    for data in ("recnix/config-keys.toml", "recnix/unit.toml", "recnix/hookentry.py"):
        assert data in names, data


def test_installed_in_a_venv_of_its_own_setup_names_that_venv(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin/pip"), "install", "-q", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
    )
    for hook in HOOKS:  # the sh fast paths beside the console script
        assert (venv / "bin" / hook).read_text().startswith("#!/bin/sh"), hook
    hook = subprocess.run([str(venv / "bin/recnix-pre-build-hook")], capture_output=True, text=True)
    assert hook.returncode == 2 and "Nix runs it for every build" in hook.stderr
    dry = subprocess.run(
        [str(venv / "bin/recnix"), "setup", "--dry-run"],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # nothing from the checkout
    )
    text = dry.stdout + dry.stderr
    assert dry.returncode in (0, 1), text  # 1: refused on this host, with the reason
    if dry.returncode == 0:
        assert f"pre-build-hook = {venv}/bin/recnix-pre-build-hook" in text, text
        assert f"ExecStart={venv}/bin/recnix daemon" in text, text
        assert f"RECNIX_HOOK_PYTHON={venv}/bin/python" in text, text
    else:
        assert text.startswith("recnix setup: refused: "), text
