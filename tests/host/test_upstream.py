"""`recnix.store.upstream.Upstream` runs every op it forwards against Debian's nix-daemon 2.8.

Each test opens its own connection(s) to the private daemon of ``nix_host`` (own
NIX_CONF_DIR, own socket) and cross-checks what the daemon answered with the nix CLI.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from recnix.formats.storepath import make_fixed_output_path, nix32_decode, nix32_encode
from recnix.protocol import (
    BuildStatus,
    DerivedPath,
    Op,
    PathInfo,
    Realisation,
    Result,
    StartActivity,
    StderrMessage,
    ValidPathInfo,
)
from recnix.protocol.nar import dump_path, nar_hash
from recnix.store.upstream import Upstream, UpstreamClosed, UpstreamError, default_options
from tests import nixversion
from tests.host.conftest import NixHost
from tests.nixversion import path_info_args, path_info_record

pytestmark = pytest.mark.host

NONCE = f"{os.getpid()}-{time.time_ns()}"
RES_BUILD_LOG_LINE = 101
ACT_BUILD = 105
T = TypeVar("T")
OP_TIMEOUT = 120  # a desynchronised connection fails the test instead of hanging it
ANSI = re.compile(r"\x1b\[[0-9;]*m")

DRV_EXPR = """
{ bb, name, script }: derivation {
  inherit name;
  system = builtins.currentSystem;
  builder = "${builtins.storePath bb}/bin/sh";
  args = [ "-c" script ];
}
"""


# --------------------------------------------------------------------------- helpers


def with_upstream(host: NixHost, body: Callable[[Upstream], Awaitable[T]]) -> T:
    """Connect to ``host``'s daemon, run ``body(upstream)``, close; all in a fresh event loop."""

    async def main() -> T:
        up = await Upstream.connect(f"unix://{host.socket}")
        try:
            return await asyncio.wait_for(body(up), OP_TIMEOUT)
        finally:
            await up.close()

    return asyncio.run(main())


def plain(message: str) -> str:
    """A daemon message without its ANSI colours (the nix CLI strips them too)."""
    return ANSI.sub("", message)


def cli(host: NixHost, *args: str) -> str:
    """stdout of a nix CLI command against ``host`` (stripped)."""
    return host.run(list(args)).stdout.strip()


def cli_path_info(host: NixHost, path: str) -> dict[str, Any]:
    record = path_info_record(cli(host, "nix", "path-info", *path_info_args(), path), path)
    return {"path": path, **record}  # 2.19 on: keyed by path, no "path" field


def nix32_hash(info: PathInfo) -> str:
    """The wire's base16 NAR hash as nix-store -q --hash prints it."""
    return "sha256:" + nix32_encode(bytes.fromhex(info.nar_hash))


def assert_info_matches_cli(host: NixHost, path: str, info: PathInfo) -> None:
    """``info`` (from QueryPathInfo) says what `nix path-info --json` and `nix-store -q` say."""
    js = cli_path_info(host, path)
    assert js["path"] == path
    sri = js["narHash"].removeprefix("sha256-")
    assert bytes.fromhex(info.nar_hash) == base64.b64decode(sri)
    assert nix32_hash(info) == cli(host, "nix-store", "-q", "--hash", path)
    assert info.nar_size == js["narSize"] == int(cli(host, "nix-store", "-q", "--size", path))
    assert sorted(info.references) == sorted(js["references"])
    assert sorted(info.references) == sorted(
        cli(host, "nix-store", "-q", "--references", path).split()
    )
    assert info.registration_time == js["registrationTime"]
    assert info.ca == js.get("ca")
    assert info.deriver == js.get("deriver")
    assert sorted(info.sigs) == sorted(js.get("signatures", []))
    assert info.ultimate == js.get("ultimate", False)


