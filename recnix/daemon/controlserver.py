"""The control socket's server side: JSON-line requests, each with its JSON-line reply
(recnix.hooks.control), dispatched by op to the handler the service's table names.

A request that is not one (bad JSON, an unknown op, a missing field) gets an
``{"ok": false}`` reply that says why; so does a handler's refusal. Nothing a
client sends takes the service down.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from recnix.hooks import control

log = logging.getLogger("recnix.daemon.controlserver")

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ControlServer:
    """Serves control connections with ``handlers`` (op -> coroutine); the exceptions in
    ``refusals`` are answers (their message goes to the client), not failures."""

    def __init__(
        self, handlers: Mapping[str, Handler], refusals: tuple[type[Exception], ...]
    ) -> None:
        self.handlers = dict(handlers)
        self.refusals = refusals

    async def dispatch(self, message: dict[str, Any]) -> dict[str, Any]:
        """The reply to one decoded request (KeyError/ValueError/TypeError if malformed)."""
        op = message["op"]
        handler = self.handlers.get(op)
        if handler is None:
            raise ValueError(f"unknown control op {op!r} (known: {', '.join(self.handlers)})")
        return await handler(message)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one control connection (``asyncio.start_unix_server``'s callback): each
        request line gets its reply line, until the client closes (most send one; the
        build hook keeps its connection for every build its Nix process asks about)."""
        try:
            while line := await reader.readline():
                writer.write(control.encode_reply(await self._reply(line)))
                await writer.drain()
        except (ConnectionError, OSError) as e:
            log.info("control connection lost: %s", e)
        except Exception:
            log.exception("control request failed")
            try:
                writer.write(control.encode_reply({"ok": False, "error": "internal error"}))
                await writer.drain()
            except (ConnectionError, OSError):
                pass
        finally:
            writer.close()

    async def _reply(self, line: bytes) -> dict[str, Any]:
        try:
            return await self.dispatch(control.decode_request(line))
        except (ValueError, KeyError, TypeError) as e:
            return {"ok": False, "error": f"bad control request: {e}"}
        except self.refusals as e:
            return {"ok": False, "error": str(e)}
