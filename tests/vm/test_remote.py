"""recnix with Nix's distributed builds: two guests on a private network (issue 12).

``client`` and ``builder`` (both the Debian 12 image: Nix 2.8, nix-daemon,
recnix) share one boot for the whole module. The client's ``/etc/nix/machines``
(Nix's default ``builders = @/etc/nix/machines``) is rewritten per test; the
client's root reaches the builder as root (trusted by the builder's Nix) or as
``nixremote`` (not trusted).

What Nix does (build-remote.cc, daemon.cc, nix-store.cc, 2.8 to 2.34): the
client copies the input closure, then sends the outer build with
``BuildDerivation`` (ssh: always, ``nix-store --serve``'s cmdBuildDerivation;
ssh-ng: always in 2.8, for a trusted client later), which carries no ``.drv``,
or, ssh-ng from an untrusted client on Nix >= 2.16, copies the ``.drv`` and
sends ``BuildPaths``; then it copies back only the outputs.

The guests' nix.conf ``build-hook`` is ``recnix-build-hook``: Nix's build-remote
with recnix's ssh proxy (recnix.remote.sshproxy) for ``ssh-ng://`` builders, which
copies the ``.drv`` closure of an opted-in build to the builder (and builds it
there from it) and brings the outputs' closure back. Without it (the default
``build-hook``, given with ``--option``) or over ``ssh://``, the builder's
pre-build hook gets the path of a ``.drv`` it does not have: recnix mounts a
guard socket there (recnix.remote.guards), so an opted-in build fails at its first
Nix call with the cause and the fix.

The guest that is killed mid-build is the last test's: keep it last.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from recnix_vm.guestnix import bundle_nix_in_guest, guest_exec
from recnix_vm.image import GUEST_SCENARIOS_DIR, get_suite
from recnix_vm.machine import Machine
from recnix_vm.network import (
    UNTRUSTED_USER,
    BuilderLink,
    Network,
    ignores_nix_conf_build_hook,
    link_builder,
    set_daemon_ssh_shim,
)

from tests.scenarios import checks
from tests.scenarios.checks import RECNIX, fresh_tag
from tests.scenarios.runner import ScenarioRunner

# Two TCG guests take minutes: bookworm (Nix 2.8) and sid (2.34) by default; e.g.
# RECNIX_VM_REMOTE_SUITES=bookworm,trixie,sid for 2.26 too.
SUITES = os.environ.get("RECNIX_VM_REMOTE_SUITES", "bookworm,sid").split(",")

pytestmark = [
    pytest.mark.vm,
    pytest.mark.parametrize("vm_suite", SUITES, indirect=True, scope="module"),
]

MACHINES = "/etc/nix/machines"
GUARD_TEXT = "was sent to this machine without its .drv"


@dataclass
class Pair:
    client: Machine
    builder: Machine
    link: BuilderLink
    busybox: str
    nix: str

    @property
    def nix_version(self) -> tuple[int, int]:
        """The guests' Nix (major, minor), from the image's suite."""
        major, minor = get_suite(self.client.image.suite).nix.split(".")[:2]
        return int(major), int(minor)

    def machines(self, line: str) -> None:
        """Make ``line`` the client's only remote builder."""
        self.client.succeed(f"echo {shlex.quote(line)} > {MACHINES}")

    @property
    def nix_build_hook(self) -> str:
        """Nix's own default build-hook on the guests' Nix."""
        return (
            "/usr/libexec/nix/build-remote" if self.nix_version < (2, 19) else "nix __build-remote"
        )

    def runner(
        self,
        dispatch: str | None = None,
        copy_drv: str | None = None,
        remote_store: str | None = None,
        nix_hook: bool = False,
    ) -> ScenarioRunner:
        """A runner on the client; ``dispatch``: force nix-build onto the builder
        (``--max-jobs 0``); ``copy_drv``: first copy the .drv's closure to the
        builder with this store URI; ``remote_store``: instead of nix-build,
        ``nix build --store <uri> --eval-store auto`` and ``nix copy --from <uri>``;
        ``nix_hook``: build with Nix's default build-hook instead of recnix's."""
        plain = guest_exec(self.client, via_daemon=True)

        def run(argv: list[str], timeout: float) -> tuple[int, str, str]:
            if not argv or not argv[0].endswith("nix-build"):
                return plain(argv, timeout)
            if remote_store:
                rest = [a for a in argv[2:] if a != "--no-out-link"]
                build = shlex.join(
                    ["nix", "build", "--store", remote_store, "--eval-store", "auto"]
                    + ["--no-link", "--json", "-f", argv[1], *rest]
                )
                parse = "import json,sys; print(json.load(sys.stdin)[0]['outputs']['out'])"
                # The inputs are unsigned: a trusted user copies them first (nix build
                # copies what is missing with signature checks).
                inputs = shlex.join([self.busybox, self.nix])
                cmd = (
                    f"export NIX_REMOTE=daemon; nix copy --no-check-sigs --to "
                    f"{shlex.quote(remote_store)} {inputs} && "
                    f"out=$({build} | python3 -c {shlex.quote(parse)})"
                    f" && nix copy --no-check-sigs --from {shlex.quote(remote_store)}"
                    ' "$out" && echo "$out"'
                )
                return self.client.execute(cmd, timeout)
            extra = ["--max-jobs", "0"] if dispatch else []
            if nix_hook:
                extra += ["--option", "build-hook", self.nix_build_hook]
            build = shlex.join([*argv, *extra])
            cmd = f"export NIX_REMOTE=daemon; {build}"
            if copy_drv:
                inst = shlex.join(["nix-instantiate", *argv[1:]]).replace(" --no-out-link", "")
                cmd = (
                    f"export NIX_REMOTE=daemon; drv=$({inst}) && "
                    f'nix copy --derivation --to {shlex.quote(copy_drv)} "$drv" && {build}'
                )
            return self.client.execute(cmd, timeout)

        return ScenarioRunner(run, GUEST_SCENARIOS_DIR, self.busybox, self.nix, timeout=900)

    def on_builder(self) -> ScenarioRunner:
        return ScenarioRunner(
            guest_exec(self.builder, via_daemon=True), GUEST_SCENARIOS_DIR, "", "", timeout=300
        )


