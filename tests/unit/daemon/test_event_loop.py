"""The service's event loop: uvloop when installed (optional), asyncio's otherwise."""

from __future__ import annotations

import asyncio
import sys

import pytest

from recnix.store.aio import LOOP_ENV, loop_factory


def test_asyncio_when_forced(monkeypatch):
    monkeypatch.setenv(LOOP_ENV, "asyncio")
    assert loop_factory() is None


def test_fallback_without_uvloop(monkeypatch):
    monkeypatch.delenv(LOOP_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import fails
    assert loop_factory() is None
    monkeypatch.setenv(LOOP_ENV, "uvloop")
    with pytest.raises(RuntimeError, match="uvloop is not installed"):
        loop_factory()


def test_uvloop_when_installed(monkeypatch):
    uvloop = pytest.importorskip("uvloop", reason="uvloop (the optional 'fast' extra) absent")
    monkeypatch.delenv(LOOP_ENV, raising=False)
    factory = loop_factory()
    assert factory is uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        assert runner.run(asyncio.sleep(0, "ran")) == "ran"
