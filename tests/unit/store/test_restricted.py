"""RestrictedStore against an in-memory store: every op × every kind of path, and the
one rule (recnix.store.policy) checked against an independent oracle on generated graphs."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recnix.formats.derivation import Derivation, DerivationOutput, OutputsNode, to_aterm_bytes
from recnix.formats.storepath import make_fixed_output_path
from recnix.protocol import (
    DerivedPath,
    GCResult,
    Missing,
    Op,
    PathInfo,
    ValidPathInfo,
    encode_multiple_entry,
    encode_multiple_header,
)
from recnix.store.policy import Denied
from recnix.store.restricted import SERVED_OPS, SYNC_OPS, NarReply, RestrictedStore
from tests.unit.fakes import FakeClient, FakeSession, FakeStore, nar_of, store_path


def run(value: Any) -> Any:
    if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
        return asyncio.run(value)
    return value


def drv(
    name: str,
    srcs: list[str] = (),  # type: ignore[assignment]
    deps: list[str] = (),  # type: ignore[assignment]
    fod: bool = False,
) -> Derivation:
    """A derivation of ``name`` (fixed-output if ``fod``), output path included."""
    if fod:
        hex_hash = hashlib.sha256(name.encode()).hexdigest()
        out = DerivationOutput(
            "caFixed",
            make_fixed_output_path("flat", "sha256", hex_hash, name),
            "sha256",
            hex_hash,
            "flat",
        )
    else:
        out = DerivationOutput("inputAddressed", store_path(name, repr((srcs, deps))))
    return Derivation(
        outputs={"out": out},
        input_drvs={d: OutputsNode({"out"}) for d in deps},
        input_srcs=sorted(srcs),
        platform="x86_64-linux",
        builder="/bin/sh",
        args=[],
        env={"name": name},
        name=name,
    )


class World:
    """A session with one path of each kind: input, added, built, foreign, invalid."""

    def __init__(self, **limits: Any) -> None:
        self.store = FakeStore()
        s = self.store
        self.src = s.put(store_path("src"))
        self.input_drv = s.put_drv(drv("in", [self.src]), "in")
        self.input = s.put(store_path("input"), b"input", [self.src])
        self.foreign = s.put(store_path("secret"), b"host secret")
        self.foreign_drv = s.put_drv(drv("host", [self.foreign]), "host")
        self.invalid = "/nix/store/../etc/passwd"
        inputs = {self.src, self.input_drv, self.input}
        self.session = FakeSession(s, allowed=set(inputs))
        self.client = FakeClient()
        self.rs = RestrictedStore(s, self.session, self.client)
        # added and built through the restricted store itself
        self.added = run(self.call(Op.ADD_TEXT_TO_STORE, name="added", text=b"a", references=[]))
        self.built_drv = self.call(
            Op.ADD_TEXT_TO_STORE,
            name="b.drv",
            text=to_aterm_bytes(drv("b", [self.src])),
            references=[self.src],
        )
        self.built_drv = run(self.built_drv)
        run(self.build(self.built_drv))
        self.built = s.read_derivation(self.built_drv).outputs["out"].path  # type: ignore[union-attr]
        assert self.built in self.session.allowed
        self.session.limits = replace(self.session.limits, **limits)
        self.session.added_bytes = 0

    def call(self, op: Op, data: list[bytes] | None = None, **args: Any) -> Any:
        self.client.data = data or []
        return run(self.rs.serve(op, args))

    def build(self, drv_path: str, op: Op = Op.BUILD_PATHS) -> Any:
        return self.call(op, paths=[DerivedPath(drv_path, ["out"])], build_mode=0)

    def path(self, kind: str) -> str:
        return getattr(self, kind)


KINDS = ["input", "added", "built", "foreign", "invalid"]
ALLOWED = {"input", "added", "built"}
DENY = "deny"


def nar_info(path: str, refs: list[str]) -> dict:
    return {
        "path": path,
        "deriver": None,
        "nar_hash": "00" * 32,
        "references": refs,
        "registration_time": 0,
        "nar_size": 2,
        "ultimate": False,
        "sigs": [],
        "ca": None,
        "repair": False,
        "dont_check_sigs": False,
    }


# op -> (args for a path p, expected outcome when p is allowed, when p is foreign);
# an invalid path is always refused. An outcome is a value, DENY, or a predicate.
def _cases(w: World) -> dict[Op, Any]:
    return {
        Op.IS_VALID_PATH: (lambda p: {"path": p}, True, False),
        Op.QUERY_PATH_INFO: (
            lambda p: {"path": p},
            lambda v: (
                isinstance(v, PathInfo) and v.deriver is None and v.sigs == [] and not v.ultimate
            ),
            None,
        ),
        Op.QUERY_VALID_PATHS: (
            lambda p: {"paths": [p], "substitute": False},
            lambda v: len(v) == 1,
            [],
        ),
        Op.QUERY_PATH_HASH: (lambda p: {"path": p}, lambda v: len(v) == 64, DENY),
        Op.QUERY_REFERENCES: (lambda p: {"path": p}, lambda v: isinstance(v, list), DENY),
        Op.QUERY_DERIVER: (lambda p: {"path": p}, None, None),
        Op.QUERY_REFERRERS: (lambda p: {"path": p}, [], []),
        Op.QUERY_VALID_DERIVERS: (lambda p: {"path": p}, [], []),
        Op.HAS_SUBSTITUTES: (lambda p: {"path": p}, False, False),
        Op.QUERY_SUBSTITUTABLE_PATH_INFO: (lambda p: {"path": p}, None, None),
        Op.NAR_FROM_PATH: (lambda p: {"path": p}, lambda v: isinstance(v, NarReply), DENY),
        Op.ENSURE_PATH: (lambda p: {"path": p}, 1, DENY),
        Op.ADD_TEMP_ROOT: (lambda p: {"path": p}, 1, 1),
        Op.QUERY_MISSING: (
            lambda p: {"targets": [DerivedPath(p)]},
            lambda v: isinstance(v, Missing) and not v.unknown,
            lambda v: isinstance(v, Missing) and len(v.unknown) == 1,
        ),
        Op.BUILD_PATHS: (lambda p: {"paths": [DerivedPath(p)], "build_mode": 0}, 1, DENY),
        Op.ADD_TEXT_TO_STORE: (
            lambda p: {"name": "t", "text": b"t", "references": [p]},
            lambda v: v in w.session.allowed,
            DENY,
        ),
        Op.ADD_TO_STORE: (
            lambda p: {"name": "f", "ca_method": "fixed:sha256", "references": [p]},
            lambda v: v.path in w.session.allowed,
            DENY,
        ),
        Op.ADD_TO_STORE_NAR: (
            lambda p: nar_info(store_path("nar", p), [p]),
            None,
            DENY,
        ),
    }


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "op",
    [
        Op.IS_VALID_PATH,
        Op.QUERY_PATH_INFO,
        Op.QUERY_VALID_PATHS,
        Op.QUERY_PATH_HASH,
        Op.QUERY_REFERENCES,
        Op.QUERY_DERIVER,
        Op.QUERY_REFERRERS,
        Op.QUERY_VALID_DERIVERS,
        Op.HAS_SUBSTITUTES,
        Op.QUERY_SUBSTITUTABLE_PATH_INFO,
        Op.NAR_FROM_PATH,
        Op.ENSURE_PATH,
        Op.ADD_TEMP_ROOT,
        Op.QUERY_MISSING,
        Op.BUILD_PATHS,
        Op.ADD_TEXT_TO_STORE,
        Op.ADD_TO_STORE,
        Op.ADD_TO_STORE_NAR,
    ],
    ids=lambda o: o.name,
)
def test_op_by_kind_of_path(op: Op, kind: str) -> None:
    w = World()
    args_of, if_allowed, if_foreign = _cases(w)[op]
    p = w.path(kind)
    data = (
        [nar_of(b"payload")]
        if op is Op.ADD_TO_STORE_NAR
        else [b"payload"]
        if op in (Op.ADD_TO_STORE, Op.ADD_TO_STORE_NAR)
        else None
    )
    expected = DENY if kind == "invalid" else if_allowed if kind in ALLOWED else if_foreign
    if expected == DENY:
        with pytest.raises(Denied) as e:
            w.call(op, data, **args_of(p))
        assert p in str(e.value) or "store path" in str(e.value) or "not valid" in str(e.value)
        return
    value = w.call(op, data, **args_of(p))
    if callable(expected):
        assert expected(value), value
    else:
        assert value == expected


@pytest.mark.parametrize("kind", ["input_drv", "built_drv", "foreign_drv"])
@pytest.mark.parametrize(
    "op",
    [Op.QUERY_DERIVATION_OUTPUTS, Op.QUERY_DERIVATION_OUTPUT_NAMES, Op.QUERY_DERIVATION_OUTPUT_MAP],
)
def test_derivation_queries(op: Op, kind: str) -> None:
    w = World()
    p = w.path(kind)
    key = "drv_path" if op is Op.QUERY_DERIVATION_OUTPUT_MAP else "path"
    if kind == "foreign_drv":
        with pytest.raises(Denied, match="neither an input"):
            w.call(op, **{key: p})
    else:
        assert w.call(op, **{key: p})


def test_ops_not_served_are_refused() -> None:
    w = World()
    for op in Op:
        if op in SERVED_OPS:
            continue
        with pytest.raises(Denied, match=f"operation {op.name} is not allowed"):
            w.rs.serve(op, {})
    assert Op.ADD_SIGNATURES not in SERVED_OPS and Op.EXPORT_PATH not in SERVED_OPS
    assert Op.IS_VALID_PATH in SYNC_OPS and Op.BUILD_PATHS not in SYNC_OPS


def test_inert_and_refused_maintenance_ops() -> None:
    w = World()
    assert (
        w.call(Op.COLLECT_GARBAGE, action=0, paths=[], ignore_liveness=False, max_freed=0)
        == GCResult()
    )
    assert any(e["event"] == "refused" and e["op"] == "COLLECT_GARBAGE" for e in w.session.events)
    assert w.call(Op.FIND_ROOTS) == {}
    assert w.call(Op.OPTIMISE_STORE) == 1
    assert w.call(Op.VERIFY_STORE, check_contents=True, repair=False) == 0
    with pytest.raises(Denied, match="repair"):
        w.call(Op.VERIFY_STORE, check_contents=False, repair=True)
    with pytest.raises(Denied, match="queryPathFromHashPart"):
        w.call(Op.QUERY_PATH_FROM_HASH_PART, hash_part="x" * 32)
    assert w.call(Op.QUERY_ALL_VALID_PATHS) == sorted(w.session.allowed)
    assert w.foreign not in w.call(Op.QUERY_ALL_VALID_PATHS)


# -- the smuggling routes of issue 10


def leak_drv(w: World, via: str = "src") -> Derivation:
    if via == "src":
        return drv("leak", [w.src, w.foreign])
    return drv("leak", [w.src], deps=[w.foreign_drv])


@pytest.mark.parametrize("via", ["src", "drv"])
def test_route1_a_drv_named_source_among_the_inputs(via: str) -> None:
    w = World()
    # a source whose name ends in .drv: no references, so the foreign path is not an input
    leak = w.store.put_drv(leak_drv(w, via), "leak", refs=False)
    w.session.allowed.add(leak)
    with pytest.raises(Denied) as e:
        w.build(leak)
    foreign = w.foreign if via == "src" else w.foreign_drv
    assert foreign in str(e.value) and leak in str(e.value)
    assert w.store.ran == [w.built_drv]  # nothing more was built


@pytest.mark.parametrize("via", ["src", "drv"])
@pytest.mark.parametrize("add_op", ["text", "flat", "nar", "add-nar", "multiple"])
def test_route2_a_drv_added_inside_is_refused(via: str, add_op: str) -> None:
    w = World(max_added_bytes=10_000)
    text = to_aterm_bytes(leak_drv(w, via))
    before = set(w.session.allowed)
    with pytest.raises(Denied) as e:
        add(w, "leak.drv", text, add_op)
    foreign = w.foreign if via == "src" else w.foreign_drv
    assert foreign in str(e.value) and "cannot add derivation" in str(e.value)
    assert w.session.allowed == before
    assert w.session.added_bytes == 0  # the refused add is not charged


def add(w: World, name: str, content: bytes, how: str, refs: list[str] = ()) -> str:  # type: ignore[assignment]
    refs = list(refs)
    if how == "text":
        return w.call(Op.ADD_TEXT_TO_STORE, name=name, text=content, references=refs)
    if how in ("flat", "nar"):
        method = "fixed:sha256" if how == "flat" else "fixed:r:sha256"
        body = content if how == "flat" else nar_of(content)
        return w.call(Op.ADD_TO_STORE, [body], name=name, ca_method=method, references=refs).path
    path = store_path(name, content.decode())
    if how == "add-nar":
        w.call(Op.ADD_TO_STORE_NAR, [nar_of(content)], **nar_info(path, refs))
        return path
    nar = nar_of(content)
    info = ValidPathInfo(path, PathInfo(None, "00" * 32, refs, 0, len(nar)))
    stream = encode_multiple_header(1) + encode_multiple_entry(info) + nar
    w.call(Op.ADD_MULTIPLE_TO_STORE, [stream], repair=False, dont_check_sigs=False)
    return path


@pytest.mark.parametrize("add_op", ["text", "flat", "nar", "add-nar", "multiple"])
def test_a_derivation_instantiated_inside_from_inputs_builds(add_op: str) -> None:
    w = World()
    dep = add(w, "dep.drv", to_aterm_bytes(drv("dep", [w.src, w.added])), add_op)
    top = add(w, "top.drv", to_aterm_bytes(drv("top", [w.input], deps=[dep])), add_op)
    w.build(top, Op.BUILD_PATHS_WITH_RESULTS)
    assert w.store.ran[-2:] == [dep, top]
    out = w.store.read_derivation(top).outputs["out"].path  # type: ignore[union-attr]
    assert out in w.session.allowed


def test_what_a_build_adds_or_builds_is_kept_on_its_store_before_it_is_allowed() -> None:
    """One route to the daemon: the restricted store keeps each new path (temp roots,
    ``Store.keep``) and walks the built outputs' closure on its own store, before the
    session allows them (FakeSession.allow fails on a path not kept); a path allowed
    already is not kept again."""
    w = World()
    counting = CountingStore(w.store)
    rs = RestrictedStore(counting, w.session, w.client)  # type: ignore[arg-type]
    dep = w.store.put(store_path("dep"), b"dep", [w.src])
    top = w.store.put_drv(drv("top", [w.src, dep]), "top")  # a host derivation
    w.session.allowed |= {top, dep}
    counting.calls.clear()
    run(rs.serve(Op.BUILD_PATHS, {"paths": [DerivedPath(top, ["out"])], "build_mode": 0}))
    out = w.store.read_derivation(top).outputs["out"].path  # type: ignore[union-attr]
    assert out in w.session.allowed and out in w.store.kept
    assert "query_path_info" in counting.calls and "keep" in counting.calls
    kept = set(w.store.kept)
    assert not kept & {w.src, dep}  # allowed already, so not kept again
    counting.calls.clear()
    run(rs.serve(Op.BUILD_PATHS, {"paths": [DerivedPath(top, ["out"])], "build_mode": 0}))
    assert "keep" not in counting.calls and w.store.kept == kept


@pytest.mark.parametrize("how", ["add-nar", "multiple"])
def test_a_host_path_cannot_be_claimed_by_name(how: str) -> None:
    """Nix's daemon accepts a NAR for an already-valid path unread: the NAR must be the
    path's own (the client then had the content anyway)."""
    w = World()
    with pytest.raises(Denied, match="already exists in the host store"):
        claim(w, w.foreign, b"anything", how)
    assert w.foreign not in w.session.allowed
    claim(w, w.foreign, b"host secret", how)
    assert w.foreign in w.session.allowed


