"""Finalisation is all or nothing (issue 19): an output whose references recnix could not
add and check does not stay valid, the log says why, and the next nix-build rebuilds it."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from recnix.daemon.journal import SessionJournal, SessionRecord
from tests.host.conftest import (
    NixHost,
    RecnixService,
    processes_with_env,
    scenario_runner,
    start_nix_host,
    start_recnix_service,
    stop_nix_host,
    stop_recnix_service,
)
from tests.nixversion import build_top_glob
from tests.scenarios import checks
from tests.scenarios.checks import RECNIX, fresh_tag
from tests.scenarios.runner import BuildOutcome, ScenarioRunner

pytestmark = pytest.mark.host

TIMEOUT = 120.0


def scenario_outputs(host: NixHost, argv: list[str]) -> tuple[str, list[str]]:
    """The .drv and output paths of what a scenario's nix-build command line builds."""
    inst = ["nix-instantiate", *[a for a in argv[1:] if a != "--no-out-link"]]
    drv = host.run(inst).stdout.strip()
    return drv, host.run(["nix-store", "-q", "--outputs", drv]).stdout.split()


def is_valid(host: NixHost, path: str) -> bool:
    return host.run(["nix-store", "--check-validity", path], check=False).returncode == 0


def assert_invalid(host: NixHost, path: str) -> None:
    """``path`` is not valid: --check-validity and -q --hash both refuse it."""
    for argv in (["nix-store", "--check-validity", path], ["nix-store", "-q", "--hash", path]):
        result = host.run(argv, check=False)
        assert result.returncode != 0, f"{path} is still valid: {argv} said {result.stdout}"


def assert_says_invalidated(outcome: BuildOutcome, outputs: list[str], why: str) -> None:
    """The build failed, and its log names each output, the reason, and what happens."""
    assert outcome.rc != 0, outcome.describe()
    # the message starts on a line of its own and may span several (a quoted Nix error)
    start = outcome.stderr.find(" invalidated: ")
    assert start >= 0, outcome.describe()
    said = outcome.stderr[outcome.stderr.rfind("\n", 0, start) + 1 :]
    assert all(out in said for out in outputs), outcome.describe()
    assert why in said and "the next nix-build rebuilds" in said, outcome.describe()


@contextmanager
def beside(work: Callable[[], object]) -> Iterator[None]:
    """Run ``work`` in a thread while the block runs; re-raise what it raised."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as e:  # handed to the test's thread
            failure.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        yield
    finally:
        thread.join()
    if failure:
        raise AssertionError(f"the innocent build beside it failed: {failure[0]}") from failure[0]


def assert_refused_and_rebuilt(
    host: NixHost, runner: ScenarioRunner, check: str, why: str, **extra: str
) -> None:
    """A constrained build fails naming ``why``, leaves its output invalid, and a second
    nix-build builds it again (and fails again) rather than succeeding silently."""
    tag = fresh_tag()
    args = {"innerTag": tag, "check": check, **extra}
    _, outputs = scenario_outputs(host, runner.build_argv("constrained", RECNIX, tag, args))
    for attempt in (1, 2):
        outcome = runner.build("constrained", RECNIX, tag, args)
        assert outcome.rc != 0, f"attempt {attempt}: {outcome.describe()}"
        assert "-scenario-constrained.drv'..." in outcome.stderr, (
            f"attempt {attempt} did not build: {outcome.describe()}"
        )
        for out in outputs:
            assert_invalid(host, out)
        assert_says_invalidated(outcome, outputs, why)


def inner_result(host: NixHost, runner: ScenarioRunner, tag: str) -> str:
    """The path constrained.nix's inner build (not built yet) will give."""
    argv = [
        "nix-build",
        f"{runner.scenario_dir}/inner/trivial.nix",
        *["--argstr", "busybox", runner.busybox, "--argstr", "name", "constrained-inner"],
        *["--argstr", "tag", tag, "--argstr", "content", "hello from the inner build"],
    ]
    return scenario_outputs(host, argv)[1][0]


