"""ATerm `.drv` files: parser, printer, and the derivation attributes recnix needs.

Both `Derive(...)` and `DrvWithVersion("xp-dyn-drv", ...)` are read.  Strings are decoded
as UTF-8 with `surrogateescape`, so `to_aterm(parse_derivation(b)) == b` byte for byte.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recnix.formats.storepath import (
    InvalidStorePath,
    make_fixed_output_path,
    make_store_path,
    nix32_decode,
    nix32_len,
    store_path_name,
    validate_store_path,
)

DYN_DRV_VERSION = "xp-dyn-drv"
HASH_SIZES = {"md5": 16, "sha1": 20, "sha256": 32, "sha512": 64, "blake3": 32}
METHOD_PREFIXES = {"r:": "nar", "text:": "text", "git:": "git"}
OUTPUT_KINDS = ("inputAddressed", "caFixed", "caFloating", "deferred", "impure")
_CHECK_ATTRS = (
    "allowedReferences",
    "disallowedReferences",
    "allowedRequisites",
    "disallowedRequisites",
)


class DerivationError(ValueError):
    """A malformed or inconsistent derivation."""


@dataclass
class DerivationOutput:
    """One output: `kind` is one of OUTPUT_KINDS.

    `path` is set for inputAddressed and caFixed; `hash_algo` and `method` ("flat", "nar",
    "text", "git") for the content-addressed kinds; `hash` (as written, normally base 16)
    for caFixed only.
    """

    kind: str
    path: str | None = None
    hash_algo: str | None = None
    hash: str | None = None
    method: str | None = None

    def aterm_fields(self) -> tuple[str, str, str]:
        """The (path, hashAlgo, hash) strings as written in the ATerm."""
        algo = ""
        if self.hash_algo is not None:
            prefix = next((p for p, m in METHOD_PREFIXES.items() if m == self.method), "")
            algo = prefix + self.hash_algo
        hash_ = "impure" if self.kind == "impure" else (self.hash or "")
        return self.path or "", algo, hash_


@dataclass
class OutputsNode:
    """Outputs wanted from an input derivation, plus (dynamic derivations) outputs of its
    outputs: `dynamic_outputs[o]` are wanted from the derivation that output `o` is."""

    outputs: set[str] = field(default_factory=set)
    dynamic_outputs: dict[str, OutputsNode] = field(default_factory=dict)


@dataclass
class OutputChecks:
    """Reference/requisite restrictions of one output (None = no restriction)."""

    allowed_references: list[str] | None = None
    disallowed_references: list[str] | None = None
    allowed_requisites: list[str] | None = None
    disallowed_requisites: list[str] | None = None
    max_closure_size: int | None = None  # bytes (maxClosureSize)


@dataclass
class Derivation:
    """A parsed store derivation."""

    outputs: dict[str, DerivationOutput]
    input_drvs: dict[str, OutputsNode]
    input_srcs: list[str]
    platform: str
    builder: str
    args: list[str]
    env: dict[str, str]
    name: str | None = None
    version: str | None = None  # None for plain `Derive(`

    # -- inputs -------------------------------------------------------------------------

    @property
    def input_drv_outputs(self) -> dict[str, set[str]]:
        """Input derivation path -> directly wanted output names."""
        return {drv: set(node.outputs) for drv, node in self.input_drvs.items()}

    # -- structured attributes ------------------------------------------------------------

    @property
    def structured_attrs(self) -> dict[str, Any] | None:
        """The `__json` structured attributes, or None without `__structuredAttrs`."""
        raw = self.env.get("__json")
        if raw is None:
            return None
        try:
            value = json.loads(raw)
        except ValueError as e:
            raise DerivationError(f"derivation {self.name!r}: invalid __json: {e}") from e
        if not isinstance(value, dict):
            raise DerivationError(f"derivation {self.name!r}: __json is not a JSON object")
        return value

    def _strings_attr(self, attr: str, where: dict[str, Any] | None = None) -> list[str] | None:
        """A list-of-strings attribute: from `where` (structured) or the env (space-split)."""
        if where is not None:
            if attr not in where or where[attr] is None:
                return None
            value = where[attr]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise DerivationError(
                    f"derivation {self.name!r}: attribute {attr!r} must be a list of strings"
                )
            return list(value)
        raw = self.env.get(attr)
        return None if raw is None else raw.split()

    @property
    def declared_system_features(self) -> set[str]:
        """`requiredSystemFeatures` as written (env string or structured-attrs list)."""
        sa = self.structured_attrs
        return set(
            self._strings_attr("requiredSystemFeatures", sa if sa is not None else None) or []
        )

    @property
    def required_system_features(self) -> set[str]:
        """System features a builder must have, as Nix computes them.

        The declared `requiredSystemFeatures` (space-separated env entry, or a list in
        structured attrs) plus `ca-derivations` when output paths are not known in advance
        (floating content-addressed, deferred or impure outputs).
        """
        features = self.declared_system_features
        if not self.has_known_output_paths:
            features.add("ca-derivations")
        return features

    # -- output kinds ---------------------------------------------------------------------

    @property
    def has_known_output_paths(self) -> bool:
        """True when every output path is fixed in the derivation itself."""
        return all(o.kind in ("inputAddressed", "caFixed") for o in self.outputs.values())

    @property
    def is_fixed_output(self) -> bool:
        """True for a fixed-output derivation (its outputs are all caFixed)."""
        return bool(self.outputs) and all(o.kind == "caFixed" for o in self.outputs.values())

    @property
    def is_content_addressed(self) -> bool:
        """True for fixed-output or floating content-addressed derivations."""
        return bool(self.outputs) and all(
            o.kind in ("caFixed", "caFloating") for o in self.outputs.values()
        )

    @property
    def is_impure(self) -> bool:
        """True for impure derivations."""
        return any(o.kind == "impure" for o in self.outputs.values())

    # -- output checks --------------------------------------------------------------------

    def output_checks(self, output: str = "out") -> OutputChecks:
        """Reference restrictions for `output`, from the env or structured `outputChecks`."""
        sa = self.structured_attrs
        if sa is None:
            values = [self._strings_attr(a) for a in _CHECK_ATTRS]
            values.append(self._size_attr(self.env.get("maxClosureSize")))
        else:
            checks = sa.get("outputChecks") or {}
            if not isinstance(checks, dict):
                raise DerivationError(f"derivation {self.name!r}: outputChecks is not an object")
            per_output = checks.get(output)
            if per_output is None:
                return OutputChecks()
            if not isinstance(per_output, dict):
                raise DerivationError(
                    f"derivation {self.name!r}: outputChecks.{output} is not an object"
                )
            values = [self._strings_attr(a, per_output) for a in _CHECK_ATTRS]
            values.append(self._size_attr(per_output.get("maxClosureSize")))
        return OutputChecks(*values)

    def _size_attr(self, value: Any) -> int | None:
        """A size limit in bytes (maxClosureSize): an integer, or its decimal text in the env."""
        if value is None:
            return None
        try:
            size = int(value)
        except (TypeError, ValueError):
            raise DerivationError(
                f"derivation {self.name!r}: maxClosureSize {value!r} is not a number of bytes"
            ) from None
        if isinstance(value, bool) or size < 0:
            raise DerivationError(f"derivation {self.name!r}: maxClosureSize {value!r} is invalid")
        return size

    def allowed_references(self, output: str = "out") -> list[str] | None:
        """`allowedReferences` of `output` (None = unrestricted)."""
        return self.output_checks(output).allowed_references

    def disallowed_references(self, output: str = "out") -> list[str] | None:
        """`disallowedReferences` of `output`."""
        return self.output_checks(output).disallowed_references

    def allowed_requisites(self, output: str = "out") -> list[str] | None:
        """`allowedRequisites` of `output` (None = unrestricted)."""
        return self.output_checks(output).allowed_requisites

    def disallowed_requisites(self, output: str = "out") -> list[str] | None:
        """`disallowedRequisites` of `output`."""
        return self.output_checks(output).disallowed_requisites


# --- parser --------------------------------------------------------------------------------

_PLAIN = re.compile(rb'[^"\\]*')
_ESCAPES = {ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t"}


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def fail(self, problem: str) -> DerivationError:
        return DerivationError(f"invalid derivation: {problem} at offset {self.pos}")

    def peek(self, token: bytes) -> bool:
        return self.data.startswith(token, self.pos)

    def expect(self, token: bytes) -> None:
        if not self.data.startswith(token, self.pos):
            got = self.data[self.pos : self.pos + 20]
            raise self.fail(f"expected {token.decode()!r}, got {got!r}")
        self.pos += len(token)

    def string(self) -> str:
        self.expect(b'"')
        out = bytearray()
        data = self.data
        while True:
            m = _PLAIN.match(data, self.pos)
            assert m is not None
            out += m.group()
            self.pos = m.end()
            if self.pos >= len(data):
                raise self.fail("unterminated string")
            if data[self.pos] == ord('"'):
                self.pos += 1
                return _decode(bytes(out))
            # backslash escape
            if self.pos + 1 >= len(data):
                raise self.fail("unterminated string")
            c = data[self.pos + 1]
            out += _ESCAPES.get(c, bytes([c]))
            self.pos += 2

    def path(self, what: str) -> str:
        start = self.pos
        s = self.string()
        if not s.startswith("/"):
            self.pos = start
            raise self.fail(f"bad path {s!r} in {what}")
        return s

    def store_path(self, what: str) -> str:
        start = self.pos
        s = self.path(what)
        try:
            return validate_store_path(s)
        except InvalidStorePath as e:
            self.pos = start
            raise self.fail(f"{what}: {e}") from e

    def list_of(self, item):  # type: ignore[no-untyped-def]
        self.expect(b"[")
        items = []
        first = True
        while not self.peek(b"]"):
            if not first:
                self.expect(b",")
            first = False
            items.append(item())
        self.pos += 1
        return items

    def strings(self) -> list[str]:
        return self.list_of(self.string)

    def map_of(self, item, what: str) -> dict:  # type: ignore[no-untyped-def]
        """A list of (key, value) items as a dict; a repeated key is an error naming ``what``."""
        result: dict = {}
        for key, value in self.list_of(item):
            if key in result:
                raise self.fail(f"duplicate {what} {key!r}")
            result[key] = value
        return result


def _hash_hex(raw: str, algo: str) -> str:
    """Base-16 form of a hash written in base 16, nix32 or base 64."""
    size = HASH_SIZES[algo]
    try:
        if len(raw) == 2 * size:
            return bytes.fromhex(raw).hex()
        if len(raw) == nix32_len(size):
            return nix32_decode(raw).hex()
        decoded = base64.b64decode(raw, validate=True)
        if len(decoded) == size:
            return decoded.hex()
    except (ValueError, binascii.Error):
        pass
    raise ValueError(f"invalid {algo} hash {raw!r}")


def _output_path_name(drv_name: str, output: str) -> str:
    return drv_name if output == "out" else f"{drv_name}-{output}"


def _parse_output(r: _Reader, drv_name: str | None) -> tuple[str, DerivationOutput]:
    r.expect(b"(")
    start = r.pos
    out_name = r.string()
    if not out_name:
        r.pos = start
        raise r.fail("empty output name")
    r.expect(b",")
    path_pos = r.pos
    path = r.string()
    r.expect(b",")
    algo_field = r.string()
    r.expect(b",")
    hash_field = r.string()
    r.expect(b")")
    end = r.pos
    r.pos = path_pos

    def check_path() -> str:
        try:
            return validate_store_path(path)
        except InvalidStorePath as e:
            raise r.fail(f"output {out_name!r}: {e}") from e

    if algo_field:
        method = "flat"
        algo = algo_field
        for prefix, m in METHOD_PREFIXES.items():
            if algo_field.startswith(prefix):
                method, algo = m, algo_field[len(prefix) :]
                break
        if algo not in HASH_SIZES:
            raise r.fail(f"output {out_name!r}: unknown hash algorithm {algo_field!r}")
        if hash_field == "impure":
            if path:
                raise r.fail(f"impure output {out_name!r} must not specify an output path")
            output = DerivationOutput("impure", None, algo, None, method)
        elif hash_field:
            try:
                hex_hash = _hash_hex(hash_field, algo)
            except ValueError as e:
                raise r.fail(f"output {out_name!r}: {e}") from e
            check_path()
            name = drv_name
            if name is None:
                base = store_path_name(path)
                suffix = "" if out_name == "out" else f"-{out_name}"
                name = base[: len(base) - len(suffix)] if base.endswith(suffix) else base
            if method != "git":
                expected = make_fixed_output_path(
                    method, algo, hex_hash, _output_path_name(name, out_name)
                )
                if expected != path:
                    raise r.fail(
                        f"fixed-output {out_name!r} path {path!r} does not match its content"
                        f" address (expected {expected!r})"
                    )
            output = DerivationOutput("caFixed", path, algo, hash_field, method)
        else:
            if path:
                raise r.fail(f"floating CA output {out_name!r} must not specify an output path")
            output = DerivationOutput("caFloating", None, algo, None, method)
    else:
        if hash_field:
            raise r.fail(f"output {out_name!r} has a hash but no hash algorithm")
        if path:
            output = DerivationOutput("inputAddressed", check_path())
        else:
            output = DerivationOutput("deferred")
    r.pos = end
    return out_name, output


def _parse_outputs_node(r: _Reader, dynamic: bool) -> OutputsNode:
    if r.peek(b"("):
        if not dynamic:
            raise r.fail("dynamic derivation inputs need the 'xp-dyn-drv' derivation version")
        r.pos += 1
        outputs = r.strings()
        r.expect(b",")
        node = OutputsNode(set(outputs))

        def child() -> tuple[str, OutputsNode]:
            r.expect(b"(")
            name = r.string()
            r.expect(b",")
            sub = _parse_outputs_node(r, dynamic)
            r.expect(b")")
            return name, sub

        node.dynamic_outputs.update(r.map_of(child, "dynamic output"))
        r.expect(b")")
        return node
    return OutputsNode(set(r.strings()))


def parse_derivation(text: bytes | str, name: str | None = None) -> Derivation:
    """Parse an ATerm derivation.

    `name` (as in `<hash>-<name>.drv`) defaults to the `name` env entry or structured
    attribute; it is used to check fixed-output paths.

    Raises DerivationError naming the problem and its byte offset.
    """
    data = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else bytes(text)
    r = _Reader(data)
    version: str | None = None
    if r.peek(b"DrvWithVersion("):
        r.pos += len(b"DrvWithVersion(")
        version_pos = r.pos
        version = r.string()
        if version != DYN_DRV_VERSION:
            r.pos = version_pos
            raise r.fail(f"unknown derivation ATerm format version {version!r}")
        r.expect(b",")
    else:
        r.expect(b"Derive(")
    dynamic = version == DYN_DRV_VERSION

    # Fixed-output paths are checked against the name, which may only be in the env (after
    # the outputs): if it was not given, skip the outputs once to read the env first.
    outputs_start = r.pos
    drv_name = name
    if drv_name is None:
        r.list_of(lambda: _skip_output(r))
        drv_name = _name_from_env(_parse_rest(r, dynamic)[5])
        r.pos = outputs_start

    def output_item() -> tuple[str, DerivationOutput]:
        return _parse_output(r, drv_name)

    outputs: dict[str, DerivationOutput] = r.map_of(output_item, "output")
    input_drvs, input_srcs, platform, builder, args, env = _parse_rest(r, dynamic)
    r.expect(b")")
    if r.pos != len(data):
        raise r.fail("trailing data after the derivation")
    return Derivation(
        outputs, input_drvs, input_srcs, platform, builder, args, env, drv_name, version
    )


def _name_from_env(env: dict[str, str]) -> str | None:
    """The derivation name from the env, or from structured attrs."""
    if "name" in env:
        return env["name"]
    try:
        name = json.loads(env.get("__json", "{}")).get("name")
    except (ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None


def _skip_output(r: _Reader) -> None:
    r.expect(b"(")
    for i in range(4):
        if i:
            r.expect(b",")
        r.string()
    r.expect(b")")


def _parse_rest(
    r: _Reader, dynamic: bool
) -> tuple[dict[str, OutputsNode], list[str], str, str, list[str], dict[str, str]]:
    r.expect(b",")

    def input_drv() -> tuple[str, OutputsNode]:
        r.expect(b"(")
        path = r.store_path("input derivation")
        r.expect(b",")
        node = _parse_outputs_node(r, dynamic)
        r.expect(b")")
        return path, node

    input_drvs: dict[str, OutputsNode] = r.map_of(input_drv, "input derivation")
    r.expect(b",")
    input_srcs = r.list_of(lambda: r.store_path("input source"))
    r.expect(b",")
    platform = r.string()
    r.expect(b",")
    builder = r.string()
    r.expect(b",")
    args = r.strings()
    r.expect(b",")

    def env_item() -> tuple[str, str]:
        r.expect(b"(")
        key = r.string()
        r.expect(b",")
        value = r.string()
        r.expect(b")")
        return key, value

    env: dict[str, str] = r.map_of(env_item, "environment variable")
    return input_drvs, input_srcs, platform, builder, args, env


def read_derivation(path: str | Path) -> Derivation:
    """Read and parse a `.drv` file; the name comes from the file name `<hash>-<name>.drv`."""
    p = Path(path)
    base = p.name
    name = None
    if base.endswith(".drv") and len(base) > 38 and base[32] == "-":
        name = base[33:-4]
    return parse_derivation(p.read_bytes(), name)


# --- printer -------------------------------------------------------------------------------

_ESCAPE_OUT = str.maketrans({'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"})


def _q(s: str) -> str:
    return '"' + s.translate(_ESCAPE_OUT) + '"'


def _qlist(items: list[str] | set[str]) -> str:
    return "[" + ",".join(_q(s) for s in items) + "]"


def _node_aterm(node: OutputsNode) -> str:
    outs = _qlist(sorted(node.outputs))
    if not node.dynamic_outputs:
        return outs
    dyn = ",".join(f"({_q(k)},{_node_aterm(v)})" for k, v in sorted(node.dynamic_outputs.items()))
    return f"({outs},[{dyn}])"


def to_aterm(drv: Derivation) -> str:
    """Print `drv` in ATerm form (outputs/inputs/env in their stored order)."""
    parts = []
    for out_name, o in drv.outputs.items():
        path, algo, hash_ = o.aterm_fields()
        parts.append(f"({_q(out_name)},{_q(path)},{_q(algo)},{_q(hash_)})")
    outputs = "[" + ",".join(parts) + "]"
    inputs = ",".join(f"({_q(p)},{_node_aterm(n)})" for p, n in drv.input_drvs.items())
    env = ",".join(f"({_q(k)},{_q(v)})" for k, v in drv.env.items())
    body = ",".join(
        [
            outputs,
            f"[{inputs}]",
            _qlist(drv.input_srcs),
            _q(drv.platform),
            _q(drv.builder),
            _qlist(drv.args),
            f"[{env}]",
        ]
    )
    if drv.version is None:
        return f"Derive({body})"
    return f"DrvWithVersion({_q(drv.version)},{body})"


def to_aterm_bytes(drv: Derivation) -> bytes:
    """`to_aterm` encoded back to the original bytes (UTF-8 with surrogateescape)."""
    return to_aterm(drv).encode("utf-8", "surrogateescape")


# --- output paths (Nix's hashDerivationModulo) ---------------------------------------------


def _modulo_aterm(drv: Derivation, inputs: dict[str, set[str]], mask: bool) -> bytes:
    """``drv`` printed as Nix hashes it: input derivations replaced by ``inputs`` (hash
    -> output names); with ``mask``, output paths and the env entries named after
    outputs blanked."""
    masked = Derivation(
        outputs={
            name: DerivationOutput(o.kind, None if mask else o.path, o.hash_algo, o.hash, o.method)
            for name, o in drv.outputs.items()
        },
        input_drvs={h: OutputsNode(set(names)) for h, names in sorted(inputs.items())},
        input_srcs=drv.input_srcs,
        platform=drv.platform,
        builder=drv.builder,
        args=drv.args,
        env={k: "" if mask and k in drv.outputs else v for k, v in drv.env.items()},
        name=drv.name,
        version=drv.version,
    )
    return to_aterm_bytes(masked)


def hash_derivation_modulo(
    drv: Derivation,
    resolve: Any,
    mask_outputs: bool = True,
    memo: dict[str, dict[str, str]] | None = None,
) -> dict[str, str]:
    """Nix's ``hashDerivationModulo``: output name -> base-16 sha256. ``mask_outputs``:
    as for the derivation's own output paths (its inputs are hashed unmasked).

    ``resolve(drv_path)`` returns the parsed input derivation at that path. Only
    input-addressed and fixed-output derivations, without dynamic inputs, are
    supported (DerivationError otherwise): their output paths do not depend on a
    build."""
    if drv.version is not None or any(n.dynamic_outputs for n in drv.input_drvs.values()):
        raise DerivationError(f"derivation {drv.name!r}: dynamic derivations are not supported")
    if drv.is_fixed_output:
        hashes = {}
        for name, o in drv.outputs.items():
            assert o.hash_algo is not None and o.hash is not None and o.path is not None
            prefix = {"nar": "r:", "text": "text:", "git": "git:"}.get(o.method or "", "")
            text = f"fixed:out:{prefix}{o.hash_algo}:{_hash_hex(o.hash, o.hash_algo)}:{o.path}"
            hashes[name] = hashlib.sha256(text.encode()).hexdigest()
        return hashes
    wanted = "deferred" if mask_outputs else "inputAddressed"
    if not drv.outputs or not all(
        o.kind in ("inputAddressed", wanted) for o in drv.outputs.values()
    ):
        raise DerivationError(
            f"derivation {drv.name!r}: output paths that are not fixed in advance "
            "(content-addressed, deferred or impure outputs) are not supported"
        )
    memo = {} if memo is None else memo
    inputs: dict[str, set[str]] = {}
    for path, node in drv.input_drvs.items():
        if path not in memo:
            memo[path] = hash_derivation_modulo(resolve(path), resolve, False, memo)
        for out in node.outputs:
            if out not in memo[path]:
                raise DerivationError(f"derivation {drv.name!r}: {path} has no output {out!r}")
            inputs.setdefault(memo[path][out], set()).add(out)
    digest = hashlib.sha256(_modulo_aterm(drv, inputs, mask_outputs)).hexdigest()
    return {name: digest for name in drv.outputs}


def input_addressed_output_paths(
    drv: Derivation, resolve: Any, memo: dict[str, dict[str, str]] | None = None
) -> dict[str, str]:
    """The output paths Nix computes for the input-addressed ``drv`` (name -> path);
    ``resolve`` as for :func:`hash_derivation_modulo`, ``memo`` (input .drv path ->
    its hashes) kept between calls spares hashing shared inputs again."""
    if drv.name is None:
        raise DerivationError("derivation without a name: its output paths are unknown")
    if drv.is_fixed_output:
        raise DerivationError(f"derivation {drv.name!r} is fixed-output, not input-addressed")
    hashes = hash_derivation_modulo(drv, resolve, True, memo)
    return {
        name: make_store_path(f"output:{name}", digest, _output_path_name(drv.name, name))
        for name, digest in hashes.items()
    }