def claim(w: World, path: str, content: bytes, how: str) -> None:
    nar = nar_of(content)
    if how == "add-nar":
        w.call(Op.ADD_TO_STORE_NAR, [nar], **nar_info(path, []))
        return
    info = ValidPathInfo(path, PathInfo(None, "00" * 32, [], 0, len(nar)))
    stream = encode_multiple_header(1) + encode_multiple_entry(info) + nar
    w.call(Op.ADD_MULTIPLE_TO_STORE, [stream], repair=False, dont_check_sigs=False)


def test_a_non_derivation_named_drv_cannot_be_added() -> None:
    w = World()
    with pytest.raises(Denied, match="not a derivation"):
        add(w, "junk.drv", b"not an aterm", "text")


def test_the_builder_writing_the_text_as_a_nested_output() -> None:
    """A nested build whose output is named *.drv and holds the leaking text."""
    w = World()
    text = to_aterm_bytes(leak_drv(w))
    maker = add(w, "maker.drv", to_aterm_bytes(drv("maker.drv", [w.src])), "text")
    w.build(maker)
    out = w.store.read_derivation(maker).outputs["out"].path  # type: ignore[union-attr]
    assert out.endswith(".drv") and out in w.session.allowed
    w.store.contents[out] = text  # what the builder wrote
    with pytest.raises(Denied, match=w.foreign):
        w.build(out)


