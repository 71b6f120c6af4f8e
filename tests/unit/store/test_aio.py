"""The one server loop (recnix.store.aio.serve_requests) every worker-protocol server
in recnix runs: sessions, guards and the ssh proxy."""

from __future__ import annotations

import asyncio
from typing import Any

from recnix.protocol import NEED_DATA, ConnectionClosed
from recnix.store.aio import serve_requests


def serve(events: list[Any], stop_at: Any = None) -> tuple[Any, list[str]]:
    """Run the loop over ``events``; what it returned and what happened, in order."""
    seen: list[str] = []
    queue = list(events)

    async def next_event() -> Any:
        return queue.pop(0)

    async def answer(ev: Any) -> bool | None:
        seen.append(f"answer {ev}")
        return False if ev == stop_at else None

    async def flush() -> None:
        seen.append("flush")

    return asyncio.run(serve_requests(next_event, answer, flush)), seen


def test_each_event_is_answered_then_flushed_until_the_client_leaves() -> None:
    closed = ConnectionClosed()
    end, seen = serve(["hello", "req1", "req2", closed, "never"])
    assert end is closed
    assert seen == ["answer hello", "flush", "answer req1", "flush", "answer req2", "flush"]


def test_end_of_input_inside_a_message_ends_the_loop() -> None:
    end, seen = serve(["hello", NEED_DATA, "never"])
    assert end is NEED_DATA and seen == ["answer hello", "flush"]


def test_an_answer_of_false_ends_the_loop_without_a_flush() -> None:
    end, seen = serve(["hello", "last", "never"], stop_at="last")
    assert end is None and seen == ["answer hello", "flush", "answer last"]
