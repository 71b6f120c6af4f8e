"""recnix.remote.remotetrust: which paths an ssh-ng:// builder sends back are imported."""

from __future__ import annotations

import asyncio
import base64
import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from recnix.formats.derivation import parse_derivation
from recnix.formats.signatures import fingerprint
from recnix.formats.storepath import make_text_path, nix32_encode
from recnix.protocol import PathInfo
from recnix.remote.remotetrust import (
    SETTING,
    TrustCheck,
    UntrustedPath,
    builder_trusted,
    ssh_destination,
)

H = "/nix/store/" + "0" * 31
PLANTED = "/nix/store/" + "a" * 32 + "-openssl-3.0"


def _drv_text(name: str, tag: str, inputs: dict[str, list[str]] | None = None) -> str:
    """An input-addressed derivation text with its output path computed (via Nix's
    rules: recnix.formats.derivation), for a fake builder store."""
    from recnix.formats.derivation import input_addressed_output_paths, to_aterm

    def text(out: str) -> str:
        ins = ",".join(
            f'("{p}",[{",".join(chr(34) + o + chr(34) for o in os)}])'
            for p, os in (inputs or {}).items()
        )
        return (
            f'Derive([("out","{out}","","")],[{ins}],[],"x86_64-linux","/bin/sh",'
            f'["-c","{tag}"],[("name","{name}"),("out","{out}")])'
        )

    blank = parse_derivation(text(""), name)
    out = input_addressed_output_paths(blank, STORE.__getitem__)["out"]
    return to_aterm(parse_derivation(text(out), name))


STORE: dict[str, object] = {}


class FakeBuilder:
    """.drv files a builder holds (path -> bytes), and what this machine holds."""

    def __init__(self) -> None:
        self.drvs: dict[str, bytes] = {}
        self.here: set[str] = set()

    def add_drv(self, name: str, text: str) -> tuple[str, str]:
        """(drv path, out path) of a derivation the builder holds."""
        drv = parse_derivation(text, name)
        path = make_text_path(f"{name}.drv", text.encode(), set(drv.input_drvs))
        self.drvs[path] = text.encode()
        STORE[path] = drv
        out = drv.outputs["out"].path
        assert out is not None
        return path, out

    async def read(self, path: str) -> bytes:
        if path not in self.drvs:
            raise UntrustedPath(f"{path} is not valid on builder")
        return self.drvs[path]

    async def valid_here(self, path: str) -> bool:
        return path in self.here

    def check(self, trusted: bool = False, keys: dict[str, bytes] | None = None) -> TrustCheck:
        return TrustCheck("builder", trusted, lambda: keys or {}, self.read, self.valid_here)


def admit(check: TrustCheck, path: str, info: PathInfo) -> str:
    return asyncio.run(check.admit(path, info)).reason


def refused(check: TrustCheck, path: str, info: PathInfo) -> str:
    with pytest.raises(UntrustedPath) as e:
        asyncio.run(check.admit(path, info))
    message = str(e.value)
    assert path in message and SETTING in message and "builder" in message
    return message


def info(deriver: str | None = None, refs: list[str] | None = None, **kw: object) -> PathInfo:
    return PathInfo(deriver=deriver, nar_hash="11" * 32, references=refs or [], nar_size=8, **kw)  # type: ignore[arg-type]


def test_ssh_destination_of_nix_s_ssh_calls() -> None:
    assert ssh_destination(["builder", "-x", "-a", "nix-daemon --stdio"]) == "builder"
    assert ssh_destination(["root@b", "-x", "-a", "-S", "/tmp/s", "nix-daemon --stdio"]) == "root@b"
    assert ssh_destination(["-i", "/root/key", "-p", "22", "b", "cmd"]) == "b"
    assert ssh_destination(["-ikey", "-l", "u", "b", "cmd"]) == "u@b"
    assert ssh_destination(["-x", "--", "b"]) == "b"


@pytest.mark.parametrize(
    ("destination", "entries", "trusted"),
    [
        ("builder", ["builder"], True),
        ("builder", ["ssh-ng://builder"], True),
        ("root@builder", ["ssh-ng://builder?ssh-key=/k"], True),
        ("root@builder", ["ssh-ng://root@builder"], True),
        ("nix@builder", ["ssh-ng://root@builder"], False),
        ("builder2", ["builder"], False),
        ("builder", [], False),
        ("evil.builder", ["builder"], False),
    ],
)
def test_builder_trusted_by_name(destination: str, entries: list[str], trusted: bool) -> None:
    assert builder_trusted(destination, entries) is trusted


def test_unproven_path_is_refused_and_trusted_builder_admits_it() -> None:
    fake = FakeBuilder()
    message = refused(fake.check(), PLANTED, info())
    assert "no deriver" in message
    assert admit(fake.check(trusted=True), PLANTED, info()) == f"builder is in {SETTING}"


def test_content_addressed_path_is_admitted_only_under_its_own_name() -> None:
    fake = FakeBuilder()
    text_ca = "text:sha256:" + nix32_encode(hashlib.sha256(b"hi").digest())
    good = make_text_path("f", b"hi", [])
    admission = asyncio.run(fake.check().admit(good, info(ca=text_ca)))
    assert admission.reason == "content-addressed" and admission.check_sigs
    assert "not this path" in refused(fake.check(), PLANTED, info(ca=text_ca))
    assert "not this path" in refused(
        fake.check(), "/nix/store/" + "b" * 32 + "-f", info(ca=text_ca)
    )
    assert "content address" in refused(fake.check(), PLANTED, info(ca="fixed:crc:00"))


