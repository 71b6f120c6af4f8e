"""Make store paths durable before a recursive build relies on them.

Nix 2.8 registers a path in its database (fsynced) without fsyncing the
path's files, so a crash or power loss shortly after an add can leave a valid
path with empty or partial contents. recnix fsyncs every path a session adds
or builds before the sandboxed client is told about it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable


def fsync_tree(path: str, parent: bool = True) -> None:
    """fsync every regular file and directory below ``path`` (symlinks are skipped), and
    (``parent``) the directory holding ``path``."""
    if os.path.islink(path):
        if parent:
            _fsync(os.path.dirname(path))
        return
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            for name in files:
                full = os.path.join(root, name)
                if not os.path.islink(full):
                    _fsync(full)
            _fsync(root)
            dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]
    else:
        _fsync(path)
    if parent:
        _fsync(os.path.dirname(path))


def fsync_paths(paths: Iterable[str]) -> None:
    """:func:`fsync_tree` of each path; each parent directory (``/nix/store``) is synced
    once, after all of them."""
    parents: dict[str, None] = {}
    for path in paths:
        fsync_tree(path, parent=False)
        parents[os.path.dirname(path)] = None
    for parent in parents:
        _fsync(parent)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