def instantiate(host: NixHost, busybox: str, name: str, script: str) -> str:
    """A .drv (written by `nix-instantiate`) whose busybox sh runs ``script``."""
    return cli(
        host,
        "nix-instantiate",
        "-E",
        DRV_EXPR,
        "--argstr",
        "bb",
        busybox,
        "--argstr",
        "name",
        name,
        "--argstr",
        "script",
        script,
    )


async def achunks(data: Iterable[bytes]) -> AsyncIterator[bytes]:
    """Feed ``data`` as an async generator (what sessions hand to Upstream)."""
    for chunk in data:
        await asyncio.sleep(0)
        yield chunk


def nix_dump(host: NixHost, path: str) -> bytes:
    return subprocess.run(
        ["nix-store", "--dump", path], env=host.env, capture_output=True, check=True
    ).stdout


def fake_store_path(name: str) -> str:
    """A well-formed store path nobody has added."""
    digest = hashlib.sha256(f"recnix-absent-{NONCE}-{name}".encode()).digest()[:20]
    return f"/nix/store/{nix32_encode(digest)}-{name}"


def make_tree(root: Path, tag: str) -> Path:
    tree = root / f"recnix-up-tree-{tag}-{NONCE}"
    (tree / "sub").mkdir(parents=True)
    (tree / "hello").write_text(f"hello {tag} {NONCE}\n")
    (tree / "run").write_bytes(b"#!/bin/sh\necho run\n")
    (tree / "run").chmod(0o755)
    (tree / "sub" / "blob").write_bytes(os.urandom(300_001))
    (tree / "link").symlink_to("sub/blob")
    return tree


def delete_path(host: NixHost, path: str) -> subprocess.CompletedProcess[str]:
    return host.run(["nix-store", "--delete", path], check=False)


# --------------------------------------------------------------------------- handshake/options


def test_handshake_and_set_options(nix_host: NixHost, busybox: str) -> None:
    """connect() negotiates min(35, the daemon's minor) and reads the daemon's version; an
    explicit SetOptions reaches the builder."""
    drv = instantiate(
        nix_host,
        busybox,
        f"recnix-up-cores-{NONCE}",
        'echo "cores=$NIX_BUILD_CORES" > $out',
    )

    async def body(up: Upstream) -> tuple[Any, str]:
        assert up.minor == nixversion.negotiated_minor(35)
        assert up.handshake is not None and up.handshake.server_minor == nixversion.daemon_minor()
        assert up.nix_version == nixversion.version_string()
        opts = default_options()
        opts.build_cores = 3
        reply = await up.call(Op.SET_OPTIONS, {"options": opts})
        await up.build_paths([DerivedPath(drv, ["out"])])
        return reply, (await up.query_derivation_output_map(drv))["out"]

    reply, out = with_upstream(nix_host, body)
    assert reply is None
    assert Path(out).read_text() == "cores=3\n"  # the daemon's nix.conf says cores = 1


# --------------------------------------------------------------------------- queries


def test_is_valid_path(nix_host: NixHost, busybox: str) -> None:
    absent = fake_store_path("absent")

    async def body(up: Upstream) -> tuple[bool, bool]:
        return await up.is_valid_path(busybox), await up.is_valid_path(absent)

    assert with_upstream(nix_host, body) == (True, False)
    assert nix_host.run(["nix-store", "--check-validity", absent], check=False).returncode != 0


def test_query_path_info(nix_host: NixHost, busybox: str) -> None:
    async def body(up: Upstream) -> tuple[PathInfo | None, PathInfo | None]:
        return (
            await up.query_path_info(busybox),
            await up.query_path_info(fake_store_path("absent")),
        )

    info, absent = with_upstream(nix_host, body)
    assert absent is None
    assert info is not None
    assert_info_matches_cli(nix_host, busybox, info)
    assert info.ca is not None and info.ca.startswith("fixed:r:sha256:")


def test_query_valid_paths(nix_host: NixHost, busybox: str) -> None:
    absent = [fake_store_path("absent-a"), fake_store_path("absent-b")]

    async def body(up: Upstream) -> list[str]:
        return await up.query_valid_paths([busybox, *absent])

    assert with_upstream(nix_host, body) == [busybox]


