"""Every .nix file in the repository parses with Debian's nix-instantiate (Nix 2.8)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.host

REPO = Path(__file__).resolve().parents[2]


def nix_files() -> list[str]:
    """Tracked and untracked (not ignored) .nix files, .venv excluded."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", "*.nix"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return sorted({p for p in listed if not p.startswith(".venv/") and (REPO / p).is_file()})


def nix_instantiate() -> str:
    path = shutil.which("nix-instantiate")
    if path is None:
        pytest.fail("nix-instantiate not found: install Debian's nix-bin (./setup.sh)")
    return path


def test_the_nixos_files_are_among_them() -> None:
    files = set(nix_files())
    for expected in (
        "flake.nix",
        "module/default.nix",
        "module/package.nix",
        "nixos-tests/default.nix",
        "nixos-tests/remote-builder.nix",
    ):
        assert expected in files


def test_flake_checks_include_remote_builder() -> None:
    """flake.nix's checks run nixos-tests/remote-builder.nix (issue 12)."""
    flake = (REPO / "flake.nix").read_text()
    assert "remote-builder = import ./nixos-tests/remote-builder.nix" in flake


@pytest.mark.parametrize("path", nix_files())
def test_parses(path: str) -> None:
    done = subprocess.run(
        [nix_instantiate(), "--parse", str(REPO / path)], capture_output=True, text=True
    )
    assert done.returncode == 0, f"{path} does not parse:\n{done.stderr}"
