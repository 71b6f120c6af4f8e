"""bin/recnix-hook-channel (bash) against the service's end of the hook channel
(recnix.daemon.hookchannel), with the control handlers replaced by the test's: what
the hook prints, when it hands over to the Python hook, and that neither side waits
for the other when it is gone."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from recnix.daemon.hookchannel import HookChannel
from recnix.hooks import channel

BIN = Path(__file__).resolve().parents[3] / "bin"
DRV = "/nix/store/0sm93azza052sd0lrsk9k4b958m29j4c-x.drv"
CHROOT = DRV + ".chroot"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


class Refused(Exception):
    """A handler's refusal (the service's REFUSALS)."""


class Hooks:
    """The script next to a `recnix` that records how the Python hook was called."""

    def __init__(self, root: Path) -> None:
        self.bin = root / "bin"
        self.bin.mkdir()
        shutil.copy(BIN / "recnix-hook-channel", self.bin)
        self.called = root / "python-called"
        fake = self.bin / "recnix"
        fake.write_text(f'#!/bin/sh\necho "$@" >> {self.called}\necho python-hook\n')
        fake.chmod(0o755)
        self.channel = root / "state" / "hook-channel"

    def python_calls(self) -> list[str]:
        return self.called.read_text().splitlines() if self.called.exists() else []

    async def run(
        self, kind: str, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> tuple[int, str, float]:
        """Run the hook of ``kind`` ('pre-build' or 'post-build'): (status, stdout, seconds)."""
        args = [kind + "-hook", "--control-socket", "/nonexistent/control.sock"]
        if kind == "pre-build":
            args += [DRV, CHROOT]
        full_env = {
            "PATH": os.environ["PATH"],
            "RECNIX_HOOK_CHANNEL": str(self.channel),
            "DRV_PATH": DRV,
            "OUT_PATHS": "/nix/store/a-x /nix/store/b-x-dev",
            **(env or {}),
        }
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            str(self.bin / "recnix-hook-channel"),
            *args,
            env=full_env,
            stdout=subprocess.PIPE,
            cwd=cwd,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        return proc.returncode or 0, out.decode(), time.monotonic() - started


Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def serve(tmp_path: Path, handler: Handler, scenario: Callable[..., Awaitable[None]]) -> None:
    """Run ``scenario(hooks, channel, seen)`` with a hook channel whose ops ``handler`` serves
    (``seen``: the requests it got)."""
    hooks = Hooks(tmp_path)
    seen: list[dict[str, Any]] = []

    async def dispatch(message: dict[str, Any]) -> dict[str, Any]:
        seen.append(message)
        return await handler(message)

    async def main() -> None:
        chan = HookChannel(hooks.channel, dispatch, (Refused,))
        chan.open()
        try:
            await scenario(hooks, chan, seen)
        finally:
            chan.close()

    asyncio.run(main())


def test_open_prints_the_session_block_without_python(tmp_path):
    async def handler(message):
        return {"ok": True, "socket_dir": "/run/recnix/sessions/s1"}

    async def scenario(hooks, chan, seen):
        status, out, _ = await hooks.run("pre-build")
        assert (status, out) == (
            0,
            "extra-sandbox-paths\n/nix/var/nix/daemon-socket=/run/recnix/sessions/s1\n\n",
        )
        assert hooks.python_calls() == []
        assert seen[0]["op"] == "open" and seen[0]["drv"] == DRV and seen[0]["chroot"] == CHROOT
        assert isinstance(seen[0]["worker"], int)
        # the reply FIFO is gone; the channel holds only its own files
        assert sorted(p.name for p in hooks.channel.iterdir()) == ["requests", "service"]
        assert hooks.channel.stat().st_mode & 0o777 == 0o700

    serve(tmp_path, handler, scenario)


BASH_MKFIFO = Path("/usr/lib/bash/mkfifo")  # Debian's bash-builtins (setup.sh installs it)
needs_bash_mkfifo = pytest.mark.skipif(
    not BASH_MKFIFO.exists(), reason=f"needs {BASH_MKFIFO} (Debian's bash-builtins)"
)


@needs_bash_mkfifo
def test_the_reply_fifo_is_made_by_bashs_own_mkfifo(tmp_path):
    """With bash's loadable mkfifo the hook starts no process at all: here no PATH."""

    async def handler(message):
        return {"ok": True, "messages": ["fine"]}

    async def scenario(hooks, chan, seen):
        empty = tmp_path / "empty"
        empty.mkdir()
        status, out, _ = await hooks.run("post-build", {"PATH": str(empty)})
        assert (status, out) == (0, "recnix: fine\n") and hooks.python_calls() == []

    serve(tmp_path, handler, scenario)


