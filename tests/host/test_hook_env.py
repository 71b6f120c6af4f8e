"""Opted-in builds through the hook script with the environment `recnix nix-conf
--daemon-env` renders (the NixOS module sets the same on nix-daemon): the control
socket, the marks and the hook channel come from the environment; the pre- and
post-build hooks of opted-in builds talk to the service over the channel
(bin/recnix-hook-channel) and start no Python; Python, when it starts, starts as
hooks/entry.py -I -S."""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from recnix.config.loader import hook_environment, load_defaults
from tests.host.conftest import (
    scenario_runner,
    start_nix_host,
    start_recnix_service,
    stop_nix_host,
    stop_recnix_service,
)
from tests.nixversion import uses_recnix_build_hook
from tests.scenarios import checks
from tests.scenarios.checks import RECNIX
from tests.scenarios.runner import ScenarioRunner

pytestmark = pytest.mark.host

ENTRY = Path(__file__).resolve().parents[2] / "recnix" / "hooks" / "entry.py"


@pytest.fixture(scope="module")
def rendered(busybox: str, nix_bundle: str) -> Iterator[tuple[ScenarioRunner, Path]]:
    """A daemon whose hooks run with the rendered environment, and its service."""
    scratch = Path(tempfile.mkdtemp(prefix="recnix-hookenv-"))
    raw = load_defaults()
    raw["daemon"]["control-socket"] = str(scratch / "control.sock")
    raw["daemon"]["state-dir"] = str(scratch)
    # The hooks' Python, counted: each start appends its hook kind to python-starts.
    counter = scratch / "python"
    counter.write_text(
        f'#!/bin/sh\necho "$4" >> {scratch / "python-starts"}\nexec {sys.executable} "$@"\n'
    )
    counter.chmod(0o755)
    env = hook_environment(raw, str(counter), str(ENTRY))
    assert set(env) == {
        "RECNIX_HOOK_SOCKET",
        "RECNIX_HOOK_MARKS",
        "RECNIX_HOOK_CHANNEL",
        "RECNIX_HOOK_PYTHON",
        "RECNIX_HOOK_ENTRY",
    }
    host = start_nix_host(hooks=True, daemon_env=env)
    service = None
    try:
        # The hooks never read the config: RECNIX_CONFIG points nowhere for them.
        # the same state-dir as the rendered environment (its hook marks are under it)
        service = start_recnix_service(host, daemon={"state-dir": str(scratch)})
        (scratch / "control.sock").symlink_to(service.control_socket)
        host.recnix_config.rename(scratch / "recnix.toml")  # the service has read it
        yield scenario_runner(host, busybox, nix_bundle), Path(env["RECNIX_HOOK_MARKS"])
    finally:
        if service is not None:
            stop_recnix_service(service)
        stop_nix_host(host)


def test_opted_in_builds_with_the_rendered_environment(rendered):
    """Sessions open and finalise (references registered) with no config file to read;
    the post-build hook found the pre-build hook's marks and removed them."""
    runner, marks = rendered
    starts = marks.parent / "python-starts"
    starts.unlink(missing_ok=True)
    checks.check_add(runner, RECNIX)
    checks.check_deep(runner, RECNIX)
    assert marks.is_dir() and marks.stat().st_mode & 0o777 == 0o700
    assert session_marks(marks) == []
    # The hook channel served every pre- and post-build hook: no Python started
    # for them (recnix's build hook is Python, started once per Nix process).
    hooks = starts.read_text().split() if starts.exists() else []
    assert [kind for kind in hooks if kind != "build-hook"] == []
    channel = marks.parent / "hook-channel"
    assert channel.stat().st_mode & 0o777 == 0o700
    assert sorted(p.name for p in channel.iterdir()) == ["requests", "service"]


def session_marks(marks: Path) -> list[Path]:
    """The pre-build hook's marks (not the build hook's ``.plain`` hints)."""
    return [m for m in marks.iterdir() if not m.name.endswith(".plain")]


def test_plain_builds_leave_no_marks(rendered):
    """...but the build hook's hints that they do not require recnix, which spare the
    pre-build hook the read of their .drv."""
    runner, marks = rendered
    checks.check_many(runner, RECNIX, n=2)  # nested builds that do not opt in
    assert session_marks(marks) == []
    hints = [m.name for m in marks.iterdir() if m.name.endswith("-many-1.drv.plain")]
    # the hints come from recnix's build-hook, which Lix does not run
    assert bool(hints) == uses_recnix_build_hook(), list(marks.iterdir())


def test_failed_builds_leave_no_marks(rendered):
    """A recursive build that fails gets no post-build hook: the service removes its
    mark when it ends the session."""
    runner, marks = rendered
    checks.check_failure(runner, RECNIX)
    deadline = time.monotonic() + 30
    while session_marks(marks):
        assert time.monotonic() < deadline, session_marks(marks)
        time.sleep(0.2)
