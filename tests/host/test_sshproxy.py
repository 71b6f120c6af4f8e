"""recnix's ssh proxy (recnix.sshproxy) between real Nix clients and a real builder store.

The "builder" is a separate store: ``nix-daemon --stdio --store local?root=<dir>``
(its own database and store directory), reached through a fake ``ssh`` that
ignores its host and runs that (``$RECNIX_REAL_SSH``). The client side is the
real thing: ``nix copy`` / ``nix path-info`` / ``nix store dump-path`` with
``ssh-ng://`` URIs and recnix's ``ssh`` first on PATH, and a private
nix-daemon whose ``build-hook`` is ``recnix-build-hook`` and whose only
builder is ``ssh-ng://builder``: its builds go through Nix's own build-remote,
BuildDerivation and all.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from recnix import buildhook
from tests.host.conftest import VENV_BIN, NixHost, start_nix_host, stop_nix_host
from tests.nixversion import at_least, is_lix, path_info_args, path_info_record

HOOKENTRY = Path(buildhook.__file__).with_name("hookentry.py")

# recnix's ssh proxy is started by recnix's build-hook only (its PATH has the proxy's ssh)
pytestmark = pytest.mark.skipif(
    is_lix(),
    reason="recnix's ssh proxy runs under recnix's build-hook only, which is never configured "
    "on Lix (Lix's own Cap'n Proto build hook talks to its builders)",
)


@pytest.fixture(scope="module")
def builder_store() -> Iterator[tuple[Path, Path]]:
    """(the builder's store root, the fake ssh that reaches it)."""
    root = Path(tempfile.mkdtemp(prefix="recnix-builder-"))
    conf = root / "conf"
    conf.mkdir()
    (conf / "nix.conf").write_text(
        "build-users-group = nixbld\nsandbox = true\nsubstituters =\n"
        "experimental-features = nix-command\nextra-system-features = recnix\n"
    )
    store = root / "store-root"
    fake = root / "fake-ssh"
    # The host name and options are ignored; what is run is always this store's
    # daemon (like `ssh builder nix-daemon --stdio` would).
    # Nix >= 2.20 asks ssh for a "started" line first (LocalCommand), and waits for it;
    # a control master (-M) only waits (no second daemon on the same store).
    fake.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {root}/ssh-calls\n'
        'case "$*" in *"LocalCommand=echo started"*) echo started ;; esac\n'
        'case " $* " in *" -M "*) exec sleep 3600 ;; esac\n'
        f"NIX_CONF_DIR={conf} exec nix-daemon --stdio --store 'local?root={store}'\n"
    )
    fake.chmod(0o755)
    # Make the store now: two daemons making it at once (a client's connections in
    # parallel) race ("creating symlink ...: File exists").
    subprocess.run(
        ["nix-store", "--store", f"local?root={store}", "--verify"],
        env={**os.environ, "NIX_CONF_DIR": str(conf)},
        capture_output=True,
        check=True,
    )
    yield store, fake
    subprocess.run(["chmod", "-R", "u+w", str(root)], check=False)
    shutil.rmtree(root, ignore_errors=True)


def client_env(host: NixHost, fake: Path) -> dict[str, str]:
    """A Nix client's environment whose ssh is recnix's shim (as under build-hook)."""
    env = buildhook.hook_env({**host.env, "RECNIX_REAL_SSH": str(fake)})
    assert env["PATH"].startswith(str(buildhook.shim_dir()))
    return env


def builder_query(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nix-store", "--store", f"local?root={store}", *args],
        capture_output=True,
        text=True,
        check=False,
    )


def test_copy_and_query_through_proxy(nix_host: NixHost, builder_store, busybox: str) -> None:
    """nix copy --to / path-info / store cat / copy --from over ssh-ng:// through the
    proxy: AddMultipleToStore (framed), QueryValidPaths, QueryPathInfo, NarFromPath."""
    store, fake = builder_store
    env = client_env(nix_host, fake)
    uri = "ssh-ng://builder"
    calls = fake.parent / "ssh-calls"
    calls.unlink(missing_ok=True)
    nix_host.run(["nix", "copy", "--no-check-sigs", "--to", uri, busybox], env=env)
    assert builder_query(store, "--check-validity", busybox).returncode == 0
    info = path_info_record(
        nix_host.run(
            ["nix", "path-info", *path_info_args(), "--store", uri, busybox], env=env
        ).stdout,
        busybox,
    )
    local = path_info_record(
        nix_host.run(["nix", "path-info", *path_info_args(), busybox]).stdout, busybox
    )
    assert info["narHash"] == local["narHash"], (info, local)
    ls = nix_host.run(["nix", "store", "ls", "--store", uri, f"{busybox}/bin"], env=env)
    assert "./sh" in ls.stdout.split(), ls.stdout
    # NarFromPath: dump from the builder and compare with the local NAR
    remote_nar = subprocess.run(
        ["nix", "store", "dump-path", "--store", uri, busybox],
        env={**nix_host.env, **env},
        capture_output=True,
        check=True,
    ).stdout
    local_nar = subprocess.run(
        ["nix-store", "--dump", busybox], env=nix_host.env, capture_output=True, check=True
    ).stdout
    assert remote_nar == local_nar
    # every session went through the proxy to the fake ssh, with Nix's command
    assert "nix-daemon --stdio" in calls.read_text()