def test_without_bashs_mkfifo_the_hook_runs_mkfifo_from_path(tmp_path):
    async def handler(message):
        return {"ok": True, "messages": ["fine"]}

    async def scenario(hooks, chan, seen):
        none = {"RECNIX_BASH_LOADABLES": str(tmp_path / "no-loadables")}
        status, out, _ = await hooks.run("post-build", none)
        assert (status, out) == (0, "recnix: fine\n") and hooks.python_calls() == []

    serve(tmp_path, handler, scenario)


@needs_bash_mkfifo
def test_bashs_mkfifo_is_never_loaded_from_a_relative_directory(tmp_path):
    """bash's own search path ends in "."; the hook loads only from an absolute path (a
    relative one here would find a working mkfifo): without mkfifo it goes to Python."""

    async def handler(message):
        raise AssertionError("not reached")

    async def scenario(hooks, chan, seen):
        relative = tmp_path / "cwd" / "lib"
        relative.mkdir(parents=True)
        shutil.copy(BASH_MKFIFO, relative / "mkfifo")
        empty = tmp_path / "empty"
        empty.mkdir()
        env = {"PATH": str(empty), "RECNIX_BASH_LOADABLES": "lib"}
        status, out, _ = await hooks.run("post-build", env, cwd=tmp_path / "cwd")
        assert (status, out) == (0, "python-hook\n") and seen == []

    serve(tmp_path, handler, scenario)


def test_a_build_that_did_not_opt_in_gets_nothing(tmp_path):
    async def handler(message):
        return {"ok": True, "socket": None}

    async def scenario(hooks, chan, seen):
        assert (await hooks.run("pre-build"))[:2] == (0, "")
        assert hooks.python_calls() == []

    serve(tmp_path, handler, scenario)


def test_finalise_prints_the_messages(tmp_path):
    async def handler(message):
        assert message["out_paths"] == ["/nix/store/a-x", "/nix/store/b-x-dev"]
        return {"ok": True, "messages": ["added 2 references", "."]}

    async def scenario(hooks, chan, seen):
        status, out, _ = await hooks.run("post-build")
        assert (status, out) == (0, "recnix: added 2 references\nrecnix:  .\n")
        assert hooks.python_calls() == []

    serve(tmp_path, handler, scenario)


def test_refusals_go_to_the_python_hook_which_reports_them(tmp_path):
    async def handler(message):
        raise Refused(f"no {message['op']} for\nyou")

    async def scenario(hooks, chan, seen):
        assert (await hooks.run("pre-build"))[:2] == (0, "python-hook\n")
        assert (await hooks.run("post-build"))[:2] == (0, "python-hook\n")
        assert hooks.python_calls() == [
            f"pre-build-hook --refused no open for you {DRV} {CHROOT}",
            "post-build-hook --failed no finalise for you",
        ]

    serve(tmp_path, handler, scenario)


def test_without_a_service_the_python_hook_runs_at_once(tmp_path):
    async def handler(message):
        raise AssertionError("not reached")

    async def scenario(hooks, chan, seen):
        chan.close()  # a stopped service: no `service` file
        status, out, took = await hooks.run("pre-build")
        assert (status, out) == (0, "python-hook\n") and took < 1
        assert hooks.python_calls() == [
            f"pre-build-hook --control-socket /nonexistent/control.sock {DRV} {CHROOT}"
        ]
        assert seen == []

    serve(tmp_path, handler, scenario)