def test_signature_by_a_trusted_key_admits() -> None:
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    i = info()
    sig = key.sign(fingerprint(PLANTED, i.nar_hash, i.nar_size, i.references))
    signed = info(sigs=["k-1:" + base64.b64encode(sig).decode()])
    fake = FakeBuilder()
    admission = asyncio.run(fake.check(keys={"k-1": public}).admit(PLANTED, signed))
    assert admission.reason == "signed by k-1" and admission.check_sigs
    # not trusted under that name / another key of that name
    refused(fake.check(keys={"k-2": public}), PLANTED, signed)
    other = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    refused(fake.check(keys={"k-1": other}), PLANTED, signed)


def test_proven_output_of_a_drv_the_builder_has() -> None:
    """A nested build's output: its .drv (and that of its input) on the builder only."""
    fake = FakeBuilder()
    dep_drv, dep_out = fake.add_drv("dep", _drv_text("dep", "d"))
    drv, out = fake.add_drv("inner", _drv_text("inner", "i", {dep_drv: ["out"]}))
    admission = asyncio.run(fake.check().admit(out, info(drv)))
    assert admission.reason == f"output of {drv}" and not admission.check_sigs
    assert asyncio.run(fake.check().admit(dep_out, info(dep_drv))).reason == f"output of {dep_drv}"


def test_proof_fails_for_a_path_that_is_not_the_output() -> None:
    fake = FakeBuilder()
    drv, _ = fake.add_drv("inner", _drv_text("inner", "i"))
    assert f"not an output of its deriver {drv}" in refused(fake.check(), PLANTED, info(drv))


def test_proof_fails_for_a_drv_whose_outputs_lie() -> None:
    """A .drv that names the planted path as its output (its own path correct for its
    text): the recomputed output path differs."""
    fake = FakeBuilder()
    text = _drv_text("openssl-3.0", "x")
    real_out = parse_derivation(text, "openssl-3.0").outputs["out"].path
    assert real_out is not None
    lying = text.replace(real_out, PLANTED)
    drv = make_text_path("openssl-3.0.drv", lying.encode(), [])
    fake.drvs[drv] = lying.encode()
    assert "not an output of its deriver" in refused(fake.check(), PLANTED, info(drv))


def test_proof_fails_for_drv_contents_other_than_its_path() -> None:
    """The builder sends other contents under a .drv path: not the text path of them."""
    fake = FakeBuilder()
    drv, out = fake.add_drv("inner", _drv_text("inner", "i"))
    fake.drvs[drv] = _drv_text("inner", "j").encode()
    assert "not the store path of its contents" in refused(fake.check(), out, info(drv))
    fake.drvs[drv] = b"not a derivation"
    assert "is not a derivation" in refused(fake.check(), out, info(drv))


def test_proof_fails_for_missing_input_drv_and_absent_deriver() -> None:
    fake = FakeBuilder()
    dep_drv, _ = fake.add_drv("dep", _drv_text("dep", "d"))
    drv, out = fake.add_drv("inner", _drv_text("inner", "i", {dep_drv: ["out"]}))
    del fake.drvs[dep_drv]
    assert f"{dep_drv} is not valid on builder" in refused(fake.check(), out, info(drv))
    missing = "/nix/store/" + "c" * 32 + "-x.drv"
    assert f"{missing} is not valid on builder" in refused(fake.check(), out, info(missing))
    assert "is not a .drv" in refused(fake.check(), out, info(PLANTED))


def test_a_drv_this_machine_has_and_has_not_built_proves_nothing() -> None:
    fake = FakeBuilder()
    drv, out = fake.add_drv("openssl-3.0", _drv_text("openssl-3.0", "o"))
    fake.here.add(drv)
    assert "derivation of this machine, not built here" in refused(fake.check(), out, info(drv))


def test_fixed_output_deriver_proves_nothing_without_content_address() -> None:
    """A fixed-output derivation's path says nothing of the contents the builder sends
    without their content address: refused (with it, the CA route admits it)."""
    fake = FakeBuilder()
    out = "/nix/store/j6pcdwmw2hmiy97jvz23dzwnapj7aj4g-fo"
    text = (
        f'Derive([("out","{out}","r:sha256","{"0" * 64}")],[],[],"x86_64-linux",'
        f'"/bin/sh",[],[("name","fo"),("out","{out}")])'
    )
    drv = make_text_path("fo.drv", text.encode(), [])
    fake.drvs[drv] = text.encode()
    assert "fixed-output" in refused(fake.check(), out, info(drv))
    ca = "fixed:r:sha256:" + "0" * 52
    assert admit(fake.check(), out, info(drv, ca=ca)) == "content-addressed"


def test_setting_defaults_to_no_builder_and_takes_host_names(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from recnix.config.loader import ConfigError, load_config

    conf = tmp_path / "config.toml"
    conf.write_text("")
    assert load_config(conf)["remote"]["trusted-builders"] == []
    conf.write_text('[remote]\ntrusted-builders = ["ssh-ng://root@b1", "b2"]\n')
    assert load_config(conf)["remote"]["trusted-builders"] == ["ssh-ng://root@b1", "b2"]
    conf.write_text('[remote]\ntrusted-builders = "b1"\n')
    with pytest.raises(ConfigError, match="must be a list"):
        load_config(conf)
    conf.write_text('[remote]\ntrusted-builders = [""]\n')
    with pytest.raises(ConfigError, match="list of builder host names"):
        load_config(conf)
