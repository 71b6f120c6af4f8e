"""recnix's ssh proxy (recnix.remote.sshproxy) between real Nix clients and a real builder store.

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

from recnix.formats.storepath import nix32_encode, nix32_to_base16
from recnix.hooks import buildhook
from tests.host.conftest import VENV_BIN, NixHost, start_nix_host, stop_nix_host
from tests.nixversion import at_least, is_lix, path_info_args, path_info_record

HOOKENTRY = Path(buildhook.__file__).with_name("entry.py")

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
def signing_key(builder_store) -> tuple[Path, str]:
    """(a secret key file, its public key): the public key is in the client's
    trusted-public-keys."""
    root = builder_store[0].parent
    out = subprocess.run(
        ["nix-store", "--generate-binary-cache-key", "recnix-test-1", "sk", "pk"],
        cwd=root,
        capture_output=True,
        check=True,
    )
    assert out.returncode == 0
    return root / "sk", (root / "pk").read_text().strip()


@pytest.fixture(scope="module")
def client_daemon(builder_store, signing_key, tmp_path_factory) -> Iterator[NixHost]:
    """A private daemon with build-hook = recnix-build-hook and one ssh-ng:// builder;
    its recnix config (``RECNIX_CONFIG``) is empty (the defaults), its
    trusted-public-keys the test key."""
    _, fake = builder_store
    config = tmp_path_factory.mktemp("client-recnix") / "recnix.toml"
    config.write_text("")
    host = start_nix_host(
        hooks=False,
        daemon_env={
            "RECNIX_REAL_SSH": str(fake),
            "RECNIX_HOOK_PYTHON": sys.executable,
            "RECNIX_HOOK_ENTRY": str(HOOKENTRY),
            "RECNIX_CONFIG": str(config),
        },
        extra_conf=(
            f"build-hook = {VENV_BIN / 'recnix-build-hook'}\n"
            "builders = ssh-ng://builder x86_64-linux - 1 1 recnix\n"
            f"trusted-public-keys = {signing_key[1]}\n"
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


# -- what a builder sends back beyond the outputs it was sent (issue 19, route 4) ----------

VICTIM = """
{ tag }:
derivation {
  name = "victim-${tag}";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "echo genuine > $out" ];
}
"""

INNER = """
{ busybox, tag }:
derivation {
  name = "inner-${tag}";
  system = builtins.currentSystem;
  builder = "${builtins.storePath busybox}/bin/sh";
  args = [ "-c" "echo inner ${tag} > $out" ];
}
"""

OLD_BUILD_REMOTE = pytest.mark.skipif(
    not is_lix() and at_least(2, 20),  # on Lix the whole module is skipped (pytestmark)
    reason="the fake ssh cannot stand in for Nix >= 2.20's ssh session to a builder",
)


def builder_env(store: Path) -> dict[str, str]:
    return {**os.environ, "NIX_CONF_DIR": str(store.parent / "conf")}


def plant(store: Path, path: str, text: str, refs: list[str], deriver: str = "") -> None:
    """Make ``path`` valid in the builder's store with ``text`` as its contents, through
    its daemon as root (``nix-store --register-validity`` cannot in a chroot store):
    what a builder that lies can do to its own store."""
    import asyncio

    from recnix.protocol import PathInfo, ValidPathInfo
    from recnix.protocol.nar import dump_path, nar_hash
    from recnix.remote.sshproxy import open_builder

    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "contents"
        file.write_text(text)
        digest, size = nar_hash(file)
        info = PathInfo(
            deriver=deriver or None,
            nar_hash=nix32_to_base16(digest.removeprefix("sha256:")),
            references=refs,
            nar_size=size,
        )
        fake = store.parent / "fake-ssh"

        async def add() -> None:
            conn = await open_builder(str(fake), ["builder", "nix-daemon --stdio"], 35)
            try:
                await conn.add_to_store_nar(
                    ValidPathInfo(path, info), list(dump_path(file)), dont_check_sigs=True
                )
            finally:
                await conn.close()

        asyncio.run(add())


def instantiate(host: NixHost, tmp: Path, text: str, *args: str) -> tuple[str, str]:
    """(.drv, out) of an expression, instantiated in the client's store."""
    expr = tmp / f"e{os.urandom(4).hex()}.nix"
    expr.write_text(text)
    drv = host.run(["nix-instantiate", str(expr), *args]).stdout.strip()
    out = host.run(["nix-store", "-q", "--outputs", drv]).stdout.strip()
    return drv, out


