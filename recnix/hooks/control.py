"""The control protocol between the hooks (and the CLI) and the recnix service.

One JSON object per line over a root-only Unix socket: the client sends a
request line, the service answers with one reply line; a client may send more
requests on the same connection (:class:`ControlConnection`), or close it. Replies carry
``"ok": true`` or ``"ok": false`` with an ``"error"`` text meant for humans.
This module is imported by the hooks on every opted-in build: standard library
only, no asyncio, and neither :mod:`json` nor :mod:`socket` on the client side
(their imports cost a hook ~9 ms; :mod:`recnix.hooks.hookjson` and ``_socket`` serve).
"""

from __future__ import annotations

import _socket
import os

from recnix.hooks import hookjson

# Not typing.TYPE_CHECKING: importing typing costs every hook call ~3 ms.
TYPE_CHECKING = False

if TYPE_CHECKING:
    from typing import Any

MAX_LINE = 1 << 20


class ControlError(Exception):
    """The service could not be reached or refused the request."""


class ServiceUnreachable(ControlError):
    """Nothing listens on the control socket: the service is not running."""


class ControlConnection:
    """A connection to the service's control socket for several requests, one at a time
    (the build hook keeps one for every build its Nix process asks about). One the
    service has closed since (it restarted) is replaced before the next request."""

    def __init__(self, control_socket: str | os.PathLike[str]) -> None:
        self.path = str(control_socket)
        self._sock: _socket.socket | None = None

    def request(self, message: dict[str, Any], timeout: float | None = 600.0) -> dict:
        """Send one request and return its reply (raises ControlError, and closes the
        connection then)."""
        payload = hookjson.dumps(message).encode() + b"\n"
        try:
            sock, reused = self._connected()
            try:
                data = self._exchange(sock, payload, timeout)
            except (BrokenPipeError, ConnectionResetError):
                if not reused:
                    raise
                data = b""
            if not data and reused:
                # The service closed it as this request went out (it stopped; what a
                # stopped service was asked died with it): once more, on a new one.
                self.close()
                sock, _ = self._connected()
                data = self._exchange(sock, payload, timeout)
        except FileNotFoundError as e:
            self.close()
            raise ServiceUnreachable(
                f"the recnix service is not running (no control socket at {self.path}); "
                "start it with `recnix daemon` (systemd: `systemctl start recnix`)"
            ) from e
        except ConnectionRefusedError as e:
            self.close()
            raise ServiceUnreachable(
                f"the recnix service is not running (connection refused on {self.path}); "
                "start it with `recnix daemon` (systemd: `systemctl start recnix`)"
            ) from e
        except TimeoutError as e:
            self.close()
            raise ControlError(f"the recnix service did not answer within {timeout} s") from e
        except OSError as e:
            self.close()
            raise ControlError(f"cannot talk to the recnix service at {self.path}: {e}") from e
        except ControlError:
            self.close()
            raise
        if not data.endswith(b"\n"):
            self.close()
            if not data:
                raise ControlError("the recnix service closed the connection without answering")
        try:
            reply = hookjson.loads(data.decode())
        except (ValueError, RecursionError) as e:
            self.close()
            raise ControlError(f"the recnix service sent a malformed reply: {data[:200]!r}") from e
        if not isinstance(reply, dict):
            self.close()
            raise ControlError(f"the recnix service sent a malformed reply: {data[:200]!r}")
        if not reply.get("ok"):
            raise ControlError(str(reply.get("error", "the recnix service refused the request")))
        return reply

    @staticmethod
    def _exchange(sock: _socket.socket, payload: bytes, timeout: float | None) -> bytes:
        """Send ``payload``; the reply line (or what came before the service closed)."""
        sock.settimeout(timeout)
        sock.sendall(payload)
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            if len(data) > MAX_LINE:
                raise ControlError("reply from the recnix service is too long")
        return data

    def _connected(self) -> tuple[_socket.socket, bool]:
        """The connection, and whether it served an earlier request."""
        sock = self._sock
        if sock is not None:
            sock.settimeout(0.0)  # (a socket with a timeout would wait for it first)
            try:  # between requests the service sends nothing: anything is an end
                sock.recv(1, _socket.MSG_PEEK)
                self.close()
            except BlockingIOError:
                return sock, True
            except OSError:
                self.close()
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        return sock, False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def request(
    control_socket: str | os.PathLike[str], message: dict[str, Any], timeout: float | None = 600.0
) -> dict:
    """Send one request to the service and return its reply (raises ControlError)."""
    connection = ControlConnection(control_socket)
    try:
        return connection.request(message, timeout)
    finally:
        connection.close()


def decode_request(line: bytes) -> dict[str, Any]:
    """Parse one request line (service side); raises ValueError on bad input."""
    import json

    message = json.loads(line)
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise ValueError("a control request must be a JSON object with a string 'op'")
    return message


def encode_reply(reply: dict[str, Any]) -> bytes:
    """Serialise one reply line (service side)."""
    import json

    return json.dumps(reply).encode() + b"\n"


def nix_worker_pid(start: int | None = None) -> int:
    """The pid of the Nix process that runs this hook (a nix-daemon worker, or a local
    nix-build), the pre-build hook or the build hook: the parent (or ``start``, the
    parent a hook named), or the nearest ancestor named nix* above wrapper shells.

    Nix runs the pre-build hook synchronously: while it waits, that process starts
    no other hook, so the service must never make it wait for a session slot that
    only its own builds hold (their post-build hooks could never run)."""
    pid = os.getppid() if start is None else start
    candidate = pid
    for _ in range(4):
        try:
            with open(f"/proc/{candidate}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            break
        name = stat[stat.index(b"(") + 1 : stat.rindex(b")")]
        if name.startswith(b"nix"):
            return candidate
        candidate = int(stat[stat.rindex(b")") + 2 :].split()[1])
        if candidate <= 1:
            break
    return pid
