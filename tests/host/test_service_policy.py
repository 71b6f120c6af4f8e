"""recnix policy knobs, hook chaining, slot limits and a stopped service (issue 3).

Each test gets its own private nix-daemon and recnix service with the
configuration under test.
"""

from __future__ import annotations

import contextlib
import glob
import grp
import hashlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from recnix.protocol import Op
from recnix.store.nixsettings import nix_settings
from tests import nixversion
from tests.host.conftest import (
    PRE_BUILD_HOOK,
    RECNIX_BIN,
    NixHost,
    RecnixService,
    other_build_hook,
    require_recnix_build_hook,
    scenario_runner,
    start_nix_host,
    start_recnix_service,
    stop_nix_host,
    stop_recnix_service,
)
from tests.host.session_probe import ProbeClient, sandbox_flood, sandbox_socket, start_live_build
from tests.nixversion import build_top_glob
from tests.scenarios.checks import RECNIX, check_deep, fresh_tag
from tests.scenarios.runner import ScenarioRunner

pytestmark = pytest.mark.host

LIB = Path(__file__).resolve().parents[1] / "scenarios" / "inner" / "lib.nix"


# A build hook that never queues anything (Nix's own, without remote machines, answers
# the same): opted-in builds then wait for a slot in the pre-build hook.


@contextlib.contextmanager
def host_with_service(
    busybox: str,
    nix_bundle: str,
    config: str | None,
    daemon: dict | None = None,
    nix_conf: str = "",
    build_hook: str | None = None,
) -> Iterator[tuple[NixHost, RecnixService | None, ScenarioRunner]]:
    """A daemon with recnix hooks (and ``nix_conf`` lines after them; ``build_hook``
    instead of recnix's); a service with ``config`` (none if ``config`` is None)."""
    host = start_nix_host(hooks=True, extra_conf=nix_conf, build_hook=build_hook)
    service = None
    try:
        if config is not None:
            service = start_recnix_service(host, config, daemon)
        else:
            host.recnix_config.write_text(
                f'[daemon]\ncontrol-socket = "{host.root / "no-service.sock"}"\n'
            )
        yield host, service, scenario_runner(host, busybox, nix_bundle)
    finally:
        if service is not None:
            stop_recnix_service(service)
        stop_nix_host(host)


def write_expr(host: NixHost, name: str, text: str) -> str:
    path = host.root / name
    path.write_text(text)
    return str(path)


def plain_build_expr(busybox: str, features: list[str], script: str, tag: str) -> str:
    feats = " ".join(f'"{f}"' for f in features)
    return f"""
let lib = import {LIB} {{ busybox = "{busybox}"; }};
in lib.mkBuild {{
  name = "policy-probe";
  features = [ {feats} ];
  env.tag = "{tag}";
  script = ''{script}'';
}}
"""


