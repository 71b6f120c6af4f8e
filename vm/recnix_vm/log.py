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


def log(message: str) -> None:
    """Print one line, indented by the current nesting, prefixed by seconds since start."""
    stamp = time.monotonic() - _START
    with _lock:
        print(f"[{stamp:7.1f}s] {'  ' * _depth()}{message}", file=sys.stderr, flush=True)


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
