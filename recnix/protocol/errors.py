"""The one exception the worker-protocol codec raises on bad input."""

from __future__ import annotations


class ProtocolError(Exception):
    """Malformed, truncated or unsupported protocol input.

    ``offset`` is the byte offset in the received stream where the bad item
    starts, when known.
    """

    def __init__(self, message: str, offset: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset

    def __str__(self) -> str:
        if self.offset is None:
            return self.message
        return f"{self.message} (at byte {self.offset})"
