"""Work on what a build controls, off the event loop and bounded in time.

The service's loop serves every session, the control socket and the build hook's
``admit``: it must never wait on an object a build chose (a `.drv` text of any size, a
derivation graph, a look into a sandboxed process's view). Such work runs here, in a pool
of its own (a stuck call cannot starve the loop's default executor), and the caller gets
:class:`OffLoopTimeout` after ``timeout`` seconds whatever the worker thread still does.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from recnix.formats.derivation import Derivation, DerivationError, read_derivation

T = TypeVar("T")

WORKERS = 8
# seconds for parsing one .drv a build may have written, or checking a derivation graph
DRV_TIMEOUT = 60.0
# seconds for a look at a sandboxed process (its root, its namespace, its socket)
PROC_TIMEOUT = 5.0

_pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="recnix-offloop")


class OffLoopTimeout(Exception):
    """Work on a build's objects took longer than its bound (the message says which)."""


async def off_loop(fn: Callable[..., T], *args: object, timeout: float, what: str) -> T:
    """``fn(*args)`` in the off-loop pool; OffLoopTimeout naming ``what`` after ``timeout``."""
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(_pool, functools.partial(fn, *args))
    try:
        return await asyncio.wait_for(future, timeout)
    except TimeoutError:
        raise OffLoopTimeout(f"{what} took longer than {timeout:.0f} s") from None


async def read_build_derivation(drv_path: str) -> Derivation:
    """``read_derivation`` off the event loop: a nested build's .drv is the build's text,
    of any size (DerivationError also when it takes longer than DRV_TIMEOUT)."""
    try:
        return await off_loop(
            read_derivation, drv_path, timeout=DRV_TIMEOUT, what=f"reading {drv_path}"
        )
    except OffLoopTimeout as e:
        raise DerivationError(str(e)) from None
