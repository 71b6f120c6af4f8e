"""Store paths: validation (NI §6.4), hash parts, Nix's base-32 ("nix32") encoding."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

STORE_DIR = "/nix/store"
STORE_PREFIX = STORE_DIR + "/"
NIX32_ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
HASH_PART_LEN = 32
MAX_NAME_LEN = 211

_NIX32_INDEX = {c: i for i, c in enumerate(NIX32_ALPHABET)}
_NAME_RE = re.compile(r"[A-Za-z0-9+._?=-]+")
_HASH_PART_RE = re.compile(f"[{NIX32_ALPHABET}]{{{HASH_PART_LEN}}}")


class InvalidStorePath(ValueError):
    """A string that is not a valid store path."""


def _name_problem(name: str) -> str | None:
    """Why `name` is not a valid store path name, or None when it is."""
    if not name:
        return "empty name"
    if len(name) > MAX_NAME_LEN:
        return f"name longer than {MAX_NAME_LEN} characters"
    if name.startswith("."):
        return "name starts with '.'"
    if not _NAME_RE.fullmatch(name):
        bad = next(c for c in name if not _NAME_RE.fullmatch(c))
        return f"name contains forbidden character {bad!r}"
    return None


def validate_store_path(s: str) -> str:
    """Return `s` unchanged if it is a valid store path, else raise InvalidStorePath."""
    if not isinstance(s, str):
        raise InvalidStorePath(f"store path must be a str, not {type(s).__name__}")
    if not s.startswith(STORE_PREFIX):
        raise InvalidStorePath(f"path {s!r} is not in the Nix store {STORE_DIR}")
    base = s[len(STORE_PREFIX) :]
    if "/" in base:
        raise InvalidStorePath(f"path {s!r} is not a top-level store path (contains '/')")
    hash_part_ = base[:HASH_PART_LEN]
    if len(base) < HASH_PART_LEN + 2 or base[HASH_PART_LEN] != "-":
        raise InvalidStorePath(
            f"path {s!r} lacks a 32-character hash part followed by '-' and a name"
        )
    if not _HASH_PART_RE.fullmatch(hash_part_):
        raise InvalidStorePath(f"path {s!r} has a hash part that is not nix32")
    problem = _name_problem(base[HASH_PART_LEN + 1 :])
    if problem:
        raise InvalidStorePath(f"path {s!r}: {problem}")
    return s


def is_store_path(s: object) -> bool:
    """True if `s` is a valid top-level store path string."""
    try:
        validate_store_path(s)  # type: ignore[arg-type]
    except InvalidStorePath:
        return False
    return True


def hash_part(path: str) -> str:
    """The 32-character nix32 hash part of a valid store path."""
    validate_store_path(path)
    return path[len(STORE_PREFIX) : len(STORE_PREFIX) + HASH_PART_LEN]


def store_path_name(path: str) -> str:
    """The name part (after `<hash>-`) of a valid store path."""
    validate_store_path(path)
    return path[len(STORE_PREFIX) + HASH_PART_LEN + 1 :]


def to_store_path(s: str) -> str:
    """The store path containing `s` (`/nix/store/x-y/bin/foo` → `/nix/store/x-y`)."""
    if not s.startswith(STORE_PREFIX):
        raise InvalidStorePath(f"path {s!r} is not in the Nix store {STORE_DIR}")
    top = s[len(STORE_PREFIX) :].split("/", 1)[0]
    return validate_store_path(STORE_PREFIX + top)


# --- nix32 -------------------------------------------------------------------------------


def nix32_len(nbytes: int) -> int:
    """Length of the nix32 encoding of `nbytes` bytes."""
    return (nbytes * 8 - 1) // 5 + 1 if nbytes else 0


def nix32_encode(data: bytes) -> str:
    """Encode bytes as Nix prints hashes in base 32 (least significant bits last)."""
    size = len(data)
    out = []
    for n in range(nix32_len(size) - 1, -1, -1):
        b = n * 5
        i, j = divmod(b, 8)
        c = data[i] >> j
        if i + 1 < size:
            c |= data[i + 1] << (8 - j)
        out.append(NIX32_ALPHABET[c & 0x1F])
    return "".join(out)


def nix32_decode(s: str) -> bytes:
    """Decode a nix32 string into bytes; ValueError on bad characters or padding bits."""
    size = len(s) * 5 // 8
    if nix32_len(size) != len(s):
        raise ValueError(f"invalid nix32 length {len(s)}")
    out = bytearray(size)
    for n, ch in enumerate(s):
        digit = _NIX32_INDEX.get(ch)
        if digit is None:
            raise ValueError(f"invalid nix32 character {ch!r}")
        b = (len(s) - n - 1) * 5
        i, j = divmod(b, 8)
        out[i] |= (digit << j) & 0xFF
        carry = digit >> (8 - j)
        if i + 1 < size:
            out[i + 1] |= carry
        elif carry:
            raise ValueError(f"invalid nix32 string {s!r} (excess bits)")
    return bytes(out)


def base16_to_nix32(hex_digest: str) -> str:
    """Convert a base-16 digest (e.g. sha256) into nix32."""
    return nix32_encode(bytes.fromhex(hex_digest))


def nix32_to_base16(s: str) -> str:
    """Convert a nix32 digest into base 16."""
    return nix32_decode(s).hex()


def compress_hash(digest: bytes, size: int = 20) -> bytes:
    """Nix's `compressHash`: XOR-fold a digest into `size` bytes."""
    out = bytearray(size)
    for i, byte in enumerate(digest):
        out[i % size] ^= byte
    return bytes(out)


