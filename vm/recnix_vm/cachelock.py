"""One builder per cache entry: an advisory lock file per entry of the image cache.

Two processes may want the same base tarball, disk image, root filesystem or SSH
key at once (the test suite's parallel workers, a demo beside a test run). The
first takes the entry's lock and builds it; the others wait, then find it built.
The lock is ``flock`` on ``<cache>/locks/<name>.lock``: the kernel drops it when
its holder dies, so a killed build never blocks the next one.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .log import log


@contextmanager
def cache_lock(cache: Path, name: str) -> Iterator[None]:
    """Hold the lock of cache entry ``name`` for the block (waiting, with a log line,
    while another process holds it)."""
    locks = cache / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    fd = os.open(locks / f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process building {name} (lock: {locks / name}.lock)")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
