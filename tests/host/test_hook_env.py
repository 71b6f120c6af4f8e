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

from recnix.hooks.buildqueue import HINT_SUFFIXES
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


@pytest.fixture(scope="module")
def rendered(busybox: str, nix_bundle: str) -> Iterator[tuple[ScenarioRunner, Path]]:
    """A daemon whose hooks run with the rendered environment, and its service."""
    scratch = Path(tempfile.mkdtemp(prefix="recnix-hookenv-"))
    # The hooks' Python, counted: each start appends its hook kind to python-starts,
    # beside the hook marks (in the service's state-dir).
    counter = scratch / "python"
    counter.write_text(
        '#!/bin/sh\necho "$4" >> "${RECNIX_HOOK_MARKS%/*}/python-starts"\n'
        f'exec {sys.executable} "$@"\n'
    )
    counter.chmod(0o755)
    host = start_nix_host(
        hooks=True, rendered_env=True, daemon_env={"RECNIX_HOOK_PYTHON": str(counter)}
    )
    env = {k: v for k, v in host.daemon_env.items() if k.startswith("RECNIX_HOOK_")}
    assert set(env) == {
        "RECNIX_HOOK_SOCKET",
        "RECNIX_HOOK_MARKS",
        "RECNIX_HOOK_CHANNEL",
        "RECNIX_HOOK_PYTHON",
        "RECNIX_HOOK_ENTRY",
    }
    service = None
    try:
        # The service's paths are the rendered ones (tests.host.conftest.rendered_service_env).
        service = start_recnix_service(host)
        assert env["RECNIX_HOOK_SOCKET"] == str(service.control_socket)
        # The hooks never read the config: RECNIX_CONFIG points nowhere for them.
        host.recnix_config.rename(scratch / "recnix.toml")  # the service has read it
        yield scenario_runner(host, busybox, nix_bundle), Path(env["RECNIX_HOOK_MARKS"])
    finally:
        if service is not None:
            stop_recnix_service(service)
        stop_nix_host(host)


def test_opted_in_builds_with_the_rendered_environment(rendered):
    """Sessions open and finalise (references registered) with no config file to read;
    the post-build hook found the pre-build hook's marks, and the service removed them
    with the sessions."""
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
    # ...and the count is kept: recnix's build hook started through the counter
    assert ("build-hook" in hooks) == uses_recnix_build_hook(), hooks
    channel = marks.parent / "hook-channel"
    assert channel.stat().st_mode & 0o777 == 0o700
    assert sorted(p.name for p in channel.iterdir()) == ["requests", "service"]


def session_marks(marks: Path) -> list[Path]:
    """The pre-build hook's marks (not the build hook's ``.plain``/``.recnix`` hints)."""
    return [m for m in marks.iterdir() if not m.name.endswith(HINT_SUFFIXES)]


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