def test_allowed_references_violation_invalidates(nix_host_recnix, recnix_runner) -> None:
    """(a) allowedReferences = [] and an output that points at an inner result; an innocent
    recursive build beside it succeeds with a complete closure."""
    with beside(lambda: checks.check_inner(recnix_runner, RECNIX)):
        assert_refused_and_rebuilt(
            nix_host_recnix, recnix_runner, "allowedReferences", "violates allowedReferences"
        )


def test_disallowed_references_violation_invalidates(nix_host_recnix, recnix_runner) -> None:
    tag = fresh_tag()
    forbidden = inner_result(nix_host_recnix, recnix_runner, tag)
    args = {"innerTag": tag, "check": "disallowedReferences", "disallowed": forbidden}
    argv = recnix_runner.build_argv("constrained", RECNIX, tag, args)
    _, outputs = scenario_outputs(nix_host_recnix, argv)
    for _attempt in (1, 2):
        outcome = recnix_runner.build("constrained", RECNIX, tag, args)
        assert "-scenario-constrained.drv'..." in outcome.stderr, outcome.describe()
        assert_invalid(nix_host_recnix, outputs[0])
        assert_says_invalidated(outcome, outputs, "violates disallowedReferences")
        assert forbidden in outcome.stderr


@pytest.mark.parametrize("check", ["allowedRequisites", "maxClosureSize"])
def test_requisite_and_closure_size_violations_invalidate(
    nix_host_recnix, recnix_runner, check: str
) -> None:
    with beside(lambda: checks.check_add(recnix_runner, RECNIX)):
        assert_refused_and_rebuilt(nix_host_recnix, recnix_runner, check, f"violates {check}")


def test_a_build_within_its_constraints_is_finalised(nix_host_recnix, recnix_runner) -> None:
    """The control: with no constraint the same scenario succeeds, closure complete."""
    tag = fresh_tag()
    outcome = recnix_runner.build("constrained", RECNIX, tag, {"innerTag": tag, "check": "none"})
    assert outcome.ok, outcome.describe()
    checks.assert_complete_reference(recnix_runner, outcome.out_path, "inner")


# -- failures that are not a constraint: a registrar error, a service that dies


@pytest.fixture(params=["python-hooks", "hook-channel"])
def host(request: pytest.FixtureRequest) -> Iterator[NixHost]:
    """The hooks as the config file tells them (Python), or with the rendered environment
    (an opted-in build's hooks over the service's hook channel, which hands a refusal or
    a dead service to the Python hook)."""
    host = start_nix_host(hooks=True, rendered_env=request.param == "hook-channel")
    yield host
    stop_nix_host(host)


def test_a_failing_re_registration_invalidates(host, busybox, nix_bundle, tmp_path) -> None:
    """(c) The references are added, then re-signing them fails (a corrupt signing key):
    the outputs must go, not stay half finalised."""
    bad_key = tmp_path / "corrupt.sk"
    bad_key.write_text("this is not a Nix secret key\n")
    service = start_recnix_service(host, f'[signing]\nsecret-key-files = ["{bad_key}"]\n')
    try:
        runner = scenario_runner(host, busybox, nix_bundle)
        tag = fresh_tag()
        args = {"innerTag": tag}
        _, outputs = scenario_outputs(host, runner.build_argv("inner", RECNIX, tag, args))
        outcome = runner.build("inner", RECNIX, tag, args)
        assert_says_invalidated(outcome, outputs, "store sign")
        assert_invalid(host, outputs[0])
        events = [e for e in service.audit_events() if e["event"] == "invalidated"]
        assert events and events[0]["outputs"] == outputs, service.audit_events()
    finally:
        stop_recnix_service(service)


def wait_for(what: str, found: Callable[[], object], build: subprocess.Popen[str]) -> object:
    deadline = time.monotonic() + TIMEOUT
    while not (result := found()):
        if build.poll() is not None:
            raise AssertionError(f"the build ended early: {build.communicate()}")
        assert time.monotonic() < deadline, f"no {what} after {TIMEOUT} s"
        time.sleep(0.05)
    return result


def journal_files(service: RecnixService) -> list[Path]:
    return sorted((service.root / "journal").glob("*.jsonl"))


