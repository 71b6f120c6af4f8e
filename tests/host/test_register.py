"""recnix.store.register against real Nix 2.8 builds: the post-build reference fix-up, run
as the service runs it (on an event loop, the store read over the worker protocol)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from recnix.store.register import (
    DaemonQueries,
    FinaliseError,
    FinaliseReport,
    Registrar,
    finalise_outputs,
    outputs_of,
    scan_references,
)
from recnix.store.upstreampool import UpstreamPool

pytestmark = pytest.mark.host

# The output mentions $hidden (a store path passed as a plain string, without context), so
# Nix does not know about it when it scans the output.
OUTER = r"""
{ bb, hidden, nonce, checks ? {}, fixed ? null }:
derivation ({
  name = "recnix-outer";
  system = "x86_64-linux";
  builder = "${bb}/bin/sh";
  inherit hidden nonce;
  outputs = [ "out" "dev" ];
  args = [ "-c" ''
    B=${bb}/bin/busybox
    $B mkdir $out $dev
    echo "uses $hidden" > $out/hidden-ref
    echo "nonce $nonce" > $dev/nonce
    $B ln -s ${bb}/bin/sh $out/sh
  '' ];
} // checks)
"""

# A fixed-output derivation whose (flat) output is exactly `content`.
FIXED = r"""
{ bb, content }:
derivation {
  name = "recnix-fixed";
  system = "x86_64-linux";
  builder = "${bb}/bin/sh";
  inherit content;
  outputHashMode = "flat";
  outputHashAlgo = "sha256";
  outputHash = builtins.hashString "sha256" content;
  args = [ "-c" "echo -n \"$content\" > $out" ];
}
"""


def _nix(nix_host, *argv: str, env: dict | None = None) -> str:
    result = subprocess.run(
        list(argv), env=env or nix_host.env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"{' '.join(argv)}: {result.stderr}"
    return result.stdout


def _add_text(nix_host, tmp_path: Path, name: str, text: str) -> str:
    f = tmp_path / name
    f.write_text(text)
    return _nix(nix_host, "nix-store", "--add", str(f)).strip()


def _build(nix_host, tmp_path: Path, expr: str, **args: str) -> str:
    """Instantiate and build `expr`; returns the .drv path."""
    f = tmp_path / f"e{uuid.uuid4().hex[:8]}.nix"
    f.write_text(expr)
    argv = []
    for k, v in args.items():
        argv += ["--arg", k, v]
    drv = _nix(nix_host, "nix-instantiate", str(f), *argv).strip()
    _nix(nix_host, "nix-store", "--realise", drv)
    return drv


def _with_queries(nix_host, use):
    """``use(DaemonQueries)`` on an event loop, over a pool of the host's nix-daemon."""

    async def run():
        pool = UpstreamPool(f"unix://{nix_host.socket}")
        try:
            return await use(DaemonQueries(pool))
        finally:
            await pool.close()

    return asyncio.run(run())


def _outputs(nix_host, drv: str) -> dict[str, str]:
    return _with_queries(nix_host, lambda queries: outputs_of(drv, queries))


def _finalise(nix_host, drv: str, session_paths: set[str], key_files=(), **kw) -> FinaliseReport:
    return _with_queries(
        nix_host,
        lambda queries: finalise_outputs(
            drv, session_paths, list(key_files), nix_host.env, queries, **kw
        ),
    )


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$") + '"'


@pytest.fixture
def hidden(nix_host, tmp_path) -> str:
    return _add_text(nix_host, tmp_path, "hidden", f"hidden {uuid.uuid4().hex}\n")


def _outer(nix_host, tmp_path, busybox, hidden, checks: str = "{}") -> str:
    return _build(
        nix_host,
        tmp_path,
        OUTER,
        bb=f"builtins.storePath {_q(busybox)}",
        hidden=_q(hidden),
        nonce=_q(uuid.uuid4().hex),
        checks=checks,
    )


def test_finalise_adds_missing_reference(nix_host, busybox, tmp_path, hidden):
    drv = _outer(nix_host, tmp_path, busybox, hidden)
    outputs = _outputs(nix_host, drv)
    assert set(outputs) == {"out", "dev"}
    out = outputs["out"]
    before = set(_nix(nix_host, "nix-store", "-q", "--references", out).split())
    assert hidden not in before, "Nix itself should not have seen the hidden reference"
    assert busybox in before
    assert scan_references(out, {hidden, busybox}) == {hidden, busybox}

    unrelated = _add_text(nix_host, tmp_path, "unrelated", f"x {uuid.uuid4().hex}")
    report = _finalise(nix_host, drv, {hidden, unrelated})
    assert report.outputs == outputs
    assert report.added_refs == {"out": {hidden}}

    after = set(_nix(nix_host, "nix-store", "-q", "--references", out).split())
    assert after == before | {hidden}
    assert hidden in _nix(nix_host, "nix-store", "-qR", out).split()
    assert _nix(nix_host, "nix-store", "-q", "--deriver", out).strip() == drv
    dev_refs = _nix(nix_host, "nix-store", "-q", "--references", outputs["dev"]).split()
    assert hidden not in dev_refs
    verify = subprocess.run(
        ["nix-store", "--verify-path", out], env=nix_host.env, capture_output=True, text=True
    )
    assert verify.returncode == 0, verify.stderr

    # Idempotent: a second run finds nothing new.
    again = _finalise(nix_host, drv, {hidden})
    assert again.added_refs == {}


def test_allowed_references_violation(nix_host, busybox, tmp_path, hidden):
    drv = _outer(
        nix_host,
        tmp_path,
        busybox,
        hidden,
        checks=f"{{ allowedReferences = [ (builtins.storePath {_q(busybox)}) ]; }}",
    )
    out = _outputs(nix_host, drv)["out"]
    with pytest.raises(FinaliseError, match=rf"'out'.*allowedReferences.*{hidden}"):
        _finalise(nix_host, drv, {hidden})
    assert hidden not in _nix(nix_host, "nix-store", "-q", "--references", out).split()


def test_disallowed_requisites_violation(nix_host, busybox, tmp_path, hidden):
    # `carrier` references `hidden`; the outer output refers to `carrier` only, so `hidden`
    # enters its closure only through the fix-up.
    carrier = _build(
        nix_host,
        tmp_path,
        '{ p }: derivation { name = "carrier"; system = "x86_64-linux"; builder = "${p.bb}/bin/sh";'
        ' args = [ "-c" "echo ${p.hidden} > $out" ]; }',
        p=f"{{ bb = builtins.storePath {_q(busybox)}; hidden = builtins.storePath {_q(hidden)}; }}",
    )
    carrier_out = _outputs(nix_host, carrier)["out"]
    drv = _outer(
        nix_host,
        tmp_path,
        busybox,
        carrier_out,
        checks=f"{{ disallowedRequisites = [ {_q(hidden)} ]; }}",
    )
    with pytest.raises(FinaliseError, match=rf"disallowedRequisites.*{hidden}"):
        _finalise(nix_host, drv, {carrier_out})


def test_fixed_output_referencing_session_path_fails(nix_host, busybox, tmp_path, hidden):
    content = f"fetched {hidden} {uuid.uuid4().hex}"
    drv = _build(
        nix_host,
        tmp_path,
        FIXED,
        bb=f"builtins.storePath {_q(busybox)}",
        content=_q(content),
    )
    out = _outputs(nix_host, drv)["out"]
    assert Path(out).read_text() == content
    with pytest.raises(FinaliseError, match=r"fixed-output.*computed from its references"):
        _finalise(nix_host, drv, {hidden})
    # Without a session reference it is fine.
    assert _finalise(nix_host, drv, set()).added_refs == {}


def test_resign_after_reregistration(nix_host, busybox, tmp_path, hidden):
    key_name = f"recnix-test-{uuid.uuid4().hex[:8]}"
    secret, public = tmp_path / "sk", tmp_path / "pk"
    _nix(nix_host, "nix-store", "--generate-binary-cache-key", key_name, str(secret), str(public))
    drv = _outer(nix_host, tmp_path, busybox, hidden)
    out = _outputs(nix_host, drv)["out"]
    report = _finalise(nix_host, drv, {hidden}, [str(secret)])
    assert report.added_refs == {"out": {hidden}}
    info = _nix(
        nix_host, "nix", "--extra-experimental-features", "nix-command", "path-info", "--sigs", out
    )
    assert f"{key_name}:" in info, info
    verify = subprocess.run(
        [
            "nix", "--extra-experimental-features", "nix-command", "store", "verify",
            "--no-contents", "--trusted-public-keys", public.read_text().strip(), out,
        ],
        env=nix_host.env,
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stderr
    assert os.path.exists(out)


def test_a_registrar_started_early_is_used_or_closed(nix_host, busybox, tmp_path, hidden):
    """finalise_outputs takes a nix-store started ahead of time: it registers through it
    when there is something to add, and lets it go otherwise or on an error."""
    drv = _outer(nix_host, tmp_path, busybox, hidden)
    out = _outputs(nix_host, drv)["out"]
    used = Registrar(nix_host.env)
    report = _finalise(nix_host, drv, {hidden}, registrar=used)
    assert report.added_refs == {"out": {hidden}}
    assert used.process.returncode == 0
    assert hidden in _nix(nix_host, "nix-store", "-q", "--references", out).split()

    idle = Registrar(nix_host.env)
    assert _finalise(nix_host, drv, {hidden}, registrar=idle).added_refs == {}
    assert idle.process.returncode == 0

    strict = _outer(
        nix_host,
        tmp_path,
        busybox,
        hidden,
        checks=f"{{ allowedReferences = [ (builtins.storePath {_q(busybox)}) ]; }}",
    )
    refused = Registrar(nix_host.env)
    with pytest.raises(FinaliseError, match="allowedReferences"):
        _finalise(nix_host, strict, {hidden}, registrar=refused)
    assert refused.process.returncode is not None


def test_a_failed_registration_names_the_command(nix_host):
    # a path that does not exist: nothing in the store's database is touched
    missing = "/nix/store/" + "0" * 32 + "-recnix-not-there"
    record = [missing, "sha256:" + "0" * 52, "1", "", "0"]
    with pytest.raises(FinaliseError, match="nix-store --register-validity.*failed"):
        Registrar(nix_host.env).register([record])