# --------------------------------------------------------------------------- AddToStore


def test_add_to_store_text_with_references(nix_host: NixHost, busybox: str) -> None:
    """text:sha256 with a reference lands where builtins.toFile puts the same text."""
    name = f"recnix-up-text-{NONCE}"
    text = f"refers to {busybox}\nand nothing else\n"
    expected = json.loads(
        cli(
            nix_host,
            "nix-instantiate",
            "--eval",
            "-E",
            '{ bb, name }: builtins.toFile name "refers to ${builtins.storePath bb}\n'
            'and nothing else\n"',
            "--argstr",
            "bb",
            busybox,
            "--argstr",
            "name",
            name,
        )
    )

    async def body(up: Upstream) -> tuple[ValidPathInfo, PathInfo | None]:
        added = await up.add_to_store(
            name, "text:sha256", [busybox], achunks([text[:7].encode(), text[7:].encode()])
        )
        return added, await up.query_path_info(added.path)

    added, info = with_upstream(nix_host, body)
    assert added.path == expected
    assert Path(added.path).read_text() == text
    assert added.info.references == [busybox]
    assert added.info.ca == "text:sha256:" + nix32_encode(hashlib.sha256(text.encode()).digest())
    assert info is not None
    assert_info_matches_cli(nix_host, added.path, info)


def test_add_to_store_nar_recursive(nix_host: NixHost, tmp_path: Path) -> None:
    """fixed:r:sha256 with a streamed NAR lands where `nix-store --add` puts the tree."""
    tree = make_tree(tmp_path, "rec")

    async def body(up: Upstream) -> ValidPathInfo:
        return await up.add_to_store(tree.name, "fixed:r:sha256", [], achunks(dump_path(tree)))

    added = with_upstream(nix_host, body)
    assert added.path == cli(nix_host, "nix-store", "--add", str(tree))
    assert nix_dump(nix_host, added.path) == b"".join(dump_path(tree))
    want_hash, want_size = nar_hash(tree)
    assert nix32_hash(added.info) == want_hash
    assert added.info.nar_size == want_size
    assert added.info.ca == "fixed:r:" + want_hash
    assert added.info.references == []


def test_add_to_store_flat(nix_host: NixHost, tmp_path: Path) -> None:
    """fixed:sha256 (flat) streams the file's bytes; same path as `nix-store --add-fixed`."""
    name = f"recnix-up-flat-{NONCE}"
    content = os.urandom(200_000) + NONCE.encode()
    (tmp_path / name).write_bytes(content)

    async def body(up: Upstream) -> ValidPathInfo:
        return await up.add_to_store(
            name, "fixed:sha256", [], achunks([content[:65536], content[65536:]])
        )

    added = with_upstream(nix_host, body)
    assert added.path == cli(nix_host, "nix-store", "--add-fixed", "sha256", str(tmp_path / name))
    assert Path(added.path).read_bytes() == content
    assert added.info.ca == "fixed:sha256:" + nix32_encode(hashlib.sha256(content).digest())


LARGE_ADD_CHILD = r"""
import asyncio, hashlib, json, sys
from recnix.store.upstream import Upstream

def peak_kib():
    # VmHWM of this process's own memory (ru_maxrss would start at the peak of the
    # pytest process it was forked from: Linux carries that over fork and exec)
    with open("/proc/self/status") as status:
        return next(int(l.split()[1]) for l in status if l.startswith("VmHWM:"))

socket, name, mib = sys.argv[1], sys.argv[2], int(sys.argv[3])
digest = hashlib.sha256()

async def chunks():
    for i in range(mib):
        chunk = hashlib.sha256(b"%d" % i).digest() * (1 << 15)  # 1 MiB
        digest.update(chunk)
        yield chunk

async def main():
    up = await Upstream.connect("unix://" + socket)
    before = peak_kib()
    added = await up.add_to_store(name, "fixed:sha256", [], chunks())
    after = peak_kib()
    await up.close()
    print(json.dumps({"path": added.path, "ca": added.info.ca, "before_kib": before,
                      "after_kib": after, "sha256": digest.hexdigest()}))

asyncio.run(main())
"""