def test_outer_derivation_is_never_buildable() -> None:
    w = World()
    w.session.allowed.add(w.session.drv_path)
    with pytest.raises(Denied, match="from inside its own build"):
        w.build(w.session.drv_path)


def test_existing_fixed_output_is_handed_out_and_audited_or_denied() -> None:
    for policy in ("allow", "deny"):
        w = World(existing_fixed_outputs=policy)
        fod = add(w, "src.tar.drv", to_aterm_bytes(drv("src.tar", [w.src], fod=True)), "text")
        out = w.store.read_derivation(fod).outputs["out"].path  # type: ignore[union-attr]
        w.store.put(out, b"fetched on the host")
        top = add(w, "pkg.drv", to_aterm_bytes(drv("pkg", [w.src], deps=[fod])), "text")
        if policy == "deny":
            with pytest.raises(Denied, match="existing-fixed-outputs"):
                w.build(top)
            continue
        w.build(top)
        assert fod not in w.store.ran and top in w.store.ran
        ev = [e for e in w.session.events if e["event"] == "existing-fixed-output"]
        assert ev == [{"event": "existing-fixed-output", "derivation": fod, "outputs": [out]}]


def test_fixed_output_that_would_run_needs_allow_fixed_output() -> None:
    for allow in (False, True):
        w = World(allow_fixed_output=allow)
        fod = add(w, "f.drv", to_aterm_bytes(drv("f", [w.src], fod=True)), "text")
        if allow:
            w.build(fod)
            assert fod in w.store.ran
        else:
            with pytest.raises(Denied, match="allow-fixed-output"):
                w.build(fod)


