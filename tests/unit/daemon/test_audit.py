"""Where nested builds ran, from Nix's build log lines (recnix tree, issue 12)."""

from __future__ import annotations

from recnix.daemon.audit import LOCAL, UNKNOWN, BuildNode, annotate_where, render_tree, where_built

A = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-inner.drv"
B = "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-other.drv"
C = "/nix/store/cccccccccccccccccccccccccccccccc-deep.drv"
OUTER = "/nix/store/dddddddddddddddddddddddddddddddd-outer.drv"


def test_where_built_reads_nix_activity_lines() -> None:
    log = (
        "these 2 derivations will be built:\n"
        f"  {A}\n"
        f"building '{A}' on 'ssh-ng://root@builder'...\n"
        "copying 0 paths...\n"
        f"building '{A}'...\n"
        f"building '{B}'...\n"
    )
    assert where_built(log) == {A: "ssh-ng://root@builder", B: LOCAL}


def test_annotate_where_marks_each_level_and_unknowns() -> None:
    deep = BuildNode(drv=C)
    inner = BuildNode(drv=A, children=[deep])
    other = BuildNode(drv=B)
    root = BuildNode(drv=OUTER, children=[inner, other])
    logs = {OUTER: f"building '{A}' on 'ssh://builder'...\n", A: f"building '{C}'...\n"}
    annotate_where(root, logs.get)
    assert (inner.ran_on, other.ran_on, deep.ran_on) == ("ssh://builder", UNKNOWN, LOCAL)
    assert root.ran_on is None
    text = render_tree(root)
    assert f"{A} [unknown] (ran on ssh://builder)" in text
    assert f"(ran on {UNKNOWN})" in text