def _ready(machine: Machine) -> None:
    machine.wait_for_unit("nix-daemon.socket")
    machine.wait_for_unit("recnix.service")
    machine.wait_until_succeeds("test -S /run/recnix/control.sock", timeout=60)


@pytest.fixture(scope="module")
def pair(module_machine_factory, tmp_path_factory) -> Iterator[Pair]:
    with Network(tmp_path_factory.mktemp("net")) as net:
        client = module_machine_factory("client", start=False)
        builder = module_machine_factory("builder", start=False)
        c, b = net.attach(client), net.attach(builder)
        for m in (client, builder):  # boot both at once
            m.start(wait=False)
        for m in (client, builder):
            m.wait_for_boot()
        net.configure()
        _ready(client)
        _ready(builder)
        link = link_builder(c, b)
        busybox, nix = bundle_nix_in_guest(client)
        pair = Pair(client, builder, link, busybox, nix)
        if ignores_nix_conf_build_hook(pair.nix_version):
            set_daemon_ssh_shim(client, True)
        yield pair


@contextlib.contextmanager
def nix_own_build_hook(pair: Pair) -> Iterator[None]:
    """The client without recnix's ssh on the daemon's PATH (where the test set it);
    with ``runner(nix_hook=True)``: a client without recnix's build hook."""
    shim = ignores_nix_conf_build_hook(pair.nix_version)
    if shim:
        set_daemon_ssh_shim(pair.client, False)
    try:
        yield
    finally:
        if shim:
            set_daemon_ssh_shim(pair.client, True)


def _failed_build(runner: ScenarioRunner, scenario: str = "inner") -> str:
    tag = fresh_tag()
    outcome = runner.build(scenario, RECNIX, tag, {"innerTag": tag})
    assert outcome.rc != 0 and outcome.out_path is None, outcome.describe()
    return outcome.stderr


# -- outer build dispatched to the builder --------------------------------------

CHECKS = {"inner": checks.check_inner, "add": checks.check_add, "deep": checks.check_deep}
INNER_SUFFIXES = {"inner": ("-inner",), "add": ("-added.txt",), "deep": ("-deep-inner",)}