def test_proxy_passes_errors(nix_host: NixHost, builder_store) -> None:
    """An error of the builder's daemon reaches the client with its text."""
    _, fake = builder_store
    env = client_env(nix_host, fake)
    missing = "/nix/store/" + "0" * 32 + "-not-there"
    r = nix_host.run(
        ["nix", "path-info", "--store", "ssh-ng://builder", missing], env=env, check=False
    )
    assert r.returncode != 0 and "is not valid" in r.stderr, r.stderr


OUTER = """
{ busybox, tag }:
derivation {
  name = "proxy-outer";
  system = builtins.currentSystem;
  builder = "${builtins.storePath busybox}/bin/sh";
  args = [ "-c" "echo $tag > $out" ];
  inherit tag;
  requiredSystemFeatures = [ "recnix" ];
}
"""


@pytest.fixture(scope="module")
def client_daemon(builder_store) -> Iterator[NixHost]:
    """A private daemon with build-hook = recnix-build-hook and one ssh-ng:// builder."""
    _, fake = builder_store
    host = start_nix_host(
        hooks=False,
        daemon_env={
            "RECNIX_REAL_SSH": str(fake),
            "RECNIX_HOOK_PYTHON": sys.executable,
            "RECNIX_HOOK_ENTRY": str(HOOKENTRY),
        },
        extra_conf=(
            f"build-hook = {VENV_BIN / 'recnix-build-hook'}\n"
            "builders = ssh-ng://builder x86_64-linux - 1 1 recnix\n"
        ),
    )
    yield host
    stop_nix_host(host)


@pytest.mark.skipif(
    not is_lix() and at_least(2, 20),
    reason="the fake ssh cannot stand in for Nix >= 2.20's ssh session to a builder "
    "(build-remote hangs on it); tests/vm/test_remote.py runs this flow with real ssh "
    "on 2.34 (sid)",
)
def test_build_dispatched_through_build_remote(
    client_daemon: NixHost, builder_store, busybox: str, tmp_path: Path
) -> None:
    """Nix's build-remote sends an opted-in build with BuildDerivation (no .drv); the
    proxy copies the .drv to the builder's store first, the build runs there and its
    output comes back."""
    store, _ = builder_store
    expr = tmp_path / "outer.nix"
    expr.write_text(OUTER)
    tag = os.urandom(6).hex()
    args = [str(expr), "--argstr", "busybox", busybox, "--argstr", "tag", tag]
    drv = client_daemon.run(["nix-instantiate", *args]).stdout.strip()
    assert builder_query(store, "--check-validity", drv).returncode != 0
    r = client_daemon.run(["nix-build", "--no-out-link", "--max-jobs", "0", *args], check=False)
    assert r.returncode == 0, r.stderr + client_daemon.log_text()
    out = r.stdout.strip().splitlines()[-1]
    assert Path(out).read_text().strip() == tag
    # built on the builder's store, from the .drv the proxy copied there
    assert builder_query(store, "--check-validity", out).returncode == 0
    assert builder_query(store, "--check-validity", drv).returncode == 0, (
        f"{drv} was not copied to the builder\n{r.stderr}"
    )
    assert builder_query(store, "-q", "--deriver", out).stdout.strip() == drv


def test_unreachable_builder_fails_with_reason(nix_host: NixHost, tmp_path: Path) -> None:
    """An ssh that cannot connect: the client fails with ssh's message and the
    proxy's, at once (no hang)."""
    fake = tmp_path / "refusing-ssh"
    fake.write_text(
        "#!/bin/sh\necho 'ssh: connect to host builder port 22: refused' >&2\nexit 255\n"
    )
    fake.chmod(0o755)
    env = client_env(nix_host, fake)
    r = nix_host.run(["nix", "store", "ping", "--store", "ssh-ng://builder"], env=env, check=False)
    assert r.returncode != 0, r
    assert "connect to host builder port 22: refused" in r.stderr, r.stderr
    assert "no worker-protocol session with builder" in r.stderr, r.stderr


def test_started_line_of_nix_2_20_on(
    nix_host: NixHost, builder_store, busybox: str, monkeypatch, tmp_path: Path
) -> None:
    """Nix >= 2.20 runs ``ssh … -oLocalCommand=echo started -- nix-daemon --stdio`` and
    reads ``started`` before the session: the proxy takes that line from the real ssh
    and passes it on, then the session works (here driven by recnix's own client, the
    host's Nix being 2.8)."""
    import asyncio

    from recnix.sshproxy import Builder

    store, fake = builder_store  # it prints "started" when asked, as ssh does
    for key, value in client_env(nix_host, fake).items():
        monkeypatch.setenv(key, value)
    args = ["builder", "-x", "-oPermitLocalCommand=yes", "-oLocalCommand=echo started"]
    args += ["--", "nix-daemon", "--stdio"]

    async def session() -> list[str]:
        conn = await Builder.open(str(buildhook.shim_dir() / "ssh"), args, 35)
        try:
            return await conn.query_valid_paths([busybox, "/nix/store/" + "0" * 32 + "-x"])
        finally:
            await conn.close()

    nix_host.run(
        ["nix", "copy", "--no-check-sigs", "--to", "ssh-ng://builder", busybox],
        env=client_env(nix_host, fake),
    )
    assert asyncio.run(session()) == [busybox]