class RemoteBuild:
    """An opted-in outer build whose output the builder has already "built": a
    planted path that refers to ``refs`` (what recnix's session on the builder
    registers for an output that refers to its nested builds)."""

    def __init__(self, host: NixHost, store: Path, busybox: str, tmp: Path) -> None:
        self.host = host
        self.tag = os.urandom(6).hex()
        self.args = [str(tmp / "outer.nix"), "--argstr", "busybox", busybox]
        self.args += ["--argstr", "tag", self.tag]
        (tmp / "outer.nix").write_text(OUTER)
        self.drv, self.out = instantiate(host, tmp, OUTER, *self.args[1:])
        self.store = store

    def plant_output(self, refs: list[str]) -> None:
        plant(self.store, self.out, "outer " + " ".join(refs) + "\n", refs, self.drv)

    def build(self) -> subprocess.CompletedProcess[str]:
        return self.host.run(
            ["nix-build", "--no-out-link", "--max-jobs", "0", *self.args], check=False
        )


def client_has(host: NixHost, path: str) -> bool:
    return host.run(["nix-store", "--check-validity", path], check=False).returncode == 0


@pytest.fixture
def trusted_builders(client_daemon: NixHost) -> Iterator[Path]:
    """The client's recnix config, reset to the defaults afterwards."""
    config = Path(client_daemon.daemon_env["RECNIX_CONFIG"])
    yield config
    config.write_text("")


