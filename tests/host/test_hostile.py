"""Hostile builds against recnix itself (issue 19; docs/security.md, "What root may touch").

Each test is a real sandboxed build that tries to make the recnix service, which runs as
root, act on a host object: write through a descriptor the builder redirected, block on
a FIFO, write into a host store path through a mount namespace the builder owns, follow
a symlink it planted. After each: the victim store paths verify against their recorded
hashes, nothing was written where it should not be, the service answers at once, and an
innocent recursive build running beside the attack succeeds with a complete closure.
Runs in both hook-output modes (honoured: Nix; discarded: Lix 2.93-2.95) and, in the
versions tier, on every Nix CI runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from recnix.sandbox.sandboxproc import SandboxProcess
from tests.host.conftest import NixHost, RecnixService
from tests.scenarios import checks
from tests.scenarios.checks import RECNIX, fresh_tag
from tests.scenarios.runner import BuildOutcome, ScenarioRunner

pytestmark = pytest.mark.host

VICTIM_TEXT = "a host input the builder must not be able to change\n"
STATUS_BOUND = 1.0  # seconds the control socket may take while builds misbehave


@pytest.fixture
def victim(nix_host_recnix: NixHost, busybox: str, nix_bundle: str) -> Iterator[str]:
    """A fresh host store path (a directory with `file`) given to the attack as an input.
    Afterwards it, and every other input of the attacks (the shell and the Nix every
    build uses, with their closures), must verify against the recorded hashes."""
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "victim"
        root.mkdir()
        (root / "file").write_text(VICTIM_TEXT + fresh_tag() + "\n")
        path = nix_host_recnix.run(["nix-store", "--add", str(root)]).stdout.strip()
    yield path
    assert_unchanged(nix_host_recnix, path)
    closure = nix_host_recnix.run(["nix-store", "-qR", busybox, nix_bundle]).stdout.split()
    done = nix_host_recnix.run(["nix-store", "--verify-path", *closure], check=False)
    assert done.returncode == 0, f"an input every build uses was modified: {done.stderr}"


def assert_unchanged(host: NixHost, path: str) -> None:
    """``path`` still verifies against its registered NAR hash, with nothing added in it."""
    done = host.run(["nix-store", "--verify-path", path], check=False)
    assert done.returncode == 0, f"{path} was modified: {done.stderr}"
    assert sorted(os.listdir(path)) == ["file"], os.listdir(path)
    assert Path(path, "file").read_text().startswith(VICTIM_TEXT)


def status_seconds(service: RecnixService) -> tuple[float, str]:
    """How long `recnix status` takes, and what it prints (fails the test if it errs)."""
    started = time.monotonic()
    done = service.status()
    assert done.returncode == 0, done.stderr
    return time.monotonic() - started, done.stdout


def attack(runner: ScenarioRunner, name: str, victim: str, **extra: str) -> BuildOutcome:
    tag = fresh_tag()
    args = {"attack": name, "victim": victim, "innerTag": tag, **extra}
    return runner.build("hostile", RECNIX, tag, args, timeout=180)


class Innocent(threading.Thread):
    """The add scenario, built beside an attack; ``error`` is None once it passed."""

    def __init__(self, runner: ScenarioRunner) -> None:
        super().__init__(daemon=True)
        self.runner = runner
        self.error: BaseException | None = RuntimeError("did not finish")

    def run(self) -> None:
        try:
            checks.check_add(self.runner, RECNIX)
            self.error = None
        except BaseException as e:
            self.error = e

    def check(self, timeout: float = 300) -> None:
        self.join(timeout)
        assert not self.is_alive(), "an innocent build beside the attack hung"
        assert self.error is None, f"an innocent build beside the attack failed: {self.error}"


@pytest.mark.parametrize("attack_name", ["fd2-file", "fd1-file", "fd2-fifo"])
def test_redirected_descriptors_are_never_reopened(
    recnix_runner: ScenarioRunner,
    recnix_service: RecnixService,
    victim: str,
    attack_name: str,
) -> None:
    """Routes 1 and 2: the builder hides its socket and points a descriptor at an input
    file or a FIFO nobody reads. recnix fails the build without touching the descriptor:
    the input stays intact and the service never blocks."""
    innocent = Innocent(recnix_runner)
    innocent.start()
    # The watcher looks at a builder once, at its first sighting (every second): a look
    # that comes before the builder hid its socket does not test the route; try again.
    for _ in range(3):
        outcome = attack(recnix_runner, attack_name, victim)
        assert not outcome.ok, "a builder without its socket must be failed"
        assert_unchanged(recnix_runner_host(recnix_service), victim)
        seconds, text = status_seconds(recnix_service)
        assert seconds < STATUS_BOUND, f"recnix status took {seconds:.2f} s"
        if f"scenario-hostile-{attack_name}" in text:
            break
    assert "finds no socket" in text and f"scenario-hostile-{attack_name}" in text, text
    innocent.check()


def recnix_runner_host(service: RecnixService) -> NixHost:
    return service.host


@pytest.mark.parametrize("attack_name", ["cover-store", "cover-store-after-pin"])
def test_no_root_write_through_a_namespace_the_builder_owns(
    recnix_runner: ScenarioRunner, recnix_service: RecnixService, victim: str, attack_name: str
) -> None:
    """Route 3: the builder covers /nix/store with an input in a namespace of its own and
    adds a directory. recnix refuses rather than make the mount point there."""
    innocent = Innocent(recnix_runner)
    innocent.start()
    outcome = attack(recnix_runner, attack_name, victim)
    assert outcome.ok, outcome.describe()
    out = outcome.out_path
    assert out is not None
    rc = int(recnix_runner.read(f"{out}/add.rc"))
    err = recnix_runner.read(f"{out}/add.err")
    assert rc != 0, f"the add through the covered store succeeded: {err}"
    if attack_name == "cover-store":  # its first client pinned the builder's namespace
        assert "not the sandbox's store directory" in err, err
    else:  # the sandbox's namespace was pinned first: the other one is not served
        assert "mount namespace of its own" in recnix_service.log_text()
    innocent.check()


def test_planted_symlink_is_not_followed(
    recnix_runner: ScenarioRunner, victim: str, tmp_path: Path
) -> None:
    """A symlink planted where the added path should appear, pointing at a host
    directory: the add is refused, nothing is written through the link."""
    target = tmp_path / "target"
    target.mkdir()
    outcome = attack(recnix_runner, "plant-symlink", victim, hostDir=str(target))
    assert outcome.ok, outcome.describe()
    out = outcome.out_path
    assert out is not None
    assert int(recnix_runner.read(f"{out}/add.rc")) != 0
    assert "already exists in the sandbox" in recnix_runner.read(f"{out}/add.err")
    assert list(target.iterdir()) == []


def test_first_client_exiting_does_not_lose_the_namespace(
    recnix_runner: ScenarioRunner, victim: str
) -> None:
    """Legitimate: the process that connected first (and pinned the sandbox's namespace)
    exits; a later client's add is materialised and ends up in the closure."""
    outcome = attack(recnix_runner, "fork-exit", victim)
    assert outcome.ok, outcome.describe()
    out = outcome.out_path
    assert out is not None
    added = checks.assert_complete_reference(recnix_runner, out, "added")
    assert recnix_runner.read(f"{out}/content").startswith("added by the hostile scenario")
    assert "-src-" in added, added


def test_a_reused_pid_is_not_signalled() -> None:
    """A process held by SandboxProcess exits and its pid goes to another process (forced
    with ns_last_pid): kill() must not reach the newcomer."""
    chroot = Path("/")
    first = subprocess.Popen(["sleep", "30"])
    proc = SandboxProcess.from_pid(first.pid, chroot)  # root "/" stands in for a chroot
    assert proc is not None
    first.kill()
    first.wait()
    newcomer = None
    try:
        for _ in range(50):  # other processes on the machine may take the pid first
            with open("/proc/sys/kernel/ns_last_pid", "w") as f:
                f.write(str(first.pid - 1))
            candidate = subprocess.Popen(["sleep", "30"])
            if candidate.pid == first.pid:
                newcomer = candidate
                break
            candidate.kill()
            candidate.wait()
        assert newcomer is not None, f"could not make pid {first.pid} be reused"
        assert not proc.alive()
        assert not proc.kill()
        time.sleep(0.1)
        assert newcomer.poll() is None, "the process that reused the pid was killed"
        assert SandboxProcess.from_pid(newcomer.pid, Path("/nonexistent-chroot")) is None
    finally:
        proc.close()
        if newcomer is not None:
            newcomer.send_signal(signal.SIGKILL)
            newcomer.wait()
