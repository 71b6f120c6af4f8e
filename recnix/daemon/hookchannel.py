"""The service's end of the hook channel (wire format: ``recnix.hooks.channel``): the
``requests`` FIFO read on the event loop, each request served by the same control
handlers as the control socket, each reply written into the hook's FIFO.

It spares an opted-in build the two Python starts of its pre- and post-build
hooks (``bin/recnix-hook-channel`` is bash). Nothing here blocks the loop: the
FIFOs are opened and written non-blocking, a reply FIFO whose hook is gone
(``ENXIO``) or that is not a FIFO is skipped with a log line, and a request that
is not one is logged and dropped (its hook falls back to the control socket
after a second). Only root can enter the directory; the service still checks
what it opens (``O_NOFOLLOW``, a FIFO owned by root).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from recnix.config.names import SANDBOX_SOCKET_DIR
from recnix.hooks import channel
from recnix.hooks.control import nix_worker_pid
from recnix.sandbox.sandboxproc import process_start_time

log = logging.getLogger("recnix.daemon.hookchannel")

Dispatch = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
# Whatever the handlers raise to refuse a request (the service's REFUSALS).
Refusals = tuple[type[Exception], ...]
_MAX_PENDING = 64 * 1024  # bytes of an unfinished request line before it is dropped


class ChannelSetupError(Exception):
    """The channel directory cannot be made safe (the hooks use the control socket)."""


class HookChannel:
    """Serves the requests of ``bin/recnix-hook-channel`` in ``directory``."""

    def __init__(self, directory: Path, dispatch: Dispatch, refusals: Refusals) -> None:
        self.directory = directory
        self.dispatch = dispatch
        self.refusals = refusals
        self._dir_fd: int | None = None
        self._fifo_fd: int | None = None
        self._pending = b""
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle

    def open(self) -> None:
        """Make the directory (root-only) and a fresh ``requests`` FIFO; start reading
        it; then publish this process in ``service``. Raises ChannelSetupError."""
        try:
            self._make_directory()
            dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError as e:
            raise ChannelSetupError(f"cannot set up the hook channel {self.directory}: {e}") from e
        self._dir_fd = dir_fd
        try:
            self._sweep(dir_fd)
            tmp = f"{channel.REQUESTS}.new"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dir_fd)
            os.mkfifo(tmp, 0o600, dir_fd=dir_fd)
            fifo = os.open(tmp, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
            os.rename(tmp, channel.REQUESTS, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            self._fifo_fd = fifo
            asyncio.get_running_loop().add_reader(fifo, self._on_readable)
            pid = os.getpid()
            self._write_file(channel.SERVICE_FILE, f"{pid} {process_start_time(pid)}\n")
        except OSError as e:
            self.close()
            raise ChannelSetupError(f"cannot set up the hook channel {self.directory}: {e}") from e
        log.info("hook channel ready in %s", self.directory)

    def close(self) -> None:
        """Stop serving: hooks fall back to the control socket at once (no ``service``
        file); the requests still being served are cancelled."""
        if self._dir_fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(channel.SERVICE_FILE, dir_fd=self._dir_fd)
        if self._fifo_fd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._fifo_fd)
            os.close(self._fifo_fd)
            self._fifo_fd = None
        for task in list(self._tasks):
            task.cancel()
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None

    def _make_directory(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(self.directory)
        if not stat.S_ISDIR(st.st_mode) or (os.geteuid() == 0 and st.st_uid != 0):
            raise OSError(errno.EPERM, "not a directory owned by root")
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.chmod(self.directory, 0o700)

    def _sweep(self, dir_fd: int) -> None:
        """Remove the reply FIFOs of hooks that a previous run left behind."""
        for name in os.listdir(dir_fd):
            if name.startswith(channel.REPLY_PREFIX):
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=dir_fd)

    def _write_file(self, name: str, text: str) -> None:
        assert self._dir_fd is not None
        tmp = f"{name}.new"
        fd = os.open(
            tmp,
            os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=self._dir_fd,
        )
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)

    # -- requests

    def _on_readable(self) -> None:
        assert self._fifo_fd is not None
        try:
            data = os.read(self._fifo_fd, 65536)
        except BlockingIOError:
            return
        except OSError as e:
            log.error("hook channel: cannot read %s: %s", channel.REQUESTS, e)
            return
        self._pending += data
        *lines, self._pending = self._pending.split(b"\n")
        if len(self._pending) > _MAX_PENDING:
            log.warning("hook channel: dropped %d bytes without a newline", len(self._pending))
            self._pending = b""
        for line in lines:
            self._start(line)

    def _start(self, line: bytes) -> None:
        try:
            token, message = channel.parse_request(line)
        except channel.ChannelRequestError as e:
            log.warning("hook channel: dropped a request: %s", e)
            if e.token is not None:  # its hook asks again over the control socket
                retry = channel.render_reply("retry", [f"bad request: {e}"])
                self._reply(e.token, {"op": "?", "drv": "?"}, retry)
            return
        task = asyncio.ensure_future(self._serve(token, message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, token: str, message: dict[str, Any]) -> None:
        started = time.perf_counter()
        op = message["op"]
        message["worker"] = nix_worker_pid(message["worker"])
        try:
            reply = await self.dispatch(message)
        except self.refusals as e:
            data = channel.render_reply("refused", [" ".join(str(e).split())])
        except (ValueError, KeyError, TypeError) as e:
            data = channel.render_reply("retry", [f"bad request: {e}"])
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("hook channel: %s of %s failed", op, message["drv"])
            data = channel.render_reply("retry", ["internal error"])
        else:
            data = channel.render_reply("ok", channel.reply_lines(op, reply, SANDBOX_SOCKET_DIR))
        self._reply(token, message, data)
        status = data.split(b"\n", 1)[0].decode()
        elapsed = 1e3 * (time.perf_counter() - started)
        log.debug("hook channel: %s of %s: %s in %.1f ms", op, message["drv"], status, elapsed)

    def _reply(self, token: str, message: dict[str, Any], data: bytes) -> None:
        """Write ``data`` into the hook's FIFO without blocking; remove the FIFO."""
        if self._dir_fd is None:
            return
        name = channel.reply_name(token)
        try:
            fd = os.open(
                name,
                os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC,
                dir_fd=self._dir_fd,
            )
        except OSError as e:
            # ENXIO: nobody reads it; the hook is gone (Nix killed it).
            log.warning(
                "hook channel: no reply to the %s hook of %s (%s): %s",
                message["op"],
                message["drv"],
                name,
                e,
            )
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=self._dir_fd)
            return
        try:
            st = os.fstat(fd)
            if not stat.S_ISFIFO(st.st_mode) or st.st_uid != os.geteuid():
                log.warning("hook channel: %s is not a FIFO of this user; no reply", name)
                return
            written = os.write(fd, data)
            if written != len(data):
                log.warning("hook channel: the reply to %s was cut short", name)
        except OSError as e:
            log.warning("hook channel: cannot reply to %s: %s", name, e)
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=self._dir_fd)