# -- limits and aborts


@pytest.mark.parametrize("forward", [True, False])
def test_nested_build_logs_follow_forward_build_logs(forward: bool) -> None:
    w = World(forward_build_logs=forward)
    w.client.logs.clear()
    top = add(w, "logged.drv", to_aterm_bytes(drv("logged", [w.src])), "text")
    w.build(top)
    assert bool(w.client.logs) is forward


def test_refused_add_is_not_charged() -> None:
    w = World(max_added_bytes=100)
    with pytest.raises(Denied, match="max-added-bytes"):
        add(w, "big", b"x" * 200, "flat")
    with pytest.raises(Denied, match="max-added-bytes"):
        add(w, "big", b"x" * 200, "nar")
    with pytest.raises(Denied, match="max-added-bytes"):
        add(w, "big", b"x" * 200, "text")
    assert w.session.added_bytes == 0
    assert add(w, "small", b"x" * 50, "flat") in w.session.allowed
    assert w.session.added_bytes == 50


def test_client_abort_mid_nar_ends_the_upstream_request_cleanly() -> None:
    w = World()
    w.client.fail_after = 1
    with pytest.raises(ConnectionResetError):
        w.call(
            Op.ADD_TO_STORE,
            [b"part", b"rest)"],
            name="n",
            ca_method="fixed:r:sha256",
            references=[],
        )
    # the fake store saw a truncated NAR (as the daemon would: an error, not a lost worker)
    assert not any(p.endswith("-n") for p in w.store.infos)


