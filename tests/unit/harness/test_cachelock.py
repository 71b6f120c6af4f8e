"""recnix_vm.cachelock: one builder per cache entry, across processes."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

from recnix_vm.cachelock import cache_lock


def _build_once(cache: Path, log: Path) -> None:
    """What a cache user does: take the lock, build the entry unless it exists."""
    with cache_lock(cache, "entry"):
        entry = cache / "entry"
        if not entry.exists():
            with log.open("a") as f:
                f.write(f"{os.getpid()}\n")
            time.sleep(0.2)  # a slow build: the others must wait, not build too
            entry.write_text("built")


def test_concurrent_users_build_an_entry_once(tmp_path: Path) -> None:
    log = tmp_path / "builds"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_build_once, args=(tmp_path, log)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert len(log.read_text().split()) == 1
    assert (tmp_path / "entry").read_text() == "built"


def _hold_forever(cache: Path, ready: Path) -> None:
    with cache_lock(cache, "entry"):
        ready.write_text("held")
        time.sleep(600)


def test_a_killed_holder_releases_the_lock(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    holder = multiprocessing.get_context("fork").Process(
        target=_hold_forever, args=(tmp_path, ready)
    )
    holder.start()
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert time.monotonic() < deadline, "the holder never took the lock"
        time.sleep(0.01)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(timeout=30)
    start = time.monotonic()
    with cache_lock(tmp_path, "entry"):
        assert time.monotonic() - start < 10
