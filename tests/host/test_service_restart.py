"""A restart of the recnix service while opted-in builds run (sessions are journaled)."""

from __future__ import annotations

import glob
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.host.conftest import (
    NixHost,
    scenario_runner,
    start_nix_host,
    start_recnix_service,
    stop_nix_host,
    stop_recnix_service,
)
from tests.host.session_probe import start_live_build
from tests.nixversion import build_top_glob
from tests.scenarios.checks import RECNIX, check_restart_result, fresh_tag

pytestmark = pytest.mark.host

START_TIMEOUT = 120.0


@pytest.fixture(params=["python-hooks", "hook-channel"])
def host(hook_output: str, request: pytest.FixtureRequest) -> Iterator[NixHost]:
    """The hooks as the config file tells them (Python), or with the rendered
    environment (an opted-in build's hooks over the service's hook channel)."""
    rendered = request.param == "hook-channel"
    host = start_nix_host(hooks=True, hook_output=hook_output, rendered_env=rendered)
    yield host
    stop_nix_host(host)


def wait_for_file(pattern: str, process: subprocess.Popen[str]) -> Path:
    deadline = time.monotonic() + START_TIMEOUT
    while not (found := glob.glob(pattern)):
        if process.poll() is not None:
            raise AssertionError(f"the build ended early: {process.communicate()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {pattern} after {START_TIMEOUT} s")
        time.sleep(0.05)
    return Path(found[0])


def journal_files(host: NixHost) -> list[Path]:
    return sorted((host.root / "recnix" / "journal").glob("*.jsonl"))


def session_roots(host: NixHost) -> list[str]:
    """The store paths the sessions' GC-root directories point at."""
    return sorted(os.readlink(link) for link in host.gc_roots_dir.glob("*/*"))


def test_a_restart_between_nested_builds_keeps_the_session(host, busybox, nix_bundle):
    service = start_recnix_service(host)
    runner = scenario_runner(host, busybox, nix_bundle)
    tag = fresh_tag()
    build = subprocess.Popen(
        runner.build_argv("restart", RECNIX, tag, {"innerTag": tag}),
        env=host.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        pattern = build_top_glob(host.build_dir, "scenario-restart") + "/started"
        started = wait_for_file(pattern, build)
        stop_recnix_service(service)
        assert len(journal_files(host)) == 1, "the stopped service left no journal"
        # Its temp roots went with the service; its GC roots keep what it made alive.
        rooted = session_roots(host)
        assert rooted, "the stopped service left no GC roots"
        for path in rooted:
            deleted = host.run(["nix-store", "--delete", path], check=False)
            assert deleted.returncode != 0 and os.path.lexists(path), (path, deleted.stderr)
        service = start_recnix_service(host)
        started.with_name("release").touch()
        stdout, stderr = build.communicate(timeout=300)
    finally:
        if build.poll() is None:
            build.kill()
        stop_recnix_service(service)
    assert build.returncode == 0, stderr
    check_restart_result(runner, stdout.split()[-1], tag)
    events = service.audit_events()
    resumed = [e for e in events if e["event"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["drv"].endswith("-scenario-restart.drv"), events
    assert [e for e in events if e["event"] == "finalised"], events
    assert journal_files(host) == [] and service.session_dirs() == []
    assert session_roots(host) == []


def test_a_build_that_ends_while_the_service_is_down_is_cleaned_up(
    host, busybox, nix_bundle, tmp_path
):
    service = start_recnix_service(host)
    live = start_live_build(
        host.env, host.build_dir, service.control_socket, busybox, fresh_tag(), tmp_path
    )
    stop_recnix_service(service)
    rc, _, stderr = live.finish()
    assert rc != 0, "the build succeeded without its post-build fix-up"
    assert "recnix service is not running" in stderr, stderr
    service = start_recnix_service(host)
    try:
        aborted = [
            e
            for e in service.audit_events()
            if e["event"] == "aborted" and e["session"] == live.session["session"]
        ]
        assert aborted and "not running" in aborted[0]["reason"], aborted
        assert journal_files(host) == [] and service.session_dirs() == []
        assert session_roots(host) == []
        outcome = scenario_runner(host, busybox, nix_bundle).build("inner", RECNIX, fresh_tag())
        assert outcome.ok, outcome.describe()
    finally:
        stop_recnix_service(service)