def test_a_dead_service_named_in_the_channel_is_not_waited_for(tmp_path):
    """The `service` file of a service that crashed (its FIFO is still there)."""

    async def handler(message):
        raise AssertionError("not reached")

    async def scenario(hooks, chan, seen):
        gone = subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True)
        (hooks.channel / "service").write_text(f"{gone.stdout.strip()} 1\n")
        status, out, took = await hooks.run("post-build")
        assert (status, out) == (0, "python-hook\n") and took < 1
        assert hooks.python_calls() == [
            "post-build-hook --control-socket /nonexistent/control.sock"
        ]

    serve(tmp_path, handler, scenario)


def test_a_service_that_stops_while_the_hook_waits(tmp_path):
    """The hook notices within about a second and asks again over the control socket;
    the reply FIFO it made is gone."""
    waiting = asyncio.Event()

    async def handler(message):
        waiting.set()
        await asyncio.sleep(3600)
        raise AssertionError("not reached")

    async def scenario(hooks, chan, seen):
        run = asyncio.ensure_future(hooks.run("pre-build"))
        await asyncio.wait_for(waiting.wait(), 10)
        await asyncio.sleep(0.3)
        stopped = time.monotonic()
        chan.close()
        status, out, _ = await run
        assert (status, out) == (0, "python-hook\n")
        assert time.monotonic() - stopped < 3
        assert len(hooks.python_calls()) == 1
        assert [p.name for p in hooks.channel.iterdir() if p.name.startswith("r.")] == []

    serve(tmp_path, handler, scenario)


def test_the_service_never_writes_through_what_is_not_the_hooks_fifo(tmp_path):
    """A reply name that is a symlink or a regular file, or a FIFO nobody reads (its hook
    is gone): no write, no wait; the next request is served as usual; so is one after
    a line that is not a request."""
    target = tmp_path / "target"
    target.write_text("keep\n")

    async def handler(message):
        return {"ok": True, "socket_dir": "/run/x"}

    async def scenario(hooks, chan, seen):
        (hooks.channel / channel.reply_name("11.5")).symlink_to(target)
        (hooks.channel / channel.reply_name("12.5")).write_text("")
        os.link(hooks.channel / channel.reply_name("12.5"), tmp_path / "regular")
        os.mkfifo(hooks.channel / channel.reply_name("13.5"), 0o600)
        fd = os.open(hooks.channel / channel.REQUESTS, os.O_WRONLY | os.O_NONBLOCK)
        try:
            for pid in (11, 12, 13):
                os.write(fd, f"1 open {pid}.5 1 {DRV} {CHROOT}\n".encode())
            os.write(fd, b"garbage\n")
        finally:
            os.close(fd)
        deadline = time.monotonic() + 10
        while len(seen) < 3:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        assert target.read_text() == "keep\n"
        assert (tmp_path / "regular").read_text() == ""
        # what stood at the reply names is gone, nothing it pointed to
        assert [p.name for p in hooks.channel.iterdir() if p.name.startswith("r.")] == []
        status, out, _ = await hooks.run("pre-build")
        assert status == 0 and "/run/x" in out

    serve(tmp_path, handler, scenario)


@pytest.mark.parametrize(
    "env",
    [
        {"DRV_PATH": ""},
        {"OUT_PATHS": "/nix/store/a-x\n/nix/store/b"},
        {"OUT_PATHS": "/nix/store/" + "a" * 4000},
    ],
    ids=["no-drv", "newline", "too-long"],
)
def test_what_is_not_one_request_line_goes_to_the_python_hook(tmp_path, env):
    async def handler(message):
        raise AssertionError("not reached")

    async def scenario(hooks, chan, seen):
        assert (await hooks.run("post-build", env))[:2] == (0, "python-hook\n")
        assert seen == []

    serve(tmp_path, handler, scenario)


def test_a_request_the_service_cannot_read_is_asked_again_over_the_control_socket(tmp_path):
    """A path with a space splits into words the service cannot take apart: it tells the
    hook (retry) instead of leaving it waiting, and the Python hook asks again."""

    async def handler(message):
        raise AssertionError("not reached")

    async def scenario(hooks, chan, seen):
        status, out, took = await hooks.run("post-build", {"DRV_PATH": "/nix/store/a b.drv"})
        assert (status, out) == (0, "python-hook\n") and took < 1
        assert seen == []

    serve(tmp_path, handler, scenario)
