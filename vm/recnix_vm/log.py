"""Nested, timed log lines on stderr (modelled on the NixOS test driver's ``nested``)."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

_START = time.monotonic()
_local = threading.local()
_lock = threading.Lock()


def _depth() -> int:
    return getattr(_local, "depth", 0)


# When set (`recnix-vm demo` without --verbose), log lines go here instead of stderr:
# the harness's internals, shown only if something fails (see ``held_back``).
_held: list[str] | None = None


def log(message: str) -> None:
    """Print one line, indented by the current nesting, prefixed by seconds since start."""
    stamp = time.monotonic() - _START
    line = f"[{stamp:7.1f}s] {'  ' * _depth()}{message}"
    with _lock:
        if _held is not None:
            _held.append(line)
        else:
            print(line, file=sys.stderr, flush=True)


def hold_back() -> None:
    """From now on keep log lines instead of printing them (``held_back`` has them)."""
    global _held
    with _lock:
        _held = []


def held_back() -> list[str]:
    """The log lines kept since ``hold_back`` (empty when lines are printed)."""
    with _lock:
        return list(_held or [])


@contextmanager
def nested(message: str) -> Iterator[None]:
    """Log ``message``, run the block one level deeper, then log how long it took."""
    log(message)
    start = time.monotonic()
    _local.depth = _depth() + 1
    ok = False
    try:
        yield
        ok = True
    finally:
        _local.depth = _depth() - 1
        outcome = "done" if ok else "FAILED"
        log(f"({outcome}: {message}, in {time.monotonic() - start:.1f} s)")