# -- the one rule, against an independent oracle


@st.composite
def graphs(draw: Any) -> dict:
    n = draw(st.integers(1, 6))
    nodes = []
    for i in range(n):
        nodes.append(
            {
                "srcs": draw(
                    st.lists(
                        st.sampled_from(["ok1", "ok2", "bad1", "bad2"]), max_size=3, unique=True
                    )
                ),
                "deps": draw(st.lists(st.integers(0, i - 1), max_size=3, unique=True)) if i else [],
                "fod": draw(st.booleans()),
                "valid": draw(st.booleans()),
                "allowed": draw(st.sampled_from([True, True, True, False])),
            }
        )
    return {
        "nodes": nodes,
        "root": draw(st.integers(0, n - 1)),
        "allow_fod": draw(st.booleans()),
        "existing": draw(st.sampled_from(["allow", "deny"])),
    }


def oracle(g: dict) -> tuple[bool, set[int], set[int]]:
    """The rule as docs/security.md states it: (permitted, derivations run, FODs handed out)."""
    nodes = g["nodes"]

    def sound(i: int) -> bool:  # rule 1, recursively
        d = nodes[i]
        return (
            d["allowed"]
            and all(s.startswith("ok") for s in d["srcs"])
            and all(map(sound, d["deps"]))
        )

    runs: set[int] = set()
    handed: set[int] = set()

    def visit(i: int) -> None:  # what Nix would do: nothing below a derivation that is built
        if nodes[i]["valid"]:
            if nodes[i]["fod"]:
                handed.add(i)
            return
        runs.add(i)
        for j in nodes[i]["deps"]:
            visit(j)

    visit(g["root"])
    ok = (
        sound(g["root"])
        and (g["allow_fod"] or not any(nodes[i]["fod"] for i in runs))
        and (g["existing"] == "allow" or not handed)
    )
    return ok, runs, handed


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graphs())
def test_build_decision_equals_the_written_rule(g: dict) -> None:
    store = FakeStore()
    srcs = {k: store.put(store_path(k)) for k in ["ok1", "ok2", "bad1", "bad2"]}
    paths: list[str] = []
    for i, node in enumerate(g["nodes"]):
        d = drv(
            f"d{i}", [srcs[s] for s in node["srcs"]], [paths[j] for j in node["deps"]], node["fod"]
        )
        p = store.put_drv(d, f"d{i}", refs=False)
        if node["valid"]:
            store.put(d.outputs["out"].path, b"exists")  # type: ignore[arg-type]
        paths.append(p)
    allowed = {srcs["ok1"], srcs["ok2"]} | {
        p for p, n in zip(paths, g["nodes"], strict=True) if n["allowed"]
    }
    session = FakeSession(store, allowed=allowed)
    session.limits = replace(
        session.limits, allow_fixed_output=g["allow_fod"], existing_fixed_outputs=g["existing"]
    )
    rs = RestrictedStore(store, session, FakeClient())
    ok, runs, handed = oracle(g)
    root = paths[g["root"]]
    try:
        run(rs.serve(Op.BUILD_PATHS, {"paths": [DerivedPath(root, ["out"])], "build_mode": 0}))
        permitted = True
    except Denied as e:
        permitted = False
        assert "cannot" in str(e)
    assert permitted == ok
    if ok:
        assert set(store.ran) == {paths[i] for i in runs}
        audited = {e["derivation"] for e in session.events if e["event"] == "existing-fixed-output"}
        assert audited == {paths[i] for i in handed}
        assert store.read_derivation(root).outputs["out"].path in session.allowed  # type: ignore[union-attr]
    else:
        assert store.ran == []


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from(["src", "added", "foreign", "input_drv", "foreign_drv"]), max_size=4),
    st.sampled_from(["text", "flat", "nar", "add-nar", "multiple"]),
)
def test_drv_add_decision_equals_the_written_rule(named: list[str], how: str) -> None:
    w = World()
    srcs = [w.path(k) for k in named if not k.endswith("drv")]
    deps = [w.path(k) for k in named if k.endswith("drv")]
    text = to_aterm_bytes(drv("gen", srcs, deps))
    refused = any(k.startswith("foreign") for k in named)
    if refused:
        with pytest.raises(Denied, match="cannot add derivation"):
            add(w, "gen.drv", text, how)
    else:
        assert add(w, "gen.drv", text, how) in w.session.allowed


