"""Nix's store path signatures: Ed25519 over a path's fingerprint, checked against
``trusted-public-keys`` (standard library only: the ssh proxy runs in the build hook).

A key is written ``name:<base64 of 32 bytes>``, a signature ``name:<base64 of 64
bytes>``; the signed text is ``1;<path>;sha256:<nix32 NAR hash>;<NAR size>;<sorted
references, comma-separated>``. Verification follows RFC 8032 (section 5.1.7,
cofactorless): it says whether the holder of the secret key signed exactly this
fingerprint. It is slow (a few milliseconds) but runs only for paths a remote builder
offers beyond the outputs it was asked for.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable

from recnix.formats.storepath import base16_to_nix32

_P = 2**255 - 19
_L = 2**252 + 27742317777372353535851937790883648493
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)

_Point = tuple[int, int, int, int]  # extended coordinates (X, Y, Z, T), x = X/Z, y = Y/Z


def _add(a: _Point, b: _Point) -> _Point:
    """Point addition on edwards25519 (RFC 8032 5.1.4; also doubles)."""
    x1, y1, z1, t1 = a
    x2, y2, z2, t2 = b
    aa = (y1 - x1) * (y2 - x2) % _P
    bb = (y1 + x1) * (y2 + x2) % _P
    cc = 2 * _D * t1 * t2 % _P
    dd = 2 * z1 * z2 % _P
    e, f, g, h = bb - aa, dd - cc, dd + cc, bb + aa
    return e * f % _P, g * h % _P, f * g % _P, e * h % _P


def _mul(scalar: int, point: _Point) -> _Point:
    result: _Point = (0, 1, 1, 0)
    while scalar:
        if scalar & 1:
            result = _add(result, point)
        point = _add(point, point)
        scalar >>= 1
    return result


def _decode_point(raw: bytes) -> _Point | None:
    """The point encoded in 32 bytes, or None if they encode none."""
    if len(raw) != 32:
        return None
    y = int.from_bytes(raw, "little")
    sign = y >> 255
    y &= (1 << 255) - 1
    if y >= _P:
        return None
    x2 = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P) % _P
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P:
        x = x * _SQRT_M1 % _P
    if (x * x - x2) % _P:
        return None
    if x == 0 and sign:
        return None
    if x & 1 != sign:
        x = _P - x
    return x, y, 1, x * y % _P


def _same(a: _Point, b: _Point) -> bool:
    return (a[0] * b[2] - b[0] * a[2]) % _P == 0 and (a[1] * b[2] - b[1] * a[2]) % _P == 0


_BASE = _decode_point((4 * pow(5, _P - 2, _P) % _P).to_bytes(32, "little"))
assert _BASE is not None


def ed25519_verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` (64 bytes) is ``public_key``'s (32 bytes) over ``message``."""
    if len(signature) != 64:
        return False
    a = _decode_point(public_key)
    r = _decode_point(signature[:32])
    s = int.from_bytes(signature[32:], "little")
    if a is None or r is None or s >= _L:
        return False
    k = int.from_bytes(hashlib.sha512(signature[:32] + public_key + message).digest(), "little")
    assert _BASE is not None
    return _same(_mul(s, _BASE), _add(r, _mul(k % _L, a)))


# --- Nix's keys and fingerprints --------------------------------------------------------------


def parse_public_keys(keys: Iterable[str]) -> dict[str, bytes]:
    """``trusted-public-keys`` entries (``name:base64``) as name -> 32-byte key; malformed
    entries are left out, as Nix leaves out keys it cannot use."""
    parsed: dict[str, bytes] = {}
    for entry in keys:
        name, sep, data = entry.strip().partition(":")
        if not sep or not name:
            continue
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            continue
        if len(raw) == 32:
            parsed[name] = raw
    return parsed


def fingerprint(path: str, nar_hash_hex: str, nar_size: int, references: Iterable[str]) -> bytes:
    """The text Nix signs for a store path (``ValidPathInfo::fingerprint``)."""
    refs = ",".join(sorted(set(references)))
    return f"1;{path};sha256:{base16_to_nix32(nar_hash_hex)};{nar_size};{refs}".encode()


def signed_by(
    path: str,
    nar_hash_hex: str,
    nar_size: int,
    references: Iterable[str],
    sigs: Iterable[str],
    keys: dict[str, bytes],
) -> str | None:
    """The name of a key in ``keys`` with a valid signature among ``sigs`` over the
    path's fingerprint, or None."""
    message = fingerprint(path, nar_hash_hex, nar_size, references)
    for sig in sigs:
        name, sep, data = sig.partition(":")
        if not sep or name not in keys:
            continue
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            continue
        if ed25519_verify(keys[name], message, raw):
            return name
    return None


def secret_key_public_parts(files: Iterable[str]) -> dict[str, bytes]:
    """Public keys of nix.conf's ``secret-key-files`` (Nix trusts them too): a secret key
    ``name:<base64 of seed and public key>`` ends with its 32-byte public key."""
    parsed: dict[str, bytes] = {}
    for file in files:
        try:
            with open(file, encoding="ascii") as f:
                name, sep, data = f.read().strip().partition(":")
            raw = base64.b64decode(data, validate=True)
        except (OSError, UnicodeDecodeError, binascii.Error, ValueError):
            continue
        if sep and name and len(raw) == 64:
            parsed[name] = raw[32:]
    return parsed


def trusted_keys(settings: dict[str, object]) -> dict[str, bytes]:
    """The keys Nix trusts given its settings (``nix show-config --json`` values):
    ``trusted-public-keys`` and the public parts of ``secret-key-files``."""

    def words(value: object) -> list[str]:
        if isinstance(value, str):
            return value.split()
        if isinstance(value, list):
            return [v for v in value if isinstance(v, str)]
        return []

    keys = parse_public_keys(words(settings.get("trusted-public-keys")))
    keys.update(secret_key_public_parts(words(settings.get("secret-key-files"))))
    return keys
