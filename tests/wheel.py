"""The recnix wheel as users get it (`pip wheel .`), for the tests that install it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOT_SOURCES = (".venv", ".git", "build", "dist", "*.egg-info", "__pycache__")


def copy_sources(to: Path) -> Path:
    """A copy of this checkout's sources at ``to`` (no venv, git or build output)."""
    shutil.copytree(REPO, to, ignore=shutil.ignore_patterns(*NOT_SOURCES))
    return to


def build_wheel(out: Path) -> Path:
    """Build recnix's wheel into ``out``; its path. Built from a private copy of the
    sources: pip builds in the tree (its ``build/``), and test workers build at once."""
    sources = copy_sources(out / "src")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(sources)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"pip wheel failed:\n{done.stderr[-3000:]}")
    (built,) = out.glob("recnix-*.whl")
    return built
