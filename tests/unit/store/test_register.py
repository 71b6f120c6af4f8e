"""Pure parts of recnix.store.register: constraint re-checks and the content-addressed refusal."""

from __future__ import annotations

import asyncio
import json

import pytest

from recnix.formats.derivation import Derivation, DerivationOutput
from recnix.store.register import (
    FinaliseError,
    RegisteredInfo,
    _plan_fix_ups,
    check_output_constraints,
    ensure_not_ca_referencing,
    local_store_env,
    outputs_of,
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


class MemoryQueries:
    """StoreQueries over an in-memory store: path -> (references, NAR size)."""

    def __init__(self, paths: dict[str, tuple[set[str], int]], output_map=None) -> None:
        self.paths = paths
        self.map = output_map or {}
        self.asked: list[str] = []

    async def path_info(self, path: str) -> RegisteredInfo:
        self.asked.append(f"info {path}")
        if path not in self.paths:
            raise FinaliseError(f"path '{path}' is not valid")
        refs, size = self.paths[path]
        return RegisteredInfo("sha256:" + "0" * 64, size, frozenset(refs), "")

    async def closure(self, paths) -> dict[str, int]:
        todo, seen = list(paths), {}
        while todo:
            path = todo.pop()
            if path not in seen:
                seen[path] = self.paths[path][1]
                todo.extend(self.paths[path][0])
        return seen

    async def output_map(self, drv_path: str) -> dict[str, str | None]:
        self.asked.append(f"outputs {drv_path}")
        return self.map


def _outputs_on_disk(tmp_path, out_text: str, dev_text: str = "") -> dict[str, str]:
    """OUT and DEV as files under ``tmp_path`` (their names keep the store paths' hashes)."""
    paths = {}
    for name, path, text in (("out", OUT, out_text), ("dev", DEV, dev_text)):
        local = tmp_path / path.rsplit("/", 1)[1]
        local.write_text(text)
        paths[name] = str(local)
    return paths


def test_the_plan_adds_only_the_session_paths_an_output_refers_to(tmp_path):
    """Finalisation reads the store only through its StoreQueries (no Nix CLI): an
    output that mentions a session path it lacks gets it; one that mentions nothing,
    or only what it has, is left alone."""
    on_disk = _outputs_on_disk(tmp_path, f"uses {A} and {B}", "nothing")
    drv = _drv({})
    drv.outputs["out"].path, drv.outputs["dev"].path = on_disk["out"], on_disk["dev"]
    queries = MemoryQueries({on_disk["out"]: ({B}, 10), on_disk["dev"]: (set(), 5)})
    report, pending = asyncio.run(_plan_fix_ups("/nix/store/d.drv", drv, {A, B}, queries))
    assert report.outputs == on_disk
    assert list(pending) == ["out"]
    output_path, record, new = pending["out"]
    assert new == {A} and record[5:] == sorted({A, B}) and output_path == on_disk["out"]
    assert queries.asked == [f"info {on_disk['out']}"]


def test_constraints_see_the_closure_the_added_references_bring(tmp_path):
    on_disk = _outputs_on_disk(tmp_path, f"uses {A}")
    drv = _drv({"disallowedRequisites": B})
    drv.outputs["out"].path, drv.outputs["dev"].path = on_disk["out"], on_disk["dev"]
    queries = MemoryQueries(
        {on_disk["out"]: (set(), 1), on_disk["dev"]: (set(), 1), A: ({B}, 2), B: (set(), 3)}
    )
    with pytest.raises(FinaliseError, match="disallowedRequisites"):
        asyncio.run(_plan_fix_ups("/nix/store/d.drv", drv, {A}, queries))


def test_a_floating_output_is_found_in_the_stores_output_map() -> None:
    drv = _drv({}, kind="caFloating")
    queries = MemoryQueries({}, output_map={"out": OUT})
    assert asyncio.run(outputs_of("/nix/store/d.drv", queries, drv)) == OUTPUTS
    assert queries.asked == ["outputs /nix/store/d.drv"]
    with pytest.raises(FinaliseError, match="cannot determine output 'out'"):
        asyncio.run(outputs_of("/nix/store/d.drv", MemoryQueries({}), drv))


def test_a_missing_output_fails_the_plan(tmp_path):
    drv = _drv({})
    drv.outputs["out"].path = str(tmp_path / "gone")
    drv.outputs["dev"].path = str(tmp_path / "gone-dev")
    with pytest.raises(FinaliseError, match="does not exist"):
        asyncio.run(_plan_fix_ups("/nix/store/d.drv", drv, {A}, MemoryQueries({})))