@pytest.mark.parametrize(
    ("scenario", "user"),
    [("inner", "root"), ("add", "root"), ("deep", "root"), ("inner", UNTRUSTED_USER)],
)
def test_outer_dispatched_ssh_ng(pair: Pair, scenario: str, user: str) -> None:
    """Through recnix's build-hook: the outer build runs on the builder in a session
    (its .drv sent first) and comes back with its whole closure, inner outputs and
    references valid on the client."""
    pair.machines(pair.link.machine_line("ssh-ng", user=user))
    since = pair.builder.succeed("wc -l < /var/log/recnix/audit.jsonl || echo 0").strip()
    runner = pair.runner(dispatch="remote")
    out = CHECKS[scenario](runner, RECNIX)
    assert pair.on_builder().is_valid(out), f"{out} was not built on the builder"
    closure = pair.client.succeed(f"NIX_REMOTE=daemon nix-store -qR {out}").split()
    for suffix in INNER_SUFFIXES[scenario]:
        assert any(p.endswith(suffix) for p in closure), (suffix, closure)
    tree = pair.builder.succeed(f"recnix tree {out}")
    assert f"-scenario-{scenario}.drv [finalised]" in tree, tree
    audit = pair.builder.succeed(f"tail -n +{int(since) + 1} /var/log/recnix/audit.jsonl")
    assert '"event": "opened"' in audit and '"event": "guarded"' not in audit, audit


def test_outer_dispatched_ssh_is_refused(pair: Pair) -> None:
    """ssh:// (nix-store --serve) sends BuildDerivation and no .drv, and recnix's proxy
    is not on that path: the build fails at its first nested call with the guard's
    message, never without a session."""
    pair.machines(pair.link.machine_line("ssh"))
    since = pair.builder.succeed("wc -l < /var/log/recnix/audit.jsonl || echo 0").strip()
    err = _failed_build(pair.runner(dispatch="remote"))
    assert GUARD_TEXT in err, err
    assert "build-hook = recnix-build-hook" in err and "supportedFeatures" in err, err
    audit = pair.builder.succeed(f"tail -n +{int(since) + 1} /var/log/recnix/audit.jsonl")
    assert '"event": "guarded"' in audit and '"event": "opened"' not in audit, audit


def test_outer_dispatched_without_recnix_build_hook(pair: Pair) -> None:
    """A client with Nix's own build-hook: over ssh-ng:// Nix 2.8 (and a trusted client
    of any version) sends no .drv either: the guard's message."""
    pair.machines(pair.link.machine_line("ssh-ng"))
    with nix_own_build_hook(pair):
        err = _failed_build(pair.runner(dispatch="remote", nix_hook=True))
    assert GUARD_TEXT in err and "build-hook = recnix-build-hook" in err, err


def test_outer_dispatched_with_drv_without_recnix_build_hook(pair: Pair) -> None:
    """With the .drv copied by hand but Nix's own build-hook, the outer build runs on
    the builder in a session and its output gets its references there; but Nix's
    build-remote copies back only the outputs (copyPaths, not copyClosure), so the
    client cannot import an output referencing the inner outputs: Nix's limit, which
    recnix's build-hook lifts."""
    pair.machines(pair.link.machine_line("ssh-ng"))
    runner = pair.runner(
        dispatch="remote", copy_drv=f"ssh-ng://root@{pair.link.host}", nix_hook=True
    )
    with nix_own_build_hook(pair):
        err = _failed_build(runner)
    assert "' is not valid" in err and "-inner' is not valid" in err, err
    assert "note: this build runs for a remote client (SSH)" in err, err
    # On the builder: built in a session, with the reference to the inner output.
    out = next(w for w in err.split() if w.strip("'").endswith("-scenario-inner"))
    out = out.strip("'")
    refs = pair.on_builder().references(out)
    assert any(r.endswith("-inner") for r in refs), refs
    assert not pair.runner().is_valid(out)


@pytest.mark.parametrize("scenario", ["inner", "add", "deep"])
def test_outer_built_on_builder_store(pair: Pair, scenario: str) -> None:
    """What works for an outer build on another machine: build it on the builder's
    store (``nix build --store ssh-ng://… --eval-store auto``: the .drv goes along,
    the build gets its session there) and copy the closure back (``nix copy
    --from``): the inner outputs and the references arrive on the client. (Nix
    2.8's ``--store ssh://…`` cannot build: "operation 'getFSAccessor' is not
    supported".)"""
    pair.machines("")  # no builders: nothing is dispatched behind our back
    uri = f"ssh-ng://root@{pair.link.host}"
    runner = pair.runner(remote_store=uri)
    out = {"inner": checks.check_inner, "add": checks.check_add, "deep": checks.check_deep}[
        scenario
    ](runner, RECNIX)
    assert pair.on_builder().is_valid(out), f"{out} was not built on the builder"
    tree = pair.builder.succeed(f"recnix tree {out}")
    assert f"-scenario-{scenario}.drv [finalised]" in tree, tree