def test_large_streamed_add_is_bounded(nix_host: NixHost) -> None:
    """64 MiB through AddToStore in a fresh process: its peak RSS grows by < 16 MiB."""
    mib = 64
    name = f"recnix-up-large-{NONCE}"
    child = subprocess.run(
        [sys.executable, "-c", LARGE_ADD_CHILD, str(nix_host.socket), name, str(mib)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    got = json.loads(child.stdout)
    try:
        assert got["path"] == make_fixed_output_path("flat", "sha256", got["sha256"], name)
        assert got["ca"] == "fixed:sha256:" + nix32_encode(bytes.fromhex(got["sha256"]))
        assert os.path.getsize(got["path"]) == mib << 20
        growth_mib = (got["after_kib"] - got["before_kib"]) / 1024
        print(f"peak RSS growth for a {mib} MiB add: {growth_mib:.1f} MiB")
        # streaming measured ~0 MiB; buffering the whole stream measured ~56 MiB
        assert growth_mib < 16
    finally:
        delete_path(nix_host, got["path"])


# --------------------------------------------------------------------------- builds


def test_build_ops(nix_host: NixHost, busybox: str) -> None:
    """QueryDerivationOutputMap, QueryMissing, BuildPathsWithResults (with logs), BuildPaths."""
    marker = f"RECNIX-UPSTREAM-MARKER-{NONCE}"
    drv = instantiate(
        nix_host,
        busybox,
        f"recnix-up-build-{NONCE}",
        f"echo {marker}; echo built-{NONCE} > $out",
    )
    expected_out = cli(nix_host, "nix-store", "-q", "--outputs", drv)
    target = DerivedPath(drv, ["out"])
    logs: list[StderrMessage] = []

    async def body(up: Upstream) -> dict[str, Any]:
        got: dict[str, Any] = {"map": await up.query_derivation_output_map(drv)}
        got["missing"] = await up.query_missing([target])
        got["first"] = await up.build_paths_with_results([target], on_log=logs.append)
        got["again"] = await up.build_paths([target])
        got["second"] = await up.build_paths_with_results([target])
        got["info"] = await up.query_path_info(expected_out)
        return got

    got = with_upstream(nix_host, body)
    assert got["map"] == {"out": expected_out}
    assert drv in got["missing"].will_build
    assert got["missing"].unknown == []

    (first,) = got["first"]
    assert first.path == target
    assert first.result.status == BuildStatus.Built, first.result.error_msg
    if nixversion.daemon_reports_times_built():
        assert first.result.times_built == 1
        assert 0 < first.result.start_time <= first.result.stop_time
    else:  # 2.34 reports zeros for a fresh build
        assert (first.result.times_built, first.result.start_time) == (0, 0)
    ((key, realisation),) = first.result.built_outputs.items()
    assert key.endswith("!out")
    assert isinstance(realisation, Realisation) and realisation.out_path == expected_out
    assert Path(expected_out).read_text() == f"built-{NONCE}\n"

    builds = [m for m in logs if isinstance(m, StartActivity) and m.type == ACT_BUILD]
    assert builds and builds[0].fields[0] == drv
    lines = [m for m in logs if isinstance(m, Result) and m.type == RES_BUILD_LOG_LINE]
    assert [marker] in [m.fields for m in lines]
    assert any(m.id == builds[0].id for m in lines)

    assert got["again"] is None  # BuildPaths answered (u64 1) without an error
    (second,) = got["second"]
    assert second.result.status == BuildStatus.AlreadyValid
    assert got["info"] is not None and got["info"].deriver == drv
    assert_info_matches_cli(nix_host, expected_out, got["info"])


def test_failing_build_raises_with_daemon_message(nix_host: NixHost, busybox: str) -> None:
    drv = instantiate(
        nix_host, busybox, f"recnix-up-fail-{NONCE}", "echo going to fail >&2; exit 3"
    )

    async def body(up: Upstream) -> tuple[str, list[Any]]:
        with pytest.raises(UpstreamError) as excinfo:
            await up.build_paths([DerivedPath(drv, ["out"])])
        results = await up.build_paths_with_results([DerivedPath(drv, ["out"])])
        return str(excinfo.value), results

    message, results = with_upstream(nix_host, body)
    message = plain(message)
    assert nixversion.builder_failed_message(drv, 3) in message
    (result,) = results
    assert result.result.status == BuildStatus.PermanentFailure
    assert "failed with exit code 3" in result.result.error_msg


# --------------------------------------------------------------------------- GC roots, NARs


def test_add_temp_root_keeps_path_alive_until_close(nix_host: NixHost, tmp_path: Path) -> None:
    throwaway = tmp_path / f"recnix-up-temproot-{NONCE}"
    throwaway.write_text(f"throwaway {NONCE}\n")
    path = cli(nix_host, "nix-store", "--add", str(throwaway))  # that client has exited

    async def main() -> str:
        up = await Upstream.connect(f"unix://{nix_host.socket}")
        try:
            await up.add_temp_root(path)
            refused = await asyncio.to_thread(delete_path, nix_host, path)
            assert await up.is_valid_path(path)
        finally:
            await up.close()
        return refused.stderr

    refused = asyncio.run(main())
    assert "still alive" in refused
    deadline = time.monotonic() + 10
    while True:  # the daemon's worker for that connection must exit first
        deleted = delete_path(nix_host, path)
        if deleted.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert deleted.returncode == 0, deleted.stderr
    assert not os.path.exists(path)


def test_nar_from_path(nix_host: NixHost, busybox: str) -> None:
    async def body(up: Upstream) -> tuple[bytes, int, bool]:
        chunks = [c async for c in up.nar_from_path(busybox)]
        return b"".join(chunks), len(chunks), await up.is_valid_path(busybox)

    nar, count, still_usable = with_upstream(nix_host, body)
    assert nar == nix_dump(nix_host, busybox)
    assert count > 1  # streamed, not one buffer
    assert still_usable


def test_add_to_store_nar_content_addressed(nix_host: NixHost, tmp_path: Path) -> None:
    """A new CA path (hash computed here) goes in without signatures and matches the CLI."""
    tree = make_tree(tmp_path, "nar")
    name = f"recnix-up-addnar-{NONCE}"
    hash_str, size = nar_hash(tree)
    digest = nix32_decode(hash_str.removeprefix("sha256:"))
    path = make_fixed_output_path("nar", "sha256", digest.hex(), name)
    info = ValidPathInfo(
        path,
        PathInfo(deriver=None, nar_hash=digest.hex(), nar_size=size, ca="fixed:r:" + hash_str),
    )

    async def body(up: Upstream) -> tuple[bool, bool, PathInfo | None]:
        before = await up.is_valid_path(path)
        await up.add_to_store_nar(info, achunks(dump_path(tree)))
        return before, await up.is_valid_path(path), await up.query_path_info(path)

    before, after, got = with_upstream(nix_host, body)
    assert (before, after) == (False, True)
    assert got is not None and got.ca == "fixed:r:" + hash_str and got.sigs == []
    assert_info_matches_cli(nix_host, path, got)
    assert nix_dump(nix_host, path) == b"".join(dump_path(tree))
    # the CLI puts the same tree (under the same name) at the same path
    renamed = tmp_path / name
    tree.rename(renamed)
    assert cli(nix_host, "nix-store", "--add", str(renamed)) == path


# --------------------------------------------------------------------------- errors, stdio


def test_refused_ops_raise_and_connection_stays_usable(
    nix_host: NixHost, busybox: str, tmp_path: Path
) -> None:
    """Refusals once the daemon started work leave the connection in sync."""
    tree = make_tree(tmp_path, "unsigned")
    hash_str, size = nar_hash(tree)
    unsigned = ValidPathInfo(
        fake_store_path("unsigned"),  # input-addressed: needs a signature
        PathInfo(
            deriver=None,
            nar_hash=nix32_decode(hash_str.removeprefix("sha256:")).hex(),
            nar_size=size,
        ),
    )

    async def body(up: Upstream) -> list[tuple[str, bool]]:
        seen = []
        attempts: list[Callable[[], Awaitable[Any]]] = [
            # refused here: Nix 2.8 would leave the frames unread and lose sync
            lambda: up.add_to_store(
                f"recnix-up-sha1-{NONCE}", "text:sha1", [], achunks([b"text", b" body"])
            ),
            lambda: up.add_to_store(
                f"recnix-up-notnar-{NONCE}", "fixed:r:sha256", [], achunks([b"not a NAR" * 9])
            ),
            lambda: up.add_to_store_nar(unsigned, achunks(dump_path(tree))),
            lambda: up.build_paths([DerivedPath(fake_store_path("unbuildable"))]),
        ]
        for attempt in attempts:
            with pytest.raises(UpstreamError) as excinfo:
                await attempt()
            seen.append((plain(str(excinfo.value)), await up.is_valid_path(busybox)))
        return seen

    sha1_text, not_nar, no_sig, absent = with_upstream(nix_host, body)
    assert sha1_text[1] and not_nar[1] and no_sig[1] and absent[1]
    assert "content-address method 'text:sha1' is not one of" in sha1_text[0]
    assert "doesn't look like a Nix archive" in not_nar[0]
    assert nixversion.unsigned_add_message(unsigned.path) in no_sig[0]
    assert absent[0] == nixversion.unbuildable_message(fake_store_path("unbuildable"))
    assert not os.path.exists(unsigned.path)


def test_refusal_before_work_closes_the_connection(nix_host: NixHost, busybox: str) -> None:
    """Nix 2.8 answers an argument it cannot parse with two errors and hangs up.

    The client raises the first, then reports the connection closed (never the
    stale second copy as the next op's answer); a new connection works.
    """

    async def body(up: Upstream) -> tuple[str, bool, str]:
        with pytest.raises(UpstreamError) as refused:
            await up.query_path_info("/tmp/not-in-the-store")
        with pytest.raises(UpstreamClosed) as closed:
            await up.is_valid_path(busybox)
        return plain(str(refused.value)), up.closed, str(closed.value)

    refused, closed, closed_msg = with_upstream(nix_host, body)
    assert refused == nixversion.not_in_store_message("/tmp/not-in-the-store")
    assert closed and "closed" in closed_msg
    assert with_upstream(nix_host, lambda up: up.is_valid_path(busybox))


def test_stdio_mode(nix_host: NixHost, busybox: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`nix-daemon --stdio` spawned by Upstream (env: the host's NIX_CONF_DIR)."""
    monkeypatch.setenv("NIX_CONF_DIR", str(nix_host.conf_dir))
    monkeypatch.setenv("PATH", nix_host.env["PATH"])
    monkeypatch.delenv("NIX_REMOTE", raising=False)
    absent = fake_store_path("stdio-absent")

    async def main() -> tuple[Any, ...]:
        up = await Upstream.connect("stdio")
        try:
            return (
                up.minor,
                up.nix_version,
                await up.is_valid_path(busybox),
                await up.is_valid_path(absent),
                await up.query_path_info(busybox),
            )
        finally:
            await up.close()

    minor, version, valid, invalid, info = asyncio.run(main())
    expected = (nixversion.negotiated_minor(35), nixversion.version_string(), True, False)
    assert (minor, version, valid, invalid) == expected
    assert info is not None
    assert_info_matches_cli(nix_host, busybox, info)
