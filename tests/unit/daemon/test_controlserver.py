"""The control socket's two ends over a real Unix socket: recnix.daemon.controlserver
serves request lines until the client closes, and recnix.hooks.control's
ControlConnection keeps one connection for several requests (the build hook's), and
replaces one the service closed since."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from recnix.daemon.controlserver import ControlServer
from recnix.hooks import control


class Refused(Exception):
    pass


WRITERS: list[asyncio.StreamWriter] = []  # the connections a server has open


def serving(path: Path, seen: list[tuple[int, str]]) -> tuple[asyncio.AbstractEventLoop, Any]:
    """A ControlServer on ``path`` in a thread; ``seen``: (connection number, op)."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    connections = [0]
    server = None

    async def echo(message: dict[str, Any]) -> dict[str, Any]:
        seen.append((connections[0], message["op"]))
        return {"ok": True, "n": message.get("n")}

    async def refuse(message: dict[str, Any]) -> dict[str, Any]:
        raise Refused("no, because")

    control_server = ControlServer({"echo": echo, "refuse": refuse}, (Refused,))

    async def counted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections[0] += 1
        WRITERS.append(writer)
        await control_server.serve(reader, writer)

    async def start() -> None:
        nonlocal server
        server = await asyncio.start_unix_server(counted, path=str(path))
        ready.set()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        loop.run_forever()

    threading.Thread(target=run, daemon=True).start()
    assert ready.wait(10)
    return loop, server


def stop(loop: asyncio.AbstractEventLoop, server: Any) -> None:
    async def close() -> None:
        server.close()  # as the service does when it stops, which closes its connections
        while WRITERS:
            WRITERS.pop().close()

    asyncio.run_coroutine_threadsafe(close(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)


def test_one_connection_serves_every_request_in_turn(tmp_path: Path) -> None:
    seen: list[tuple[int, str]] = []
    loop, server = serving(tmp_path / "control.sock", seen)
    try:
        conn = control.ControlConnection(tmp_path / "control.sock")
        assert [conn.request({"op": "echo", "n": i})["n"] for i in range(3)] == [0, 1, 2]
        with pytest.raises(control.ControlError, match="no, because"):
            conn.request({"op": "refuse"})  # an answer: the connection stays
        with pytest.raises(control.ControlError, match="unknown control op 'nope'"):
            conn.request({"op": "nope"})
        assert conn.request({"op": "echo", "n": 9})["n"] == 9
        assert seen == [(1, "echo")] * 4  # one connection for all of them
        conn.close()
        assert control.request(tmp_path / "control.sock", {"op": "echo"})["ok"]
        assert seen[-1] == (2, "echo")
    finally:
        stop(loop, server)


def test_a_connection_the_service_closed_is_replaced_before_the_next_request(
    tmp_path: Path,
) -> None:
    path = tmp_path / "control.sock"
    seen: list[tuple[int, str]] = []
    loop, server = serving(path, seen)
    conn = control.ControlConnection(path)
    assert conn.request({"op": "echo"})["ok"]
    stop(loop, server)  # the service restarts: its connections are closed
    path.unlink(missing_ok=True)  # (Python >= 3.13 removes it on close)
    with pytest.raises(control.ServiceUnreachable, match="not running"):
        conn.request({"op": "echo"})
    again: list[tuple[int, str]] = []
    loop, server = serving(path, again)
    try:
        assert conn.request({"op": "echo", "n": 2})["n"] == 2
        assert again == [(1, "echo")]
    finally:
        conn.close()
        stop(loop, server)


def test_a_request_the_closing_service_dropped_goes_once_more_on_a_new_connection(
    tmp_path: Path,
) -> None:
    """The service stops as a request goes out on a kept connection: it is sent again
    on a new one (what the stopped service was asked died with it)."""
    import json
    import socket

    path = tmp_path / "control.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    received: list[tuple[int, str]] = []

    def serve() -> None:
        first, _ = listener.accept()
        reader = first.makefile("rb")
        received.append((1, json.loads(reader.readline())["op"]))
        first.sendall(b'{"ok": true, "n": 1}\n')
        received.append((1, json.loads(reader.readline())["op"]))
        reader.close()
        first.close()  # stopped with that request unanswered
        second, _ = listener.accept()
        received.append((2, json.loads(second.makefile("rb").readline())["op"]))
        second.sendall(b'{"ok": true, "n": 2}\n')
        second.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    conn = control.ControlConnection(path)
    try:
        assert conn.request({"op": "one"}, timeout=10)["n"] == 1
        assert conn.request({"op": "two"}, timeout=10)["n"] == 2
    finally:
        conn.close()
        thread.join(10)
        listener.close()
    assert received == [(1, "one"), (1, "two"), (2, "two")]
