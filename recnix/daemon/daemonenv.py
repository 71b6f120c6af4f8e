"""The daemon process's place on its host: its open-files limit, and telling systemd
(``Type=notify``) that it is ready."""

from __future__ import annotations

import logging
import os
import resource
import socket

log = logging.getLogger("recnix.daemon.daemonenv")

FD_LIMIT_WANTED = 1 << 16


def raise_fd_limit() -> None:
    """Raise the soft open-files limit towards the hard one (sessions hold many sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = FD_LIMIT_WANTED if hard == resource.RLIM_INFINITY else min(hard, FD_LIMIT_WANTED)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, target, e)


def notify_systemd(message: bytes) -> None:
    """sd_notify: tell systemd (Type=notify units) about our state; no-op without it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message, address)
    except OSError as e:
        log.warning("cannot notify systemd at %s: %s", address, e)
