"""Pure parts of recnix.store.register: constraint re-checks and the content-addressed refusal."""

from __future__ import annotations

import json

import pytest

from recnix.formats.derivation import Derivation, DerivationOutput
from recnix.store.register import (
    FinaliseError,
    check_output_constraints,
    ensure_not_ca_referencing,
    local_store_env,
    parse_path_info,
    scan_references,
)

OUT = "/nix/store/0c5m4jqm7lbaffp2a2n6dfbq3n0kxbn9-x"
DEV = "/nix/store/1c5m4jqm7lbaffp2a2n6dfbq3n0kxbn9-x-dev"
A = "/nix/store/2c5m4jqm7lbaffp2a2n6dfbq3n0kxbn9-a"
B = "/nix/store/3c5m4jqm7lbaffp2a2n6dfbq3n0kxbn9-b"
OUTPUTS = {"out": OUT, "dev": DEV}


def _drv(env: dict[str, str], kind: str = "inputAddressed") -> Derivation:
    outputs = {
        "out": DerivationOutput(kind=kind, path=OUT if kind != "caFloating" else None),
        "dev": DerivationOutput(kind="inputAddressed", path=DEV),
    }
    return Derivation(
        outputs=outputs,
        input_drvs={},
        input_srcs=[],
        platform="x86_64-linux",
        builder="/bin/sh",
        args=[],
        env={"name": "x", **env},
        name="x",
    )


def test_no_constraints_accepts_anything():
    check_output_constraints(_drv({}), "out", OUTPUTS, {A, B}, {A, B})


def test_allowed_references_by_path_and_output_name():
    drv = _drv({"allowedReferences": f"{A} dev"})
    check_output_constraints(drv, "out", OUTPUTS, {A, DEV, OUT}, {A, DEV, OUT})
    with pytest.raises(FinaliseError, match=rf"'out'.*allowedReferences.*{B}"):
        check_output_constraints(drv, "out", OUTPUTS, {A, B}, {A, B})


def test_empty_allowed_references_forbids_all_but_self():
    drv = _drv({"allowedReferences": ""})
    check_output_constraints(drv, "out", OUTPUTS, {OUT}, {OUT})
    with pytest.raises(FinaliseError, match=A):
        check_output_constraints(drv, "out", OUTPUTS, {A}, {A})


def test_requisites_look_at_the_closure():
    drv = _drv({"disallowedRequisites": B})
    check_output_constraints(drv, "out", OUTPUTS, {A}, {A})
    with pytest.raises(FinaliseError, match=rf"disallowedRequisites.*{B}"):
        check_output_constraints(drv, "out", OUTPUTS, {A}, {A, B})
    allowed = _drv({"allowedRequisites": A})
    with pytest.raises(FinaliseError, match=rf"allowedRequisites.*{B}"):
        check_output_constraints(allowed, "out", OUTPUTS, {A}, {A, B})


def test_only_new_paths_are_reported():
    drv = _drv({"disallowedReferences": f"{A} {B}"})
    # A was already there (Nix accepted it); only B is new.
    check_output_constraints(drv, "out", OUTPUTS, {A}, {A}, new_paths=set())
    with pytest.raises(FinaliseError, match=B) as info:
        check_output_constraints(drv, "out", OUTPUTS, {A, B}, {A, B}, new_paths={B})
    assert A not in str(info.value)


def test_structured_attrs_output_checks():
    attrs = {"outputChecks": {"out": {"disallowedReferences": [A]}, "dev": {}}}
    drv = _drv({"__json": json.dumps(attrs)})
    check_output_constraints(drv, "dev", OUTPUTS, {A}, {A})
    with pytest.raises(FinaliseError, match=A):
        check_output_constraints(drv, "out", OUTPUTS, {A}, {A})


def test_illegal_reference_specifier():
    drv = _drv({"allowedReferences": "nonsense"})
    with pytest.raises(FinaliseError, match="illegal reference specifier 'nonsense'"):
        check_output_constraints(drv, "out", OUTPUTS, {A}, {A})


@pytest.mark.parametrize(
    ("kind", "what"),
    [("caFixed", "fixed-output"), ("caFloating", "floating content-addressed")],
)
def test_content_addressed_output_with_session_reference_is_refused(kind, what):
    drv = _drv({}, kind=kind)
    ensure_not_ca_referencing(drv, "/nix/store/d.drv", "out", set())
    with pytest.raises(FinaliseError, match=rf"'out' of {what} derivation.*{A}.*cannot be added"):
        ensure_not_ca_referencing(drv, "/nix/store/d.drv", "out", {A})
    ensure_not_ca_referencing(drv, "/nix/store/d.drv", "dev", {A})  # input-addressed output


def test_scan_references_maps_hash_parts_back_to_paths(tmp_path):
    (tmp_path / "f").write_text(f"x {A}/bin/a y")
    (tmp_path / "l").symlink_to(B[len("/nix/store/") :])
    assert scan_references(str(tmp_path), {A, B, OUT}) == {A, B}
    assert scan_references(str(tmp_path), set()) == set()


def test_local_store_env_forces_the_local_store():
    # Lix >= 2.94: `auto` is the daemon whenever its socket exists, even for root
    for given in ({"NIX_REMOTE": "daemon"}, {}, {"NIX_REMOTE": "auto"}):
        env = local_store_env({**given, "NIX_CONF_DIR": "/c"})
        assert env["NIX_REMOTE"] == "local"
        assert env["NIX_CONF_DIR"] == "/c"


# `nix path-info --json` of one added file, as each tested Nix prints it (format 1).
_F = "/nix/store/ab3li50xq0nl4q5lxdyinb8w8y13my9s-f"
_NAR = "sha256-EFUdrtf6Rn0LWIJufrmg8q99aT3jGfLvd1//zaJEufY="
_CA = "fixed:r:sha256:1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h"
PATH_INFO_2_8 = json.dumps(
    [{"path": _F, "narHash": _NAR, "narSize": 120, "references": [], "ca": _CA}]
)
PATH_INFO_2_34 = json.dumps(
    {
        _F: {
            "ca": _CA,
            "deriver": None,
            "narHash": _NAR,
            "narSize": 120,
            "references": [],
            "registrationTime": 1795855179,
            "signatures": [],
            "storeDir": "/nix/store",
            "ultimate": False,
            "version": 1,
        }
    }
)


@pytest.mark.parametrize("text", [PATH_INFO_2_8, PATH_INFO_2_34], ids=["2.8-list", "2.19+-object"])
def test_parse_path_info_reads_both_shapes(text):
    info = parse_path_info(_F, text)
    assert (info["narHash"], info["narSize"], info["references"]) == (_NAR, 120, [])


@pytest.mark.parametrize(
    "text",
    [json.dumps([{"path": _F, "valid": False}]), json.dumps({_F: None})],
    ids=["2.8-list", "2.19+-object"],
)
def test_parse_path_info_invalid_path(text):
    with pytest.raises(FinaliseError, match="is not valid"):
        parse_path_info(_F, text)


def test_parse_path_info_refuses_format_2():
    text = json.dumps({"info": {_F.removeprefix("/nix/store/"): {}}, "version": 2})
    with pytest.raises(FinaliseError, match="unexpected JSON shape"):
        parse_path_info(_F, text)
