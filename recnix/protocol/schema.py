"""Codecs of compound types and every op's request/reply, declared once with version gates.

Each request is a :class:`~recnix.protocol.wire.StructCodec` of
:class:`~recnix.protocol.wire.Field` s (name, codec, since, until, feature gates);
the same declaration encodes and decodes, in both roles. See ``OPS``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .errors import ProtocolError
from .types import (
    BasicDerivation,
    BuildResult,
    ClientHandshakeInfo,
    ClientOptions,
    DerivationOutput,
    DerivedPath,
    DrvOutput,
    GCResult,
    KeyedBuildResult,
    KeyedRealisation,
    Missing,
    PathInfo,
    Realisation,
    SubstitutablePathInfo,
    UnkeyedRealisation,
    ValidPathInfo,
)
from .wire import (
    BOOL,
    BYTES,
    FEATURE_DELETE_REFERRERS,
    FEATURE_REALISATION_WITH_PATH,
    I64,
    OPT_PATH,
    OPT_STR,
    PATH,
    PATHS,
    STORE_DIR,
    STR,
    STRS,
    TRUST,
    U64,
    Codec,
    Ctx,
    FeatureCodec,
    Field,
    FixedMinorCodec,
    Gen,
    ListCodec,
    MapCodec,
    Op,
    OptionalCodec,
    StructCodec,
    VersionedCodec,
    decode_str,
    encode_str,
    read_bool,
    read_bytes,
    read_u64,
    u64,
    write_bytes,
)

F = Field

# --------------------------------------------------------------------------- compound types

PATH_INFO = StructCodec(
    [
        F("deriver", OPT_PATH),
        F("nar_hash", STR),
        F("references", PATHS),
        F("registration_time", U64),
        F("nar_size", U64),
        F("ultimate", BOOL, since=16),
        F("sigs", STRS, since=16),
        F("ca", OPT_STR, since=16),
    ],
    PathInfo,
)
VALID_PATH_INFO = StructCodec([F("path", PATH), F("info", PATH_INFO)], ValidPathInfo)
# AddMultipleToStore entries are always written "at format 16".
VALID_PATH_INFO_16 = FixedMinorCodec(16, VALID_PATH_INFO)
CONTENT_ADDRESS = STR
OPT_CONTENT_ADDRESS = OPT_STR
BUILD_MODE = U64


class DerivedPathCodec(Codec):
    """DerivedPath string: ``drv!o1,o2`` / ``drv!*`` at >= 30; legacy path-with-outputs below."""

    def read(self, ctx: Ctx) -> Gen:
        text = decode_str((yield from read_bytes(ctx.max_string)))
        return parse_derived_path(text, ctx.minor)

    def write(self, out: bytearray, value: DerivedPath, ctx: Ctx) -> None:
        write_bytes(out, encode_str(format_derived_path(value, ctx.minor)))


def parse_derived_path(text: str, minor: int) -> DerivedPath:
    """Parse a DerivedPath string as sent at ``minor``."""
    if "!" in text:
        drv, _, outs = text.rpartition("!")
        outputs = ["*"] if outs == "*" else outs.split(",")
        if not drv or (outputs != ["*"] and any(not o or o == "*" for o in outputs)):
            raise ProtocolError(f"bad derived path {text!r}")
        return DerivedPath(drv, outputs)
    if minor < 30 and text.endswith(".drv"):
        return DerivedPath(text, ["*"])
    return DerivedPath(text)


def format_derived_path(value: DerivedPath, minor: int) -> str:
    """Format a DerivedPath the way a peer at ``minor`` expects it."""
    if value.outputs is None:
        return value.path
    if minor < 30 and value.outputs == ["*"]:
        return value.path
    return value.path + "!" + ",".join(value.outputs)


DERIVED_PATH = DerivedPathCodec()
DERIVED_PATHS = ListCodec(DERIVED_PATH)


def _base_name(path: str) -> str:
    prefix = STORE_DIR + "/"
    return path[len(prefix) :] if path.startswith(prefix) else path


def _full_path(base: str) -> str:
    return f"{STORE_DIR}/{base}"


class RealisationJsonCodec(Codec):
    """Realisation as a JSON string (minor >= 31 without the path-not-hash feature)."""

    def read(self, ctx: Ctx) -> Gen:
        text = decode_str((yield from read_bytes(ctx.max_string)))
        return realisation_from_json(text)

    def write(self, out: bytearray, value: Realisation, ctx: Ctx) -> None:
        write_bytes(out, encode_str(realisation_to_json(value)))


def realisation_from_json(text: str) -> Realisation:
    """Parse Nix's Realisation JSON."""
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise ProtocolError(f"bad realisation JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("realisation JSON is not an object")
    rid, out_path = obj.get("id"), obj.get("outPath")
    if not isinstance(rid, str) or not isinstance(out_path, str):
        raise ProtocolError("realisation JSON needs string 'id' and 'outPath'")
    sigs_raw = obj.get("signatures")
    sigs: list[str] | None = None
    structured = False
    if sigs_raw is not None:
        if not isinstance(sigs_raw, list):
            raise ProtocolError("realisation 'signatures' is not a list")
        sigs = []
        for sig in sigs_raw:
            if isinstance(sig, str):
                sigs.append(sig)
            elif (
                isinstance(sig, dict)
                and isinstance(sig.get("keyName"), str)
                and isinstance(sig.get("sig"), str)
            ):
                structured = True
                sigs.append(f"{sig['keyName']}:{sig['sig']}")
            else:
                raise ProtocolError("bad realisation signature")
    deps_raw = obj.get("dependentRealisations")
    deps: dict[str, str] | None = None
    if deps_raw is not None:
        if not isinstance(deps_raw, dict) or not all(isinstance(v, str) for v in deps_raw.values()):
            raise ProtocolError("bad realisation 'dependentRealisations'")
        deps = {k: _full_path(v) for k, v in deps_raw.items()}
    return Realisation(rid, _full_path(out_path), sigs, deps, structured)


def realisation_to_json(value: Realisation) -> str:
    """Nix's Realisation JSON (keys sorted, no spaces, base names for paths)."""
    obj: dict[str, Any] = {"id": value.id, "outPath": _base_name(value.out_path)}
    if value.dependent_realisations is not None:
        obj["dependentRealisations"] = {
            k: _base_name(v) for k, v in value.dependent_realisations.items()
        }
    if value.signatures is not None:
        if value.structured_signatures:
            obj["signatures"] = [
                {"keyName": s.partition(":")[0], "sig": s.partition(":")[2]}
                for s in value.signatures
            ]
        else:
            obj["signatures"] = list(value.signatures)
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


REALISATION_JSON = RealisationJsonCodec()
DRV_OUTPUT_ID = STR  # "<algo>:<hash>!<output>"
DRV_OUTPUT_WITH_PATH = StructCodec([F("drv_path", PATH), F("output_name", STR)], DrvOutput)
UNKEYED_REALISATION = StructCodec([F("out_path", PATH), F("signatures", STRS)], UnkeyedRealisation)
KEYED_REALISATION = StructCodec(
    [F("key", DRV_OUTPUT_WITH_PATH), F("value", UNKEYED_REALISATION)], KeyedRealisation
)
DRV_OUTPUT = FeatureCodec(FEATURE_REALISATION_WITH_PATH, DRV_OUTPUT_WITH_PATH, DRV_OUTPUT_ID)
REALISATION = FeatureCodec(FEATURE_REALISATION_WITH_PATH, KEYED_REALISATION, REALISATION_JSON)

BUILD_RESULT = StructCodec(
    [
        F("status", U64),
        F("error_msg", STR),
        F("times_built", U64, since=29),
        F("is_non_deterministic", BOOL, since=29),
        F("start_time", U64, since=29),
        F("stop_time", U64, since=29),
        F("cpu_user", OptionalCodec(I64), since=37),
        F("cpu_system", OptionalCodec(I64), since=37),
        F(
            "built_outputs",
            MapCodec(DRV_OUTPUT_ID, REALISATION_JSON),
            since=28,
            unless=FEATURE_REALISATION_WITH_PATH,
        ),
        F(
            "built_outputs",
            MapCodec(STR, UNKEYED_REALISATION),
            since=28,
            feature=FEATURE_REALISATION_WITH_PATH,
        ),
    ],
    BuildResult,
)
KEYED_BUILD_RESULT = StructCodec(
    [F("path", DERIVED_PATH), F("result", BUILD_RESULT)], KeyedBuildResult
)

BASIC_DERIVATION = StructCodec(
    [
        F(
            "outputs",
            MapCodec(
                STR,
                StructCodec(
                    [F("path", STR), F("hash_algo", STR), F("hash", STR)], DerivationOutput
                ),
            ),
        ),
        F("input_srcs", PATHS),
        F("platform", STR),
        F("builder", STR),
        F("args", STRS),
        F("env", MapCodec(STR, STR)),
    ],
    BasicDerivation,
)

CLIENT_OPTIONS = StructCodec(
    [
        F("keep_failed", U64),
        F("keep_going", U64),
        F("try_fallback", U64),
        F("verbosity", U64),
        F("max_build_jobs", U64),
        F("max_silent_time", U64),
        F("use_build_hook", U64),
        F("verbose_build", U64),
        F("log_type", U64),
        F("print_build_trace", U64),
        F("build_cores", U64),
        F("use_substitutes", U64),
        F("overrides", MapCodec(STR, STR), since=12),
    ],
    ClientOptions,
)

SUBSTITUTABLE_PATH_INFO = StructCodec(
    [
        F("deriver", OPT_PATH),
        F("references", PATHS),
        F("download_size", U64),
        F("nar_size", U64),
    ],
    SubstitutablePathInfo,
)
MISSING = StructCodec(
    [
        F("will_build", PATHS),
        F("will_substitute", PATHS),
        F("unknown", PATHS),
        F("download_size", U64),
        F("nar_size", U64),
    ],
    Missing,
)
GC_RESULT = StructCodec([F("paths", STRS), F("bytes_freed", U64), F("obsolete", U64)], GCResult)
CLIENT_HANDSHAKE_INFO = StructCodec(
    [F("nix_version", STR, since=33), F("trust", TRUST, since=35)], ClientHandshakeInfo
)


class GCTargetCodec(Codec):
    """CollectGarbage paths under ``delete-dead-specific-referrers``.

    ``None`` = whole store (tag 1); else ``{"paths": [...], "delete_referrers": bool}`` (tag 0).
    """

    def read(self, ctx: Ctx) -> Gen:
        tag = yield from read_u64()
        if tag == 1:
            return None
        if tag != 0:
            raise ProtocolError(f"bad garbage-collection target tag {tag}")
        paths = yield from PATHS.read(ctx)
        return {"paths": paths, "delete_referrers": (yield from read_bool())}

    def write(self, out: bytearray, value: dict[str, Any] | None, ctx: Ctx) -> None:
        if value is None:
            out += u64(1)
            return
        out += u64(0)
        PATHS.write(out, value["paths"], ctx)
        BOOL.write(out, value["delete_referrers"], ctx)


MAX_SINGLE_DERIVED_DEPTH = 32


class SingleDerivedPathCodec(Codec):
    """SubmitOutput's SingleDerivedPath: ``u64 0, path`` (a str) or ``u64 1, inner, output``.

    The built form decodes to a tuple ``(inner, output_name)``.
    """

    def read(self, ctx: Ctx, depth: int = 0) -> Gen:
        if depth > MAX_SINGLE_DERIVED_DEPTH:
            raise ProtocolError("derived path nested too deeply")
        tag = yield from read_u64()
        if tag == 0:
            return (yield from PATH.read(ctx))
        if tag != 1:
            raise ProtocolError(f"bad derived path tag {tag}")
        inner = yield from self.read(ctx, depth + 1)
        return (inner, (yield from STR.read(ctx)))

    def write(self, out: bytearray, value: str | tuple[Any, str], ctx: Ctx) -> None:
        if isinstance(value, str):
            out += u64(0)
            PATH.write(out, value, ctx)
        else:
            out += u64(1)
            self.write(out, value[0], ctx)
            STR.write(out, value[1], ctx)


# --------------------------------------------------------------------------- ops


class StreamKind(Enum):
    """What follows a request (or, for NarFromPath, the reply)."""

    NONE = "none"
    FRAMED = "framed"  # u64 len + bytes chunks, 0-terminated
    NAR = "nar"  # a plain NAR; its end is found by parsing it
    TUNNEL_NAR = "tunnel-nar"  # a NAR the server pulls with STDERR_READ
    TUNNEL = "tunnel"  # data pulled with STDERR_READ in another format (ImportPaths)


@dataclass(frozen=True)
class OpSpec:
    """One op: request fields, reply codec, trailing streams, minors where it exists."""

    op: Op
    request: StructCodec
    reply: Codec | None
    streams: tuple[tuple[int, StreamKind], ...] = ((0, StreamKind.NONE),)
    reply_stream: StreamKind = StreamKind.NONE
    since: int = 0
    until: int | None = None

    def stream(self, minor: int) -> StreamKind:
        """The request's trailing stream at ``minor``."""
        for since, kind in self.streams:
            if minor >= since:
                return kind
        return StreamKind.NONE

    def exists(self, minor: int) -> bool:
        """Whether clients at ``minor`` use this op."""
        return minor >= self.since and (self.until is None or minor < self.until)


def _op(
    op: Op,
    fields: list[Field],
    reply: Codec | None,
    **kw: Any,
) -> OpSpec:
    return OpSpec(op, StructCodec(fields), reply, **kw)


_PATH_ARG = [F("path", PATH)]
_ONE = U64  # replies that are "u64 1"

OPS: dict[int, OpSpec] = {
    s.op: s
    for s in [
        _op(Op.IS_VALID_PATH, _PATH_ARG, BOOL),
        _op(Op.HAS_SUBSTITUTES, _PATH_ARG, BOOL),
        _op(Op.QUERY_PATH_HASH, _PATH_ARG, STR),
        _op(Op.QUERY_REFERENCES, _PATH_ARG, PATHS),
        _op(Op.QUERY_REFERRERS, _PATH_ARG, PATHS),
        _op(
            Op.ADD_TO_STORE,
            [
                F("name", STR),
                F("ca_method", STR, since=25),
                F("references", PATHS, since=25, default=[]),
                F("repair", BOOL, since=25, default=False),
                F("fixed", BOOL, until=25, default=True),
                F("recursive", U64, until=25, default=1),
                F("hash_algo", STR, until=25, default="sha256"),
            ],
            VersionedCodec((25, VALID_PATH_INFO), (0, PATH)),
            streams=((25, StreamKind.FRAMED), (0, StreamKind.NAR)),
        ),
        _op(
            Op.ADD_TEXT_TO_STORE,
            [F("name", STR), F("text", BYTES), F("references", PATHS, default=[])],
            PATH,
        ),
        _op(
            Op.BUILD_PATHS,
            [F("paths", DERIVED_PATHS), F("build_mode", BUILD_MODE, since=15, default=0)],
            _ONE,
        ),
        _op(Op.ENSURE_PATH, _PATH_ARG, _ONE),
        _op(Op.ADD_TEMP_ROOT, _PATH_ARG, _ONE),
        _op(Op.ADD_INDIRECT_ROOT, [F("path", STR)], _ONE),
        _op(Op.SYNC_WITH_GC, [], _ONE),
        _op(Op.FIND_ROOTS, [], MapCodec(STR, PATH)),
        _op(Op.EXPORT_PATH, [F("path", PATH), F("sign", U64, default=0)], _ONE),
        _op(Op.QUERY_DERIVER, _PATH_ARG, OPT_PATH),
        _op(Op.SET_OPTIONS, [F("options", CLIENT_OPTIONS)], None),
        _op(
            Op.COLLECT_GARBAGE,
            [
                F("action", U64),
                F("paths", PATHS, unless=FEATURE_DELETE_REFERRERS, default=[]),
                F("target", GCTargetCodec(), feature=FEATURE_DELETE_REFERRERS),
                F("ignore_liveness", U64, default=0),
                F("max_freed", U64, default=0),
                F("obsolete_1", U64, default=0),
                F("obsolete_2", U64, default=0),
                F("obsolete_3", U64, default=0),
            ],
            GC_RESULT,
        ),
        _op(Op.QUERY_SUBSTITUTABLE_PATH_INFO, _PATH_ARG, OptionalCodec(SUBSTITUTABLE_PATH_INFO)),
        _op(Op.QUERY_DERIVATION_OUTPUTS, _PATH_ARG, PATHS),
        _op(Op.QUERY_ALL_VALID_PATHS, [], PATHS),
        _op(
            Op.QUERY_PATH_INFO,
            _PATH_ARG,
            VersionedCodec((17, OptionalCodec(PATH_INFO)), (0, PATH_INFO)),
        ),
        _op(Op.IMPORT_PATHS, [], PATHS, streams=((0, StreamKind.TUNNEL),)),
        _op(Op.QUERY_DERIVATION_OUTPUT_NAMES, _PATH_ARG, STRS),
        _op(Op.QUERY_PATH_FROM_HASH_PART, [F("hash_part", STR)], OPT_PATH),
        _op(
            Op.QUERY_SUBSTITUTABLE_PATH_INFOS,
            [
                F("paths", PATHS, until=22),
                F("paths", MapCodec(PATH, OPT_CONTENT_ADDRESS), since=22),
            ],
            MapCodec(PATH, SUBSTITUTABLE_PATH_INFO),
            since=12,
        ),
        _op(
            Op.QUERY_VALID_PATHS,
            [F("paths", PATHS), F("substitute", BOOL, since=27, default=False)],
            PATHS,
            since=12,
        ),
        _op(Op.QUERY_SUBSTITUTABLE_PATHS, [F("paths", PATHS)], PATHS, since=12),
        _op(Op.QUERY_VALID_DERIVERS, _PATH_ARG, PATHS),
        _op(Op.OPTIMISE_STORE, [], _ONE),
        _op(Op.VERIFY_STORE, [F("check_contents", BOOL), F("repair", BOOL)], U64),
        _op(
            Op.BUILD_DERIVATION,
            [F("drv_path", PATH), F("drv", BASIC_DERIVATION), F("build_mode", BUILD_MODE)],
            BUILD_RESULT,
        ),
        _op(Op.ADD_SIGNATURES, [F("path", PATH), F("sigs", STRS)], _ONE),
        _op(Op.NAR_FROM_PATH, _PATH_ARG, None, reply_stream=StreamKind.NAR),
        _op(
            Op.ADD_TO_STORE_NAR,
            [
                F("path", PATH),
                F("deriver", OPT_PATH),
                F("nar_hash", STR),
                F("references", PATHS, default=[]),
                F("registration_time", U64, default=0),
                F("nar_size", U64),
                F("ultimate", BOOL, default=False),
                F("sigs", STRS, default=[]),
                F("ca", OPT_CONTENT_ADDRESS),
                F("repair", BOOL, default=False),
                F("dont_check_sigs", BOOL, default=False),
            ],
            None,
            streams=(
                (23, StreamKind.FRAMED),
                (21, StreamKind.TUNNEL_NAR),
                (0, StreamKind.NAR),
            ),
        ),
        _op(Op.QUERY_MISSING, [F("targets", DERIVED_PATHS)], MISSING, since=19),
        _op(
            Op.QUERY_DERIVATION_OUTPUT_MAP,
            [F("drv_path", PATH)],
            MapCodec(STR, OPT_PATH),
            since=22,
        ),
        _op(
            Op.REGISTER_DRV_OUTPUT,
            [
                F("id", STR, until=31),
                F("out_path", STR, until=31),  # base name
                F("realisation", REALISATION, since=31),
            ],
            None,
            since=27,
        ),
        _op(
            Op.QUERY_REALISATION,
            [
                F("id", DRV_OUTPUT_ID, unless=FEATURE_REALISATION_WITH_PATH),
                F("drv_output", DRV_OUTPUT_WITH_PATH, feature=FEATURE_REALISATION_WITH_PATH),
            ],
            FeatureCodec(
                FEATURE_REALISATION_WITH_PATH,
                OptionalCodec(UNKEYED_REALISATION),
                VersionedCodec((31, ListCodec(REALISATION_JSON)), (0, PATHS)),
            ),
            since=27,
        ),
        _op(
            Op.ADD_MULTIPLE_TO_STORE,
            [F("repair", BOOL, default=False), F("dont_check_sigs", BOOL, default=False)],
            None,
            streams=((0, StreamKind.FRAMED),),
            since=32,
        ),
        _op(
            Op.ADD_BUILD_LOG,
            [F("drv_base_name", STR)],
            _ONE,
            streams=((0, StreamKind.FRAMED),),
        ),
        _op(
            Op.BUILD_PATHS_WITH_RESULTS,
            [F("paths", DERIVED_PATHS), F("build_mode", BUILD_MODE, default=0)],
            ListCodec(KEYED_BUILD_RESULT),
            since=34,
        ),
        _op(Op.ADD_PERM_ROOT, [F("path", PATH), F("gc_root", STR)], STR, since=36),
        _op(
            Op.SUBMIT_OUTPUT,
            [F("path", SingleDerivedPathCodec()), F("output_name", STR)],
            _ONE,
            since=38,
        ),
        _op(
            Op.ADD_TO_STORE_SCANNING,
            [F("name", STR), F("ca_method", STR)],
            VALID_PATH_INFO,
            streams=((0, StreamKind.FRAMED),),
            since=38,
        ),
    ]
}


def op_spec(op: int) -> OpSpec:
    """The spec of op number ``op``; ``ProtocolError("invalid operation N")`` if unknown."""
    spec = OPS.get(op)
    if spec is None:
        raise ProtocolError(f"invalid operation {op}")
    return spec
