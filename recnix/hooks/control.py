"""The control protocol between the hooks (and the CLI) and the recnix service.

One JSON object per line over a root-only Unix socket: the client sends one
request line, the service answers with one reply line and closes. Replies carry
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


def request(
    control_socket: str | os.PathLike[str], message: dict[str, Any], timeout: float | None = 600.0
) -> dict:
    """Send one request to the service and return its reply (raises ControlError)."""
    try:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(str(control_socket))
            sock.sendall(hookjson.dumps(message).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                if len(data) > MAX_LINE:
                    raise ControlError("reply from the recnix service is too long")
        finally:
            sock.close()
    except FileNotFoundError as e:
        raise ServiceUnreachable(
            f"the recnix service is not running (no control socket at {control_socket}); "
            "start it with `recnix daemon` (systemd: `systemctl start recnix`)"
        ) from e
    except ConnectionRefusedError as e:
        raise ServiceUnreachable(
            f"the recnix service is not running (connection refused on {control_socket}); "
            "start it with `recnix daemon` (systemd: `systemctl start recnix`)"
        ) from e
    except TimeoutError as e:
        raise ControlError(f"the recnix service did not answer within {timeout} s") from e
    except OSError as e:
        raise ControlError(f"cannot talk to the recnix service at {control_socket}: {e}") from e
    if not data:
        raise ControlError("the recnix service closed the connection without answering")
    try:
        reply = hookjson.loads(data.decode())
    except (ValueError, RecursionError) as e:
        raise ControlError(f"the recnix service sent a malformed reply: {data[:200]!r}") from e
    if not isinstance(reply, dict):
        raise ControlError(f"the recnix service sent a malformed reply: {data[:200]!r}")
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error", "the recnix service refused the request")))
    return reply


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