class CountingStore:
    """Counts the calls a restricted store makes to ``store``."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.store, name)
        if callable(attr):

            def call(*a: Any, **k: Any) -> Any:
                self.calls.append(name)
                return attr(*a, **k)

            return call
        return attr


def test_answers_known_without_asking_upstream() -> None:
    """What a nested nix-build asks right after its add and its build (the added .drv's
    info, the built derivation's output map) is answered from what the restricted store
    just learnt; the answers equal upstream's, and unallowed paths are still refused."""
    w = World()
    counting = CountingStore(w.store)
    rs = RestrictedStore(counting, w.session, w.client)  # type: ignore[arg-type]
    text = to_aterm_bytes(drv("fresh", [w.src]))
    drv_path = run(
        rs.serve(Op.ADD_TEXT_TO_STORE, {"name": "fresh.drv", "text": text, "references": [w.src]})
    )
    upstream = run(w.store.query_path_info(drv_path))
    counting.calls.clear()
    info = run(rs.serve(Op.QUERY_PATH_INFO, {"path": drv_path}))
    assert info.nar_hash == upstream.nar_hash and info.references == upstream.references
    assert info.deriver is None and info.sigs == []
    assert counting.calls == []
    run(rs.serve(Op.BUILD_PATHS, {"paths": [DerivedPath(drv_path, ["out"])], "build_mode": 0}))
    counting.calls.clear()
    outputs = run(rs.serve(Op.QUERY_DERIVATION_OUTPUT_MAP, {"drv_path": drv_path}))
    assert outputs == run(w.store.query_derivation_output_map(drv_path))
    assert counting.calls == []
    with pytest.raises(Denied, match="neither an input"):
        rs.serve(Op.QUERY_DERIVATION_OUTPUT_MAP, {"drv_path": w.foreign_drv})
    # a derivation built on another connection is asked upstream
    other = RestrictedStore(counting, w.session, w.client)  # type: ignore[arg-type]
    assert run(other.serve(Op.QUERY_DERIVATION_OUTPUT_MAP, {"drv_path": drv_path})) == outputs
    assert counting.calls == ["query_derivation_output_map"]
