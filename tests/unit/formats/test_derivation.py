"""The ATerm parser against Nix's golden derivations (and their JSON twins)."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from recnix.formats.derivation import (
    Derivation,
    DerivationError,
    DerivationOutput,
    OutputsNode,
    parse_derivation,
    read_derivation,
    to_aterm,
    to_aterm_bytes,
)
from recnix.formats.storepath import STORE_PREFIX

FIXTURES = Path(
    os.environ.get(
        "RECNIX_FIXTURES", Path(__file__).parents[3].parent / "shared/fixtures/nix-upstream"
    )
)
DRV_DIR = FIXTURES / "derivation"


def _require_fixtures() -> None:
    if not DRV_DIR.is_dir():
        pytest.fail(f"Nix fixtures missing: {DRV_DIR} (set RECNIX_FIXTURES)")


def _all_drvs() -> list[Path]:
    return sorted(DRV_DIR.rglob("*.drv")) if DRV_DIR.is_dir() else []


def _is_git_symlink_placeholder(p: Path) -> bool:
    """Upstream keeps some .drv as git symlinks into tests/functional; the export holds
    only the link text."""
    return p.read_bytes().startswith(b"../")


def _is_modulo(p: Path) -> bool:
    return p.name.endswith("-modulo.drv")


GOOD = [
    p
    for p in _all_drvs()
    if not p.name.startswith("bad-") and not _is_git_symlink_placeholder(p) and not _is_modulo(p)
]
BAD = [p for p in _all_drvs() if p.name.startswith("bad-")]
MODULO = [p for p in _all_drvs() if _is_modulo(p)]
PLACEHOLDERS = [p for p in _all_drvs() if _is_git_symlink_placeholder(p)]


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(DRV_DIR)) for p in paths]


# --- JSON (format version 4) <-> Derivation ---------------------------------------------


def _base(path: str) -> str:
    assert path.startswith(STORE_PREFIX), path
    return path[len(STORE_PREFIX) :]


def _sri(algo: str, hex_hash: str) -> str:
    return f"{algo}-" + base64.b64encode(bytes.fromhex(hex_hash)).decode()


def output_to_json(o: DerivationOutput) -> dict:
    if o.kind == "inputAddressed":
        return {"path": _base(o.path)}
    if o.kind == "caFixed":
        return {"hash": _sri(o.hash_algo, o.hash), "method": o.method}
    if o.kind == "caFloating":
        return {"hashAlgo": o.hash_algo, "method": o.method}
    if o.kind == "impure":
        return {"hashAlgo": o.hash_algo, "impure": True, "method": o.method}
    assert o.kind == "deferred"
    return {}


def node_to_json(n: OutputsNode) -> dict:
    return {
        "dynamicOutputs": {k: node_to_json(v) for k, v in n.dynamic_outputs.items()},
        "outputs": sorted(n.outputs),
    }


def drv_to_json(d: Derivation) -> dict:
    env = dict(d.env)
    out = {
        "args": d.args,
        "builder": d.builder,
        "env": env,
        "inputs": {
            "drvs": {_base(k): node_to_json(v) for k, v in d.input_drvs.items()},
            "srcs": [_base(s) for s in d.input_srcs],
        },
        "name": d.name,
        "outputs": {k: output_to_json(v) for k, v in d.outputs.items()},
        "system": d.platform,
        "version": 4,
    }
    if d.structured_attrs is not None:
        out["structuredAttrs"] = d.structured_attrs
        del env["__json"]
    return out


def output_from_json(j: dict) -> DerivationOutput:
    if "path" in j:
        return DerivationOutput("inputAddressed", STORE_PREFIX + j["path"])
    if "hash" in j:
        raise AssertionError("caFixed JSON needs the computed path; not used by fixtures here")
    if j.get("impure"):
        return DerivationOutput("impure", None, j["hashAlgo"], None, j["method"])
    if "hashAlgo" in j:
        return DerivationOutput("caFloating", None, j["hashAlgo"], None, j["method"])
    assert j == {}
    return DerivationOutput("deferred")


def node_from_json(j: dict) -> OutputsNode:
    return OutputsNode(
        set(j["outputs"]), {k: node_from_json(v) for k, v in j["dynamicOutputs"].items()}
    )


def drv_from_json(j: dict) -> Derivation:
    env = dict(j["env"])
    if "structuredAttrs" in j:
        env["__json"] = json.dumps(j["structuredAttrs"], separators=(",", ":"), sort_keys=True)
        env = dict(sorted(env.items()))
    return Derivation(
        outputs={k: output_from_json(v) for k, v in j["outputs"].items()},
        input_drvs={STORE_PREFIX + k: node_from_json(v) for k, v in j["inputs"]["drvs"].items()},
        input_srcs=[STORE_PREFIX + s for s in j["inputs"]["srcs"]],
        platform=j["system"],
        builder=j["builder"],
        args=j["args"],
        env=env,
        name=j["name"],
    )


# --- tests ---------------------------------------------------------------------------------


def test_fixture_directory_present() -> None:
    _require_fixtures()
    assert GOOD and BAD and PLACEHOLDERS and MODULO


@pytest.mark.parametrize("drv_path", GOOD, ids=_ids(GOOD))
def test_fixture_parses_and_round_trips(drv_path: Path) -> None:
    _require_fixtures()
    raw = drv_path.read_bytes()
    twin = drv_path.with_suffix(".json")
    name = json.loads(twin.read_text())["name"] if twin.exists() else None
    drv = parse_derivation(raw, name)
    assert to_aterm_bytes(drv) == raw
    assert parse_derivation(raw.decode("utf-8", "surrogateescape"), name) == drv
    if twin.exists():
        assert drv_to_json(drv) == json.loads(twin.read_text())


@pytest.mark.parametrize("json_path", [p.with_suffix(".json") for p in PLACEHOLDERS])
def test_placeholder_fixture_twin_through_aterm(json_path: Path) -> None:
    """The .drv is a dangling git symlink in the export: rebuild it from its JSON twin,
    print it, parse it back, and compare with the twin."""
    _require_fixtures()
    expected = json.loads(json_path.read_text())
    text = to_aterm(drv_from_json(expected))
    got = parse_derivation(text, expected["name"])
    assert parse_derivation(text).name == expected["name"]  # from env or structured attrs
    assert drv_to_json(got) == expected
    assert to_aterm(got) == text


@pytest.mark.parametrize("drv_path", BAD, ids=_ids(BAD))
def test_bad_fixture_rejected(drv_path: Path) -> None:
    _require_fixtures()
    problems = {
        "bad-version.drv": "unknown derivation ATerm format version 'invalid-version'",
        "bad-old-version-dyn-deps.drv": "need the 'xp-dyn-drv' derivation version",
        "bad-ca-fixed-path.drv": "does not match its content address",
    }
    names = {"bad-ca-fixed-path.drv": "fixed", "bad-old-version-dyn-deps.drv": None}
    with pytest.raises(DerivationError) as exc:
        parse_derivation(drv_path.read_bytes(), names.get(drv_path.name))
    assert problems[drv_path.name] in str(exc.value)


@pytest.mark.parametrize("drv_path", MODULO, ids=_ids(MODULO))
def test_hash_modulo_form_is_not_a_derivation(drv_path: Path) -> None:
    """`*-modulo.drv` hold Nix's hashing form (input drvs replaced by hashes): Nix cannot
    parse them as derivations either."""
    _require_fixtures()
    with pytest.raises(DerivationError, match="bad path"):
        parse_derivation(drv_path.read_bytes())


def test_dynamic_inputs() -> None:
    _require_fixtures()
    drv = parse_derivation((DRV_DIR / "dyn-dep-derivation.drv").read_bytes())
    dep = "/nix/store/c015dhfh5l0lp6wxyvdn7bmwhbbr6hr9-dep2.drv"
    assert drv.version == "xp-dyn-drv"
    assert drv.input_drv_outputs == {dep: {"cat", "dog"}}
    assert drv.input_drvs[dep].dynamic_outputs["goose"].outputs == {"gosling"}


def test_fixed_output_kinds() -> None:
    _require_fixtures()
    drv = parse_derivation((DRV_DIR / "hash-modulo/source-first.drv").read_bytes())
    assert drv.is_fixed_output and drv.is_content_addressed and drv.has_known_output_paths
    out = drv.outputs["out"]
    assert (out.kind, out.method, out.hash_algo) == ("caFixed", "nar", "sha256")
    # name is inferred from the output path when not given; a wrong name breaks the check
    with pytest.raises(DerivationError, match="content address"):
        parse_derivation((DRV_DIR / "hash-modulo/source-first.drv").read_bytes(), "other")


def _sample(outputs: str, env: str, version: str | None = None) -> bytes:
    body = f'[{outputs}],[],[],"x86_64-linux","/bin/sh",[],[{env}]'
    if version:
        return f'DrvWithVersion("{version}",{body})'.encode()
    return f"Derive({body})".encode()


IA_OUT = '("out","/nix/store/c015dhfh5l0lp6wxyvdn7bmwhbbr6hr9-x","","")'


def test_required_system_features_env_string() -> None:
    drv = parse_derivation(_sample(IA_OUT, '("requiredSystemFeatures","kvm  recnix\\tbig")'))
    assert drv.required_system_features == {"kvm", "recnix", "big"}
    assert drv.structured_attrs is None


def test_required_system_features_structured_attrs() -> None:
    attrs = {
        "requiredSystemFeatures": ["recnix", "kvm"],
        "outputChecks": {
            "out": {"allowedReferences": ["/nix/store/a"], "disallowedRequisites": []}
        },
    }
    escaped = json.dumps(attrs).replace("\\", "\\\\").replace('"', '\\"')
    # a plain env entry of the same name is ignored with structured attrs, as in Nix
    env = f'("__json","{escaped}"),("requiredSystemFeatures","bogus")'
    drv = parse_derivation(_sample(IA_OUT, env))
    assert drv.structured_attrs == attrs
    assert drv.required_system_features == {"recnix", "kvm"}
    assert drv.allowed_references() == ["/nix/store/a"]
    assert drv.disallowed_requisites() == []
    assert drv.disallowed_references() is None
    assert drv.allowed_references("dev") is None


def test_required_system_features_implicit_ca_derivations() -> None:
    drv = parse_derivation(_sample('("out","","r:sha256","")', ""))
    assert drv.outputs["out"].kind == "caFloating"
    assert drv.required_system_features == {"ca-derivations"}
    assert drv.declared_system_features == set()
    assert drv.is_content_addressed and not drv.is_fixed_output


def test_structured_attrs_must_be_list_of_strings() -> None:
    env = '("__json","{\\"requiredSystemFeatures\\":\\"recnix\\"}")'
    drv = parse_derivation(_sample(IA_OUT, env))
    with pytest.raises(DerivationError, match="list of strings"):
        _ = drv.required_system_features


def test_env_output_checks() -> None:
    env = '("allowedReferences",""),("disallowedReferences","/nix/store/a dev")'
    drv = parse_derivation(_sample(IA_OUT, env))
    assert drv.allowed_references() == []
    assert drv.disallowed_references("anything") == ["/nix/store/a", "dev"]
    assert drv.allowed_requisites() is None


def test_max_closure_size() -> None:
    drv = parse_derivation(_sample(IA_OUT, '("maxClosureSize","4096")'))
    assert drv.output_checks().max_closure_size == 4096
    assert parse_derivation(_sample(IA_OUT, "")).output_checks().max_closure_size is None
    structured = '{\\"outputChecks\\":{\\"out\\":{\\"maxClosureSize\\":100}}}'
    drv = parse_derivation(_sample(IA_OUT, f'("__json","{structured}")'))
    assert drv.output_checks().max_closure_size == 100
    bad = parse_derivation(_sample(IA_OUT, '("maxClosureSize","lots")'))
    with pytest.raises(DerivationError, match="maxClosureSize"):
        bad.output_checks()


def test_impure_and_deferred_outputs() -> None:
    drv = parse_derivation(_sample('("a","","",""),("b","","r:sha256","impure")', ""))
    assert drv.outputs["a"].kind == "deferred"
    assert drv.outputs["b"].kind == "impure"
    assert drv.is_impure and not drv.has_known_output_paths
    assert to_aterm_bytes(drv) == _sample('("a","","",""),("b","","r:sha256","impure")', "")


def test_string_escapes_and_latin1_round_trip() -> None:
    raw = _sample(IA_OUT, '("k","a\\"b\\\\c\\nd\\re\\tf")').replace(b'f")', b'f\xe9\xff")')
    drv = parse_derivation(raw)
    assert drv.env["k"] == 'a"b\\c\nd\re\tf' + b"\xe9\xff".decode("utf-8", "surrogateescape")
    assert to_aterm_bytes(drv) == raw


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (b"", "expected 'Derive('"),
        (b'Derive([("out","/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-foo', "unterminated string"),
        (_sample('("out","/tmp/x","","")', ""), "not in the Nix store"),
        (_sample('("out","nix/store/x","","")', ""), "not in the Nix store"),
        (_sample(IA_OUT + "," + IA_OUT, ""), "duplicate output 'out'"),
        (_sample(IA_OUT, '("a","1"),("a","2")'), "duplicate environment variable 'a'"),
        (_sample('("out","","md7","")', ""), "unknown hash algorithm 'md7'"),
        (
            _sample('("out","/nix/store/c015dhfh5l0lp6wxyvdn7bmwhbbr6hr9-x","r:sha256","")', ""),
            "must not specify an output path",
        ),
        (_sample('("out","","sha256","abc")', ""), "invalid sha256 hash"),
        (_sample('("out","","","abc")', ""), "hash but no hash algorithm"),
        (_sample(IA_OUT, "") + b"\n", "trailing data"),
        (_sample(IA_OUT, "", "xp-dyn-drv2"), "unknown derivation ATerm format version"),
    ],
)
def test_malformed_rejected(text: bytes, problem: str) -> None:
    with pytest.raises(DerivationError) as exc:
        parse_derivation(text)
    assert problem in str(exc.value)
    assert "offset" in str(exc.value)


def test_read_derivation_takes_name_from_file(tmp_path: Path) -> None:
    _require_fixtures()
    src = (DRV_DIR / "hash-modulo/source-first.drv").read_bytes()
    good = tmp_path / "q4mzjdlh5px6977h7v5fdsk1p33yg583-source.drv"
    good.write_bytes(src)
    assert read_derivation(good).name == "source"
    bad = tmp_path / "q4mzjdlh5px6977h7v5fdsk1p33yg583-other.drv"
    bad.write_bytes(src)
    with pytest.raises(DerivationError, match="content address"):
        read_derivation(bad)


# --- output paths (hashDerivationModulo) ---------------------------------------------------

HASH_MODULO = DRV_DIR / "hash-modulo"


def _modulo_fixture(stem: str) -> tuple[str, Derivation]:
    """(its store path, the parsed derivation) of ``hash-modulo/<stem>.drv``."""
    from recnix.formats.storepath import make_text_path

    text = (HASH_MODULO / f"{stem}.drv").read_bytes()
    name = json.loads((HASH_MODULO / f"{stem}.json").read_text())["name"]
    drv = parse_derivation(text, name)
    refs = set(drv.input_srcs) | set(drv.input_drvs)
    return make_text_path(f"{name}.drv", text, refs), drv


def _modulo_store() -> dict[str, Derivation]:
    return dict(
        _modulo_fixture(s)
        for s in ("source-first", "source-second", "intermediate-first", "intermediate-second")
    )


def test_fixture_drv_paths_are_their_text_paths() -> None:
    """The store paths the hash-modulo fixtures refer to are the text paths of their
    contents and references (Nix's makeTextPath)."""
    _require_fixtures()
    store = _modulo_store()
    assert "/nix/store/q4mzjdlh5px6977h7v5fdsk1p33yg583-source.drv" in store
    assert "/nix/store/kp6i4n4bb3hlniwqjakhlf046qpdc0gl-intermediate.drv" in store
    assert "/nix/store/f8g8x4m83da3b2f79iv84q2r3qlc58lr-intermediate.drv" in store


@pytest.mark.parametrize(
    "stem", ["intermediate-first", "intermediate-second", "parent-joined", "parent-split"]
)
def test_hash_derivation_modulo_matches_nix(stem: str) -> None:
    """hashDerivationModulo = sha256 of Nix's own `<stem>-modulo.drv` text (fixed-output
    inputs hashed by their content address, so first and second agree; two inputs
    with the same hash merge their outputs)."""
    import hashlib

    from recnix.formats.derivation import hash_derivation_modulo

    _require_fixtures()
    store = _modulo_store()
    drv = parse_derivation((HASH_MODULO / f"{stem}.drv").read_bytes(), stem.split("-")[0])
    expected = hashlib.sha256((HASH_MODULO / f"{stem}-modulo.drv").read_bytes()).hexdigest()
    assert set(hash_derivation_modulo(drv, store.__getitem__).values()) == {expected}


def test_input_addressed_output_paths_as_nix_2_8_computes_them() -> None:
    """Output paths of a derivation with two outputs, a fixed-output input and a text
    input, as `nix-instantiate` (2.8) wrote them; its .drv path is its text path."""
    from recnix.formats.derivation import input_addressed_output_paths
    from recnix.formats.storepath import make_text_path

    fo_out = "/nix/store/j6pcdwmw2hmiy97jvz23dzwnapj7aj4g-fo"
    fo = (
        f'Derive([("out","{fo_out}","r:sha256",'
        '"0000000000000000000000000000000000000000000000000000000000000000")],[],[],'
        '"x86_64-linux","/bin/sh",[],[("builder","/bin/sh"),("name","fo"),'
        f'("out","{fo_out}"),'
        '("outputHash","0000000000000000000000000000000000000000000000000000"),'
        '("outputHashAlgo","sha256"),("outputHashMode","recursive"),'
        '("system","x86_64-linux")])'
    )
    fo_path = "/nix/store/dja7pnqjwq2l6kqisbsc7fmxgjn5rapl-fo.drv"
    assert make_text_path("fo.drv", fo.encode(), []) == fo_path
    dev, out = (
        "/nix/store/1q54ksvdb189gxpiw7lg6c1cs1j1vy6l-a-dev",
        "/nix/store/mf68cwgc8zvc7n43m3qfl92mwgk2hgg3-a",
    )
    f = "/nix/store/2qrhg0a6v2d6nsxncds6y3pc4l36n9xj-f"
    assert make_text_path("f", b"hi", []) == f
    a = (
        f'Derive([("dev","{dev}","",""),("out","{out}","","")],[("{fo_path}",["out"])],'
        f'["{f}"],"x86_64-linux","/bin/sh",["-c","x"],[("builder","/bin/sh"),'
        f'("dev","{dev}"),("f","{f}"),("name","a"),("out","{out}"),("outputs","out dev"),'
        f'("src","{fo_out}"),("system","x86_64-linux")])'
    )
    store = {fo_path: parse_derivation(fo, "fo")}
    computed = input_addressed_output_paths(parse_derivation(a, "a"), store.__getitem__)
    assert computed == {"dev": dev, "out": out}
    # one byte of the derivation changes every output path
    tampered = parse_derivation(a.replace('["-c","x"]', '["-c","y"]'), "a")
    assert input_addressed_output_paths(tampered, store.__getitem__)["out"] != out


def test_output_paths_refuse_floating_and_dynamic() -> None:
    from recnix.formats.derivation import input_addressed_output_paths

    floating = parse_derivation(
        'Derive([("out","","r:sha256","")],[],[],"x86_64-linux","/bin/sh",[],[])', "f"
    )
    with pytest.raises(DerivationError, match="not fixed in advance"):
        input_addressed_output_paths(floating, {}.__getitem__)
