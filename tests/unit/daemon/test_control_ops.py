"""The control socket's op table (recnix.daemon.service.CONTROL_OPS) against its clients."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import recnix
from recnix.daemon.service import CONTROL_OPS, Service


def test_every_op_is_served_by_a_coroutine_of_the_service() -> None:
    for op, method in CONTROL_OPS.items():
        assert inspect.iscoroutinefunction(getattr(Service, method, None)), (op, method)


def test_every_op_a_client_sends_is_in_the_table() -> None:
    sent = set()
    for path in Path(recnix.__file__).parent.rglob("*.py"):
        sent.update(re.findall(r'\{"op": "(\w+)"', path.read_text()))
    assert {"open", "finalise", "status"} <= sent  # the scan finds the hooks' requests
    assert sent <= set(CONTROL_OPS), sent - set(CONTROL_OPS)