def test_a_service_killed_while_the_hook_waits(host, busybox, nix_bundle) -> None:
    """(d) The service dies (SIGKILL) between Nix's registration and recnix's: the
    post-build hook invalidates the outputs itself; the restarted service cleans up."""
    service = start_recnix_service(host)
    runner = scenario_runner(host, busybox, nix_bundle)
    tag = fresh_tag()
    args = {"innerTag": tag, "check": "none", "wait": 300}
    argv = runner.build_argv("constrained", RECNIX, tag, args)
    drv, outputs = scenario_outputs(host, argv)
    build = subprocess.Popen(
        argv, env=host.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        pattern = build_top_glob(host.build_dir, "scenario-constrained") + "/started"
        found = wait_for(pattern, lambda: glob.glob(pattern), build)
        started = Path(found[0])  # type: ignore[index]
        os.kill(service.process.pid, signal.SIGSTOP)  # it will not answer the hook
        started.with_name("release").touch()
        wait_for("post-build hook", lambda: processes_with_env("DRV_PATH", drv), build)
        time.sleep(0.5)  # the hook has sent its request and waits for the answer
        assert is_valid(host, outputs[0]), "Nix has registered the output by now"
        service.process.kill()
        service.process.wait()
        stdout, stderr = build.communicate(timeout=TIMEOUT)
    finally:
        if build.poll() is None:
            build.kill()
        if service.process.poll() is None:
            service.process.kill()
    outcome = BuildOutcome(build.returncode, None, stdout, stderr)
    assert_says_invalidated(outcome, outputs, "recnix service")
    assert_invalid(host, outputs[0])
    assert len(journal_files(service)) == 1, "the killed service left no journal"
    service = start_recnix_service(host)
    try:
        assert journal_files(service) == [] and service.session_dirs() == []
        aborted = [e for e in service.audit_events() if e["event"] == "aborted"]
        assert aborted and "not running" in aborted[-1]["reason"], aborted
        assert_invalid(host, outputs[0])
        checks.check_inner(runner, RECNIX)  # and the next build works
    finally:
        stop_recnix_service(service)


# A plain build (not recursive) whose output mentions a store path without context: Nix
# registers it without that reference, as it does for paths that came through recnix.
HIDING = r"""
{ bb, hidden, nonce }:
derivation {
  name = "recnix-half-finalised";
  system = "x86_64-linux";
  builder = "${bb}/bin/sh";
  inherit hidden nonce;
  args = [ "-c" "echo uses $hidden > $out" ];
}
"""


def built_hiding(host: NixHost, busybox: str, tmp_path: Path) -> tuple[str, str, str]:
    """(.drv, output, the path the output mentions but does not reference)."""
    hidden_file = tmp_path / f"hidden-{uuid.uuid4().hex[:8]}"
    hidden_file.write_text(f"hidden {uuid.uuid4().hex}\n")
    hidden = host.run(["nix-store", "--add", str(hidden_file)]).stdout.strip()
    expr = tmp_path / f"hiding-{uuid.uuid4().hex[:8]}.nix"
    expr.write_text(HIDING)
    argv = ["nix-instantiate", str(expr), "--arg", "bb", f'builtins.storePath "{busybox}"']
    argv += ["--argstr", "hidden", hidden, "--argstr", "nonce", uuid.uuid4().hex]
    drv = host.run(argv).stdout.strip()
    out = host.run(["nix-store", "--realise", drv]).stdout.strip()
    assert hidden not in host.run(["nix-store", "-q", "--references", out]).stdout
    return drv, out, hidden


def journal_session(service: RecnixService, drv: str, allowed: str, finalising: bool) -> str:
    """Journal a session of ``drv`` whose build is over (its chroot is gone)."""
    sid = uuid.uuid4().hex[:16]
    record = SessionRecord(
        sid=sid,
        drv_path=drv,
        chroot=f"/nonexistent/{sid}.drv.chroot",
        readonly=False,
        depth=1,
        parent=None,
        holds_slot=True,
    )
    journal = SessionJournal.create(service.root, record)
    journal.record(allowed={allowed})
    if finalising:
        journal.record(finalising=True)
    return sid


def test_a_restarted_service_finishes_or_invalidates_half_finalised_sessions(
    host, busybox, tmp_path
) -> None:
    """(e) A restarted service finds in its journal a session whose build ended while it
    was down (it finishes it: the references are added) and one it was finalising (it
    invalidates it)."""
    service = start_recnix_service(host)
    stop_recnix_service(service)
    ended_drv, ended_out, ended_hidden = built_hiding(host, busybox, tmp_path)
    half_drv, half_out, half_hidden = built_hiding(host, busybox, tmp_path)
    ended = journal_session(service, ended_drv, ended_hidden, finalising=False)
    half = journal_session(service, half_drv, half_hidden, finalising=True)
    service = start_recnix_service(host)
    try:
        assert journal_files(service) == []
        refs = host.run(["nix-store", "-q", "--references", ended_out]).stdout.split()
        assert ended_hidden in refs, refs
        assert_invalid(host, half_out)
        events = service.audit_events()
        assert any(e["event"] == "finalised" and e["session"] == ended for e in events), events
        assert any(e["event"] == "invalidated" and e["session"] == half for e in events), events
        assert "stopped while finalising" in service.log_text()
    finally:
        stop_recnix_service(service)


GRACE = 3  # daemon.finalise-grace for the test below (default 60 s)


def test_a_build_without_a_post_build_hook_call_is_finalised_or_invalidated(
    busybox, nix_bundle
) -> None:
    """A Nix that never calls recnix's post-build hook: Nix reports success, and once
    the grace for the hook has passed the service finalises the outputs (the reference
    is added) or, when that fails, invalidates them."""
    host = start_nix_host(hooks=True, extra_conf="post-build-hook =\n")
    service = start_recnix_service(host, daemon={"finalise-grace": GRACE})
    try:
        runner = scenario_runner(host, busybox, nix_bundle)
        tag = fresh_tag()
        good = runner.build("inner", RECNIX, tag, {"innerTag": tag})
        assert good.ok, good.describe()
        inner = runner.readlink(f"{good.out_path}/inner")
        assert inner not in runner.references(good.out_path), "Nix cannot have seen it"
        tag = fresh_tag()
        bad = runner.build("constrained", RECNIX, tag, {"innerTag": tag})
        assert bad.ok, "without the hook Nix cannot know of the violation"

        def settled() -> bool:
            return inner in runner.references(good.out_path) and not is_valid(host, bad.out_path)

        deadline = time.monotonic() + GRACE + 60
        while not settled():
            assert time.monotonic() < deadline, service.log_text()[-3000:]
            time.sleep(1)
        events = service.audit_events()
        assert any(e["event"] == "finalised" for e in events), events
        invalidated = [e for e in events if e["event"] == "invalidated"]
        assert invalidated and invalidated[0]["outputs"] == [bad.out_path], events
        assert "violates allowedReferences" in invalidated[0]["reason"]
    finally:
        stop_recnix_service(service)
        stop_nix_host(host)


USER = r"""
{ bb, used }:
derivation {
  name = "recnix-uses-half-finalised";
  system = "x86_64-linux";
  builder = "${bb}/bin/sh";
  args = [ "-c" "echo ${used} > $out" ];
}
"""


def test_an_output_in_use_cannot_be_invalidated_but_gets_a_complete_closure(
    host, busybox, tmp_path
) -> None:
    """The fallback: a valid path refers to the half-finalised output (it was used
    meanwhile), so it cannot be made invalid; its references are registered unchecked,
    and the log and the audit say so."""
    service = start_recnix_service(host)
    stop_recnix_service(service)
    drv, out, hidden = built_hiding(host, busybox, tmp_path)
    expr = tmp_path / "user.nix"
    expr.write_text(USER)
    user = host.run(
        ["nix-build", "--no-out-link", str(expr), "--arg", "bb", f'builtins.storePath "{busybox}"']
        + ["--arg", "used", f'builtins.storePath "{out}"']
    ).stdout.strip()
    assert out in host.run(["nix-store", "-q", "--references", user]).stdout
    sid = journal_session(service, drv, hidden, finalising=True)
    service = start_recnix_service(host)
    try:
        assert is_valid(host, out) and is_valid(host, user)
        assert hidden in host.run(["nix-store", "-q", "--references", out]).stdout.split()
        failed = [e for e in service.audit_events() if e["event"] == "invalidation-failed"]
        assert failed and failed[0]["session"] == sid and user in failed[0]["error"], failed
        assert "registered unchecked" in service.log_text()
    finally:
        stop_recnix_service(service)
