"""Per-session journals: what a restarted service needs to resume a running build's session.

One JSON-lines file per session in ``<state-dir>/journal/<sid>.jsonl``: a header line
(who the session is), then one line per change (paths allowed, builds requested, bytes
added, ...). Lines are appended and never rewritten, so a crash loses at most the line
being written; :func:`replay` skips a torn last line. The state directory is normally a
tmpfs (``/run/recnix``): a reboot ends every build, and every journal with it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

JOURNAL_DIR = "journal"


@dataclass
class SessionRecord:
    """A session as its journal describes it."""

    sid: str
    drv_path: str
    chroot: str
    readonly: bool
    depth: int
    parent: str | None
    holds_slot: bool
    allowed: set[str] = field(default_factory=set)  # what the session added or built
    materialised: dict[str, str] = field(default_factory=dict)  # path -> mechanism
    build_requests: set[str] = field(default_factory=set)
    realisations: set[str] = field(default_factory=set)
    builds: int = 0
    added_bytes: int = 0
    # finalisation began (recorded before any output is touched): a restarted service
    # invalidates the outputs of such a session rather than resuming it
    finalising: bool = False


class SessionJournal:
    """Appends one session's changes to its journal file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def of(cls, state_dir: Path, sid: str) -> SessionJournal:
        """The journal of session ``sid`` (it may not exist yet)."""
        return cls(state_dir / JOURNAL_DIR / f"{sid}.jsonl")

    @classmethod
    def create(cls, state_dir: Path, record: SessionRecord) -> SessionJournal:
        """Start the journal of a new session with its header line."""
        journal = cls.of(state_dir, record.sid)
        header = {
            "sid": record.sid,
            "drv": record.drv_path,
            "chroot": record.chroot,
            "readonly": record.readonly,
            "depth": record.depth,
            "parent": record.parent,
            "holds_slot": record.holds_slot,
        }
        try:
            journal._append(header, mode=os.O_CREAT | os.O_EXCL)
        except FileNotFoundError:  # the first session of this state directory
            journal.path.parent.mkdir(mode=0o700, exist_ok=True)
            journal._append(header, mode=os.O_CREAT | os.O_EXCL)
        return journal

    def record(self, **change: Any) -> None:
        """Append one change: ``allowed``/``build_requests``/``realisations`` (lists, added
        to the sets), ``materialised`` (dict, merged), ``builds``/``added_bytes`` (ints,
        replacing), ``finalising`` (True once finalisation begins)."""
        self._append({k: sorted(v) if isinstance(v, set) else v for k, v in change.items()})

    def remove(self) -> None:
        """The session ended: nothing to resume."""
        self.path.unlink(missing_ok=True)

    def _append(self, line: dict[str, Any], mode: int = 0) -> None:
        data = (json.dumps(line, sort_keys=True) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | mode, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)


def replay(path: Path) -> SessionRecord:
    """Read a journal back (ValueError if even its header is unreadable)."""
    lines = path.read_text().splitlines()
    if not lines:
        raise ValueError(f"journal {path} is empty")
    try:
        h = json.loads(lines[0])
        record = SessionRecord(
            sid=str(h["sid"]),
            drv_path=str(h["drv"]),
            chroot=str(h["chroot"]),
            readonly=bool(h["readonly"]),
            depth=int(h["depth"]),
            parent=h["parent"],
            holds_slot=bool(h["holds_slot"]),
        )
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"journal {path} has a bad header: {e}") from None
    for n, text in enumerate(lines[1:], start=2):
        try:
            change = json.loads(text)
        except ValueError:
            if n == len(lines):
                break  # torn last line: the change it describes was never acknowledged
            raise ValueError(f"journal {path} line {n} is not JSON") from None
        record.allowed.update(change.get("allowed", ()))
        record.build_requests.update(change.get("build_requests", ()))
        record.realisations.update(change.get("realisations", ()))
        record.materialised.update(change.get("materialised", {}))
        record.builds = int(change.get("builds", record.builds))
        record.added_bytes = int(change.get("added_bytes", record.added_bytes))
        record.finalising = record.finalising or bool(change.get("finalising", False))
    return record


def journals(state_dir: Path) -> list[Path]:
    """The journal files left in ``state_dir`` (sessions a previous run did not end)."""
    directory = state_dir / JOURNAL_DIR
    return sorted(directory.glob("*.jsonl")) if directory.is_dir() else []


__all__ = ["JOURNAL_DIR", "SessionJournal", "SessionRecord", "journals", "replay"]
