"""The hook channel's wire format: how ``bin/recnix-hook-channel`` (bash, no Python)
asks the service to open or finalise a session, and what it reads back.

The channel is a directory only root can enter (``RECNIX_HOOK_CHANNEL``,
``<state-dir>/hook-channel``) that the service keeps:

- ``requests``: a FIFO the service holds open for reading and writing. A hook
  writes one request line there in a single write (under ``PIPE_BUF``, so lines
  of concurrent hooks never mix)::

      1 open TOKEN WORKER DRV CHROOT
      1 finalise TOKEN WORKER DRV [OUT ...]

  TOKEN (``HOOKPID.RANDOM``) names the hook's reply FIFO: the random part keeps
  a late reply to a killed hook from reaching a new hook that got its pid.
  WORKER is the Nix process that runs the hook (the service walks up from it to
  the nearest ``nix*`` process).
- ``r.TOKEN``: the hook's reply FIFO (``mkfifo`` by the hook). The service
  writes the whole reply in one write and removes the FIFO::

      STATUS
      LINE ...
      .

  STATUS ``ok``: for ``open`` the LINEs are what the hook prints to Nix (an
  ``extra-sandbox-paths`` block, or nothing for a build that did not opt in);
  for ``finalise`` they are messages for the build log. STATUS ``refused``: one
  LINE, the service's refusal; the hook hands it to the Python hook
  (``--refused``/``--failed``), which reports it as the control socket path
  would. Any other STATUS (``retry``: a request the service could not read or
  could not serve): the hook asks again over the control socket.
- ``service``: ``PID STARTTIME`` of the service that reads ``requests`` (field 22
  of ``/proc/PID/stat``). A hook waiting for its reply checks every second that
  this process still runs and still holds the same ``requests``; if not, it falls
  back to the Python hook and the control socket, which tell a dead service.

Pure functions: the service's I/O is ``recnix.daemon.hookchannel``.
"""

from __future__ import annotations

import re
from typing import Any

from recnix.hooks.prepost import sandbox_paths_block

VERSION = "1"
REQUESTS = "requests"
SERVICE_FILE = "service"
REPLY_PREFIX = "r."
END = "."
# A request must fit one atomic FIFO write; the hook checks the same bound.
MAX_REQUEST = 4000
# A reply is one write into an empty FIFO (64 KiB on Linux); longer message lists
# are cut.
MAX_REPLY = 32 * 1024
OPS = ("open", "finalise")

_PID = re.compile(r"[1-9][0-9]{0,9}")
_TOKEN_BYTES = re.compile(rb"[1-9][0-9]{0,9}\.[0-9]{1,12}")


class ChannelRequestError(ValueError):
    """A request line that is not one (its text says why); ``token`` is its reply token
    when that much of it could be read, so that its hook is told rather than left
    waiting."""

    def __init__(self, message: str, token: str | None = None) -> None:
        super().__init__(message)
        self.token = token


def reply_name(token: str) -> str:
    """The name of the reply FIFO of the request ``token`` in the channel directory."""
    return f"{REPLY_PREFIX}{token}"


def parse_request(line: bytes) -> tuple[str, dict[str, Any]]:
    """(its reply token, the control request it stands for) for one request line,
    without its newline; raises ChannelRequestError."""
    words = line.split(b" ")
    token = None
    if len(words) > 2 and _TOKEN_BYTES.fullmatch(words[2]):
        token = words[2].decode()
    try:
        text = line.decode()
    except UnicodeDecodeError as e:
        raise ChannelRequestError("a request line is not UTF-8", token) from e
    fields = text.split(" ")
    if len(fields) < 5 or fields[0] != VERSION:
        raise ChannelRequestError(f"not a version {VERSION} request: {text[:120]!r}", token)
    _, op, _, worker, drv, *rest = fields
    if token is None:
        raise ChannelRequestError(f"bad reply token in {text[:120]!r}")
    if op not in OPS:
        raise ChannelRequestError(f"unknown op {op!r}", token)
    if not _PID.fullmatch(worker):
        raise ChannelRequestError(f"bad worker pid in {text[:120]!r}", token)
    if any(not f.startswith("/") for f in (drv, *rest)):
        raise ChannelRequestError(f"bad paths in {text[:120]!r}", token)
    message: dict[str, Any] = {"op": op, "drv": drv, "worker": int(worker)}
    if op == "open":
        if len(rest) != 1:
            raise ChannelRequestError(f"open takes DRV CHROOT: {text[:120]!r}", token)
        message["chroot"] = rest[0]
    else:
        message["out_paths"] = rest
    return token, message


def render_reply(status: str, lines: list[str]) -> bytes:
    """The reply: STATUS, the LINEs (none may contain a newline or be ``.``), ``.``."""
    safe = [" ".join(line.split("\n")) for line in lines]
    safe = [line if line != END else f" {END}" for line in safe]
    body = "\n".join([status, *safe, END]) + "\n"
    data = body.encode()
    if len(data) > MAX_REPLY:
        cut = f"(recnix: {len(lines)} lines; the rest is in the service's log)"
        kept: list[str] = []
        size = len(status) + len(cut) + 8
        for line in safe:
            size += len(line.encode()) + 1
            if size > MAX_REPLY:
                break
            kept.append(line)
        data = ("\n".join([status, *kept, cut, END]) + "\n").encode()
    return data


def reply_lines(op: str, reply: dict[str, Any], sandbox_socket_dir: str) -> list[str]:
    """What the hook prints for the service's successful ``reply`` to ``op``."""
    if op == "open":
        socket_dir = reply.get("socket_dir")
        if not socket_dir:
            return []
        return sandbox_paths_block(str(socket_dir), sandbox_socket_dir).split("\n")[:-1]
    return [str(m) for m in reply.get("messages", [])]
