"""One QEMU guest, driven like the NixOS test driver's ``Machine``.

- lifecycle through QMP on a unix socket (``qemu.qmp``): start, ACPI shutdown,
  hard reset (``system_reset``), crash (kill QEMU), waiting for QMP events;
- the serial console (ttyS0) through ``pexpect``: a reader thread keeps the
  whole console in ``<state_dir>/console.log`` and lets tests wait for text;
- commands over SSH (``paramiko``): stdout, stderr and the exit status
  separately, no tty scraping; files both ways over SFTP.

Every action logs a nested, timed line (:func:`recnix_vm.log.nested`).
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import re
import select
import shlex
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paramiko
import pexpect
from qemu.qmp.legacy import QEMUMonitorProtocol

from .image import READY_MARKER, Image, create_overlay
from .log import log, nested

ACCEL_ENV = "RECNIX_VM_ACCEL"
DEFAULT_MEMORY_MB = 2048
DEFAULT_SMP = 2
DEFAULT_BOOT_TIMEOUT = 600.0  # TCG, and other guests booting beside it
DEFAULT_COMMAND_TIMEOUT = 900.0
KVM_PROBE_TIMEOUT = 20.0
# The user-mode NIC (SSH from the host); the guest's networkd matches it by this.
USER_NET_MAC = "52:54:00:12:34:56"


class MachineError(Exception):
    """Something went wrong driving a guest."""


class CommandFailed(MachineError):
    """A command's exit status was not what the caller required."""

    def __init__(self, cmd: str, rc: int, stdout: str, stderr: str, console_log: Path) -> None:
        self.cmd, self.rc, self.stdout, self.stderr = cmd, rc, stdout, stderr
        super().__init__(
            f"command {cmd!r} exited with status {rc}\n"
            f"--- stdout ---\n{stdout.rstrip()}\n--- stderr ---\n{stderr.rstrip()}\n"
            f"(guest console log: {console_log})"
        )


class GlobalTimeoutExpired(MachineError):
    """The machine's global timeout ran out; QEMU was killed."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _short(cmd: str, limit: int = 120) -> str:
    """A command on one log line."""
    one = " ".join(cmd.split())
    return one if len(one) <= limit else one[: limit - 3] + "..."


def retry(fn: Callable[[bool], bool], timeout: float, interval: float = 1.0) -> None:
    """Call ``fn(False)`` until it returns true, then once more as ``fn(True)`` if time ran out.

    The final call (``last_try=True``) should log what it found; if it still
    returns false a :class:`TimeoutError` is raised.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fn(False):
            return
        time.sleep(interval)
    if not fn(True):
        raise TimeoutError(f"condition not met within {timeout:.0f} s")


