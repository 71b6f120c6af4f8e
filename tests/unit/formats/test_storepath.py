"""Store path validation and nix32, checked against Nix's fixtures and known values."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from recnix.formats.storepath import (
    NIX32_ALPHABET,
    InvalidStorePath,
    base16_to_nix32,
    hash_part,
    is_store_path,
    make_fixed_output_path,
    nix32_decode,
    nix32_encode,
    nix32_to_base16,
    store_path_name,
    to_store_path,
    validate_store_path,
)

FIXTURES = Path(
    os.environ.get(
        "RECNIX_FIXTURES", Path(__file__).parents[3].parent / "shared/fixtures/nix-upstream"
    )
)
H = "g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q"


def test_fixture_store_path_is_valid() -> None:
    simple = FIXTURES / "store-path/simple.json"
    if not simple.is_file():
        pytest.fail(f"Nix fixtures missing: {simple} (set RECNIX_FIXTURES)")
    base = json.loads(simple.read_text())
    path = validate_store_path("/nix/store/" + base)
    assert hash_part(path) == H
    assert store_path_name(path) == "foo.drv"


@pytest.mark.parametrize(
    "name", ["a", "foo-1.0", "x" * 211, "A+b._?=-", "-leading-dash", "foo..bar"]
)
def test_valid_names(name: str) -> None:
    assert is_store_path(f"/nix/store/{H}-{name}")


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        (f"/nix/stor/{H}-foo", "is not in the Nix store"),
        (f"nix/store/{H}-foo", "is not in the Nix store"),
        (f"/nix/store/{H}-foo/bin", "contains '/'"),
        (f"/nix/store/{H}-", "lacks a 32-character hash part"),
        (f"/nix/store/{H}foo", "lacks a 32-character hash part"),
        (f"/nix/store/{H[:31]}-foo", "lacks a 32-character hash part"),
        (f"/nix/store/{H[:31]}e-foo", "hash part that is not nix32"),
        (f"/nix/store/{H[:31]}G-foo", "hash part that is not nix32"),
        (f"/nix/store/{H}-.hidden", "name starts with '.'"),
        (f"/nix/store/{H}-..", "name starts with '.'"),
        (f"/nix/store/{H}-{'x' * 212}", "longer than 211"),
        (f"/nix/store/{H}-a b", "forbidden character ' '"),
        (f"/nix/store/{H}-caf\u00e9", "forbidden character"),
        (f"/nix/store/{H}-a\0", "forbidden character"),
        ("/nix/store/", "lacks"),
    ],
)
def test_invalid_paths(path: str, problem: str) -> None:
    with pytest.raises(InvalidStorePath) as exc:
        validate_store_path(path)
    assert problem in str(exc.value)
    assert repr(path)[:40] in str(exc.value) or problem == "longer than 211"
    assert not is_store_path(path)


def test_non_str_rejected() -> None:
    assert not is_store_path(b"/nix/store/x")
    assert not is_store_path(None)


def test_to_store_path() -> None:
    assert to_store_path(f"/nix/store/{H}-y/bin/foo") == f"/nix/store/{H}-y"
    assert to_store_path(f"/nix/store/{H}-y") == f"/nix/store/{H}-y"
    with pytest.raises(InvalidStorePath):
        to_store_path("/tmp/x")
    with pytest.raises(InvalidStorePath):
        to_store_path("/nix/store/short-y/bin")


def test_nix32_known_value() -> None:
    # `nix-hash --type sha256 --flat --base32` of a file containing "hello"
    digest = hashlib.sha256(b"hello").digest()
    assert nix32_encode(digest) == "094qif9n4cq4fdg459qzbhg1c6wywawwaaivx0k0x8xhbyx4vwic"
    assert base16_to_nix32(digest.hex()) == "094qif9n4cq4fdg459qzbhg1c6wywawwaaivx0k0x8xhbyx4vwic"
    assert nix32_to_base16("094qif9n4cq4fdg459qzbhg1c6wywawwaaivx0k0x8xhbyx4vwic") == digest.hex()


@given(st.binary(min_size=1, max_size=70))
def test_nix32_round_trip(data: bytes) -> None:
    enc = nix32_encode(data)
    assert set(enc) <= set(NIX32_ALPHABET)
    assert nix32_decode(enc) == data


def test_nix32_decode_rejects() -> None:
    with pytest.raises(ValueError, match="character"):
        nix32_decode("e" * 52)
    with pytest.raises(ValueError, match="length"):
        nix32_decode("0" * 51)
    with pytest.raises(ValueError, match="excess bits"):
        nix32_decode("z" + "0" * 51)  # sha256: top digit can only hold 1 bit


def test_fixed_output_path_matches_nix_fixture() -> None:
    # hash-modulo/source-first.drv: recursive sha256 output named "source"
    h = "894517c9163c896ec31a2adbd33c0681fd5f45b2c0ef08a64c92a03fb97f390f"
    assert make_fixed_output_path("nar", "sha256", h, "source") == (
        "/nix/store/i00sflxqsj37lfmf95m8mn0grv615hpj-source"
    )


def test_content_address_paths_as_nix_2_8_names_them() -> None:
    """`builtins.toFile "f" "hi"` (text) and a recursive sha256 fixed output of all
    zeros, as Nix 2.8 named them; references enter a text path's name."""
    from recnix.formats.storepath import content_address_path, make_text_path

    text_ca = "text:sha256:" + nix32_encode(hashlib.sha256(b"hi").digest())
    f = "/nix/store/2qrhg0a6v2d6nsxncds6y3pc4l36n9xj-f"
    assert content_address_path(text_ca, "f", [], f) == f
    assert make_text_path("f", b"hi", []) == f
    assert content_address_path(text_ca, "f", [f"/nix/store/{H}-x"], f) != f
    fo = "/nix/store/j6pcdwmw2hmiy97jvz23dzwnapj7aj4g-fo"
    assert content_address_path("fixed:r:sha256:" + "0" * 52, "fo", [], fo) == fo
    assert content_address_path("fixed:r:sha256:" + "0" * 64, "fo", [], fo) == fo
    # a self-reference is named ":self", not by the path itself
    with_self = content_address_path("fixed:r:sha256:" + "0" * 52, "fo", [fo], fo)
    assert with_self not in (fo, content_address_path("fixed:r:sha256:" + "0" * 52, "fo", [], f))


@pytest.mark.parametrize(
    "ca",
    ["text:sha1:" + "0" * 32, "fixed:sha256:" + "0" * 51, "git:sha1:" + "0" * 40, "fixed:crc:00"],
)
def test_content_address_path_refuses_what_nix_does_not_name(ca: str) -> None:
    from recnix.formats.storepath import content_address_path

    with pytest.raises(ValueError):
        content_address_path(ca, "x", [], f"/nix/store/{H}-x")


def test_flat_content_address_cannot_have_references() -> None:
    from recnix.formats.storepath import content_address_path

    with pytest.raises(ValueError, match="cannot have references"):
        content_address_path("fixed:sha256:" + "0" * 52, "x", [f"/nix/store/{H}-y"], "")
