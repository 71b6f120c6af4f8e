"""recnix.formats.signatures: Ed25519 verification and Nix's path fingerprints."""

from __future__ import annotations

import base64
import os

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from recnix.formats.signatures import (
    ed25519_verify,
    fingerprint,
    parse_public_keys,
    signed_by,
)

PATH = "/nix/store/" + "a" * 32 + "-x"
REF = "/nix/store/" + "b" * 32 + "-y"
NAR_HASH = "00" * 31 + "01"


def _keypair() -> tuple[Ed25519PrivateKey, bytes]:
    key = Ed25519PrivateKey.generate()
    return key, key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def test_rfc_8032_test_vector_1() -> None:
    """RFC 8032 section 7.1, TEST 1 (the empty message)."""
    public = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
    sig = bytes.fromhex(
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
    )
    assert ed25519_verify(public, b"", sig)
    assert not ed25519_verify(public, b"x", sig)


@settings(max_examples=20, deadline=None)
@given(st.binary(max_size=200))
def test_verifies_what_an_independent_implementation_signs(message: bytes) -> None:
    key, public = _keypair()
    sig = key.sign(message)
    assert ed25519_verify(public, message, sig)
    assert not ed25519_verify(public, message + b"\0", sig)
    flipped = bytes([sig[0] ^ 1]) + sig[1:]
    assert not ed25519_verify(public, message, flipped)
    assert not ed25519_verify(_keypair()[1], message, sig)


def test_malformed_inputs_are_not_valid() -> None:
    key, public = _keypair()
    sig = key.sign(b"m")
    assert not ed25519_verify(public, b"m", sig[:63])
    assert not ed25519_verify(public[:31], b"m", sig)
    # s >= L is refused (malleability)
    big_s = sig[:32] + (2**256 - 1).to_bytes(32, "little")
    assert not ed25519_verify(public, b"m", big_s)


def test_fingerprint_is_nix_s() -> None:
    """``1;path;sha256:<nix32>;size;sorted refs`` (store-api.cc, fingerprint)."""
    text = fingerprint(PATH, NAR_HASH, 120, [REF, PATH])
    nix32 = text.decode().split(";")[2]
    assert nix32.startswith("sha256:") and len(nix32) == 7 + 52
    assert text.decode() == f"1;{PATH};{nix32};120;{PATH},{REF}"


def test_signed_by_a_trusted_key_only() -> None:
    key, public = _keypair()
    other, other_public = _keypair()
    message = fingerprint(PATH, NAR_HASH, 8, [REF])
    sig = "cache-1:" + base64.b64encode(key.sign(message)).decode()
    trusted = parse_public_keys(["cache-1:" + base64.b64encode(public).decode()])
    assert signed_by(PATH, NAR_HASH, 8, [REF], [sig], trusted) == "cache-1"
    # other references, size, or a key of the same name but other bytes: not signed
    assert signed_by(PATH, NAR_HASH, 8, [], [sig], trusted) is None
    assert signed_by(PATH, NAR_HASH, 9, [REF], [sig], trusted) is None
    impostor = parse_public_keys(["cache-1:" + base64.b64encode(other_public).decode()])
    assert signed_by(PATH, NAR_HASH, 8, [REF], [sig], impostor) is None
    # a valid signature under a name not trusted
    renamed = "cache-2:" + sig.split(":", 1)[1]
    assert signed_by(PATH, NAR_HASH, 8, [REF], [renamed], trusted) is None


@pytest.mark.parametrize("entry", ["nocolon", ":AAAA", "k:not base64!", "k:" + "A" * 10])
def test_unusable_keys_are_left_out(entry: str) -> None:
    good = "good:" + base64.b64encode(os.urandom(32)).decode()
    assert list(parse_public_keys([entry, good])) == ["good"]
