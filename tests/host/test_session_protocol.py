"""The worker protocol spoken directly to a live recnix session (issue 3, NI §6.4, §3.5).

What the nix CLI never sends: ops a sandboxed client could send by hand, and
malformed input. Each test starts an opted-in build that waits for a release
file (``session_probe.start_live_build``), talks to its session socket from a
process inside the build's sandbox, then releases the build and checks it
finishes and its session is cleaned up.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from recnix.config.loader import load_defaults
from recnix.protocol import (
    BasicDerivation,
    DerivationOutput,
    DerivedPath,
    Error,
    GCResult,
    Op,
    PathInfo,
    ValidPathInfo,
    encode_multiple_entry,
    encode_multiple_header,
)
from recnix.protocol.wire import u64
from tests.host.conftest import RECNIX_BIN, NixHost, RecnixService
from tests.host.session_probe import (
    LiveBuild,
    ProbeClient,
    decode_stderr_messages,
    recv_until_closed,
    sandbox_flood,
    sandbox_socket,
    service_sessions,
    start_live_build,
)
from tests.nixversion import path_info_args, path_info_record
from tests.scenarios.runner import BuildOutcome, ScenarioRunner

pytestmark = pytest.mark.host

GCROOTS_AUTO = Path("/nix/var/nix/gcroots/auto")
MAX_CONNECTIONS = load_defaults()["policy"]["max-connections-per-session"]
SESSION_GONE_TIMEOUT = 10.0
TRUNCATION_ATTEMPTS = 8


def fresh() -> str:
    return uuid.uuid4().hex[:12]


def host_add(host: NixHost, directory: Path, name: str, content: str) -> str:
    """``nix-store --add`` a new file on the host (a valid path no build has as input)."""
    f = directory / name
    f.write_text(content)
    return host.run(["nix-store", "--add", str(f)]).stdout.strip()


def host_dump(host: NixHost, path: str) -> bytes:
    result = subprocess.run(
        ["nix-store", "--dump", path], env=host.env, capture_output=True, check=True
    )
    return result.stdout


def valid_on_host(host: NixHost, path: str) -> bool:
    return host.run(["nix-store", "--check-validity", path], check=False).returncode == 0


def path_info(host: NixHost, path: str) -> dict:
    return path_info_record(host.run(["nix", "path-info", *path_info_args(), path]).stdout, path)


@pytest.fixture
def live(
    nix_host_recnix: NixHost, recnix_service: RecnixService, busybox: str, tmp_path: Path
) -> Iterator[LiveBuild]:
    """A waiting opted-in build with an open session; released and checked afterwards."""
    build = start_live_build(
        nix_host_recnix.env,
        nix_host_recnix.build_dir,
        recnix_service.control_socket,
        busybox,
        fresh(),
        tmp_path,
    )
    try:
        yield build
    finally:
        rc, stdout, stderr = build.finish()
    assert rc == 0, f"the waiting build failed after release ({rc}):\n{stderr}"
    assert stdout.strip() == build.out_path
    assert Path(build.out_path).read_text().startswith("released after")
    deadline = time.monotonic() + SESSION_GONE_TIMEOUT
    while time.monotonic() < deadline:
        open_sessions = [
            s for s in service_sessions(recnix_service.control_socket) if s["drv"] == build.drv_path
        ]
        if not open_sessions and not recnix_service.session_dirs():
            break
        time.sleep(0.2)
    assert not open_sessions, f"session still listed after the build ended: {open_sessions}"
    assert not recnix_service.session_dirs(), (
        f"session directories left behind: {recnix_service.session_dirs()}"
    )


@pytest.fixture
def secret(nix_host_recnix: NixHost, tmp_path: Path) -> str:
    """A valid host store path that is not an input of any build."""
    return host_add(nix_host_recnix, tmp_path, "secret.txt", f"recnix probe secret {fresh()}\n")


def client_for(sock: socket.socket) -> ProbeClient:
    client = ProbeClient(sock)
    client.do_handshake()
    return client


def audit_for(service: RecnixService, live: LiveBuild, event: str) -> list[dict]:
    sid = live.session["session"]
    return [e for e in service.audit_events() if e.get("event") == event and sid in str(e)]


# --------------------------------------------------------------------------- peers


def test_consecutive_clients_of_a_session_reuse_its_daemon_connection(
    live: LiveBuild, recnix_service: RecnixService, busybox: str
) -> None:
    """A nested nix-build opens several connections one after the other: each after the
    first is served on the daemon connection the session gave back to the service's
    pool (recnix.store.upstreampool), not on a new nix-daemon worker."""

    lines_of_a_client = f"session {live.session['session']}: connection from pid"

    def closed() -> int:
        return recnix_service.log_text().count(lines_of_a_client)

    def handshakes() -> int:
        return recnix_service.log_text().count("recnix.store.upstream DEBUG nix-daemon")

    def one_client() -> None:
        done = closed() + 2  # its "connection from pid" and "... closed after" lines
        with sandbox_socket(live) as sock:  # QueryPathHash: answered by the daemon
            reply = client_for(sock).call(Op.QUERY_PATH_HASH, {"path": busybox})
            assert reply.error is None and len(reply.value) == 64, reply
        deadline = time.monotonic() + 10
        while closed() < done:  # its daemon connection is back in the pool
            assert time.monotonic() < deadline, recnix_service.log_text()[-2000:]
            time.sleep(0.05)

    one_client()
    # the first client connected the session's keeper, taking a spare: wait for the
    # pool's refill (recnix.store.upstreampool.SPARE_REFILL_DELAY) to be done
    before, deadline = -1, time.monotonic() + 10
    while before != handshakes():
        assert time.monotonic() < deadline, recnix_service.log_text()[-2000:]
        before = handshakes()
        time.sleep(0.3)
    for _ in range(4):
        one_client()
    assert handshakes() == before, recnix_service.log_text()[-3000:]


def test_the_keeper_and_input_closure_wait_for_the_builds_first_client(
    live: LiveBuild, recnix_service: RecnixService, busybox: str
) -> None:
    """An open session has no daemon worker of its own until the build's first client
    comes (a build that never calls Nix costs the daemon none); later clients use the
    same one, and no client is answered before the session knows its inputs:
    IsValidPath of an input (answered from the session's allowed set) is true."""
    ready = f"session {live.session['session']}: keeper connected"
    assert ready not in recnix_service.log_text()
    with sandbox_socket(live) as first, sandbox_socket(live) as second:
        clients = [client_for(first), client_for(second)]
        for client in clients:
            assert client.call(Op.IS_VALID_PATH, {"path": busybox}).value is True
    with sandbox_socket(live) as third:
        assert client_for(third).call(Op.IS_VALID_PATH, {"path": busybox}).value is True
    assert recnix_service.log_text().count(ready) == 1, recnix_service.log_text()[-3000:]


def test_outsider_is_refused_but_sandbox_process_accepted(
    live: LiveBuild, recnix_service: RecnixService, busybox: str
) -> None:
    # The test process (host root, host mount namespace) connects to the host path.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as outsider:
        outsider.connect(str(live.socket_path))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            outsider.sendall(u64(0x6E697863) + u64((1 << 8) | 35))
        assert recv_until_closed(outsider, timeout=10) == b"", "an outsider got a handshake"
    refused = [e for e in audit_for(recnix_service, live, "refused") if e.get("op") == "connect"]
    assert refused, f"no 'refused' connect audit event: {recnix_service.audit_events()[-5:]}"
    assert str(os.getpid()) in refused[-1]["reason"]

    # The same socket, from inside the sandbox: handshake and a real answer.
    with sandbox_socket(live) as sock:
        client = client_for(sock)
        assert client.call(Op.IS_VALID_PATH, {"path": busybox}).value is True


# --------------------------------------------------------------------------- restricted view


def test_nar_from_path_only_of_allowed_paths(
    live: LiveBuild,
    nix_host_recnix: NixHost,
    recnix_service: RecnixService,
    busybox: str,
    secret: str,
) -> None:
    with sandbox_socket(live) as sock:
        client = client_for(sock)
        denied = client.call(Op.NAR_FROM_PATH, {"path": secret})
        assert secret in denied.error_message
        assert denied.nar == b""
        # the connection is still in sync: an input's NAR is exactly nix-store --dump's
        allowed = client.call(Op.NAR_FROM_PATH, {"path": busybox})
        assert allowed.error is None
        assert allowed.nar == host_dump(nix_host_recnix, busybox)
    refused = [e for e in audit_for(recnix_service, live, "refused") if e["op"] == "NAR_FROM_PATH"]
    assert refused and secret in refused[-1]["reason"]


def test_queries_hide_what_is_not_allowed(live: LiveBuild, busybox: str, secret: str) -> None:
    with sandbox_socket(live) as sock:
        client = client_for(sock)
        assert client.call(Op.IS_VALID_PATH, {"path": secret}).value is False
        assert client.call(Op.QUERY_PATH_INFO, {"path": secret}).value is None
        valid = client.call(Op.QUERY_VALID_PATHS, {"paths": [secret, busybox]}).value
        assert valid == [busybox]
        hash_part = os.path.basename(secret)[:32]
        assert (
            "not allowed"
            in client.call(Op.QUERY_PATH_FROM_HASH_PART, {"hash_part": hash_part}).error_message
        )
        # controls: an input is valid, and its info is censored
        assert client.call(Op.IS_VALID_PATH, {"path": busybox}).value is True
        info = client.call(Op.QUERY_PATH_INFO, {"path": busybox}).value
        assert isinstance(info, PathInfo)
        assert info.nar_size > 0
        assert info.deriver is None and info.sigs == [] and info.registration_time == 0
    assert os.path.lexists(live.sandbox_path(busybox))
    assert not os.path.lexists(live.sandbox_path(secret)), "the secret is visible in the sandbox"


def test_denied_ops_answer_errors_and_keep_the_connection(
    live: LiveBuild, recnix_service: RecnixService, busybox: str, secret: str
) -> None:
    basic = BasicDerivation(
        outputs={"out": DerivationOutput("/nix/store/" + "0" * 32 + "-probe-out")},
        input_srcs=[busybox],
        platform="x86_64-linux",
        builder=busybox + "/bin/sh",
        args=["-c", "echo pwned > $out"],
        env={"out": "/nix/store/" + "0" * 32 + "-probe-out"},
    )
    cases: list[tuple[Op, dict, str]] = [
        (Op.ENSURE_PATH, {"path": secret}, secret),
        (Op.ADD_SIGNATURES, {"path": busybox, "sigs": ["cache.example.org-1:AAAA"]}, "not allowed"),
        (
            Op.BUILD_DERIVATION,
            {"drv_path": live.drv_path, "drv": basic, "build_mode": 0},
            "not allowed",
        ),
        (Op.BUILD_PATHS, {"paths": [DerivedPath(busybox)], "build_mode": 1}, "repair"),
        (Op.BUILD_PATHS, {"paths": [DerivedPath(busybox)], "build_mode": 2}, "check"),
        (Op.BUILD_PATHS, {"paths": [DerivedPath(live.drv_path, ["out"])]}, live.drv_path),
        (Op.BUILD_PATHS_WITH_RESULTS, {"paths": [DerivedPath(secret)]}, secret),
        (Op.ADD_TEXT_TO_STORE, {"name": "t", "text": b"x", "references": [secret]}, secret),
    ]
    with sandbox_socket(live) as sock:
        client = client_for(sock)
        for op, args, expected in cases:
            result = client.call(op, args)
            assert result.error is not None, f"{op.name} {args} was answered: {result.reply}"
            assert expected in result.error_message, f"{op.name}: {result.error_message}"
        # AddToStore with a reference to a path that is not allowed: refused, stream drained
        bad_ref = client.call(
            Op.ADD_TO_STORE,
            {"name": "refers", "ca_method": "text:sha256", "references": [secret]},
            data=[b"refers to the secret\n"],
        )
        assert secret in bad_ref.error_message
        assert client.call(Op.IS_VALID_PATH, {"path": busybox}).value is True
    refused_ops = {e["op"] for e in audit_for(recnix_service, live, "refused")}
    assert {"ENSURE_PATH", "ADD_SIGNATURES", "BUILD_DERIVATION", "BUILD_PATHS"} <= refused_ops
    assert not os.path.lexists("/nix/store/" + "0" * 32 + "-probe-out")


def test_malformed_store_paths_are_refused_in_sync(live: LiveBuild, busybox: str) -> None:
    valid_hash = os.path.basename(busybox)[:32]
    bad_paths = [
        "/etc/passwd",
        f"/nix/store/{valid_hash}-x/../../../etc/shadow",
        f"/nix/store/{valid_hash}",
        busybox + "/bin/sh",
        "",
    ]
    with sandbox_socket(live) as sock:
        client = client_for(sock)
        for bad in bad_paths:
            for op in (Op.IS_VALID_PATH, Op.NAR_FROM_PATH, Op.QUERY_PATH_INFO):
                result = client.call(op, {"path": bad})
                assert result.error is not None, f"{op.name} {bad!r} answered {result.reply}"
                assert result.nar == b""
        assert client.call(Op.IS_VALID_PATH, {"path": busybox}).value is True


def test_old_client_add_is_refused_and_its_nar_drained(
    live: LiveBuild, nix_host_recnix: NixHost, busybox: str, secret: str
) -> None:
    nar = host_dump(nix_host_recnix, secret)
    with sandbox_socket(live) as sock:
        client = ProbeClient(sock, client_minor=24)
        assert client.do_handshake().minor == 24
        args = {"name": "old.txt", "fixed": True, "recursive": 1, "hash_algo": "sha256"}
        result = client.call(Op.ADD_TO_STORE, args, data=[nar[:100], nar[100:]])
        assert "1.25" in result.error_message
        # the plain NAR was read to its end: the next request is understood
        assert client.call(Op.IS_VALID_PATH, {"path": busybox}).value is True
        assert client.call(Op.IS_VALID_PATH, {"path": secret}).value is False


def test_add_to_store_nar_repair_is_forced_off(
    live: LiveBuild, nix_host_recnix: NixHost, tmp_path: Path
) -> None:
    path = host_add(nix_host_recnix, tmp_path, "repairable.txt", f"repair me {fresh()}\n")
    info = path_info(nix_host_recnix, path)
    nar = host_dump(nix_host_recnix, path)
    args = {
        "path": path,
        "deriver": None,
        "nar_hash": info["narHash"],
        "references": [],
        "registration_time": 0,
        "nar_size": info["narSize"],
        "ultimate": True,
        "sigs": [],
        "ca": info["ca"],
        "repair": True,
        "dont_check_sigs": True,
    }
    inode = os.lstat(path).st_ino
    with sandbox_socket(live) as sock:
        client = client_for(sock)
        result = client.call(Op.ADD_TO_STORE_NAR, args, data=[nar])
        assert result.error is None, result.error_message
        assert client.call(Op.IS_VALID_PATH, {"path": path}).value is True
    assert os.lstat(path).st_ino == inode, "the session let a sandboxed client repair a path"
    assert os.path.lexists(live.sandbox_path(path))
    # control: the same request sent straight to the (trusting) daemon does rewrite the path
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as direct:
        direct.connect(str(nix_host_recnix.socket))
        client = client_for(direct)
        assert client.call(Op.ADD_TO_STORE_NAR, args, data=[nar]).error is None
    assert os.lstat(path).st_ino != inode, "repair=1 had no visible effect: the check is vacuous"


def test_add_indirect_root_is_inert(
    live: LiveBuild, nix_host_recnix: NixHost, tmp_path: Path
) -> None:
    link = tmp_path / "indirect-root"
    link.symlink_to(live.out_path)

    def roots_to_link() -> list[str]:
        found = []
        for entry in GCROOTS_AUTO.iterdir() if GCROOTS_AUTO.is_dir() else []:
            if os.path.islink(entry) and os.readlink(entry) == str(link):
                found.append(str(entry))
        return found

    with sandbox_socket(live) as sock:
        client = client_for(sock)
        assert client.call(Op.ADD_INDIRECT_ROOT, {"path": str(link)}).value == 1
        assert client.call(Op.ADD_TEMP_ROOT, {"path": live.out_path}).value == 1
    assert roots_to_link() == [], "a sandboxed client created a GC root on the host"
    # control: the daemon itself would have made one
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as direct:
        direct.connect(str(nix_host_recnix.socket))
        client = client_for(direct)
        assert client.call(Op.ADD_INDIRECT_ROOT, {"path": str(link)}).value == 1
    made = roots_to_link()
    try:
        assert made, "the daemon made no indirect root either: the check is vacuous"
    finally:
        for entry in made:
            os.unlink(entry)


def test_collect_garbage_is_inert(
    live: LiveBuild, nix_host_recnix: NixHost, recnix_service: RecnixService, tmp_path: Path
) -> None:
    dead = host_add(nix_host_recnix, tmp_path, "dead.txt", f"dead but kept {fresh()}\n")
    with sandbox_socket(live) as sock:
        client = client_for(sock)
        gc_args = {"action": 3, "paths": [dead], "ignore_liveness": 1, "max_freed": 0}
        assert client.call(Op.COLLECT_GARBAGE, gc_args).value == GCResult()
        assert client.call(Op.COLLECT_GARBAGE, {"action": 2}).value == GCResult()
        assert client.call(Op.FIND_ROOTS, {}).value == {}
    assert os.path.exists(dead)
    assert valid_on_host(nix_host_recnix, dead)
    assert any(e["op"] == "COLLECT_GARBAGE" for e in audit_for(recnix_service, live, "refused"))


def test_added_text_becomes_valid_and_visible(
    live: LiveBuild, nix_host_recnix: NixHost, recnix_service: RecnixService
) -> None:
    content = f"added through the session {fresh()}\n".encode()
    with sandbox_socket(live) as sock:
        client = client_for(sock)
        added = client.call(
            Op.ADD_TO_STORE,
            {"name": "probe-added.txt", "ca_method": "text:sha256", "references": []},
            data=[content[:10], content[10:]],
        ).value
        assert isinstance(added, ValidPathInfo)
        path = added.path
        assert path.endswith("-probe-added.txt")
        assert added.info.ca.startswith("text:sha256:")
        assert client.call(Op.IS_VALID_PATH, {"path": path}).value is True
        assert client.call(Op.NAR_FROM_PATH, {"path": path}).nar == host_dump(nix_host_recnix, path)
        text_path = client.call(
            Op.ADD_TEXT_TO_STORE,
            {"name": "probe-text.txt", "text": content, "references": [path]},
        ).value
        assert path in client.call(Op.QUERY_REFERENCES, {"path": text_path}).value
        assert {path, text_path} <= set(client.call(Op.QUERY_ALL_VALID_PATHS, {}).value)
    with open(path, "rb") as f:
        assert f.read() == content
    with open(live.sandbox_path(path), "rb") as f:
        assert f.read() == content, "the added path is not visible inside the sandbox"
    assert os.path.lexists(live.sandbox_path(text_path))
    # the session roots what it added: the host cannot collect it while the build runs
    deleted = nix_host_recnix.run(["nix-store", "--delete", path], check=False)
    assert deleted.returncode != 0 and os.path.exists(path), deleted.stderr
    added_events = {e.get("path") for e in audit_for(recnix_service, live, "added")}
    assert {path, text_path} <= added_events


def test_add_multiple_with_an_already_valid_entry(
    live: LiveBuild, nix_host_recnix: NixHost, tmp_path: Path
) -> None:
    # One path that is valid on the host and one that was valid and is gone: the
    # batch is forwarded per path (Nix 2.8 desynchronises on valid entries, §3.5 item 6).
    kept = host_add(nix_host_recnix, tmp_path, "multi-kept.txt", f"kept {fresh()}\n")
    gone = host_add(nix_host_recnix, tmp_path, "multi-gone.txt", f"gone {fresh()}\n")
    entries = []
    for path in (kept, gone):
        info = path_info(nix_host_recnix, path)
        pinfo = PathInfo(
            deriver=None,
            nar_hash=info["narHash"],
            references=[],
            registration_time=0,
            nar_size=info["narSize"],
            ultimate=False,
            sigs=[],
            ca=info["ca"],
        )
        entries.append((ValidPathInfo(path, pinfo), host_dump(nix_host_recnix, path)))
    nix_host_recnix.run(["nix-store", "--delete", gone])
    assert not os.path.lexists(gone)
    stream = encode_multiple_header(len(entries)) + b"".join(
        encode_multiple_entry(vpi) + nar for vpi, nar in entries
    )
    with sandbox_socket(live) as sock:
        client = client_for(sock)
        args = {"repair": True, "dont_check_sigs": True}
        result = client.call(Op.ADD_MULTIPLE_TO_STORE, args, data=[stream[:77], stream[77:]])
        assert result.error is None, result.error_message
        valid = client.call(Op.QUERY_VALID_PATHS, {"paths": [kept, gone]}).value
        assert sorted(valid) == sorted([kept, gone])
    for vpi, nar in entries:
        assert host_dump(nix_host_recnix, vpi.path) == nar
        assert os.path.lexists(live.sandbox_path(vpi.path)), f"{vpi.path} not in the sandbox"


def test_own_derivation_cannot_be_built_even_when_added(
    live: LiveBuild, recnix_service: RecnixService, busybox: str
) -> None:
    # A build can add its own .drv (same text, same references => same path) and so
    # make it allowed; building it would wait forever on its own output lock.
    drv_text = Path(live.drv_path).read_bytes()
    name = os.path.basename(live.drv_path)[33:]
    with sandbox_socket(live) as sock:
        client = client_for(sock)
        added = client.call(
            Op.ADD_TEXT_TO_STORE, {"name": name, "text": drv_text, "references": [busybox]}
        ).value
        assert added == live.drv_path
        assert client.call(Op.IS_VALID_PATH, {"path": live.drv_path}).value is True
        for op in (Op.BUILD_PATHS, Op.BUILD_PATHS_WITH_RESULTS):
            result = client.call(op, {"paths": [DerivedPath(live.drv_path, ["out"])]})
            assert "from inside its own build" in result.error_message
            assert live.drv_path in result.error_message
    assert not os.path.exists(live.out_path), "the outer output appeared before release"


# --------------------------------------------------------------------------- bad input


def _closed_after(sock: socket.socket, payload: bytes, shut: bool = False) -> bytes:
    """Send ``payload`` (then half-close if ``shut``); return what arrives before close."""
    sock.sendall(payload)
    if shut:
        sock.shutdown(socket.SHUT_WR)
    return recv_until_closed(sock, timeout=15)


def test_malformed_input_closes_only_that_connection(
    live: LiveBuild,
    nix_host_recnix: NixHost,
    recnix_service: RecnixService,
    recnix_runner: ScenarioRunner,
    busybox: str,
) -> None:
    outcome: list[BuildOutcome] = []
    good = threading.Thread(
        target=lambda: outcome.append(recnix_runner.build("inner", "recnix", tag=fresh()))
    )
    good.start()
    deadline = time.monotonic() + 60
    while good.is_alive() and time.monotonic() < deadline:  # abuse while it has a session
        sessions = service_sessions(recnix_service.control_socket)
        if any("scenario-inner" in s["drv"] and s["state"] == "open" for s in sessions):
            break
        time.sleep(0.1)
    log_before = len(recnix_service.log_text())
    handshake = u64(0x6E697863) + u64((1 << 8) | 35) + u64(0) + u64(0)
    try:
        # 1. garbage instead of the magic
        with sandbox_socket(live) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
            recv_until_closed(sock, timeout=15)

        # 2. a valid handshake, then an unknown op: an error naming it, then close
        with sandbox_socket(live) as sock:
            client = client_for(sock)
            rest = _closed_after(sock, u64(999))
            messages = decode_stderr_messages(rest, client.minor)
            assert len(messages) == 1 and isinstance(messages[0], Error), messages
            assert "invalid operation 999" in messages[0].message

        # 3. AddToStore whose framed stream is cut mid-chunk, then a disconnect: what
        # arrived must not become a (truncated) store path. Nix 2.8's daemon stores a
        # cut text/flat stream about one time in four, hence the repetitions.
        truncated = f"truncated-{fresh()}"
        nar_prefix = host_dump(nix_host_recnix, busybox)[:5000]
        for method, payload, attempts in (
            ("text:sha256", b"complete frame, ", TRUNCATION_ATTEMPTS),
            ("fixed:sha256", b"complete frame, ", TRUNCATION_ATTEMPTS),
            ("fixed:r:sha256", nar_prefix, 2),
        ):
            for attempt in range(attempts):
                with sandbox_socket(live) as sock:
                    client = client_for(sock)
                    name = f"{truncated}-{method.replace(':', '-')}-{attempt}"
                    client.conn.send_request(
                        Op.ADD_TO_STORE, {"name": name, "ca_method": method, "references": []}
                    )
                    client.conn.send_data(payload)
                    sock.sendall(client.conn.data_to_send() + u64(1000) + b"only ten b")
                    time.sleep(0.1)  # let the session pass on what it has
                    _closed_after(sock, b"", shut=True)
        # 4. a string length of 2**40: refused at once, not awaited
        with sandbox_socket(live) as sock:
            client = client_for(sock)
            started = time.monotonic()
            rest = _closed_after(sock, u64(Op.IS_VALID_PATH) + u64(1 << 40))
            assert time.monotonic() - started < 10
            messages = decode_stderr_messages(rest, client.minor)
            assert len(messages) == 1 and isinstance(messages[0], Error), messages
            assert "protocol error" in messages[0].message

        # 5. a disconnect in the middle of a request (inside a string)
        with sandbox_socket(live) as sock:
            client = client_for(sock)
            _closed_after(sock, u64(Op.IS_VALID_PATH) + u64(44) + b"/nix/st", shut=True)

        # 6. the magic cut in half, then EOF
        with sandbox_socket(live) as sock:
            _closed_after(sock, handshake[:5], shut=True)

        # the session still serves a well-behaved client
        with sandbox_socket(live) as sock:
            client = client_for(sock)
            assert client.call(Op.IS_VALID_PATH, {"path": busybox}).value is True
    finally:
        good.join(timeout=300)
    assert outcome and outcome[0].ok, outcome[0].describe() if outcome else "build thread hung"

    log = recnix_service.log_text()[log_before:]
    reasons = [line for line in log.splitlines() if "protocol error" in line]
    expected = [
        "bad client magic",
        "invalid operation 999",
        "unexpected end of stream",
        "string",
    ]
    for fragment in expected:
        assert any(fragment in line for line in reasons), (
            f"no protocol-error log line mentions {fragment!r}:\n" + "\n".join(reasons)
        )
    assert len(reasons) >= 5, "\n".join(reasons)
    audit = audit_for(recnix_service, live, "protocol-error")
    assert len(audit) >= 5, audit
    # (Nix 2.8 may leave an unregistered, half-restored directory for the cut NAR)
    leftovers = [str(p) for p in Path("/nix/store").glob(f"*-{truncated}-*") if p.suffix != ".lock"]
    stored = [p for p in leftovers if valid_on_host(nix_host_recnix, p)]
    assert not stored, f"truncated adds became valid store paths: {stored}"
    status = subprocess.run(
        [str(RECNIX_BIN), "status", "--json", "--config", str(recnix_service.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert status.returncode == 0, status.stderr
    sessions = json.loads(status.stdout)
    mine = [s for s in sessions if s["drv"] == live.drv_path and s["state"] == "open"]
    assert mine, sessions
    done = recnix_service.status()
    assert done.returncode == 0, done.stderr
    table = done.stdout
    row = next(line.split() for line in table.splitlines() if line.startswith(mine[0]["session"]))
    assert row[1] == live.drv_path.split("-", 1)[1].removesuffix(".drv"), table
    assert row[4] == "open" and row[5] != "?", table  # state, age
    assert f"{mine[0]['session']}: {live.drv_path}" in table


def test_connection_flood_does_not_starve_the_service(
    live: LiveBuild,
    recnix_service: RecnixService,
    recnix_runner: ScenarioRunner,
    busybox: str,
) -> None:
    # A build opening (and holding) more connections than the service has file
    # descriptors must not take the service down for every other build: the
    # session serves policy.max-connections-per-session (default) at once and
    # closes the rest.
    service_pid = recnix_service.process.pid
    soft, hard = prlimit_nofile(service_pid)
    limit = 512
    set_prlimit_nofile(service_pid, limit, hard)
    try:
        with sandbox_flood(live, limit + 100) as flood:
            held = flood.connected - flood.closed_by_server
            assert flood.connected >= limit, flood
            assert held <= MAX_CONNECTIONS, flood
            assert len(os.listdir(f"/proc/{service_pid}/fd")) < limit - 100
            assert service_sessions(recnix_service.control_socket)
            outcome = recnix_runner.build("inner", "recnix", tag=fresh(), timeout=120)
            assert outcome.ok, outcome.describe()
    finally:
        set_prlimit_nofile(service_pid, soft, hard)
    refused = [
        e
        for e in audit_for(recnix_service, live, "refused")
        if e["op"] == "connect" and "concurrent connections" in e["reason"]
    ]
    assert refused, "the refused connections were not audited"
    assert len(refused) < 20, "every refused connection was audited (log flooding)"
    # once the flood is gone the session serves again
    with sandbox_socket(live) as sock:
        client = client_for(sock)
        assert client.call(Op.IS_VALID_PATH, {"path": busybox}).value is True


def prlimit_nofile(pid: int) -> tuple[int, int]:
    out = subprocess.run(
        ["prlimit", "--pid", str(pid), "--nofile", "--raw", "--noheadings", "-o", "SOFT,HARD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return int(out[0]), int(out[1])


def set_prlimit_nofile(pid: int, soft: int, hard: int) -> None:
    subprocess.run(["prlimit", "--pid", str(pid), f"--nofile={soft}:{hard}"], check=True)
