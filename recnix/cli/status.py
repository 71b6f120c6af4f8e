"""``recnix status``: the service's open sessions as a table (pure formatting)."""

from __future__ import annotations

from typing import Any

COLUMNS = ("SESSION", "BUILD", "DEPTH", "MODE", "STATE", "AGE", "BUILDS", "ADDED", "CONNS")


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def human_age(seconds: float | None) -> str:
    """75 -> '1m15s'; None (not known) -> '?'."""
    if seconds is None:
        return "?"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def build_name(drv: str) -> str:
    """/nix/store/<hash>-outer.drv -> 'outer'."""
    base = drv.rsplit("/", 1)[-1]
    if len(base) > 33 and base[32] == "-":
        base = base[33:]
    return base[:-4] if base.endswith(".drv") else base


def session_row(s: dict[str, Any], now: float) -> tuple[str, ...]:
    """One table row of a session as the ``status`` control op describes it."""
    opened = s.get("opened")
    return (
        str(s.get("session", "?")),
        build_name(str(s.get("drv", "?"))),
        str(s.get("depth", "?")),
        "readonly" if s.get("readonly") else "full",
        str(s.get("state", "?")),
        human_age(now - opened if isinstance(opened, (int, float)) else None),
        str(s.get("builds", 0)),
        f"{s.get('added', 0)} ({human_bytes(int(s.get('added_bytes', 0)))})",
        str(s.get("connections", 0)),
    )


def render_failures(failures: list[dict[str, Any]]) -> str:
    """The builds recnix failed itself (e.g. a builder that cannot reach its socket)."""
    if not failures:
        return ""
    lines = ["", "builds recnix failed:"]
    lines += [f"  {f.get('drv', '?')}: {f.get('reason', '?')}" for f in failures]
    return "\n".join(lines) + "\n"


def render_status(sessions: list[dict[str, Any]], now: float) -> str:
    """The table: one row per session, columns aligned; a line saying so when there is none.

    BUILDS counts nested build requests, ADDED the paths added or built (and their
    NAR bytes added), CONNS the connections being served now, AGE the time since
    this service opened (or, after a restart, resumed) the session.
    """
    if not sessions:
        return "no open recnix sessions\n"
    rows = [COLUMNS, *(session_row(s, now) for s in sessions)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]
    drvs = [f"  {s.get('session', '?')}: {s.get('drv', '?')}" for s in sessions]
    return "\n".join(lines + ["", "derivations:", *drvs]) + "\n"
