"""The smuggling routes of issue 10, under recnix (refused) and under Nix's built-in
recursive-nix (measured: it leaks; asserted, so the comparison in docs/security.md
stays true as Nix changes). Also: existing fixed outputs (route 3) and legitimate use.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.host.conftest import (
    NixHost,
    RecnixService,
    scenario_runner,
    start_nix_host,
    start_recnix_service,
    stop_nix_host,
    stop_recnix_service,
)
from tests.scenarios.checks import BUILTIN, RECNIX, fresh_tag
from tests.scenarios.runner import ScenarioRunner

pytestmark = pytest.mark.host

LIB = Path(__file__).resolve().parents[1] / "scenarios" / "inner" / "lib.nix"
ROUTES = ["route1-src", "route1-drv", "route2-src", "route2-drv", "printed"]
# (A nested build cannot write the text as its output: Nix refuses derivation names
# ending in .drv. tests/unit/store/test_restricted.py covers that case in-process.)


@dataclass
class Leak:
    secret: str  # a valid host path that is no input of the build
    content: str  # what it holds
    reader_drv: str  # a host .drv whose inputSrcs name the secret
    src_text: str  # file: a .drv text naming the secret in inputSrcs
    dep_text: str  # file: a .drv text naming reader_drv in inputDrvs


def make_leak(host: NixHost, busybox: str, scratch: str) -> Leak:
    tag = fresh_tag()
    content = f"host secret {tag}\n"
    secret_file = os.path.join(scratch, "secret")
    Path(secret_file).write_text(content)
    secret = host.run(["nix-store", "--add", secret_file]).stdout.strip()
    expr = os.path.join(scratch, "leak.nix")
    Path(expr).write_text(
        f"""{{ busybox, secret, tag }}:
let lib = import {LIB} {{ inherit busybox; }}; s = builtins.storePath secret;
  cat = name: what: lib.mkBuild {{
    inherit name; env = {{ inherit tag; }}; script = "cat ${{what}} > $out";
  }};
in rec {{
  src = cat "leak-src" s;
  reader = cat "secret-reader" s;
  dep = cat "leak-dep" reader;
}}
"""
    )
    args = ["--argstr", "busybox", busybox, "--argstr", "secret", secret, "--argstr", "tag", tag]
    drvs = {}
    for attr in ("src", "reader", "dep"):
        drvs[attr] = host.run(["nix-instantiate", expr, "-A", attr, *args]).stdout.strip()
    texts = {}
    for attr in ("src", "dep"):
        texts[attr] = os.path.join(scratch, f"{attr}.txt")
        Path(texts[attr]).write_text(Path(drvs[attr]).read_text())
    return Leak(secret, content, drvs["reader"], texts["src"], texts["dep"])


def run_routes(runner: ScenarioRunner, feature: str, leak: Leak) -> dict[str, tuple[int, str, str]]:
    tag = fresh_tag()
    outcome = runner.build(
        "smuggle",
        feature,
        tag,
        {
            "innerTag": tag,
            "srcText": leak.src_text,
            "depText": leak.dep_text,
        },
    )
    assert outcome.ok, outcome.describe()
    out = outcome.out_path
    assert out is not None
    rcs = runner.check_results(out)
    return {
        name: (rcs[name], runner.read(f"{out}/{name}.out"), runner.read(f"{out}/{name}.err"))
        for name in ROUTES
    }


@pytest.fixture
def scratch():
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o755)  # the evaluator of the scenario (the client) reads the texts
        yield d


def test_routes_refused_under_recnix(
    nix_host_recnix: NixHost, recnix_runner: ScenarioRunner, busybox: str, scratch: str
) -> None:
    leak = make_leak(nix_host_recnix, busybox, scratch)
    results = run_routes(recnix_runner, RECNIX, leak)
    for route, (rc, out, err) in results.items():
        assert rc != 0, f"{route} leaked under recnix: {out!r}"
        assert leak.content not in out
        named = leak.reader_drv if route.endswith("-drv") else leak.secret
        assert named in err, f"{route}: the refusal must name the path: {err}"
        why = "cannot add derivation" if route.startswith(("route2", "printed")) else "cannot build"
        assert why in err and "neither an input" in err, f"{route}: {err}"


def test_routes_leak_under_the_builtin(
    nix_host: NixHost, oracle_runner: ScenarioRunner, busybox: str, scratch: str
) -> None:
    """Nix's built-in recursive-nix hands the secret out on every route (measured on
    Nix 2.8). If this starts failing, Nix changed: update docs/security.md."""
    leak = make_leak(nix_host, busybox, scratch)
    results = run_routes(oracle_runner, BUILTIN, leak)
    leaked = {route for route, (rc, out, _) in results.items() if rc == 0 and leak.content in out}
    assert leaked == set(ROUTES), {r: v for r, v in results.items() if r not in leaked}


# -- route 3: fixed-output derivations whose outputs already exist


def prebuild_fod(host: NixHost, runner: ScenarioRunner, tag: str) -> str:
    """Build inner/fod.nix with ``tag`` on the host (outside any build): its output is valid."""
    return host.run(
        ["nix-build", "--no-out-link", f"{runner.scenario_dir}/inner/fod.nix"]
        + ["--argstr", "busybox", runner.busybox, "--argstr", "tag", tag]
    ).stdout.strip()


def fod_events(service: RecnixService) -> list[dict]:
    return [e for e in service.audit_events() if e["event"] == "existing-fixed-output"]


@pytest.mark.parametrize("scenario", ["fod", "fod-dep"])
def test_existing_fixed_output_handed_out_and_audited(
    nix_host_recnix: NixHost,
    recnix_runner: ScenarioRunner,
    recnix_service: RecnixService,
    scenario: str,
) -> None:
    """Default policy (allow-fixed-output = false, existing-fixed-outputs = "allow"): a
    nested build whose closure holds a fixed-output derivation with a valid output works
    (nothing fixed-output runs), and the hand-out is audited."""
    tag = fresh_tag()
    fod_out = prebuild_fod(nix_host_recnix, recnix_runner, tag)
    outcome = recnix_runner.build(scenario, RECNIX, tag, {"innerTag": tag})
    assert outcome.ok, outcome.describe()
    assert recnix_runner.read(fod_out) == f"recnix fixed output {tag}\n"
    events = [e for e in fod_events(recnix_service) if fod_out in e["outputs"]]
    assert len(events) == 1, fod_events(recnix_service)
    assert events[0]["derivation"].endswith("-recnix-fixed-output.drv")


def test_existing_fixed_output_refused_with_deny(busybox: str, nix_bundle: str) -> None:
    host = start_nix_host(hooks=True)
    service = None
    try:
        service = start_recnix_service(host, '[policy]\nexisting-fixed-outputs = "deny"\n')
        runner = scenario_runner(host, busybox, nix_bundle)
        tag = fresh_tag()
        fod_out = prebuild_fod(host, runner, tag)
        outcome = runner.build("fod-dep", RECNIX, tag, {"innerTag": tag})
        assert not outcome.ok
        assert fod_out in outcome.stderr and "existing-fixed-outputs" in outcome.stderr
        assert not fod_events(service)
    finally:
        if service is not None:
            stop_recnix_service(service)
        stop_nix_host(host)
