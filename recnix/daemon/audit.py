"""Audit log (one JSON line per session event) and the tree of nested builds.

Events: ``opened``, ``refused`` (an op denied, with the reason), ``added`` (a
path became allowed through an add), ``build-started``, ``build-finished``,
``existing-fixed-output`` (a nested build was handed the existing outputs of a
fixed-output derivation: ``derivation``, ``outputs``), ``finalised``,
``aborted``; ``guarded`` (recnix.remote.guards: a build without its ``.drv`` got a
guard socket). ``recnix tree`` reads the log back, and the build logs for
where each nested build ran (:func:`annotate_where`).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class AuditLog:
    """Appends events as JSON lines; a no-op when ``path`` is None."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, event: str, session: str, **fields: Any) -> None:
        """Record one event of one session."""
        if self.path is None:
            return
        record = {"time": round(time.time(), 3), "event": event, "session": session, **fields}
        line = json.dumps(record, sort_keys=True) + "\n"
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)


def read_events(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the events of an audit log, skipping lines that are not JSON objects."""
    with path.open() as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                yield record


@dataclass
class BuildNode:
    """One recursive build and what it did inside its sandbox."""

    drv: str
    outputs: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    children: list[BuildNode] = field(default_factory=list)
    status: str = "unknown"
    ran_on: str | None = None  # where Nix said it built this (see annotate_where)


def build_tree(events: list[dict[str, Any]], drv: str) -> BuildNode:
    """The tree of nested builds below ``drv``, from audit events (latest session wins)."""
    sessions: dict[str, dict[str, Any]] = {}
    latest_for_drv: dict[str, str] = {}
    for ev in events:
        sid = ev.get("session", "")
        s = sessions.setdefault(sid, {"drv": None, "built": [], "added": [], "status": "open"})
        kind = ev.get("event")
        if kind == "opened":
            s["drv"] = ev.get("drv")
            latest_for_drv[ev.get("drv", "")] = sid
        elif kind == "added":
            s["added"].append(ev.get("path", ""))
        elif kind == "build-finished":
            s["built"].append((ev.get("targets", []), ev.get("outputs", []), ev.get("ok")))
        elif kind == "finalised":
            s["status"] = "finalised"
            s["outputs"] = ev.get("outputs", [])
        elif kind == "aborted":
            s["status"] = "aborted: " + str(ev.get("reason", ""))

    def node(drv_path: str, seen: frozenset[str]) -> BuildNode:
        n = BuildNode(drv=drv_path)
        sid = latest_for_drv.get(drv_path)
        if sid is None or drv_path in seen:
            return n
        s = sessions[sid]
        n.status = s["status"]
        n.outputs = list(s.get("outputs", []))
        n.added = [p for p in s["added"] if not p.endswith(".drv")]
        for targets, outputs, ok in s["built"]:
            for target in targets:
                child_drv = target.split("!", 1)[0]
                if not child_drv.endswith(".drv"):
                    continue
                child = node(child_drv, seen | {drv_path})
                if not child.outputs:
                    child.outputs = [o for o in outputs if not o.endswith(".drv")]
                if child.status == "unknown":
                    child.status = "built" if ok else "failed"
                n.children.append(child)
        return n

    return node(drv, frozenset())


def render_tree(root: BuildNode) -> str:
    """Text rendering of a build tree, one build per line, indented by depth."""
    lines: list[str] = []

    def walk(n: BuildNode, prefix: str, last: bool, top: bool) -> None:
        branch = "" if top else ("└── " if last else "├── ")
        outs = ", ".join(n.outputs) if n.outputs else "(no outputs recorded)"
        where = f" (ran on {n.ran_on})" if n.ran_on and not top else ""
        lines.append(f"{prefix}{branch}{n.drv} [{n.status}]{where} -> {outs}")
        child_prefix = prefix if top else prefix + ("    " if last else "│   ")
        items = [("add", p) for p in n.added] + [("drv", c) for c in n.children]
        for i, (kind, item) in enumerate(items):
            is_last = i == len(items) - 1
            if kind == "add":
                lines.append(f"{child_prefix}{'└── ' if is_last else '├── '}added {item}")
            else:
                walk(item, child_prefix, is_last, False)

    walk(root, "", True, True)
    return "\n".join(lines) + "\n"


# Nix's activity text for a build: "building '<drv>'", plus " on '<machine>'"
# when its build hook sent it to a remote builder (DerivationGoal::started).
_BUILDING = re.compile(r"building '(/nix/store/[^']+\.drv)'(?: on '([^']+)')?")
LOCAL = "this machine"
UNKNOWN = "unknown: not in the build log"


def where_built(log_text: str) -> dict[str, str]:
    """Where a build log says each derivation was built: drv -> machine URI or LOCAL."""
    where: dict[str, str] = {}
    for m in _BUILDING.finditer(log_text):
        # A remote build's own log follows Nix's "... on '<machine>'" line and
        # repeats "building '<drv>'" without a machine: the machine wins.
        if m.group(2):
            where[m.group(1)] = m.group(2)
        else:
            where.setdefault(m.group(1), LOCAL)
    return where


def annotate_where(root: BuildNode, read_log: Callable[[str], str | None]) -> None:
    """Set ``ran_on`` of every nested build from its parent's log (``read_log(drv)``:
    the build log of ``drv``, None if there is none); UNKNOWN where the log does not tell."""

    def walk(n: BuildNode) -> None:
        if not n.children:
            return
        where = where_built(read_log(n.drv) or "")
        for child in n.children:
            child.ran_on = where.get(child.drv, UNKNOWN)
            walk(child)

    walk(root)
