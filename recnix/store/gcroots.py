"""Per-session GC roots that outlive the service process.

A session keeps what it added or built alive with temp roots on its keeper
connection: race-free against a running garbage collection, but gone as soon
as that connection closes. So that a restart of the service does not open a
window for the collector, each session also keeps a directory of symlinks,
``<gc-roots-dir>/<sid>/<store path name>``, under Nix's ``gcroots`` directory
(which the collector searches recursively). The directory goes when the session
ends; at start the service removes those of sessions it did not resume. Not
fsynced: they guard against a restart of the service, and a crash of the
machine ends the builds (and /run's journals) anyway.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path


class SessionRoots:
    """The GC-root directory of one session."""

    def __init__(self, roots_dir: Path, sid: str) -> None:
        self.path = roots_dir / sid
        self._made = False

    def add(self, store_paths: Iterable[str]) -> None:
        """Root ``store_paths`` (already valid and temp-rooted); idempotent."""
        if not self._made:
            self.path.mkdir(mode=0o755, parents=True, exist_ok=True)
            self._made = True
        for store_path in store_paths:
            link = self.path / os.path.basename(store_path)
            try:
                os.symlink(store_path, link)
            except FileExistsError:
                if os.readlink(link) != store_path:
                    raise

    def rooted(self) -> set[str]:
        """The store paths this directory roots."""
        try:
            return {os.readlink(entry.path) for entry in os.scandir(self.path)}
        except FileNotFoundError:
            return set()

    def remove(self) -> None:
        """Drop every root of the session."""
        if self._made or os.path.lexists(self.path):
            shutil.rmtree(self.path, ignore_errors=True)
        self._made = False


def sweep(roots_dir: Path, keep: Iterable[str]) -> list[str]:
    """Remove the root directories of sessions not in ``keep``; return their sids."""
    keep = set(keep)
    removed = []
    try:
        entries = list(os.scandir(roots_dir))
    except FileNotFoundError:
        return []
    for entry in entries:
        if entry.name not in keep and entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.name)
    return removed
