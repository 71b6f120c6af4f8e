"""A build hook started by Lix >= 2.94, which recnix's ``build-hook`` cannot serve.

Nix (2.8 to 2.34) and Lix up to 2.93 start the build hook with the settings on
its stdin (a pipe) and its stdout joined to its stderr (one pipe). Lix 2.94 on
(``HookInstance::create``, run through its ``run-build-hook`` helper) give it
``/dev/null`` as stdin and one end of a Unix stream socket as stdout, and speak
Cap'n Proto RPC over that socket: they wait for the answer to their first call
(``init``) and keep their own copy of the hook's end open, so a hook that just
exits leaves the daemon's worker waiting for ever (recnix issue 20).

So recnix's hook, finding such a peer, answers the way Cap'n Proto ends a
connection with an error: one RPC ``Message`` whose union member is
``abort :Exception`` (``rpc.capnp``: discriminant 1; ``Exception.reason`` is
pointer 0, ``type`` 0 = failed), the reason being what to change in nix.conf.
The RPC system then fails every pending call with that reason, and the build
fails with it instead of hanging. The message is written with the standard
framing (segment table, one segment) by hand: a few words, no library.

Standard library only (runs inside the build hook).
"""

from __future__ import annotations

import os
import stat
import struct

WORD = 8
MESSAGE_ABORT = 1  # rpc.capnp Message: unimplemented @0, abort @1, call @2, ...


def is_lix_rpc_peer(stdin: int = 0, stdout: int = 1) -> bool:
    """Whether this hook was started the Lix >= 2.94 way: stdout a socket, stdin not a
    pipe (Nix: stdin the settings pipe, stdout the same pipe as stderr)."""
    try:
        out, inp = os.fstat(stdout), os.fstat(stdin)
    except OSError:
        return False
    return stat.S_ISSOCK(out.st_mode) and not stat.S_ISFIFO(inp.st_mode)


def _struct_pointer(offset: int, data_words: int, pointers: int) -> bytes:
    return struct.pack("<IHH", (offset << 2) & 0xFFFFFFFF, data_words, pointers)


def _byte_list_pointer(offset: int, count: int) -> bytes:
    # element size 2 = one byte per element; count includes Text's NUL
    return struct.pack("<II", ((offset << 2) | 1) & 0xFFFFFFFF, (count << 3) | 2)


def abort_message(reason: str) -> bytes:
    """The framed Cap'n Proto RPC message ``Message(abort = Exception(reason, failed))``."""
    text = reason.encode() + b"\0"
    text += b"\0" * (-len(text) % WORD)
    segment = b"".join(
        [
            _struct_pointer(0, 1, 1),  # w0: root -> Message at w1
            struct.pack("<H6x", MESSAGE_ABORT),  # w1: Message data: which = abort
            _struct_pointer(0, 1, 1),  # w2: Message.abort -> Exception at w3
            bytes(WORD),  # w3: Exception data: type = failed (0), obsolete fields 0
            _byte_list_pointer(0, len(reason.encode()) + 1),  # w4: reason -> w5
            text,  # w5..: the reason's bytes
        ]
    )
    return struct.pack("<II", 0, len(segment) // WORD) + segment


def refusal(nix_conf: str) -> str:
    """What to tell a Lix user whose nix.conf names recnix's build-hook."""
    return (
        "recnix's build-hook cannot serve Lix: Lix 2.94 and later speak Cap'n Proto to "
        f"their build hook. Remove the `build-hook = …recnix-build-hook` line from {nix_conf} "
        "(or `--option build-hook` from nix-daemon's command line; NixOS: "
        "services.recnix.lix = true) and restart nix-daemon; `recnix nix-conf` prints "
        "the lines recnix needs on Lix"
    )


def refuse(environ: dict[str, str] | None = None, stdout: int = 1) -> str:
    """Tell the Lix peer on ``stdout`` why this hook cannot serve it (best effort);
    return the message (for stderr, which Lix sends to its log)."""
    env = os.environ if environ is None else environ
    message = refusal(os.path.join(env.get("NIX_CONF_DIR") or "/etc/nix", "nix.conf"))
    try:  # noqa: SIM105 - no contextlib import: every build hook start loads this module
        os.write(stdout, abort_message(message))
    except OSError:
        pass
    return message