def make_store_path(type_: str, inner_sha256_hex: str, name: str) -> str:
    """Nix's `makeStorePath(type, sha256 hash, name)` for the /nix/store directory."""
    fingerprint = f"{type_}:sha256:{inner_sha256_hex}:{STORE_DIR}:{name}"
    digest = hashlib.sha256(fingerprint.encode()).digest()
    return f"{STORE_PREFIX}{nix32_encode(compress_hash(digest))}-{name}"


def make_fixed_output_path(method: str, hash_algo: str, hash_hex: str, name: str) -> str:
    """Store path of a fixed-output store object without references.

    `method` is "flat", "nar" or "text"; `hash_algo` e.g. "sha256"; `hash_hex` base 16.
    """
    if method == "text":
        if hash_algo != "sha256":
            raise ValueError("text-hashed store objects must use sha256")
        return make_store_path("text", hash_hex, name)
    if method == "nar" and hash_algo == "sha256":
        return make_store_path("source", hash_hex, name)
    if method not in ("flat", "nar"):
        raise ValueError(f"unsupported content-address method {method!r}")
    prefix = "r:" if method == "nar" else ""
    inner = hashlib.sha256(f"fixed:out:{prefix}{hash_algo}:{hash_hex}:".encode()).hexdigest()
    return make_store_path("output:out", inner, name)


def make_type(type_: str, references: Iterable[str], self_path: str | None = None) -> str:
    """Nix's ``makeType``: ``type`` then ``:<reference>`` for each reference (sorted),
    then ``:self`` if ``self_path`` is among them (it is left out of the list)."""
    refs = sorted(set(references))
    has_self = self_path is not None and self_path in refs
    return ":".join([type_, *(r for r in refs if r != self_path)] + (["self"] if has_self else []))


def make_text_path(name: str, text: bytes, references: Iterable[str]) -> str:
    """Store path of a text-hashed object (a ``.drv``, ``builtins.toFile``): Nix's
    ``makeTextPath`` over the sha256 of ``text`` and its references."""
    return make_store_path(make_type("text", references), hashlib.sha256(text).hexdigest(), name)


def content_address_path(ca: str, name: str, references: Iterable[str], path: str) -> str:
    """The store path that content address ``ca`` (``text:sha256:<h>``,
    ``fixed:r:<algo>:<h>``, ``fixed:<algo>:<h>``; ``<h>`` nix32 or base 16) and
    ``references`` give a path named ``name`` (``path`` may refer to itself).

    Raises ValueError for a content address Nix would not name a path by."""
    method, _, rest = ca.partition(":")
    if method == "text":
        algo, _, digest = rest.partition(":")
        if algo != "sha256" or path in references:
            raise ValueError(f"invalid text content address {ca!r}")
        return make_store_path(make_type("text", references), _digest_hex(digest, 32), name)
    if method != "fixed":
        raise ValueError(f"unknown content-address method in {ca!r}")
    recursive = rest.startswith("r:")
    algo, _, digest = rest.removeprefix("r:").partition(":")
    size = {"md5": 16, "sha1": 20, "sha256": 32, "sha512": 64}.get(algo)
    if size is None:
        raise ValueError(f"unknown hash algorithm in {ca!r}")
    hex_digest = _digest_hex(digest, size)
    if recursive and algo == "sha256":
        return make_store_path(make_type("source", references, path), hex_digest, name)
    if list(references):
        raise ValueError(f"a path with content address {ca!r} cannot have references")
    return make_fixed_output_path("nar" if recursive else "flat", algo, hex_digest, name)


def _digest_hex(digest: str, size: int) -> str:
    if len(digest) == 2 * size:
        return bytes.fromhex(digest).hex()
    if len(digest) == nix32_len(size):
        return nix32_decode(digest).hex()
    raise ValueError(f"invalid digest {digest!r}")