def test_outer_dispatched_untrusted_ssh_fails(pair: Pair) -> None:
    """A client the builder does not trust cannot hand it an input-addressed
    BuildDerivation over ssh:// (Nix's own refusal, recnix or not)."""
    pair.machines(pair.link.machine_line("ssh", user=UNTRUSTED_USER))
    err = _failed_build(pair.runner(dispatch="remote"))
    print(f"untrusted ssh:// client, Nix {pair.nix_version}:\n{err}")
    assert "not privileged to build input-addressed derivations" in err, err


# -- nested builds dispatched from a local outer build -------------------------


def test_nested_builds_dispatched(pair: Pair) -> None:
    """The outer build runs on the client (the builder lacks `recnix`); its nested
    build goes out through the client's nix-daemon and comes back into the sandbox."""
    pair.machines(pair.link.machine_line("ssh-ng", features=()))
    runner = pair.runner()
    out = checks.check_inner(runner, RECNIX)
    inner = runner.readlink(f"{out}/inner")
    assert pair.on_builder().is_valid(inner), f"{inner} was not built on the builder"
    assert not pair.on_builder().is_valid(out), f"{out} was built on the builder"
    tree = pair.client.succeed(f"NIX_REMOTE=daemon recnix tree {out}")
    assert "-inner.drv" in tree and f"(ran on ssh-ng://root@{pair.link.host})" in tree, tree


def test_nested_remote_failure(pair: Pair) -> None:
    """A nested build failing on the builder fails the outer, with its log lines."""
    pair.machines(pair.link.machine_line("ssh-ng", features=()))
    checks.check_failure(pair.runner(), RECNIX)


def test_verify_both(pair: Pair) -> None:
    """Both stores are consistent after the dispatched builds."""
    for m in (pair.client, pair.builder):
        m.succeed(
            "nix-store --verify --check-contents 2>&1 | tee /dev/stderr | "
            "(! grep -Ei 'error|warning|invalid|modified')"
        )


# -- the builder goes away mid-build (keep last: it kills the builder) ----------

SLOW = f"""
{{ busybox, nix, tag }}:
let lib = import {GUEST_SCENARIOS_DIR}/inner/lib.nix {{ inherit busybox nix; }};
in lib.mkBuild {{
  name = "remote-slow";
  features = [ "recnix" ];
  env = {{ inherit tag; }};
  script = ''
    nix-store -q --references ${{lib.bb}} >/dev/null
    sleep 3600
    mkdir $out
  '';
}}
"""


def test_builder_killed_mid_build(pair: Pair) -> None:
    """Killing the builder fails the outer build on the client (SSH keep-alives), and
    nothing of it stays rooted there."""
    pair.machines(pair.link.machine_line("ssh-ng"))
    c = pair.client
    c.succeed(f"cat > /root/slow.nix <<'EOF'\n{SLOW}\nEOF")
    tag = fresh_tag()
    args = (
        f"/root/slow.nix --argstr busybox {pair.busybox} --argstr nix {pair.nix} --argstr tag {tag}"
    )
    drv = c.succeed(f"NIX_REMOTE=daemon nix-instantiate {args}").strip()
    c.succeed(f"NIX_REMOTE=daemon nix copy --derivation --to ssh-ng://root@{pair.link.host} {drv}")
    result: dict[str, tuple[int, str, str]] = {}

    def build() -> None:
        result["build"] = c.execute(
            f"NIX_REMOTE=daemon nix-build --no-out-link --max-jobs 0 {args}", timeout=600
        )

    t = threading.Thread(target=build)
    t.start()
    pair.builder.wait_until_succeeds("pgrep -f 'sleep 3600'", timeout=600)
    pair.builder.crash()
    t.join(timeout=700)
    assert not t.is_alive(), "nix-build on the client still runs after the builder died"
    rc, out, err = result["build"]
    assert rc not in (0, 124), f"exit status {rc}\n{out}\n{err}"
    # nothing rooted on the client: no recnix roots, no root naming the outer build
    c.succeed('test -z "$(ls -A /nix/var/nix/gcroots/recnix 2>/dev/null)"')
    roots = c.succeed("NIX_REMOTE=daemon nix-store --gc --print-roots")
    assert "remote-slow" not in roots, roots
    c.succeed("nix-store --verify --check-contents")
