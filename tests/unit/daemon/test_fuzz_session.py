"""A short run of scripts/fuzz_session.py (the full run: a million cases, see
docs/security.md): no crash, no hang, and a good client still served."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "fuzz_session.py"


def load_fuzzer():  # noqa: ANN201
    spec = importlib.util.spec_from_file_location("fuzz_session", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fuzz_session_entry_bounded() -> None:
    fuzzer = load_fuzzer()
    logging.disable(logging.CRITICAL)
    try:
        stats = asyncio.run(fuzzer.fuzz(3000, seed=7, timeout=10.0, check_every=1000, quiet=True))
    finally:
        logging.disable(logging.NOTSET)
    assert stats["cases"] == 3000
    assert stats["crash"] == 0 and stats["hang"] == 0, stats
    assert stats["good_client_checks"] == 4
    # the cases reach past the codec into the restricted store
    assert stats.get("ev-refused", 0) > 100 and stats.get("ev-added", 0) > 0, stats
