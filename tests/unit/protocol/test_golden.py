"""Golden tests: Nix's own worker-protocol fixtures decode to their JSON twins and
re-encode to the identical bytes (src/libstore-tests/data in NixOS/nix)."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from recnix.formats.storepath import nix32_encode
from recnix.protocol import (
    FEATURE_REALISATION_WITH_PATH,
    BuildResult,
    BuildStatus,
    ClientConnection,
    ClientHandshakeInfo,
    DerivedPath,
    DrvOutput,
    HandshakeDone,
    KeyedRealisation,
    PathInfo,
    ProtocolError,
    Realisation,
    ServerConnection,
    UnkeyedRealisation,
    ValidPathInfo,
)
from recnix.protocol import schema as S
from recnix.protocol import wire as W
from recnix.protocol.connection import NEED_DATA

FIXTURES = Path(
    os.environ.get("RECNIX_FIXTURES")
    or Path(__file__).parents[3].parent / "shared/fixtures/nix-upstream"
)

# Fixtures deliberately not covered, with the reason (copied into the closing note).
NOT_COVERED: dict[str, str] = {}

WITH_PATH = frozenset({FEATURE_REALISATION_WITH_PATH})


def full(base: str | None) -> str | None:
    return None if base is None else f"/nix/store/{base}"


def sri_digest(sri: str) -> tuple[str, bytes]:
    algo, _, b64 = sri.partition("-")
    return algo, base64.b64decode(b64)


def ca_from_json(j: dict[str, str] | None) -> str | None:
    if j is None:
        return None
    algo, digest = sri_digest(j["hash"])
    prefix = {"text": "text:", "flat": "fixed:", "nar": "fixed:r:"}[j["method"]]
    return f"{prefix}{algo}:{nix32_encode(digest)}"


def sig_from_json(s: Any) -> str:
    return s if isinstance(s, str) else f"{s['keyName']}:{s['sig']}"


def derived_path_from_json(j: Any) -> DerivedPath:
    if isinstance(j, str):
        return DerivedPath(full(j))
    return DerivedPath(full(j["drvPath"]), list(j["outputs"]))


def path_info_from_json(j: dict[str, Any]) -> PathInfo:
    _, digest = sri_digest(j["narHash"])
    return PathInfo(
        deriver=full(j["deriver"]),
        nar_hash=digest.hex(),
        references=[full(r) for r in j["references"]],
        registration_time=j["registrationTime"],
        nar_size=j["narSize"],
        ultimate=j["ultimate"],
        sigs=[sig_from_json(s) for s in j["signatures"]],
        ca=ca_from_json(j["ca"]),
    )


def realisation_key(r: Realisation | UnkeyedRealisation, name: str) -> tuple:
    """Semantic form of a built output: (output name, out path, sigs, deps)."""
    if isinstance(r, UnkeyedRealisation):
        return (name, r.out_path, r.signatures, {})
    return (r.output_name, r.out_path, r.signatures or [], r.dependent_realisations or {})


def realisation_from_json(j: dict[str, Any]) -> Realisation:
    return Realisation(
        id=j["id"],
        out_path=full(j["outPath"]),
        signatures=[sig_from_json(s) for s in j["signatures"]],
        dependent_realisations={k: full(v) for k, v in j["dependentRealisations"].items()},
        structured_signatures=any(isinstance(s, dict) for s in j["signatures"]),
    )


def build_result_from_json(j: dict[str, Any]) -> dict[str, Any]:
    """Semantic form of a BuildResult twin, compared with :func:`build_result_norm`."""
    return {
        "status": BuildStatus[j["status"]],
        "error_msg": j.get("errorMsg", ""),
        "times_built": j["timesBuilt"],
        "is_non_deterministic": j.get("isNonDeterministic", False),
        "start_time": j["startTime"],
        "stop_time": j["stopTime"],
        "cpu_user": j.get("cpuUser"),
        "cpu_system": j.get("cpuSystem"),
        "built_outputs": sorted(
            (
                name,
                full(r["outPath"]),
                [sig_from_json(s) for s in r.get("signatures", [])],
                {k: full(v) for k, v in r.get("dependentRealisations", {}).items()},
            )
            for name, r in j.get("builtOutputs", {}).items()
        ),
    }


def build_result_norm(r: BuildResult) -> dict[str, Any]:
    return {
        "status": r.status,
        "error_msg": r.error_msg,
        "times_built": r.times_built,
        "is_non_deterministic": r.is_non_deterministic,
        "start_time": r.start_time,
        "stop_time": r.stop_time,
        "cpu_user": r.cpu_user,
        "cpu_system": r.cpu_system,
        "built_outputs": sorted(realisation_key(v, k) for k, v in r.built_outputs.items()),
    }


def ident(x: Any) -> Any:
    return x


# name -> (codec(s), minor, features, json item -> expected, decoded -> comparable)
Case = tuple[Any, int, frozenset[str], Callable[[Any], Any], Callable[[Any], Any]]
STRS2 = W.ListCodec(W.STRS)

CASES: dict[str, Case] = {
    "string": (W.STR, 10, frozenset(), ident, ident),
    "store-path": (W.PATH, 10, frozenset(), full, ident),
    "content-address": (S.CONTENT_ADDRESS, 10, frozenset(), ca_from_json, ident),
    "optional-content-address": (S.OPT_CONTENT_ADDRESS, 10, frozenset(), ca_from_json, ident),
    "optional-store-path": (W.OPT_PATH, 10, frozenset(), full, ident),
    "drv-output": (S.DRV_OUTPUT, 10, frozenset(), ident, ident),
    "realisation": (S.REALISATION, 10, frozenset(), realisation_from_json, ident),
    "realisation-with-deps": (S.REALISATION, 10, frozenset(), realisation_from_json, ident),
    "vector": ([W.STRS, W.STRS, W.STRS, STRS2], 10, frozenset(), ident, ident),
    "set": ([W.STRS, W.STRS, W.STRS, STRS2], 10, frozenset(), ident, ident),
    "build-mode": (S.BUILD_MODE, 10, frozenset(), ident, ident),
    "optional-trusted-flag": (
        W.TRUST,
        10,
        frozenset(),
        lambda j: None if j is None else (1 if j else 2),
        ident,
    ),
    "derived-path-1.29": (S.DERIVED_PATH, 29, frozenset(), derived_path_from_json, ident),
    "derived-path-1.30": (S.DERIVED_PATH, 30, frozenset(), derived_path_from_json, ident),
    **{
        f"build-result-{v}": (
            S.BUILD_RESULT,
            minor,
            frozenset(),
            build_result_from_json,
            build_result_norm,
        )
        for v, minor in [
            ("1.27", 27),
            ("1.28", 28),
            ("1.29", 29),
            ("1.29-compat", 29),
            ("1.37", 37),
        ]
    },
    "build-result-realisation-with-path-not-hash": (
        S.BUILD_RESULT,
        38,
        WITH_PATH,
        build_result_from_json,
        build_result_norm,
    ),
    "keyed-build-result-1.29": (
        S.KEYED_BUILD_RESULT,
        29,
        frozenset(),
        lambda j: (derived_path_from_json(j["path"]), build_result_from_json(j)),
        lambda k: (k.path, build_result_norm(k.result)),
    ),
    "unkeyed-valid-path-info-1.15": (S.PATH_INFO, 15, frozenset(), path_info_from_json, ident),
    "valid-path-info-1.15": (
        S.VALID_PATH_INFO,
        15,
        frozenset(),
        lambda j: ValidPathInfo(full(j["path"]), path_info_from_json(j)),
        ident,
    ),
    "valid-path-info-1.16": (
        S.VALID_PATH_INFO,
        16,
        frozenset(),
        lambda j: ValidPathInfo(full(j["path"]), path_info_from_json(j)),
        ident,
    ),
    "drv-output-realisation-with-path-not-hash": (
        S.DRV_OUTPUT,
        38,
        WITH_PATH,
        lambda j: DrvOutput(full(j["drvPath"]), j["outputName"]),
        ident,
    ),
    "unkeyed-realisation-realisation-with-path-not-hash": (
        S.UNKEYED_REALISATION,
        38,
        WITH_PATH,
        lambda j: UnkeyedRealisation(
            full(j["outPath"]), [sig_from_json(s) for s in j["signatures"]]
        ),
        ident,
    ),
    "realisation-realisation-with-path-not-hash": (
        S.REALISATION,
        38,
        WITH_PATH,
        lambda j: KeyedRealisation(
            DrvOutput(full(j["key"]["drvPath"]), j["key"]["outputName"]),
            UnkeyedRealisation(
                full(j["value"]["outPath"]), [sig_from_json(s) for s in j["value"]["signatures"]]
            ),
        ),
        ident,
    ),
}

# Fixtures without a JSON twin (VERSIONED_CHARACTERIZATION_TEST_NO_JSON upstream):
# the values are those of src/libstore-tests/worker-protocol.cc.
HANDSHAKE_INFO = {
    "client-handshake-info_1_30": (30, [ClientHandshakeInfo()]),
    "client-handshake-info_1_33": (
        33,
        [ClientHandshakeInfo("foo"), ClientHandshakeInfo("bar")],
    ),
    "client-handshake-info_1_35": (
        35,
        [ClientHandshakeInfo("foo", 2), ClientHandshakeInfo("bar", 1)],
    ),
}
OTHER = {"handshake-to-client"}


def fixture_dirs() -> list[Path]:
    return [FIXTURES / "worker-protocol", FIXTURES / "common-protocol"]


def test_fixture_directory_exists() -> None:
    for d in fixture_dirs():
        assert d.is_dir(), f"fixture directory {d} is missing (set RECNIX_FIXTURES)"


def all_fixture_names() -> list[tuple[str, str]]:
    out = []
    for d in fixture_dirs():
        if d.is_dir():
            out += [(d.name, p.stem) for p in sorted(d.glob("*.bin"))]
    return out


def test_every_fixture_is_covered() -> None:
    names = all_fixture_names()
    assert len(names) > 40, f"too few fixtures under {FIXTURES}"
    known = set(CASES) | set(HANDSHAKE_INFO) | OTHER | set(NOT_COVERED)
    missing = sorted({n for _, n in names} - known)
    assert not missing, f"fixtures without a test: {missing}"


COMMON = [
    "string",
    "store-path",
    "content-address",
    "optional-content-address",
    "optional-store-path",
    "drv-output",
    "realisation",
    "realisation-with-deps",
    "vector",
    "set",
]


def _case_params() -> list[Any]:
    return [pytest.param("worker-protocol", n, id=f"worker-protocol/{n}") for n in CASES] + [
        pytest.param("common-protocol", n, id=f"common-protocol/{n}") for n in COMMON
    ]


@pytest.mark.parametrize(("directory", "name"), _case_params())
def test_fixture_decodes_to_twin_and_reencodes(directory: str, name: str) -> None:
    data = (FIXTURES / directory / f"{name}.bin").read_bytes()
    twin = json.loads((FIXTURES / directory / f"{name}.json").read_text())
    codecs, minor, features, expected_of, comparable = CASES[name]
    items = twin if isinstance(twin, list) else [twin]
    if not isinstance(codecs, list):
        codecs = [codecs] * len(items)
    ctx = W.Ctx(minor, features)
    pos = 0
    reencoded = bytearray()
    for codec, item in zip(codecs, items, strict=True):
        value, used = W.decode_all(codec, data[pos:], ctx)
        assert comparable(value) == expected_of(item), f"{name}: value {value!r}"
        pos += used
        codec.write(reencoded, value, ctx)
    assert pos == len(data), f"{name}: {len(data) - pos} trailing bytes"
    assert bytes(reencoded) == data


@pytest.mark.parametrize("name", sorted(HANDSHAKE_INFO))
def test_client_handshake_info_fixture(name: str) -> None:
    data = (FIXTURES / "worker-protocol" / f"{name}.bin").read_bytes()
    minor, values = HANDSHAKE_INFO[name]
    ctx = W.Ctx(minor)
    assert b"".join(W.encode(S.CLIENT_HANDSHAKE_INFO, v, ctx) for v in values) == data
    pos = 0
    for v in values:
        got, used = W.decode_all(S.CLIENT_HANDSHAKE_INFO, data[pos:], ctx)
        assert got == v
        pos += used
    assert pos == len(data)


def _handshake_to_client() -> bytes:
    return (FIXTURES / "worker-protocol" / "handshake-to-client.bin").read_bytes()


def test_handshake_to_client_is_what_our_server_sends_at_1_10() -> None:
    server = ServerConnection(server_minor=10)
    server.receive_data(W.u64(W.WORKER_MAGIC_1) + W.u64(W.make_version(10)))
    done = server.next_event()
    assert isinstance(done, HandshakeDone) and done.minor == 10
    # upstream's log holds the version exchange; the post-handshake STDERR_LAST follows it
    assert server.data_to_send() == _handshake_to_client() + W.u64(W.Stderr.LAST)


def _client_replay(data: bytes) -> Any:
    client = ClientConnection(10)
    client.initiate()
    client.receive_data(data + W.u64(W.Stderr.LAST))
    client.receive_data(b"")
    return client.next_event()


def test_handshake_to_client_replay() -> None:
    done = _client_replay(_handshake_to_client())
    assert isinstance(done, HandshakeDone)
    assert done.minor == 10 and done.server_minor == 10


def test_handshake_to_client_truncated_replay_throws() -> None:
    data = _handshake_to_client()
    for n in range(len(data)):
        client = ClientConnection(10)
        client.initiate()
        if n:
            client.receive_data(data[:n])
            assert client.next_event() is NEED_DATA
        client.receive_data(b"")
        with pytest.raises(ProtocolError):
            client.next_event()


def test_handshake_to_client_corrupted() -> None:
    data = _handshake_to_client()
    for idx in range(len(data)):
        corrupt = bytearray(data)
        corrupt[idx] = (corrupt[idx] * 4 + 1) & 0xFF
        if idx < 8 or idx == 9 or idx >= 12:
            with pytest.raises(ProtocolError):
                _client_replay(bytes(corrupt))
        else:
            done = _client_replay(bytes(corrupt))
            assert isinstance(done, HandshakeDone) and done.minor == 10