@OLD_BUILD_REMOTE
@pytest.mark.parametrize("drv_on", ["client", "client and builder", "neither"])
def test_builder_cannot_plant_the_output_of_an_unbuilt_derivation(
    client_daemon: NixHost, builder_store, busybox: str, tmp_path: Path, drv_on: str
) -> None:
    """The attack: the builder's output of the sent derivation refers to the output path
    of a derivation this machine has not built, with the builder's contents (its .drv
    on this machine, on both, or under a deriver neither has). Nothing is imported;
    the build fails naming the path, the builder and the setting. (Before the fix,
    the proxy imported it as root without any check.)"""
    store, _ = builder_store
    tag = os.urandom(6).hex()
    victim_drv, victim_out = instantiate(client_daemon, tmp_path, VICTIM, "--argstr", "tag", tag)
    if drv_on == "neither":
        victim_drv = f"/nix/store/{nix32_encode(os.urandom(20))}-victim-{tag}.drv"
    if drv_on == "client and builder":  # the builder computes the same .drv as the client
        expr = tmp_path / "victim.nix"
        expr.write_text(VICTIM)
        on_builder = subprocess.run(
            ["nix-instantiate", "--store", f"local?root={store}", str(expr)]
            + ["--argstr", "tag", tag],
            env=builder_env(store),
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert on_builder == victim_drv
    plant(store, victim_out, "evil\n", [], victim_drv)
    build = RemoteBuild(client_daemon, store, busybox, tmp_path)
    build.plant_output([victim_out])
    r = build.build()
    assert r.returncode != 0, r.stdout
    assert not client_has(client_daemon, victim_out), f"{victim_out} was planted"
    assert victim_out in r.stderr and "remote.trusted-builders" in r.stderr, r.stderr
    assert "builder" in r.stderr and "trusted-public-keys" in r.stderr, r.stderr
    assert not client_has(client_daemon, build.out)
    if drv_on == "neither":
        assert f"{victim_drv} is not valid on builder" in r.stderr, r.stderr


@OLD_BUILD_REMOTE
def test_builder_cannot_plant_a_path_under_a_false_deriver(
    client_daemon: NixHost, builder_store, busybox: str, tmp_path: Path
) -> None:
    """A path the builder says some other derivation it has produced, whose output
    paths are not that path: refused, not imported."""
    store, _ = builder_store
    other = tmp_path / "other.nix"
    other.write_text(INNER)
    tag = os.urandom(6).hex()
    other_drv = subprocess.run(
        ["nix-instantiate", "--store", f"local?root={store}", str(other)]
        + ["--argstr", "busybox", busybox, "--argstr", "tag", tag],
        env=builder_env(store),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    fake = f"/nix/store/{nix32_encode(os.urandom(20))}-inner-{tag}"
    plant(store, fake, "evil\n", [], other_drv)
    build = RemoteBuild(client_daemon, store, busybox, tmp_path)
    build.plant_output([fake])
    r = build.build()
    assert r.returncode != 0
    assert not client_has(client_daemon, fake)
    assert fake in r.stderr and f"not an output of its deriver {other_drv}" in r.stderr, r.stderr


@OLD_BUILD_REMOTE
def test_trusted_builder_setting_admits_what_it_sends(
    client_daemon: NixHost, builder_store, busybox: str, tmp_path: Path, trusted_builders: Path
) -> None:
    """remote.trusted-builders naming the builder: the same unproven path is imported."""
    store, _ = builder_store
    _, victim_out = instantiate(
        client_daemon, tmp_path, VICTIM, "--argstr", "tag", os.urandom(6).hex()
    )
    plant(store, victim_out, "trusted builder's\n", [])
    trusted_builders.write_text('[remote]\ntrusted-builders = ["ssh-ng://builder"]\n')
    build = RemoteBuild(client_daemon, store, busybox, tmp_path)
    build.plant_output([victim_out])
    r = build.build()
    assert r.returncode == 0, r.stderr
    assert client_has(client_daemon, victim_out)
    assert Path(victim_out).read_text() == "trusted builder's\n"
    assert client_has(client_daemon, build.out)


@OLD_BUILD_REMOTE
def test_path_signed_by_a_trusted_key_is_imported(
    client_daemon: NixHost, builder_store, busybox: str, tmp_path: Path, signing_key
) -> None:
    """A path signed on the builder with a key in the client's trusted-public-keys is
    imported; signed with another key, it is not."""
    store, _ = builder_store
    secret, _ = signing_key
    other_key = tmp_path / "other-sk"
    subprocess.run(
        ["nix-store", "--generate-binary-cache-key", "recnix-test-1", str(other_key), "/dev/null"],
        check=True,
    )
    results = {}
    for key in (other_key, secret):
        _, out = instantiate(
            client_daemon, tmp_path, VICTIM, "--argstr", "tag", os.urandom(6).hex()
        )
        plant(store, out, "signed\n", [])
        subprocess.run(
            ["nix", "--extra-experimental-features", "nix-command", "store", "sign"]
            + ["--store", f"local?root={store}", "--key-file", str(key), out],
            env=builder_env(store),
            check=True,
        )
        build = RemoteBuild(client_daemon, store, busybox, tmp_path)
        build.plant_output([out])
        results[key] = (build.build(), out)
    r, out = results[other_key]
    assert r.returncode != 0 and out in r.stderr and not client_has(client_daemon, out)
    r, out = results[secret]
    assert r.returncode == 0, r.stderr
    assert client_has(client_daemon, out) and Path(out).read_text() == "signed\n"


@OLD_BUILD_REMOTE
def test_nested_build_outputs_and_added_sources_still_come_back(
    client_daemon: NixHost, builder_store, busybox: str, tmp_path: Path
) -> None:
    """The legitimate case: the output refers to a nested build's output (its .drv on
    the builder only, built there) and to a source added during the build
    (content-addressed): both are imported, unsigned, the builder not trusted."""
    store, _ = builder_store
    env = builder_env(store)
    subprocess.run(
        ["nix", "--extra-experimental-features", "nix-command", "copy", "--no-check-sigs"]
        + ["--to", f"local?root={store}", busybox],
        env=env,
        check=True,
    )
    inner = tmp_path / "inner.nix"
    inner.write_text(INNER)
    tag = os.urandom(6).hex()
    inner_out = subprocess.run(
        ["nix-build", "--store", f"local?root={store}", "--no-out-link", str(inner)]
        + ["--argstr", "busybox", busybox, "--argstr", "tag", tag],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    source = tmp_path / f"source-{tag}"
    source.write_text(f"added {tag}\n")
    added = subprocess.run(
        ["nix-store", "--store", f"local?root={store}", "--add", str(source)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    build = RemoteBuild(client_daemon, store, busybox, tmp_path)
    build.plant_output([inner_out, added])
    r = build.build()
    assert r.returncode == 0, r.stderr + client_daemon.log_text()
    assert client_has(client_daemon, inner_out) and client_has(client_daemon, added)
    assert Path(inner_out).read_text() == f"inner {tag}\n"
    assert Path(added).read_text() == f"added {tag}\n"
    refs = client_daemon.run(["nix-store", "-q", "--references", build.out]).stdout.split()
    assert sorted(refs) == sorted([inner_out, added])


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

    from recnix.remote.sshproxy import open_builder

    store, fake = builder_store  # it prints "started" when asked, as ssh does
    for key, value in client_env(nix_host, fake).items():
        monkeypatch.setenv(key, value)
    args = ["builder", "-x", "-oPermitLocalCommand=yes", "-oLocalCommand=echo started"]
    args += ["--", "nix-daemon", "--stdio"]

    async def session() -> list[str]:
        conn = await open_builder(os.path.join(buildhook.shim_dir(), "ssh"), args, 35)
        try:
            return await conn.query_valid_paths([busybox, "/nix/store/" + "0" * 32 + "-x"])
        finally:
            await conn.close()

    nix_host.run(
        ["nix", "copy", "--no-check-sigs", "--to", "ssh-ng://builder", busybox],
        env=client_env(nix_host, fake),
    )
    assert asyncio.run(session()) == [busybox]