class Machine:
    """A Debian guest booted from a qcow2 overlay on top of a cached image."""

    def __init__(
        self,
        image: Image,
        state_dir: str | os.PathLike[str],
        name: str = "machine",
        *,
        memory_mb: int = DEFAULT_MEMORY_MB,
        smp: int = DEFAULT_SMP,
        accel: str | None = None,
        global_timeout: float | None = None,
        boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
    ) -> None:
        self.image = image
        self.name = name
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.overlay = self.state_dir / "overlay.qcow2"
        self.console_log = self.state_dir / "console.log"
        self.qmp_path = self.state_dir / "qmp.sock"
        # the guest's ttyS1: its ready unit writes READY_MARKER there once per boot
        self.ready_channel = self.state_dir / "ready-channel"
        self.memory_mb, self.smp, self.boot_timeout = memory_mb, smp, boot_timeout
        self.accel = accel or os.environ.get(ACCEL_ENV) or "auto"
        self.ssh_port: int | None = None
        # Appended to the QEMU command line (e.g. a NIC on a network.Network).
        self.extra_qemu_args: list[str] = []
        self.accel_used: str | None = None
        self._process: pexpect.spawn | None = None
        self._qmp: QEMUMonitorProtocol | None = None
        self._ssh: paramiko.SSHClient | None = None
        self._console = bytearray()
        self._console_cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self._reader_stop = threading.Event()
        self._expired = False
        self._timer: threading.Timer | None = None
        if global_timeout:
            self._timer = threading.Timer(global_timeout, self._global_timeout_expired)
            self._timer.daemon = True
            self._timer.start()

    # -- logging -----------------------------------------------------------

    @contextlib.contextmanager
    def nested(self, message: str) -> Iterator[None]:
        """Log ``message`` for this machine and time the block."""
        with nested(f"{self.name}: {message}"):
            yield

    def log(self, message: str) -> None:
        log(f"{self.name}: {message}")

    # -- lifecycle -----------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return self._process is not None and self._process.isalive()

    def qemu_argv(self, accel: str) -> list[str]:
        """The QEMU command line for this machine."""
        self.ssh_port = self.ssh_port or _free_port()
        cpu = "host" if accel == "kvm" else "max"
        return [
            "qemu-system-x86_64",
            "-machine", "q35",
            "-accel", accel,
            "-cpu", cpu,
            "-smp", str(self.smp),
            "-m", str(self.memory_mb),
            "-display", "none",
            "-monitor", "none",
            "-serial", "stdio",
            "-serial", f"file:{self.ready_channel}",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-kernel", str(self.image.kernel),
            "-initrd", str(self.image.initrd),
            "-append", self.image.cmdline,
            "-drive", f"file={self.overlay},if=virtio,format=qcow2",
            "-netdev", f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22",
            "-device", f"virtio-net-pci,netdev=n0,mac={USER_NET_MAC}",
            "-device", "virtio-rng-pci",
            *self.extra_qemu_args,
        ]  # fmt: skip

    def start(self, wait: bool = True) -> None:
        """Boot the guest (a fresh overlay unless one exists); wait until SSH works."""
        self._check_expired()
        if self.is_running:
            return
        accel = self.accel_used = resolve_accel(self.accel, self.image)
        with self.nested(f"starting QEMU ({accel}, {self.smp} vCPU, {self.memory_mb} MiB)"):
            if not self.overlay.exists():
                create_overlay(self.image, self.overlay)
            self.qmp_path.unlink(missing_ok=True)
            self.ready_channel.unlink(missing_ok=True)  # QEMU makes it anew
            argv = self.qemu_argv(accel)
            (self.state_dir / "qemu-cmdline").write_text(shlex.join(argv) + "\n")
            self._process = pexpect.spawn(argv[0], argv[1:], echo=False, timeout=None)
            self._reader_stop.clear()
            self._reader = threading.Thread(target=self._read_console, daemon=True)
            self._reader.start()
            self._connect_qmp()
            self.log(f"SSH on 127.0.0.1:{self.ssh_port}, console log {self.console_log}")
        if wait:
            self.wait_for_boot(since=0)

    def _connect_qmp(self) -> None:
        deadline = time.monotonic() + 30
        while not self.qmp_path.exists():
            if not self.is_running:
                self._check_expired()  # killed by the global timeout, not a failed start
                raise MachineError(f"QEMU exited at start:\n{self.console_tail()}")
            if time.monotonic() > deadline:
                raise MachineError("QEMU did not create its QMP socket within 30 s")
            time.sleep(0.05)
        while True:  # the socket file exists a moment before QEMU listens on it
            self._qmp = QEMUMonitorProtocol(str(self.qmp_path))
            try:
                self._qmp.connect(negotiate=True)
                return
            except Exception as e:  # qemu.qmp wraps ECONNREFUSED in ConnectError
                self._qmp = None
                if not self.is_running or time.monotonic() > deadline:
                    self._check_expired()
                    raise MachineError(f"cannot connect to QEMU's QMP socket: {e!r}") from e
                time.sleep(0.2)

    def wait_for_boot(self, since: int = 0, timeout: float | None = None) -> float:
        """Wait for the guest's ready marker on its ready channel (ttyS1) after byte
        ``since`` of it, then for SSH; return seconds. On a timeout the error holds what
        the guest's systemd still waits for, if SSH answers."""
        start = time.monotonic()
        timeout = timeout or self.boot_timeout
        with self.nested("waiting for the guest to boot"):
            self._wait_ready_marker(since, timeout)
            self._connect_ssh(max(5.0, timeout - (time.monotonic() - start)))
        elapsed = time.monotonic() - start
        self.log(f"up after {elapsed:.1f} s")
        return elapsed

    def _ready_channel_size(self) -> int:
        try:
            return self.ready_channel.stat().st_size
        except FileNotFoundError:
            return 0

    def _wait_ready_marker(self, since: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        marker = READY_MARKER.encode()
        while True:
            self._check_expired()
            with contextlib.suppress(FileNotFoundError), self.ready_channel.open("rb") as f:
                f.seek(since)
                if marker in f.read():
                    return
            if self._process is None or not self._process.isalive():
                raise MachineError(
                    f"QEMU exited while the guest booted (log: {self.console_log}):\n"
                    f"{self.console_tail()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the guest did not report ready ({READY_MARKER} on ttyS1) within "
                    f"{timeout:.0f} s (log: {self.console_log}); {self._boot_diagnosis()}; "
                    f"last console lines:\n{self.console_tail()}"
                )
            time.sleep(0.5)

    def _boot_diagnosis(self) -> str:
        """What systemd in a guest that did not report ready still waits for (over SSH)."""
        try:
            self._connect_ssh(20)
        except Exception as e:  # no SSH either: the console tail is all there is
            return f"SSH does not answer either ({e})"
        _, out, _ = self.execute(
            "systemctl list-jobs --no-pager; systemctl status --no-pager recnix-vm-ready; "
            "systemctl --failed --no-pager",
            timeout=30,
        )
        self._close_ssh()
        return f"SSH answers; the guest's systemd says:\n{out}"

    def _connect_ssh(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        blob = base64.b64decode(self.image.ssh_host_key.read_text().split()[1])
        host_key = paramiko.Ed25519Key(data=blob)
        last: Exception | None = None
        while time.monotonic() < deadline:
            self._check_expired()
            client = paramiko.SSHClient()
            client.get_host_keys().add(f"[127.0.0.1]:{self.ssh_port}", "ssh-ed25519", host_key)
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
            try:
                client.connect(
                    "127.0.0.1",
                    port=self.ssh_port,
                    username="root",
                    key_filename=str(self.image.ssh_key),
                    timeout=10,
                    banner_timeout=10,
                    auth_timeout=10,
                    allow_agent=False,
                    look_for_keys=False,
                )
                transport = client.get_transport()
                assert transport is not None
                transport.set_keepalive(10)
                self._ssh = client
                return
            except (OSError, paramiko.SSHException) as e:
                last = e
                client.close()
                time.sleep(0.5)
        raise MachineError(f"no SSH to the guest within {timeout:.0f} s: {last!r}")

    def qmp(self, command: str, **args: Any) -> Any:
        """Run one QMP command and return its result."""
        self._check_expired()
        if self._qmp is None:
            raise MachineError("QEMU is not running")
        return self._qmp.cmd(command, **args)

    def wait_for_qmp_event(self, name: str, timeout: float = 60.0) -> dict[str, Any]:
        """Wait for the QMP event ``name`` (e.g. ``"RESET"``, ``"SHUTDOWN"``) and return it."""
        if self._qmp is None:
            raise MachineError("QEMU is not running")
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no QMP event {name} within {timeout:.0f} s")
            event = self._qmp.pull_event(wait=remaining)
            if event and event.get("event") == name:
                return event

    def shutdown(self, timeout: float = 120.0) -> None:
        """Power the guest off via ACPI (``system_powerdown``) and wait for QEMU to exit."""
        if not self.is_running:
            return
        with self.nested("shutting down (ACPI powerdown)"):
            self._close_ssh()
            self.qmp("system_powerdown")
            self._wait_exit(timeout)

    def reset(self) -> None:
        """Hard reset through QMP (``system_reset``): no shutdown, like pressing reset."""
        with self.nested("hard reset (QMP system_reset)"):
            self._close_ssh()
            since = self._ready_channel_size()
            self.qmp("system_reset")
            self.wait_for_qmp_event("RESET", 30)
        self.wait_for_boot(since=since)

    def crash(self) -> None:
        """Kill QEMU at once (SIGKILL), like pulling the power cord; the overlay stays."""
        with self.nested("crashing (killing QEMU)"):
            self._close_ssh()
            self._kill()

    def _wait_exit(self, timeout: float) -> None:
        assert self._process is not None
        deadline = time.monotonic() + timeout
        while self._process.isalive():
            if time.monotonic() > deadline:
                self.log(f"QEMU did not exit within {timeout:.0f} s: killing it")
                self._kill()
                return
            time.sleep(0.2)
        self._cleanup_process()

    def _kill(self) -> None:
        if self._process is not None and self._process.isalive():
            self._process.kill(9)
            with contextlib.suppress(Exception):
                self._process.wait()
        self._cleanup_process()

    def _cleanup_process(self) -> None:
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                self._qmp.close()
            self._qmp = None
        if self._reader is not None:
            self._reader.join(timeout=5)
            self._reader = None
        if self._process is not None:
            with contextlib.suppress(Exception):
                self._process.close(force=True)
            self._process = None

    def close(self) -> None:
        """Tear everything down: SSH, QMP, QEMU (killed if still running), the timer."""
        if self._timer is not None:
            self._timer.cancel()
        self._close_ssh()
        self._kill()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _global_timeout_expired(self) -> None:
        self._expired = True
        log(f"{self.name}: GLOBAL TIMEOUT expired: killing QEMU")
        with contextlib.suppress(Exception):
            if self._process is not None and self._process.isalive():
                self._process.kill(9)
        with contextlib.suppress(Exception):
            self._close_ssh()

    def _check_expired(self) -> None:
        if self._expired:
            # The timer thread sets the flag, then kills: report only once QEMU is gone.
            deadline = time.monotonic() + 30
            while self.is_running and time.monotonic() < deadline:
                time.sleep(0.05)
            raise GlobalTimeoutExpired(f"{self.name}: global timeout expired; QEMU was killed")

    # -- serial console ------------------------------------------------------

    def _read_console(self) -> None:
        proc = self._process
        assert proc is not None
        with self.console_log.open("ab") as out:
            while not self._reader_stop.is_set():
                try:
                    data = proc.read_nonblocking(65536, timeout=0.5)
                except pexpect.TIMEOUT:
                    continue
                except (pexpect.EOF, OSError, ValueError):
                    break
                out.write(data)
                out.flush()
                with self._console_cond:
                    self._console += data
                    self._console_cond.notify_all()

    def console_text(self, since: int = 0) -> str:
        """The console output so far (from byte offset ``since``), decoded leniently."""
        with self._console_cond:
            return self._console[since:].decode(errors="replace")

    def console_tail(self, lines: int = 40) -> str:
        return "\n".join(self.console_text().splitlines()[-lines:])

    def console_offset(self) -> int:
        """The current end of the console output (for ``wait_for_console_text(since=...)``)."""
        with self._console_cond:
            return len(self._console)

    def wait_for_console_text(
        self, regex: str, timeout: float = 60.0, since: int | None = None
    ) -> re.Match[str]:
        """Wait until ``regex`` appears on the serial console (after offset ``since``)."""
        pattern = re.compile(regex)
        start = 0 if since is None else since
        deadline = time.monotonic() + timeout
        with self._console_cond:
            while True:
                self._check_expired()
                match = pattern.search(self._console[start:].decode(errors="replace"))
                if match:
                    return match
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if self._process is None or not self._process.isalive():
                    raise MachineError(
                        f"QEMU exited while waiting for {regex!r} on the console "
                        f"(log: {self.console_log}):\n{self.console_tail()}"
                    )
                self._console_cond.wait(min(remaining, 1.0))
        raise TimeoutError(
            f"{regex!r} did not appear on the console within {timeout:.0f} s "
            f"(log: {self.console_log}); last lines:\n{self.console_tail()}"
        )

    def send_console(self, text: str) -> None:
        """Type ``text`` on the serial console."""
        if self._process is None:
            raise MachineError("QEMU is not running")
        self._process.send(text)

    def interact(self) -> None:
        """Hand the serial console to the terminal (exit with Ctrl-]); still logged."""
        if self._process is None:
            raise MachineError("QEMU is not running")
        self._reader_stop.set()
        if self._reader is not None:
            self._reader.join()
            self._reader = None
        with self.console_log.open("ab") as log_file:
            self._process.logfile_read = log_file
            try:
                self._process.interact()
            finally:
                self._process.logfile_read = None

    # -- commands --------------------------------------------------------------

    def _close_ssh(self) -> None:
        if self._ssh is not None:
            with contextlib.suppress(Exception):
                self._ssh.close()
            self._ssh = None

    def _client(self) -> paramiko.SSHClient:
        self._check_expired()
        if self._ssh is None:
            raise MachineError(f"{self.name} is not up (start() it first)")
        return self._ssh

    def execute(
        self,
        cmd: str,
        timeout: float | None = DEFAULT_COMMAND_TIMEOUT,
        on_stderr: Callable[[str], None] | None = None,
    ) -> tuple[int, str, str]:
        """Run ``cmd`` with bash as root; return ``(exit status, stdout, stderr)``.

        The command runs under ``timeout`` in the guest (exit status 124 when it
        runs out); the host gives up 30 s later if the guest does not answer.
        ``on_stderr`` gets each line of its stderr as it arrives (a build's log, live).
        """
        lines = _LineSplitter(on_stderr)
        wrapped = f"bash -c {shlex.quote(cmd)}"
        if timeout is not None:
            wrapped = f"timeout -k 10 {max(1, math.ceil(timeout))} {wrapped}"
        transport = self._client().get_transport()
        if transport is None or not transport.is_active():
            raise MachineError(f"{self.name}: SSH connection lost (console: {self.console_log})")
        channel = transport.open_session(timeout=60)
        try:
            channel.exec_command(wrapped)
            channel.shutdown_write()
            out, err = bytearray(), bytearray()
            deadline = None if timeout is None else time.monotonic() + timeout + 30
            while True:
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"{cmd!r}: no answer from the guest in {timeout} s + 30 s")
                self._check_expired()
                select.select([channel], [], [], 0.5)
                while channel.recv_ready():
                    out += channel.recv(65536)
                while channel.recv_stderr_ready():
                    err += lines.feed(channel.recv_stderr(65536))
                done = channel.exit_status_ready() and channel.eof_received
                if done or channel.closed:
                    break
            while channel.recv_ready():  # whatever arrived with the exit status
                out += channel.recv(65536)
            while channel.recv_stderr_ready():
                err += lines.feed(channel.recv_stderr(65536))
            lines.finish()
            rc = channel.recv_exit_status()
            return rc, out.decode(errors="replace"), err.decode(errors="replace")
        finally:
            channel.close()

    def succeed(self, cmd: str, timeout: float | None = DEFAULT_COMMAND_TIMEOUT) -> str:
        """Run ``cmd``; return its stdout, or raise :class:`CommandFailed` if it fails."""
        with self.nested(f"must succeed: {_short(cmd)}"):
            rc, out, err = self.execute(cmd, timeout)
            if rc != 0:
                raise CommandFailed(cmd, rc, out, err, self.console_log)
            return out

    def fail(self, cmd: str, timeout: float | None = DEFAULT_COMMAND_TIMEOUT) -> str:
        """Run ``cmd``; return its stderr if it fails, raise :class:`CommandFailed` if not."""
        with self.nested(f"must fail: {_short(cmd)}"):
            rc, out, err = self.execute(cmd, timeout)
            if rc == 0:
                raise CommandFailed(cmd, rc, out, err, self.console_log)
            return err

    def wait_until_succeeds(self, cmd: str, timeout: float = 900.0) -> str:
        """Retry ``cmd`` every second until it succeeds; the last attempt's output is logged."""
        result: list[str] = []

        def attempt(last_try: bool) -> bool:
            rc, out, err = self.execute(cmd, timeout)
            if rc == 0:
                result.append(out)
                return True
            if last_try:
                self.log(
                    f"last attempt of {cmd!r}: exit status {rc}\nstdout:\n{out}\nstderr:\n{err}"
                )
            return False

        with self.nested(f"waiting for success: {_short(cmd)}"):
            try:
                retry(attempt, timeout)
            except TimeoutError as e:
                raise TimeoutError(f"{cmd!r} did not succeed within {timeout:.0f} s") from e
        return result[-1]

    def wait_until_fails(self, cmd: str, timeout: float = 900.0) -> str:
        """Retry ``cmd`` every second until it fails; return its stderr."""
        result: list[str] = []

        def attempt(last_try: bool) -> bool:
            rc, out, err = self.execute(cmd, timeout)
            if rc != 0:
                result.append(err)
                return True
            if last_try:
                self.log(f"last attempt of {cmd!r} still succeeded; stdout:\n{out}")
            return False

        with self.nested(f"waiting for failure: {_short(cmd)}"):
            retry(attempt, timeout)
        return result[-1]

    def unit_state(self, unit: str) -> dict[str, str]:
        """``systemctl show`` properties of ``unit`` that matter for waiting."""
        out = self.succeed(
            f"systemctl show --property=ActiveState,SubState,LoadState,Result {shlex.quote(unit)}"
        )
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_for_unit(self, unit: str, timeout: float = 900.0) -> None:
        """Wait until ``unit`` is active; fail at once if it failed or is not loaded."""
        with self.nested(f"waiting for unit {unit}"):

            def check(last_try: bool) -> bool:
                rc, out, err = self.execute(
                    "systemctl show --property=ActiveState,SubState,LoadState,Result "
                    f"{shlex.quote(unit)}"
                )
                state = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
                if state.get("LoadState") == "not-found":
                    raise MachineError(f"unit {unit} is not loaded in the guest")
                if state.get("ActiveState") == "failed":
                    _, status, _ = self.execute(f"systemctl status --no-pager -l {unit} 2>&1")
                    raise MachineError(f"unit {unit} failed:\n{status}")
                if last_try:
                    self.log(f"unit {unit}: {state}")
                return state.get("ActiveState") == "active"

            retry(check, timeout)

    # -- files -----------------------------------------------------------------

    def copy_to(self, host_path: str | os.PathLike[str], guest_path: str) -> None:
        """Copy a file or a directory tree from the host to ``guest_path`` (SFTP)."""
        src = Path(host_path)
        with self.nested(f"copying {src} to guest {guest_path}"):
            sftp = self._client().open_sftp()
            try:
                _put(sftp, src, guest_path)
            finally:
                sftp.close()

    def copy_from(self, guest_path: str, host_path: str | os.PathLike[str]) -> None:
        """Copy a file or a directory tree from the guest to ``host_path`` (SFTP)."""
        dst = Path(host_path)
        with self.nested(f"copying guest {guest_path} to {dst}"):
            sftp = self._client().open_sftp()
            try:
                _get(sftp, guest_path, dst)
            finally:
                sftp.close()


def _put(sftp: paramiko.SFTPClient, src: Path, dst: str) -> None:
    mode = src.lstat().st_mode
    if stat.S_ISLNK(mode):
        sftp.symlink(os.readlink(src), dst)
    elif stat.S_ISDIR(mode):
        with contextlib.suppress(OSError):
            sftp.mkdir(dst)
        sftp.chmod(dst, stat.S_IMODE(mode))
        for child in sorted(src.iterdir()):
            _put(sftp, child, f"{dst.rstrip('/')}/{child.name}")
    else:
        sftp.put(str(src), dst)
        sftp.chmod(dst, stat.S_IMODE(mode))


def _get(sftp: paramiko.SFTPClient, src: str, dst: Path) -> None:
    attrs = sftp.lstat(src)
    mode = attrs.st_mode or 0
    if stat.S_ISLNK(mode):
        dst.symlink_to(sftp.readlink(src))
    elif stat.S_ISDIR(mode):
        dst.mkdir(parents=True, exist_ok=True)
        for entry in sorted(sftp.listdir(src)):
            _get(sftp, f"{src.rstrip('/')}/{entry}", dst / entry)
        dst.chmod(stat.S_IMODE(mode))
    else:
        sftp.get(src, str(dst))
        dst.chmod(stat.S_IMODE(mode))


# -- accelerator choice --------------------------------------------------------


def _qemu_version() -> str:
    out = subprocess.run(
        ["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=True
    ).stdout
    return out.splitlines()[0]


def probe_kvm(image: Image, timeout: float = KVM_PROBE_TIMEOUT) -> tuple[bool, str]:
    """Boot the guest kernel under KVM (no disk) and see whether it reaches init.

    Returns ``(works, reason)``. The boot is killed after ``timeout`` seconds.
    """
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is missing or not accessible"
    argv = [
        "qemu-system-x86_64", "-machine", "q35", "-accel", "kvm", "-cpu", "host", "-m", "512",
        "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd),
        "-append", "console=ttyS0 panic=-1 rdinit=/bin/false",
    ]  # fmt: skip
    child = pexpect.spawn(argv[0], argv[1:], echo=False, timeout=timeout)
    try:
        child.expect(rb"Run /bin/false as init process|Kernel panic")
        return True, "guest kernel reached init under KVM"
    except pexpect.TIMEOUT:
        return False, f"guest kernel did not reach init within {timeout:.0f} s under KVM"
    except pexpect.EOF:
        return False, "QEMU exited during the KVM probe: " + (child.before or b"").decode(
            errors="replace"
        )[-300:]
    finally:
        child.close(force=True)


def resolve_accel(accel: str, image: Image) -> str:
    """``"tcg"`` / ``"kvm"`` as given; ``"auto"``: KVM if the (cached) probe boot worked."""
    if accel in ("tcg", "kvm"):
        return accel
    if accel != "auto":
        raise MachineError(f"accel must be auto, tcg or kvm, not {accel!r}")
    cache_file = image.directory.parent.parent / "kvm-probe.json"
    kernel_name = json.loads((image.directory / "image.json").read_text())["kernel"]
    key = f"{kernel_name}:{image.kernel.stat().st_size}:{_qemu_version()}"
    with contextlib.suppress(OSError, ValueError, KeyError):
        cached = json.loads(cache_file.read_text())
        if cached["key"] == key:
            return "kvm" if cached["works"] else "tcg"
    with nested(f"probing KVM (short boot, {KVM_PROBE_TIMEOUT:.0f} s timeout)"):
        works, reason = probe_kvm(image)
        log(f"KVM probe: {reason} -> using {'kvm' if works else 'tcg'}")
    partial = cache_file.with_name(f"{cache_file.name}.{os.getpid()}")  # readers never see half
    partial.write_text(json.dumps({"key": key, "works": works, "reason": reason}))
    partial.replace(cache_file)
    return "kvm" if works else "tcg"


class _LineSplitter:
    """Passes each complete line of a byte stream to ``on_line`` (if any) as it comes."""

    def __init__(self, on_line: Callable[[str], None] | None) -> None:
        self.on_line = on_line
        self._partial = b""

    def feed(self, data: bytes) -> bytes:
        """Take ``data``; return it unchanged (the caller keeps the whole stream)."""
        if self.on_line is not None:
            *complete, self._partial = (self._partial + data).split(b"\n")
            for line in complete:
                self.on_line(line.decode(errors="replace"))
        return data

    def finish(self) -> None:
        """The stream ended: pass on a last line without its newline."""
        if self.on_line is not None and self._partial:
            self.on_line(self._partial.decode(errors="replace"))
        self._partial = b""
