"""`.drv` files written by the real `nix-instantiate` parse and agree with
`nix show-derivation` (Debian's nix-bin 2.8, local store, no daemon)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from recnix.formats.derivation import Derivation, read_derivation, to_aterm_bytes
from tests import nixversion

pytestmark = pytest.mark.host

EXPR = r"""
{ nonce }:
let
  base = {
    system = "x86_64-linux";
    builder = "/bin/sh";
    args = [ "-c" "echo ${nonce} > $out" ];
  };
  mk = attrs: derivation (base // attrs);
  src = builtins.toFile "src-${nonce}" "some \"quoted\"\ttext\n";
  ia = mk { name = "ia"; nonce = nonce; inherit src; weird = "a\"b\\c\nd\re\tf é"; };
in {
  inherit ia;
  latin1 = mk { name = "latin1"; text = builtins.readFile ./latin1.txt; };
  fixedFlat = mk {
    name = "fixed-flat";
    outputHashMode = "flat";
    outputHashAlgo = "sha256";
    outputHash = "0000000000000000000000000000000000000000000000000000";
  };
  fixedRecursive = mk {
    name = "fixed-rec";
    outputHashMode = "recursive";
    outputHashAlgo = "sha256";
    outputHash = "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s";
  };
  fixedSha1 = mk {
    name = "fixed-sha1";
    outputHashAlgo = "sha1";
    outputHash = "0000000000000000000000000000000000000000";
  };
  features = mk {
    name = "features";
    requiredSystemFeatures = [ "recnix" "kvm" ];
    allowedReferences = [ ia ];
    disallowedRequisites = [ "out" ];
  };
  structured = mk {
    name = "structured";
    __structuredAttrs = true;
    requiredSystemFeatures = [ "recnix" ];
    outputs = [ "out" "dev" ];
    outputChecks.out.allowedReferences = [ ia ];
    outputChecks.dev.disallowedReferences = [ ia.drvPath ];
    nested = { list = [ 1 2.5 true null "x" ]; inherit nonce; };
  };
  multi = mk {
    name = "multi";
    outputs = [ "out" "lib" "dev" ];
    dep = ia;
    devOfStructured = (derivation (base // { name = "dummy"; outputs = [ "a" "b" ]; })).b;
  };
}
"""

LATIN1 = b'caf\xe9 \xff\x80 "q" \\ end\n'
ATTRS = ["ia", "fixedFlat", "fixedRecursive", "fixedSha1", "features", "structured", "multi"]


@pytest.fixture(scope="module")
def drvs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    """attribute -> (.drv path, `nix show-derivation` JSON of it)."""
    if os.geteuid() != 0:
        pytest.fail("host tests need root (local Nix store)")
    for tool in ("nix-instantiate", "nix"):
        if shutil.which(tool) is None:
            pytest.fail(f"host tests need {tool} (Debian package nix-bin)")
    tmp = tmp_path_factory.mktemp("drv")
    (tmp / "nix.conf").write_text(
        "sandbox = false\nsubstituters =\nexperimental-features = nix-command\n"
    )
    env = dict(os.environ, NIX_CONF_DIR=str(tmp))
    env.pop("NIX_REMOTE", None)
    (tmp / "default.nix").write_text(EXPR)
    (tmp / "latin1.txt").write_bytes(LATIN1)
    nonce = os.urandom(6).hex()
    result = {}
    for attr in [*ATTRS, "latin1"]:
        path = subprocess.run(
            ["nix-instantiate", str(tmp / "default.nix"), "-A", attr, "--argstr", "nonce", nonce],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        if attr == "latin1":  # not UTF-8: `nix show-derivation` cannot print it as JSON
            result[attr] = (Path(path), {})
            continue
        shown = subprocess.run(
            ["nix", *nixversion.show_derivation_args(), path],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        result[attr] = (Path(path), nixversion.show_derivation_record(shown, path))
    return result


def as_show_derivation(drv: Derivation) -> dict:
    """Our parse in the layout of Nix 2.8's `nix show-derivation`."""
    outputs = {}
    for name, o in drv.outputs.items():
        path, algo, hash_ = o.aterm_fields()
        entry: dict[str, str] = {}
        if path:
            entry["path"] = path
        if algo:
            entry["hashAlgo"] = algo
        if hash_:
            entry["hash"] = hash_
        outputs[name] = entry
    return {
        "outputs": outputs,
        "inputSrcs": drv.input_srcs,
        "inputDrvs": {p: sorted(n.outputs) for p, n in drv.input_drvs.items()},
        "system": drv.platform,
        "builder": drv.builder,
        "args": drv.args,
        "env": drv.env,
    }


@pytest.mark.parametrize("attr", ATTRS)
def test_agrees_with_show_derivation(drvs: dict, attr: str) -> None:
    path, shown = drvs[attr]
    drv = read_derivation(path)
    if nixversion.show_derivation_layout_differs():  # compare what every version says
        projection = nixversion.derivation_projection
        assert projection(as_show_derivation(drv)) == projection(shown)
    else:
        assert as_show_derivation(drv) == shown
    assert to_aterm_bytes(drv) == path.read_bytes()


def test_kinds_and_features(drvs: dict) -> None:
    ia = read_derivation(drvs["ia"][0])
    assert ia.outputs["out"].kind == "inputAddressed"
    assert not ia.is_fixed_output and not ia.is_content_addressed
    assert ia.required_system_features == set()
    assert ia.env["weird"] == 'a"b\\c\nd\re\tf é'
    assert len(ia.input_srcs) == 1

    for attr, method, algo in [
        ("fixedFlat", "flat", "sha256"),
        ("fixedRecursive", "nar", "sha256"),
        ("fixedSha1", "flat", "sha1"),
    ]:
        fixed = read_derivation(drvs[attr][0])
        out = fixed.outputs["out"]
        assert (out.kind, out.method, out.hash_algo) == ("caFixed", method, algo), attr
        assert fixed.is_fixed_output and fixed.is_content_addressed

    features = read_derivation(drvs["features"][0])
    ia_out = ia.outputs["out"].path
    assert features.required_system_features == {"recnix", "kvm"}
    assert features.allowed_references() == [ia_out]
    assert features.disallowed_requisites() == ["out"]
    assert features.allowed_requisites() is None
    assert features.input_drv_outputs == {str(drvs["ia"][0]): {"out"}}

    structured = read_derivation(drvs["structured"][0])
    sa = structured.structured_attrs
    assert sa is not None and sa["nested"]["list"] == [1, 2.5, True, None, "x"]
    assert structured.required_system_features == {"recnix"}
    assert "requiredSystemFeatures" not in structured.env
    assert structured.allowed_references("out") == [ia_out]
    assert structured.disallowed_references("dev") == [str(drvs["ia"][0])]
    assert structured.allowed_references("dev") is None
    assert set(structured.outputs) == {"out", "dev"}

    multi = read_derivation(drvs["multi"][0])
    assert list(multi.outputs) == ["dev", "lib", "out"]
    assert all(o.kind == "inputAddressed" for o in multi.outputs.values())
    assert sorted(map(sorted, multi.input_drv_outputs.values())) == [["b"], ["out"]]


def test_non_utf8_bytes_are_kept(drvs: dict) -> None:
    path = drvs["latin1"][0]
    raw = path.read_bytes()
    assert b"caf\xe9 \xff\x80" in raw
    drv = read_derivation(path)
    assert drv.env["text"].encode("utf-8", "surrogateescape") == LATIN1
    assert to_aterm_bytes(drv) == raw