@pytest.mark.parametrize(
    ("config", "scenario", "extra", "expected"),
    [
        ("[policy]\nmax-depth = 1\n", "deep", {}, "policy.max-depth"),
        ("[policy]\nmax-builds-per-session = 2\n", "many", {"n": 3}, "max-builds-per-session"),
        ("[policy]\nmax-added-bytes = 64\n", "add", {}, "policy.max-added-bytes"),
    ],
    ids=["max-depth", "max-builds", "max-added-bytes"],
)
def test_limits_fail_with_a_clear_error(busybox, nix_bundle, config, scenario, extra, expected):
    with host_with_service(busybox, nix_bundle, config) as (_, service, runner):
        tag = fresh_tag()
        outcome = runner.build(scenario, RECNIX, tag, {"innerTag": tag, **extra})
        assert outcome.rc != 0, outcome.describe()
        assert expected in outcome.stderr, outcome.describe()
        # the service survives the refusal and still answers
        assert service is not None and service.process.poll() is None
        status = subprocess.run(
            [str(RECNIX_BIN), "--config", str(service.config_path), "status"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert status.returncode == 0, status.stderr


def test_readonly_only_policy(busybox, nix_bundle):
    with host_with_service(busybox, nix_bundle, "[policy]\nreadonly-only = true\n") as (
        _,
        _service,
        runner,
    ):
        outcome = runner.build("inner", RECNIX, fresh_tag())
        assert outcome.rc != 0 and "recnix-readonly" in outcome.stderr, outcome.describe()


# Mentions recnix (so the sh fast path hands it to Python) without requiring it.
LOOKALIKE_SCRIPT = 'echo "built without recnix" > "$out"; test ! -e /nix/var/nix/daemon-socket'


def test_service_down_fails_only_opted_in_builds(busybox, nix_bundle):
    with host_with_service(busybox, nix_bundle, None) as (host, _, runner):
        tag = fresh_tag()
        plain = write_expr(
            host, "plain.nix", plain_build_expr(busybox, [], 'echo "$tag" > "$out"', tag)
        )
        done = host.run(["nix-build", "--no-out-link", plain])
        assert runner.read(done.stdout.strip()) == f"{tag}\n"
        lookalike = write_expr(
            host, "lookalike.nix", plain_build_expr(busybox, [], LOOKALIKE_SCRIPT, tag)
        )
        done = host.run(["nix-build", "--no-out-link", lookalike])
        assert runner.read(done.stdout.strip()) == "built without recnix\n"
        outcome = runner.build("inner", RECNIX, tag)
        assert outcome.rc != 0
        assert "recnix service is not running" in outcome.stderr, outcome.describe()


def test_lookalike_gets_no_session(busybox, nix_bundle):
    """A .drv that mentions recnix but does not require it: no socket, no session."""
    with host_with_service(busybox, nix_bundle, "") as (host, service, runner):
        lookalike = write_expr(
            host, "lookalike.nix", plain_build_expr(busybox, [], LOOKALIKE_SCRIPT, fresh_tag())
        )
        done = host.run(["nix-build", "--no-out-link", lookalike])
        assert runner.read(done.stdout.strip()) == "built without recnix\n"
        assert service is not None
        opened = [e for e in service.audit_events() if e.get("event") == "opened"]
        assert opened == [], opened


def test_connection_limit_is_a_setting(busybox, nix_bundle, tmp_path):
    config = "[policy]\nmax-connections-per-session = 3\n"
    with host_with_service(busybox, nix_bundle, config) as (host, service, _):
        assert service is not None
        live = start_live_build(
            host.env, host.build_dir, service.control_socket, busybox, fresh_tag(), tmp_path
        )
        try:
            with sandbox_flood(live, 10) as flood:
                assert flood.connected - flood.closed_by_server <= 3, flood
                assert flood.closed_by_server >= 7, flood
        finally:
            rc, _, stderr = live.finish()
        assert rc == 0, stderr
        reasons = [e.get("reason", "") for e in service.audit_events() if e["event"] == "refused"]
        assert any("policy.max-connections-per-session" in r for r in reasons), reasons


def test_a_drv_added_but_not_built_by_a_session_is_not_its_child(busybox, nix_bundle, tmp_path):
    # With max-depth = 1 a child session would be refused: the build of a .drv
    # that an open session merely added (here: built from outside) is top-level.
    with host_with_service(busybox, nix_bundle, "[policy]\nmax-depth = 1\n") as (
        host,
        service,
        _,
    ):
        assert service is not None
        tag = fresh_tag()
        expr = write_expr(
            host, "child.nix", plain_build_expr(busybox, [RECNIX], 'echo "$tag" > "$out"', tag)
        )
        drv = host.run(["nix-instantiate", expr]).stdout.strip()
        refs = host.run(["nix-store", "-q", "--references", drv]).stdout.split()
        live = start_live_build(
            host.env, host.build_dir, service.control_socket, busybox, fresh_tag(), tmp_path
        )
        try:
            with sandbox_socket(live) as sock:
                client = ProbeClient(sock)
                client.do_handshake()
                added = client.call(
                    Op.ADD_TEXT_TO_STORE,
                    {
                        "name": Path(drv).name[33:],
                        "text": Path(drv).read_bytes(),
                        "references": refs,
                    },
                ).value
                assert added == drv
                out = host.run(["nix-store", "--realise", drv]).stdout.strip()
        finally:
            rc, _, stderr = live.finish()
        assert rc == 0, stderr
        assert Path(out).read_text() == f"{tag}\n"
        opened = [e for e in service.audit_events() if e["event"] == "opened"]
        child = [e for e in opened if e["drv"] == drv]
        assert len(child) == 1 and child[0]["depth"] == 1 and child[0]["parent"] is None, opened


# An outer fixed-output derivation whose output names the nested build's output:
# Nix accepts the hash, recnix's post-build hook must fail it (NI §6.5).
CA_INNER = """\
let bb = builtins.storePath "BUSYBOX"; in
derivation {
  name = "ca-inner";
  system = builtins.currentSystem;
  builder = "${bb}/bin/sh";
  tag = "TAG";
  args = [ "-c" "echo inner > $out" ];
}
"""


def test_content_addressed_outer_referencing_a_nested_output_fails(busybox, nix_bundle):
    with host_with_service(busybox, nix_bundle, "") as (host, _, _runner):
        inner_text = CA_INNER.replace("BUSYBOX", busybox).replace("TAG", fresh_tag())
        inner_drv = host.run(["nix-instantiate", write_expr(host, "ca-inner.nix", inner_text)])
        inner_out = host.run(["nix-store", "-q", "--outputs", inner_drv.stdout.strip()])
        content = inner_out.stdout.strip() + "\n"
        script = (
            "cat > inner.nix <<'EOF'\n" + inner_text.replace("${", "''${") + "EOF\n"
            'nix-build --no-out-link inner.nix > "$out"\n'
        )
        outer = f"""
let lib = import {LIB} {{ busybox = "{busybox}"; nix = "{nix_bundle}"; }};
in lib.mkBuild {{
  name = "ca-outer";
  features = [ "{RECNIX}" ];
  env = {{
    outputHashMode = "flat";
    outputHashAlgo = "sha256";
    outputHash = "{hashlib.sha256(content.encode()).hexdigest()}";
  }};
  script = ''{script}'';
}}
"""
        proc = subprocess.run(
            ["nix-build", "--no-out-link", write_expr(host, "ca-outer.nix", outer)],
            env=host.env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert proc.returncode != 0, proc.stdout
        assert "fixed-output derivation" in proc.stderr, proc.stderr
        assert "cannot be added after the build" in proc.stderr, proc.stderr


def test_hooks_are_chained(busybox, nix_bundle):
    """recnix runs the hooks of [hooks] after its own; a chained pre-build hook's
    extra-sandbox-paths reach Nix (not on Lix 2.93-2.95, which drops every pre-build
    hook's output: there the chained hook runs and nothing is mounted)."""
    mounts = not nixversion.drops_pre_build_hook_output()
    with host_with_service(busybox, nix_bundle, "") as (host, _, runner):
        shared = host.root / "chained.txt"
        shared.write_text("mounted by a chained hook\n")
        marker = host.root / "post-hook-ran"
        pre_marker = host.root / "pre-hook-ran"
        pre = host.root / "pre-hook.sh"
        pre.write_text(
            f'#!/bin/sh\necho "$1" >> {pre_marker}\n'
            f"echo extra-sandbox-paths\necho /chained.txt={shared}\necho\n"
        )
        post = host.root / "post-hook.sh"
        post.write_text(f'#!/bin/sh\necho "$DRV_PATH" >> {marker}\n')
        for hook in (pre, post):
            hook.chmod(0o755)
        config = host.recnix_config.read_text()
        config += f'[hooks]\npre-build = ["{pre}"]\npost-build = ["{post}"]\n'
        host.recnix_config.write_text(config)
        tag = fresh_tag()
        # a plain build sees the chained hook's mount; a recnix build gets both
        cat = '{ cat /chained.txt || echo "not mounted"; } > "$out"'
        plain = write_expr(host, "plain.nix", plain_build_expr(busybox, [], cat, tag))
        out = host.run(["nix-build", "--no-out-link", plain]).stdout.strip()
        seen = "mounted by a chained hook\n" if mounts else "not mounted\n"
        assert runner.read(out) == seen
        script = cat + '; test -S /nix/var/nix/daemon-socket/socket && echo socket >> "$out"'
        both = write_expr(host, "both.nix", plain_build_expr(busybox, [RECNIX], script, tag))
        out = host.run(["nix-build", "--no-out-link", both]).stdout.strip()
        assert runner.read(out) == seen + "socket\n"
        drvs = marker.read_text().split()
        assert len(drvs) == 2 and all(d.endswith("-policy-probe.drv") for d in drvs), drvs
        drvs = pre_marker.read_text().split()
        assert len(drvs) == 2 and all(d.endswith("-policy-probe.drv") for d in drvs), drvs


@pytest.mark.parametrize("queue", [True, False], ids=["build-hook", "pre-build-hook"])
def test_sessions_beyond_the_limit_wait(busybox, nix_bundle, tmp_path, queue):
    """With max-sessions = 1, a second recursive build waits for the first: in recnix's
    build hook (before it takes a build user), or, with another build hook (Lix),
    in the pre-build hook."""
    build_hook = None
    if queue:
        require_recnix_build_hook()
    else:
        build_hook = other_build_hook(tmp_path)
    with host_with_service(busybox, nix_bundle, "", {"max-sessions": 1}, build_hook=build_hook) as (
        host,
        service,
        runner,
    ):
        assert service is not None
        script = (
            'echo "$tag" > started; i=0; while [ $i -lt 120 ] && [ ! -e release ]; '
            'do sleep 0.2; i=$((i+1)); done; echo "$tag" > "$out"'
        )
        procs = []
        for n in range(2):
            expr = write_expr(
                host,
                f"wait{n}.nix",
                plain_build_expr(busybox, [RECNIX], script, f"{fresh_tag()}-{n}"),
            )
            procs.append(
                subprocess.Popen(
                    ["nix-build", "--no-out-link", expr],
                    env=host.env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        try:
            deadline = time.monotonic() + 60
            where = "before it takes a build user" if queue else "session slot (1 in use"
            while where not in service.log_text():
                assert time.monotonic() < deadline, service.log_text()
                time.sleep(0.2)
            pattern = build_top_glob(host.build_dir, "policy-probe") + "/started"
            while not (started := glob.glob(pattern)):  # the first may not have begun yet
                assert time.monotonic() < deadline, f"no build started: {service.log_text()}"
                time.sleep(0.2)
            assert len(started) == 1, f"both builds run despite max-sessions = 1: {started}"
            # release builds as they start: the waiting one starts after the first ends
            # (in a build directory of the same name: builds are told apart by their tag)
            released: set[str] = set()
            while any(p.poll() is None for p in procs):
                assert time.monotonic() < deadline + 60, "builds did not finish"
                for s in glob.glob(pattern):
                    with contextlib.suppress(OSError):
                        tag = Path(s).read_text()
                        if tag and tag not in released:
                            open(os.path.join(os.path.dirname(s), "release"), "w").close()
                            released.add(tag)
                time.sleep(0.2)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        results = [p.communicate() for p in procs]
        assert all(p.returncode == 0 for p in procs), results
        assert len(released) == 2


def _opted_in_builds(host: NixHost, busybox: str, count: int = 2) -> str:
    tag = fresh_tag()
    builds = [
        plain_build_expr(busybox, [RECNIX], 'echo "$tag" > "$out"', f"{tag}-{n}")
        for n in range(count)
    ]
    return write_expr(host, "many.nix", "[\n" + "\n".join(f"({b})" for b in builds) + "\n]")


def _builds_with_one_slot(busybox: str, nix_bundle: str, max_jobs: int, count: int = 2) -> str:
    """``count`` opted-in builds in one nix-build with ``--max-jobs`` (max-sessions = 1):
    all must succeed; the service's log."""
    require_recnix_build_hook()
    with host_with_service(busybox, nix_bundle, "", {"max-sessions": 1}) as (
        host,
        service,
        runner,
    ):
        assert service is not None
        drvs = _opted_in_builds(host, busybox, count)
        proc = subprocess.run(
            ["nix-build", "--no-out-link", "--max-jobs", str(max_jobs), drvs],
            env=host.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        assert len(proc.stdout.split()) == count, proc.stdout
        log = service.log_text()
        assert log.count("opened for") == count, log[-3000:]
        return log


def test_one_nix_process_with_more_recursive_builds_than_slots_queues_them(busybox, nix_bundle):
    """recnix's build hook makes the second of two opted-in builds of one nix-build wait
    (Nix's "postpone") while the first holds the only slot (max-sessions = 1): both
    succeed, one after the other."""
    assert "before it takes a build user" in _builds_with_one_slot(busybox, nix_bundle, 2)


def test_builds_of_a_process_that_runs_them_one_by_one_are_not_postponed(busybox, nix_bundle):
    """With --max-jobs 1 a Nix process can never hold every slot while its next build
    waits: that build waits for the slot in its pre-build hook (woken when the slot
    frees) instead of being postponed for build-poll-interval. Ten of them, with the
    machine's 10 build users: however many it queues, that process holds one build
    user at a time, so waiting leaves build users for nested builds."""
    log = _builds_with_one_slot(busybox, nix_bundle, 1, count=10)
    assert "before it takes a build user" not in log, log[-3000:]


def test_one_nix_process_is_never_made_to_wait_for_its_own_slots(busybox, nix_bundle, tmp_path):
    """Without recnix's build hook, Nix runs pre-build hooks synchronously: two opted-in
    builds of one nix-build with max-sessions = 1 would hang that process for good (the
    first build's post-build hook, which frees the slot, can never run while the second
    build's hook waits). The second is refused with a message that says why; nothing
    hangs and no session stays open."""
    build_hook = other_build_hook(tmp_path)
    with host_with_service(busybox, nix_bundle, "", {"max-sessions": 1}, build_hook=build_hook) as (
        host,
        service,
        runner,
    ):
        assert service is not None
        expr = _opted_in_builds(host, busybox)
        proc = subprocess.run(
            ["nix-build", "--no-out-link", "--keep-going", "--max-jobs", "2", expr],
            env=host.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if nixversion.is_lix():
            # Lix runs the pre-build hook without stopping its other goals: the second
            # build either waits there for the slot (the first build's post-build hook
            # frees it) or, by timing, meets the same-process rule and is refused; it
            # then runs without a session (its builder calls no Nix; Lix dropped the
            # hook's message) and recnix's post-build hook fails it. Nothing hangs.
            if proc.returncode == 0:
                assert len(proc.stdout.split()) == 2, proc.stdout
            else:
                assert "recnix has no session for" in proc.stderr, proc.stderr
        else:
            assert proc.returncode != 0, "both builds ran with max-sessions = 1"
            assert "held by other builds of the same Nix process" in proc.stderr, proc.stderr
            assert "daemon.max-sessions" in proc.stderr, proc.stderr
        # Nix 2.8 then stops the whole nix-build; the first build's session is ended too.
        deadline = time.monotonic() + 60
        while service.session_dirs():
            assert time.monotonic() < deadline, service.log_text()
            time.sleep(0.2)


@pytest.mark.parametrize("skip", [True, False], ids=["skip", "always"])
def test_nested_builds_skip_hooks_unless_they_need_a_session(busybox, nix_bundle, tmp_path, skip):
    """policy.nested-builds-skip-hooks: a nested build that opens no session runs
    without nix.conf's hooks; a nested recnix build still gets its session.

    nix.conf's pre-build hook here is a wrapper that logs each build and runs
    recnix's: the case the setting's false value is for.
    """
    log = tmp_path / "hook.log"
    wrapper = tmp_path / "logging-pre-build-hook"
    wrapper.write_text(f'#!/bin/sh\necho "$1" >> {log}\nexec {PRE_BUILD_HOOK} "$@"\n')
    wrapper.chmod(0o755)
    config = "" if skip else "[policy]\nnested-builds-skip-hooks = false\n"
    with host_with_service(
        busybox, nix_bundle, config, nix_conf=f"pre-build-hook = {wrapper}\n"
    ) as (_, _service, runner):
        check_deep(runner, RECNIX, fresh_tag())
    hooked = [line.rsplit("-", 1)[-1] for line in log.read_text().split()]
    expected = ["deep.drv", "middle.drv"] + ([] if skip else ["inner.drv"])
    assert hooked == expected, log.read_text()


def test_sessions_stay_below_the_build_users(busybox, nix_bundle):
    """daemon.max-sessions at or above the build users is lowered, with a warning (#7297)."""
    with host_with_service(busybox, nix_bundle, "", {"max-sessions": 1000}) as (
        host,
        service,
        runner,
    ):
        assert service is not None
        group = nix_settings(host.env)["build-users-group"]
        users = len(grp.getgrnam(group).gr_mem)
        log = service.log_text()
        assert f"{users} build user(s): allowing {users - 1} concurrent session(s)" in log, log
        assert f"max {users - 1} concurrent sessions" in log, log
        assert runner.build("inner", RECNIX, fresh_tag()).ok
