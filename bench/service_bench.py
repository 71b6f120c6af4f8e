#!/usr/bin/env python3
"""recnix service overhead against Nix's built-in recursive-nix, measured side by side.

Scenarios, each run on private nix-daemons started here (tests/host/conftest.py);
every ratio is the median of paired ratios (the two sides of a pair run back to
back, alternating which goes first), so the machine's drift cancels:

qpi      QueryPathInfo round trip from inside a waiting sandboxed build: recnix's
         session socket ÷ the built-in's ``<build dir>/.nix-socket``. The client is
         a forked child that chroots into the build's sandbox root first.
many     Wall time of ``tests/scenarios/many.nix`` (n nested ``nix-build`` calls).
trivial  Trivial non-recursive builds in one ``nix-build``: recnix's hooks ÷
         ``/bin/true`` as both hooks (recnix's own share), and reference rows
         against no hooks (the floor of Nix running any hook) and for the hook
         script's fallback (no rendered environment: it scans the config).
add      ``nix-store --add`` of a large file inside a build (timed inside the
         build), and the service's peak RSS during it.
load     Many concurrent outer builds with nested builds each (more than the
         build users: recnix's build hook queues them before they take one; the
         built-in deadlocks, Nix issue #7297): failures, hangs, wall time, the
         service's peak RSS.
start    The service's start to ready (control socket accepting).
hook     Opted-in trivial builds, recnix ÷ Nix's built-in recursive-nix on the same
         derivations (requiredSystemFeatures "recnix" vs "recursive-nix"), in one
         nix-build and as separate ones, with more builds than daemon.max-sessions
         (target ≤ 1.10); against no hooks (reference); the floor of any hook
         (built-in builds with /bin/true hooks ÷ none); and the hook's Python
         start: hooks/entry.py -I -S ÷ console script.

The daemon with recnix's hooks runs with the environment ``recnix nix-conf
--daemon-env`` renders (RECNIX_HOOK_SOCKET, _MARKS, _CHANNEL, _PYTHON, _ENTRY), as the
NixOS module sets it, and recnix's build hook (``recnix nix-conf``'s
``build-hook``), which queues recursive builds before they take a build user.
The daemons build as the machine's ``nixbld`` users (10 on Debian). Prints a
table and writes it to bench/results-service.txt (``--quick``:
bench/results-service-quick.txt).

``--suite lix``: Lix has no built-in to compare with, so recnix on Lix is put
beside recnix on Nix 2.34: the recnix side alone of ``qpi`` and ``many`` and the
hook share (``hookcpu``) run in the lix root filesystem, then in sid's
(``--recnix-only``), and the two are printed side by side (Lix ÷ 2.34) into
bench/results-service-lix.txt.
Run as root: .venv/bin/python bench/service_bench.py [--quick] [--only SCENARIO]
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from recnix.cli.bundle import bundle_nix, busybox_store_path  # noqa: E402
from recnix.hooks import control  # noqa: E402
from recnix.protocol import (  # noqa: E402
    NEED_DATA,
    ClientConnection,
    HandshakeDone,
    Op,
    PathInfo,
    Reply,
)
from tests.buildhookwire import settings as hook_settings  # noqa: E402
from tests.buildhookwire import try_request  # noqa: E402
from tests.host.conftest import (  # noqa: E402
    PRE_BUILD_HOOK,
    RECNIX_BIN,
    NixHost,
    RecnixService,
    concurrent_builds,
    launch_recnix_service,
    scenario_runner,
    start_nix_host,
    start_recnix_service,
    stop_recnix_service,
    wait_until_ready,
)
from tests.nixversion import build_top_glob, is_lix, sandbox_root  # noqa: E402

RESULTS = REPO / "bench" / "results-service.txt"
START_TIMEOUT = 120.0

# A build that sits in its sandbox until `release` appears in its build directory.
WAIT_NIX = """\
{ busybox, feature, tag }:
let bb = builtins.storePath busybox;
in derivation {
  name = "bench-wait";
  system = builtins.currentSystem;
  builder = "${bb}/bin/sh";
  args = [ "-e" "-c" ''
    touch started
    while [ ! -e release ]; do sleep 0.1; done
    echo "$tag" > "$out"
  '' ];
  PATH = "${bb}/bin";
  inherit tag;
  requiredSystemFeatures = [ feature ];
}
"""

# n plain builds, element i writes "<prefix>-<i>" to $out.
TRIVIAL_NIX = """\
{ busybox, prefix, n, features ? [ ] }:
let bb = builtins.storePath busybox;
in builtins.genList (i: derivation {
  name = "bench-trivial-${toString i}";
  system = builtins.currentSystem;
  builder = "${bb}/bin/sh";
  args = [ "-c" "echo $tag > $out" ];
  tag = "${prefix}-${toString i}";
  requiredSystemFeatures = features;
}) n
"""

# One `nix-store --add` of a <mib> MiB file, timed inside the build (/proc/uptime,
# 10 ms steps); the added path is named bench-add-<tag> (deleted afterwards).
ADD_NIX = """\
{ busybox, nix, feature, tag, mib }:
let bb = builtins.storePath busybox; nx = builtins.storePath nix;
in derivation {
  name = "bench-add";
  system = builtins.currentSystem;
  builder = "${bb}/bin/sh";
  args = [ "-e" "-c" ''
    export HOME="$TMPDIR"
    f="$TMPDIR/bench-add-$tag"
    { echo "$tag"; head -c $((mib * 1048576)) /dev/zero; } > "$f"
    read t0 _ < /proc/uptime
    nix-store --add "$f" > /dev/null
    read t1 _ < /proc/uptime
    echo "$t0 $t1" > "$out"
  '' ];
  PATH = "${bb}/bin:${nx}/bin";
  inherit tag mib;
  requiredSystemFeatures = [ feature ];
}
"""


FLOOR_HOOKS = "pre-build-hook = /bin/true\npost-build-hook = /bin/true\n"


def fresh_tag() -> str:
    return secrets.token_hex(6)


@dataclass
class Row:
    """One scenario: interleaved runs of both sides (``runs_*[i]`` measured back to back).

    An absolute row (``absolute`` = "max" or "median") has no baseline: its value
    is that statistic of ``runs_recnix``, compared with ``target`` as it is.
    """

    scenario: str
    runs_recnix: list[float]
    runs_baseline: list[float]
    unit: str
    target: float | None  # None: a reference row, no target
    note: str = ""
    absolute: str = ""

    @property
    def recnix(self) -> float:
        if self.absolute == "max":
            return max(self.runs_recnix)
        return statistics.median(self.runs_recnix)

    @property
    def baseline(self) -> float | None:
        return statistics.median(self.runs_baseline) if self.runs_baseline else None

    @property
    def ratio(self) -> float:
        """Median of the paired ratios: each pair ran back to back, so the machine's
        drift (other load, a slow minute) cancels within a pair."""
        if self.absolute:
            return self.recnix
        pairs = zip(self.runs_recnix, self.runs_baseline, strict=True)
        return statistics.median(a / b for a, b in pairs)

    @property
    def verdict(self) -> str:
        if self.target is None:
            return "ref"
        return "PASS" if self.ratio <= self.target else "FAIL"


# -- measuring


def timed(action: Callable[[], None]) -> Callable[[], float]:
    """``action`` as a measurement: its wall time in s."""

    def run() -> float:
        t0 = time.perf_counter()
        action()
        return time.perf_counter() - t0

    return run


def process_cpu(pids: list[int]) -> float:
    """CPU seconds of the processes ``pids`` and their reaped descendants (for a
    nix-daemon: its workers, hooks, builders): less sensitive to other load on the
    machine than wall time."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += sum(int(x) for x in fields[11:15])
    return total / os.sysconf("SC_CLK_TCK")


def timed_cpu(pids: list[int], action: Callable[[], None], cpu: list[float]) -> Callable[[], float]:
    """``action`` as a wall-time measurement that also appends the CPU of ``pids``
    (process_cpu) to ``cpu``."""

    def run() -> float:
        c0 = process_cpu(pids)
        t0 = time.perf_counter()
        action()
        seconds = time.perf_counter() - t0
        time.sleep(0.05)  # let the daemon reap the last worker
        cpu.append(process_cpu(pids) - c0)
        return seconds

    return run


def interleaved(
    reps: int, recnix_run: Callable[[], float], baseline_run: Callable[[], float]
) -> tuple[list[float], list[float]]:
    """Alternate two measurements, swapping which goes first each round."""
    a: list[float] = []
    b: list[float] = []
    for i in range(reps):
        if i % 2 == 0:
            a.append(recnix_run())
            b.append(baseline_run())
        else:
            b.append(baseline_run())
            a.append(recnix_run())
    return a, b


def spread(values: list[float], digits: int = 2) -> str:
    return "/".join(f"{v:.{digits}f}" for v in values)


# -- 1. QueryPathInfo round trips


def _exchange(sock: socket.socket, conn: ClientConnection) -> object:
    """Send what ``conn`` queued, then read until it has an event."""
    while True:
        ev = conn.next_event()
        data = conn.data_to_send()  # requests, and handshake steps queued while decoding
        if data:
            sock.sendall(data)
        if ev is not NEED_DATA:
            return ev
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the daemon closed the connection")
        conn.receive_data(chunk)


def qpi_loop(sock: socket.socket, path: str, n: int) -> float:
    """Handshake, then ``n`` QueryPathInfo of ``path``; seconds per round trip."""
    conn = ClientConnection(35)
    conn.initiate()
    ev = _exchange(sock, conn)
    if not isinstance(ev, HandshakeDone):
        raise RuntimeError(f"handshake failed: {ev!r}")
    for _ in range(20):  # warm up (first upstream connection, caches)
        conn.send_request(Op.QUERY_PATH_INFO, {"path": path})
        ev = _exchange(sock, conn)
    if not (isinstance(ev, Reply) and isinstance(ev.value, PathInfo)):
        raise RuntimeError(f"QueryPathInfo of {path} gave {ev!r}")
    t0 = time.perf_counter()
    for _ in range(n):
        conn.send_request(Op.QUERY_PATH_INFO, {"path": path})
        ev = _exchange(sock, conn)
        if not isinstance(ev, Reply):
            raise RuntimeError(f"QueryPathInfo of {path} gave {ev!r}")
    return (time.perf_counter() - t0) / n


def qpi_from_sandbox(chroot: str, socket_dir: str, socket_name: str, path: str, n: int) -> float:
    """Run ``qpi_loop`` in a forked child chrooted into the build's sandbox root."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns
        status = 1
        try:
            os.close(read_end)
            dirfd = os.open(socket_dir, os.O_RDONLY | os.O_DIRECTORY)
            os.chroot(chroot)
            os.fchdir(dirfd)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(60)
                sock.connect(socket_name)
                seconds = qpi_loop(sock, path, n)
            os.write(write_end, struct.pack("d", seconds))
            status = 0
        except BaseException as e:  # report anything, then leave without cleanup handlers
            os.write(write_end, b"E" + repr(e).encode()[:4000])
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or len(data) != 8:
        raise RuntimeError(f"sandboxed QueryPathInfo client failed: {data!r}")
    return struct.unpack("d", data)[0]


class WaitingBuild:
    """An opted-in build of WAIT_NIX that sits in its sandbox until released."""

    def __init__(self, host: NixHost, expr: Path, busybox: str, feature: str) -> None:
        self.host = host
        self.tag = fresh_tag()
        args = ["--argstr", "busybox", busybox, "--argstr", "feature", feature]
        args += ["--argstr", "tag", self.tag]
        self.drv = host.run(["nix-instantiate", str(expr), *args]).stdout.strip()
        self.process = subprocess.Popen(
            ["nix-build", "--no-out-link", self.drv],
            env=host.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + START_TIMEOUT
        pattern = build_top_glob(host.build_dir, "bench-wait") + "/started"
        while not (started := glob.glob(pattern)):
            if self.process.poll() is not None:
                raise RuntimeError(f"waiting build ended early: {self.process.communicate()}")
            if time.monotonic() > deadline:
                raise RuntimeError("waiting build never started")
            time.sleep(0.05)
        self.build_dir = os.path.dirname(started[0])

    def release(self) -> None:
        Path(self.build_dir, "release").touch()
        _, stderr = self.process.communicate(timeout=60)
        if self.process.returncode != 0:
            raise RuntimeError(f"waiting build failed: {stderr}")


def tree_cpu(root: int, comms: tuple[str, ...]) -> float:
    """CPU seconds (user + system, threads included) of ``root`` and its descendants
    whose command name is in ``comms`` (``()``: all)."""
    procs: dict[int, tuple[int, str, float]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        procs[int(entry)] = (int(fields[1]), comm, (int(fields[11]) + int(fields[12])) / tick)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        if pid in procs and (not comms or procs[pid][1] in comms or pid == root):
            total += procs[pid][2]
        todo.extend(child for child, (ppid, _, _) in procs.items() if ppid == pid)
    return total


def with_cpu(measure: Callable[[], float], root: int, comms: tuple[str, ...], cpu: list[float]):
    """``measure`` that also appends the CPU seconds ``tree_cpu`` saw meanwhile to ``cpu``."""

    def run() -> float:
        c0 = tree_cpu(root, comms)
        result = measure()
        cpu.append(tree_cpu(root, comms) - c0)
        return result

    return run


def bench_qpi(
    hooked: NixHost,
    service: RecnixService,
    plain: NixHost,
    expr: Path,
    busybox: str,
    n: int,
    rounds: int,
) -> Row:
    """Both waiting builds at once; ``rounds`` alternating loops of ``n``; medians."""
    recnix_build = WaitingBuild(hooked, expr, busybox, "recnix")
    builtin_build: WaitingBuild | None = None
    try:
        builtin_build = WaitingBuild(plain, expr, busybox, "recursive-nix")
        status = control.request(service.control_socket, {"op": "status"})
        sessions = [s for s in status["sessions"] if s["drv"] == recnix_build.drv]
        if len(sessions) != 1:
            raise RuntimeError(f"no recnix session for {recnix_build.drv}: {status}")
        sock_path = Path(sessions[0]["socket"])
        recnix_args = (sessions[0]["chroot"], str(sock_path.parent), sock_path.name)
        # the sandbox root (tests/nixversion.py); the socket is <build dir>/.nix-socket.
        chroot = str(sandbox_root(builtin_build.drv))
        builtin_args = (chroot, builtin_build.build_dir, ".nix-socket")
        # CPU of the side that answers: the service; the built-in's daemon workers.
        cpu_r: list[float] = []
        cpu_b: list[float] = []
        a, b = interleaved(
            rounds,
            with_cpu(
                lambda: qpi_from_sandbox(*recnix_args, busybox, n),
                service.process.pid,
                (),
                cpu_r,
            ),
            with_cpu(
                lambda: qpi_from_sandbox(*builtin_args, busybox, n),
                plain.process.pid,
                ("nix-daemon",),
                cpu_b,
            ),
        )
    finally:
        recnix_build.release()
        if builtin_build is not None:
            builtin_build.release()
    return Row(
        f"QueryPathInfo round trip in the sandbox ({len(a)} rounds of {n})",
        [x * 1e6 for x in a],
        [x * 1e6 for x in b],
        "µs",
        1.0,
        f"rounds recnix {spread([x * 1e6 for x in a], 0)} µs, built-in "
        f"{spread([x * 1e6 for x in b], 0)} µs; client chrooted into the sandbox root for "
        "both; path = busybox (an input); server CPU per round trip (all rounds): recnix "
        f"service {sum(cpu_r) / (n * rounds) * 1e6:.1f} µs, built-in daemon "
        f"{sum(cpu_b) / (n * rounds) * 1e6:.1f} µs",
    )


# -- many: nested builds; trivial and hook: plain and opted-in trivial builds


def many_runner(host: NixHost, busybox: str, nix: str, feature: str, n: int) -> Callable[[], None]:
    runner = scenario_runner(host, busybox, nix)

    def run() -> None:
        tag = fresh_tag()
        outcome = runner.build("many", feature, tag, {"innerTag": tag, "n": n})
        if not outcome.ok:
            raise RuntimeError(f"many.nix ({feature}) failed: {outcome.describe()}")

    return run


def trivial_runner(
    host: NixHost,
    expr: Path,
    busybox: str,
    n: int,
    separate: bool = False,
    feature: str | None = None,
) -> Callable[[], None]:
    """n trivial builds (one nix-build, or ``separate`` ones) requiring ``feature``."""

    def run() -> None:
        args = ["--argstr", "busybox", busybox, "--argstr", "prefix", fresh_tag()]
        args += ["--arg", "n", str(n)]
        if feature:
            # One build at a time, on both sides (as a user with more opted-in builds
            # than daemon.max-sessions would on Lix, which has no recnix build hook).
            args += ["--arg", "features", f'[ "{feature}" ]', "--max-jobs", "1"]
        if separate:
            for i in range(n):
                host.run(["nix-build", "--no-out-link", str(expr), *args, "-A", str(i)])
        else:
            out = host.run(["nix-build", "--no-out-link", str(expr), *args]).stdout.split()
            if len(out) != n:
                raise RuntimeError(f"expected {n} outputs, got {len(out)}")

    return run


def trivial_row(
    scenario: str,
    a: list[float],
    b: list[float],
    n: int,
    label: str,
    baseline: str = "without",
    target: float | None = None,
    cpu: tuple[list[float], list[float]] | None = None,
    cpu_what: str = "daemon-tree CPU",
) -> Row:
    paired = statistics.median(x - y for x, y in zip(a, b, strict=True)) / n * 1e3
    note = f"runs {label} {spread(a)} s, {baseline} {spread(b)} s; per build {paired:+.2f} ms"
    if cpu is not None:
        ca, cb = cpu
        cpu_ratio = statistics.median(x / y for x, y in zip(ca, cb, strict=True))
        cpu_paired = statistics.median(x - y for x, y in zip(ca, cb, strict=True)) / n * 1e3
        note += (
            f"; {cpu_what} {spread(ca)} s vs {spread(cb)} s: ratio {cpu_ratio:.3f}, "
            f"per build {cpu_paired:+.2f} ms"
        )
    return Row(f"{scenario} ({len(a)} pairs)", a, b, "s", target, note + " (medians of pairs)")


# -- add: a large nix-store --add inside a build


def rss_reset(pid: int) -> None:
    """Reset the peak RSS (VmHWM) of ``pid`` (Linux clear_refs 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def rss_peak_mib(pid: int) -> float:
    """VmHWM of ``pid`` in MiB: its peak RSS since the last ``rss_reset``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def add_runner(
    host: NixHost, expr: Path, busybox: str, nix: str, feature: str, mib: int
) -> Callable[[], float]:
    """One build that adds a ``mib`` MiB file; the add's seconds, timed in the build.
    The output and the added path are deleted afterwards (they are garbage)."""

    def run() -> float:
        tag = fresh_tag()
        args = ["--argstr", "busybox", busybox, "--argstr", "nix", nix]
        args += ["--argstr", "feature", feature, "--argstr", "tag", tag, "--arg", "mib", str(mib)]
        out = host.run(["nix-build", "--no-out-link", str(expr), *args], timeout=900).stdout
        out_path = out.split()[-1]
        t0, t1 = (float(x) for x in Path(out_path).read_text().split())
        added = glob.glob(f"/nix/store/*-bench-add-{tag}")
        # Best effort: a path still rooted (e.g. by a session ending late) stays.
        host.run(["nix-store", "--delete", out_path, *added], check=False)
        return t1 - t0

    return run


# -- load: concurrent outer builds with nested builds


# -- start: service start to ready


def start_service_timed(host: NixHost) -> tuple[RecnixService, float]:
    """Start ``recnix daemon`` on ``host.recnix_config`` (already written); return it and
    the seconds until its control socket accepts a connection (polled every ms)."""
    t0 = time.perf_counter()
    service = launch_recnix_service(host)
    wait_until_ready(service, timeout=START_TIMEOUT, poll=0.001)
    return service, time.perf_counter() - t0


# -- hook: the hook's Python start


def spawn_cpu(argv: list[str], env: dict[str, str], n: int) -> float:
    """Mean CPU seconds (user + system) of ``n`` runs of ``argv``, from wait4's rusage."""
    cpu = 0.0
    for _ in range(n):
        pid = os.posix_spawn(argv[0], argv, env)
        _, status, usage = os.wait4(pid, 0)
        if status != 0:
            raise RuntimeError(f"{argv} exited with {status}")
        cpu += usage.ru_utime + usage.ru_stime
    return cpu / n


def spawn_loop(argv: list[str], env: dict[str, str], n: int) -> float:
    """Mean wall seconds of ``n`` runs of ``argv`` (posix_spawn, no shell)."""
    t0 = time.perf_counter()
    for _ in range(n):
        pid = os.posix_spawn(argv[0], argv, env)
        _, status = os.waitpid(pid, 0)
        if status != 0:
            raise RuntimeError(f"{argv} exited with {status}")
    return (time.perf_counter() - t0) / n


def answer_every_channel_request(directory: Path) -> Callable[[], None]:
    """Serve a hook channel in ``directory`` (the service's end, recnix.daemon.hookchannel)
    whose every request is answered ``{"ok": true}`` at once; returns the function that
    stops serving."""
    import asyncio
    import threading

    from recnix.daemon.hookchannel import HookChannel

    loop = asyncio.new_event_loop()
    ready = threading.Event()

    async def dispatch(message: dict) -> dict:
        return {"ok": True}

    channel = HookChannel(directory, dispatch, ())

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(lambda: (channel.open(), ready.set()))
        loop.run_forever()
        channel.close()
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    if not ready.wait(10):
        raise RuntimeError(f"the hook channel in {directory} did not start")

    def stop() -> None:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)

    return stop


def answer_every_request(path: Path, reply: bytes) -> Callable[[], None]:
    """Serve ``path``: read each connection's request line, answer ``reply``; returns
    the function that stops serving."""
    import threading

    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(16)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:  # closed: stop
                return
            with conn:
                data = b""
                while not data.endswith(b"\n"):
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown(socket.SHUT_RDWR)
        server.close()
        thread.join(timeout=5)

    return stop


# -- the benchmark context and its scenarios


@dataclass
class Bench:
    """Everything the scenarios share: the daemons, the service, store paths, files."""

    opts: argparse.Namespace
    scratch: Path
    hooked: NixHost  # recnix's hooks with the rendered environment; the service's host
    plain: NixHost  # no hooks: Nix's built-in recursive-nix
    floor: NixHost  # /bin/true as both hooks
    fallback: NixHost  # recnix's hooks without the rendered environment
    service: RecnixService
    busybox: str
    nix: str

    @property
    def service_max_sessions(self) -> int:
        """The session slots the service allows (its start line says)."""
        found = re.findall(r"max (\d+) concurrent sessions", self.service.log_text())
        return int(found[-1]) if found else 0

    def expr(self, name: str, text: str) -> Path:
        path = self.scratch / name
        if not path.exists():
            path.write_text(text)
        return path


def scenario_qpi(b: Bench) -> list[Row]:
    o = b.opts
    row = bench_qpi(
        b.hooked, b.service, b.plain, b.expr("wait.nix", WAIT_NIX), b.busybox, o.qpi, o.qpi_rounds
    )
    return [row]


def scenario_many(b: Bench) -> list[Row]:
    n, reps = b.opts.nested, b.opts.many_reps
    a, c = interleaved(
        reps,
        timed(many_runner(b.hooked, b.busybox, b.nix, "recnix", n)),
        timed(many_runner(b.plain, b.busybox, b.nix, "recursive-nix", n)),
    )
    note = (
        f"runs recnix {spread(a)} s, built-in {spread(c)} s (built-in on the daemon without hooks)"
    )
    return [Row(f"many.nix: {n} nested nix-build, wall ({reps} pairs)", a, c, "s", 1.05, note)]


def scenario_trivial(b: Bench) -> list[Row]:
    n, reps = b.opts.trivial, b.opts.trivial_reps
    expr = b.expr("trivial.nix", TRIVIAL_NIX)
    rows = []

    def compare(
        first: NixHost, second: NixHost, title: str, labels: tuple[str, str], target=None
    ) -> None:
        cpu: tuple[list[float], list[float]] = ([], [])
        a, c = interleaved(
            reps,
            timed_cpu([first.process.pid], trivial_runner(first, expr, b.busybox, n), cpu[0]),
            timed_cpu([second.process.pid], trivial_runner(second, expr, b.busybox, n), cpu[1]),
        )
        rows.append(trivial_row(title, a, c, n, *labels, target=target, cpu=cpu))

    compare(
        b.hooked,
        b.floor,
        f"{n} trivial builds, recnix hooks ÷ /bin/true hooks",
        ("hooks", "true"),
        1.02,
    )
    compare(b.floor, b.plain, f"reference: {n} trivial, /bin/true hooks ÷ none", ("true", "none"))
    compare(b.hooked, b.plain, f"reference: {n} trivial, recnix hooks ÷ none", ("hooks", "none"))
    compare(
        b.fallback,
        b.floor,
        f"reference: {n} trivial, hooks without rendered env ÷ /bin/true",
        ("fallback", "true"),
    )
    if b.opts.separate:
        a, c = interleaved(
            reps,
            timed(trivial_runner(b.hooked, expr, b.busybox, n, separate=True)),
            timed(trivial_runner(b.plain, expr, b.busybox, n, separate=True)),
        )
        rows.append(
            trivial_row(
                f"reference: {n} separate nix-build calls, recnix hooks ÷ none",
                a,
                c,
                n,
                "hooks",
            )
        )
    return rows


def scenario_add(b: Bench) -> list[Row]:
    mib, reps = b.opts.add_mib, b.opts.add_reps
    expr = b.expr("add.nix", ADD_NIX)
    pid = b.service.process.pid
    peaks: list[float] = []
    recnix_add = add_runner(b.hooked, expr, b.busybox, b.nix, "recnix", mib)

    def recnix_run() -> float:
        rss_reset(pid)
        seconds = recnix_add()
        peaks.append(rss_peak_mib(pid))
        return seconds

    a, c = interleaved(
        reps, recnix_run, add_runner(b.plain, expr, b.busybox, b.nix, "recursive-nix", mib)
    )
    return [
        Row(
            f"nix-store --add of {mib} MiB inside a build ({reps} pairs)",
            a,
            c,
            "s",
            1.2,
            f"runs recnix {spread(a)} s, built-in {spread(c)} s (timed in the build, 10 ms steps)",
        ),
        Row(
            f"service peak RSS during the {mib} MiB add (max of {reps})",
            peaks,
            [],
            "Mi",
            64.0,
            f"VmHWM of the service process per add: {spread(peaks, 1)} MiB",
            absolute="max",
        ),
    ]


def scenario_load(b: Bench) -> list[Row]:
    outer, nested, reps = b.opts.load_outer, b.opts.load_nested, b.opts.load_reps
    pid = b.service.process.pid
    peaks: list[float] = []
    bad: list[float] = []
    bad_builtin: list[str] = []

    def recnix_run() -> float:
        rss_reset(pid)
        wall, failures, hangs = concurrent_builds(
            b.hooked, b.busybox, b.nix, "recnix", outer, nested, b.opts.load_timeout
        )
        peaks.append(rss_peak_mib(pid))
        bad.append(failures + hangs)
        return wall

    def builtin_run() -> float:
        wall, failures, hangs = concurrent_builds(
            b.plain, b.busybox, b.nix, "recursive-nix", outer, nested, b.opts.load_timeout
        )
        bad_builtin.append(f"{failures}/{hangs}")
        return wall

    a, c = interleaved(reps, recnix_run, builtin_run)
    what = f"{outer} concurrent outer builds × {nested} nested"
    return [
        Row(
            f"load: {what}, wall ({reps} pairs)",
            a,
            c,
            "s",
            None,
            f"runs recnix {spread(a)} s, built-in {spread(c)} s; built-in failures/hangs "
            f"{', '.join(bad_builtin)} (timeout {b.opts.load_timeout:.0f} s)",
        ),
        Row(f"load: {what}, recnix failures + hangs", bad, [], "  ", 0.0, "", absolute="max"),
        Row(
            f"load: {what}, service peak RSS",
            peaks,
            [],
            "Mi",
            100.0,
            f"VmHWM per run: {spread(peaks, 1)} MiB",
            absolute="max",
        ),
    ]


def scenario_start(b: Bench) -> list[Row]:
    times = []
    for _ in range(b.opts.start_reps):
        stop_recnix_service(b.service)
        b.service, seconds = start_service_timed(b.hooked)
        times.append(seconds * 1e3)
    return [
        Row(
            f"service start to ready ({len(times)} starts)",
            times,
            [],
            "ms",
            None,
            f"each: {spread(times, 0)} ms (control socket accepting)",
            absolute="median",
        )
    ]


def scenario_hook(b: Bench) -> list[Row]:
    n, reps = b.opts.hook_builds, b.opts.trivial_reps
    expr = b.expr("trivial.nix", TRIVIAL_NIX)
    slots = b.service_max_sessions
    rows = []
    # CPU: recnix's side counts its nix-daemon's tree and the service (with its children)
    recnix_pids = [b.hooked.process.pid, b.service.process.pid]
    for separate, what in ((False, "in one nix-build"), (True, "as separate nix-builds")):
        cpu: tuple[list[float], list[float]] = ([], [])
        a, c = interleaved(
            reps,
            timed_cpu(
                recnix_pids,
                trivial_runner(b.hooked, expr, b.busybox, n, separate, "recnix"),
                cpu[0],
            ),
            timed_cpu(
                [b.plain.process.pid],
                trivial_runner(b.plain, expr, b.busybox, n, separate, "recursive-nix"),
                cpu[1],
            ),
        )
        rows.append(
            trivial_row(
                f"opted-in: {n} trivial builds {what}, recnix ÷ built-in (max-sessions {slots})",
                a,
                c,
                n,
                "recnix",
                "built-in",
                target=1.10,
                cpu=cpu,
                cpu_what="CPU (daemon tree, and recnix's service)",
            )
        )
    a, c = interleaved(
        reps,
        timed(trivial_runner(b.hooked, expr, b.busybox, n, feature="recnix")),
        timed(trivial_runner(b.plain, expr, b.busybox, n, feature="recnix")),
    )
    rows.append(
        trivial_row(f"reference: {n} opted-in trivial builds, recnix ÷ no hooks", a, c, n, "recnix")
    )
    rows[-1].note += " (both hooks, session open, finalise)"
    # What any pre- and post-build hook costs the same builds: the floor under the
    # opted-in rows' per-build cost (Nix forks its worker for each hook).
    a, c = interleaved(
        reps,
        timed(trivial_runner(b.floor, expr, b.busybox, n, feature="recursive-nix")),
        timed(trivial_runner(b.plain, expr, b.busybox, n, feature="recursive-nix")),
    )
    rows.append(
        trivial_row(
            f"reference: {n} built-in recursive-nix trivial builds, /bin/true hooks ÷ none",
            a,
            c,
            n,
            "true",
            "none",
        )
    )
    rows[-1].note += " (the floor of any pre- and post-build hook)"
    # The opted-in hook's Python: start, imports and one control round trip, against
    # a control socket that answers every request at once (no session is opened).
    drv = b.scratch / "mentions.drv"
    drv.write_text('Derive([],[],[],"x86_64-linux","/bin/sh",[],[("note","recnix")])')
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    answering = b.scratch / "answering.sock"
    stop_answering = answer_every_request(answering, b'{"ok": true}\n')
    tail = ["--control-socket", str(answering), str(drv), "/c"]
    entry = [sys.executable, "-I", "-S", str(REPO / "recnix" / "hooks" / "entry.py")]
    loops = 20
    a, c = interleaved(
        reps,
        lambda: spawn_loop([*entry, "pre-build-hook", *tail], env, loops) * 1e3,
        lambda: spawn_loop([str(RECNIX_BIN), "pre-build-hook", *tail], env, loops) * 1e3,
    )
    # The same hook as Nix runs it (the sh script, the rendered environment), over the
    # hook channel (bash, no Python) and starting Python: the before and after of the
    # channel, each with one round trip answered at once.
    stop_channel = answer_every_channel_request(b.scratch / "answering-channel")
    script_env = {
        **env,
        "RECNIX_HOOK_SOCKET": str(answering),
        "RECNIX_HOOK_PYTHON": sys.executable,
        "RECNIX_HOOK_ENTRY": entry[-1],
    }
    channel_env = {**script_env, "RECNIX_HOOK_CHANNEL": str(b.scratch / "answering-channel")}
    hook = [str(PRE_BUILD_HOOK), str(drv), "/c"]
    ch, py = interleaved(
        reps,
        lambda: spawn_loop(hook, channel_env, loops) * 1e3,
        lambda: spawn_loop(hook, script_env, loops) * 1e3,
    )
    stop_channel()
    stop_answering()
    rows.append(
        Row(
            "reference: an opted-in build's pre-build hook as Nix runs it, over the hook "
            "channel ÷ starting Python",
            ch,
            py,
            "ms",
            None,
            f"mean of {loops} runs per round, one round trip each: hook channel "
            f"{spread(ch, 1)} ms, Python (hooks/entry.py -I -S) {spread(py, 1)} ms",
        )
    )
    rows.append(
        Row(
            "reference: the opted-in hook's Python with one control round trip, "
            "hooks/entry.py -I -S ÷ recnix console script",
            a,
            c,
            "ms",
            None,
            f"mean of {loops} starts per round: entry {spread(a, 1)} ms, "
            f"console script {spread(c, 1)} ms",
        )
    )
    return rows


def _write_drv(path: Path, busybox: str, padding: int = 0) -> Path:
    """A trivial build's .drv (``padding``: bytes of an extra variable, to make it as large
    as a typical nixpkgs derivation's)."""
    store = "/nix/store/" + "a" * 32
    extra = f',("padding","{"x" * padding}")' if padding else ""
    path.write_text(
        f'Derive([("out","{store}-bench-trivial-0","","")],[],["{busybox}"],"x86_64-linux",'
        f'"{busybox}/bin/sh",["-c","echo $tag > $out"],[("builder","{busybox}/bin/sh"),'
        f'("name","bench-trivial-0"),("out","{store}-bench-trivial-0"){extra},'
        f'("system","x86_64-linux"),("tag","0123456789ab-0")])'
    )
    return path


def build_hook_try_us(b: Bench, tries: int = 500) -> float:
    """Mean wall µs of one "try" round trip with recnix's build hook (a build that does
    not require recnix, no remote machines): what Nix waits for before each build."""
    settings = hook_settings(builders="")
    request = try_request("/nix/store/" + "b" * 32 + "-x.drv", [])
    env = {**b.hooked.daemon_env, "RECNIX_HOOK_MARKS": str(b.scratch / "try-marks")}
    hook = str(Path(sys.executable).parent / "recnix-build-hook")
    proc = subprocess.Popen([hook, "0"], stdin=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdin is not None and proc.stderr is not None
    proc.stdin.write(settings)
    t0 = time.perf_counter()
    for _ in range(tries):
        proc.stdin.write(request)
        proc.stdin.flush()
        if proc.stderr.readline() != b"# decline\n":
            raise RuntimeError("recnix's build hook did not decline a plain build")
    elapsed = time.perf_counter() - t0
    proc.stdin.close()
    proc.wait()
    return elapsed / tries * 1e6


def scenario_hookcpu(b: Bench) -> list[Row]:
    """recnix's share of a build that does not opt in, in CPU time (robust to other load):
    both hook scripts as nix-daemon runs them (rendered environment, a trivial .drv),
    less /bin/true twice. With recnix's build hook, its <drv>.plain hint spares the
    pre-build hook the .drv; without it (Lix, preferLocalBuild) the hook reads the .drv,
    a system call per byte (reference rows: a trivial .drv, and one of 8 KiB)."""
    marks = Path(b.hooked.daemon_env["RECNIX_HOOK_MARKS"])
    marks.mkdir(mode=0o700, exist_ok=True)
    small = _write_drv(b.scratch / "plain.drv", b.busybox)
    large = _write_drv(b.scratch / "large.drv", b.busybox, padding=8192)
    hint = marks / f"{small.name}.plain"
    try_us = build_hook_try_us(b)
    rows = []
    for drv, hinted, title in (
        (small, True, "recnix's CPU share of a build that does not opt in"),
        (small, False, "reference: the same, without recnix's build hook (no hint)"),
        (large, False, "reference: the same with an 8 KiB .drv, without the hint"),
    ):
        if hinted:
            hint.touch()
        else:
            hint.unlink(missing_ok=True)
        rows.append(_hook_cpu_row(b, drv, title))
    rows[
        0
    ].note += f"; plus recnix's build hook answering Nix's try: {try_us:.0f} µs wall per build"
    return rows


def _hook_cpu_row(b: Bench, drv: Path, title: str) -> Row:
    env = {**b.hooked.daemon_env, "DRV_PATH": str(drv), "OUT_PATHS": "/nix/store/x"}
    hook_bin = Path(sys.executable).parent
    pre = [str(hook_bin / "recnix-pre-build-hook"), str(drv), f"{drv}.chroot"]
    post = [str(hook_bin / "recnix-post-build-hook")]
    loops, rounds = b.opts.hookcpu_loops, b.opts.hookcpu_rounds
    hooks: list[float] = []
    floor: list[float] = []
    for i in range(rounds):
        pair = [
            lambda: spawn_cpu(pre, env, loops) + spawn_cpu(post, env, loops),
            lambda: 2 * spawn_cpu(["/bin/true"], env, loops),
        ]
        if i % 2:
            pair.reverse()
        x, y = (f() for f in pair)
        hooks.append((x if i % 2 == 0 else y) * 1e3)
        floor.append((y if i % 2 == 0 else x) * 1e3)
    share = [h - f for h, f in zip(hooks, floor, strict=True)]
    return Row(
        f"{title} (both hooks − 2 × /bin/true)",
        share,
        [],
        "ms",
        0.5 if not title.startswith("reference") else None,
        f"{rounds} rounds of {loops}: hooks {spread(hooks, 3)} ms, /bin/true ×2 "
        f"{spread(floor, 3)} ms per build; .drv {drv.stat().st_size} bytes",
        absolute="median",
    )


def scenario_qpi_recnix(b: Bench) -> list[Row]:
    """QueryPathInfo round trips against recnix's session alone (no built-in: Lix)."""
    n, rounds = b.opts.qpi, b.opts.qpi_rounds
    build = WaitingBuild(b.hooked, b.expr("wait.nix", WAIT_NIX), b.busybox, "recnix")
    try:
        status = control.request(b.service.control_socket, {"op": "status"})
        sessions = [s for s in status["sessions"] if s["drv"] == build.drv]
        if len(sessions) != 1:
            raise RuntimeError(f"no recnix session for {build.drv}: {status}")
        sock = Path(sessions[0]["socket"])
        args = (sessions[0]["chroot"], str(sock.parent), sock.name)
        cpu: list[float] = []
        measure = with_cpu(
            lambda: qpi_from_sandbox(*args, b.busybox, n), b.service.process.pid, (), cpu
        )
        runs = [measure() * 1e6 for _ in range(rounds)]
    finally:
        build.release()
    return [
        Row(
            f"QueryPathInfo round trip in the sandbox ({rounds} rounds of {n})",
            runs,
            [],
            "µs",
            None,
            f"rounds {spread(runs, 0)} µs; service CPU per round trip "
            f"{sum(cpu) / (n * rounds) * 1e6:.1f} µs",
            absolute="median",
        )
    ]


def scenario_many_recnix(b: Bench) -> list[Row]:
    """many.nix through recnix alone (no built-in: Lix)."""
    n, reps = b.opts.nested, b.opts.many_reps
    run = timed(many_runner(b.hooked, b.busybox, b.nix, "recnix", n))
    runs = [run() for _ in range(reps)]
    return [
        Row(
            f"many.nix: {n} nested nix-build, wall ({reps} runs)",
            runs,
            [],
            "s",
            None,
            f"runs {spread(runs)} s",
            absolute="median",
        )
    ]


# Without a built-in (Lix, or --recnix-only): recnix's side alone; the hook share as is.
RECNIX_ONLY: dict[str, Callable[[Bench], list[Row]]] = {
    "qpi": scenario_qpi_recnix,
    "many": scenario_many_recnix,
    "hookcpu": lambda b: scenario_hookcpu_unhinted(b),
}


def scenario_hookcpu_unhinted(b: Bench) -> list[Row]:
    """The hooks' CPU share of a build that does not opt in, without recnix's build hook's
    hint (as on Lix): the pre-build hook reads the .drv."""
    marks = Path(b.hooked.daemon_env["RECNIX_HOOK_MARKS"])
    marks.mkdir(mode=0o700, exist_ok=True)
    small = _write_drv(b.scratch / "plain.drv", b.busybox)
    (marks / f"{small.name}.plain").unlink(missing_ok=True)
    row = _hook_cpu_row(b, small, "hooks' CPU share of a build that does not opt in (no hint)")
    row.target = None
    return [row]


SCENARIOS: dict[str, Callable[[Bench], list[Row]]] = {
    "hookcpu": scenario_hookcpu,
    "qpi": scenario_qpi,
    "many": scenario_many,
    "trivial": scenario_trivial,
    "hook": scenario_hook,
    "add": scenario_add,
    "load": scenario_load,
    "start": scenario_start,
}


# -- main


def render(rows: list[Row], header: str) -> str:
    lines = [header, "", "columns: medians of each side; ratio: median of the paired ratios", ""]
    lines.append(
        f"{'scenario':<72} {'recnix':>10} {'built-in/without':>17} {'ratio':>6} "
        f"{'target':>7}  verdict"
    )
    for r in rows:
        target = "-" if r.target is None else f"≤{r.target:.2f}"
        if r.absolute:
            base, ratio = f"{'-':>17}", f"{'-':>6}"
        else:
            base, ratio = f"{r.baseline:>15.2f}{r.unit:>2}", f"{r.ratio:>6.2f}"
        lines.append(
            f"{r.scenario:<72} {r.recnix:>8.2f}{r.unit:>2} {base} {ratio} {target:>7}  {r.verdict}"
        )
        if r.note:
            lines.append(f"    {r.note}")
    return "\n".join(lines) + "\n"


QUICK = {  # about 60 s on a quiet 2-core machine
    "hookcpu_loops": 100,
    "hookcpu_rounds": 7,
    "qpi": 300,
    "qpi_rounds": 7,
    "nested": 8,
    "many_reps": 3,
    "trivial": 20,
    "trivial_reps": 5,
    "hook_builds": 5,
    "add_mib": 32,
    "add_reps": 3,
    "load_outer": 6,
    "load_nested": 3,
    "load_reps": 1,
    "start_reps": 3,
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a ~60 s subset (smaller sizes)")
    parser.add_argument("--qpi", type=int, default=1000, help="QueryPathInfo round trips per round")
    parser.add_argument("--qpi-rounds", type=int, default=11)
    parser.add_argument("--nested", type=int, default=20, help="nested builds in many.nix")
    parser.add_argument("--many-reps", type=int, default=7)
    parser.add_argument("--trivial", type=int, default=50, help="trivial builds per run")
    parser.add_argument("--trivial-reps", type=int, default=11)
    parser.add_argument("--separate", action="store_true", help="also one nix-build per build")
    parser.add_argument("--hook-builds", type=int, default=10, help="opted-in trivial builds")
    parser.add_argument("--hookcpu-loops", type=int, default=200, help="hook runs per round")
    parser.add_argument("--hookcpu-rounds", type=int, default=9)
    parser.add_argument("--add-mib", type=int, default=256, help="size of the added file")
    parser.add_argument("--add-reps", type=int, default=3)
    parser.add_argument("--load-outer", type=int, default=16, help="concurrent outer builds")
    parser.add_argument("--load-nested", type=int, default=8, help="nested builds in each")
    parser.add_argument("--load-reps", type=int, default=1)
    parser.add_argument(
        "--load-timeout", type=float, default=120.0, help="s before a build counts as hung"
    )
    parser.add_argument("--start-reps", type=int, default=5)
    parser.add_argument(
        "--event-loop",
        choices=["asyncio", "uvloop"],
        help="the service's event loop (default: uvloop when installed)",
    )
    parser.add_argument("--only", choices=list(SCENARIOS), action="append")
    parser.add_argument(
        "--service-log",
        metavar="PATH",
        help="copy the recnix service's log there at the end (its per-session timings)",
    )
    parser.add_argument(
        "--service-log-level",
        choices=("info", "debug"),
        default="info",
        help="the service's daemon.log-level (debug: per-path timings in --service-log; "
        "slower, so not for the results file)",
    )
    parser.add_argument("--no-write", action="store_true", help="do not write the results file")
    parser.add_argument(
        "--suite",
        choices=("trixie", "sid", "lix"),
        help="measure that Debian suite's Nix (2.26, 2.34) or Lix 2.95: run inside its root "
        "filesystem (recnix_vm.rootfs; results in bench/results-service-SUITE.txt); lix: "
        "recnix on Lix beside recnix on 2.34 (no built-in on Lix)",
    )
    parser.add_argument(
        "--recnix-only",
        action="store_true",
        help="measure recnix's side alone (qpi, many, hookcpu), as on Lix",
    )
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    opts = parser.parse_args()
    if opts.quick:
        for key, value in QUICK.items():
            if getattr(opts, key) == parser.get_default(key):  # not given on the command line
                setattr(opts, key, value)
    return opts


def lix_side_by_side(opts: argparse.Namespace) -> int:
    """recnix on Lix (lix rootfs) beside recnix on Nix 2.34 (sid rootfs): the recnix-only
    rows of each, side by side, into bench/results-service-lix.txt."""
    import json

    from recnix_vm import rootfs

    script = os.path.abspath(sys.argv[0])
    args = [a for a in sys.argv[1:] if a not in ("--suite", "lix")]
    sides = {}
    for suite in ("lix", "sid"):
        out = f"/tmp/recnix-bench-{suite}.json"  # inside the suite's root filesystem
        inner = ["python3", script, *args, "--recnix-only", "--no-write", "--json", out]
        root = rootfs.prepare(suite)
        inside = root / out.lstrip("/")
        inside.unlink(missing_ok=True)
        rc = subprocess.call(rootfs.command(root, inner))
        if rc != 0 or not inside.exists():
            print(f"service_bench: the {suite} side failed (exit {rc})", file=sys.stderr)
            return 1
        sides[suite] = json.loads(inside.read_text())
    lix, sid = sides["lix"], sides["sid"]
    lines = [
        f"recnix on Lix beside recnix on Nix 2.34 — {time.strftime('%Y-%m-%d %H:%M:%S')}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {lix['nix']} | "
        f"{sid['nix']}; each suite's side runs alone (not interleaved: one root "
        "filesystem at a time), so compare on a quiet machine"
        + (" (--quick)" if opts.quick else ""),
        "",
        f"{'scenario':<66} {'Lix':>10} {'Nix 2.34':>10} {'Lix÷2.34':>9}",
    ]
    for a, b in zip(lix["rows"], sid["rows"], strict=True):
        ratio = a["value"] / b["value"] if b["value"] else float("nan")
        lines.append(
            f"{a['scenario'][:66]:<66} {a['value']:>10.2f} {b['value']:>10.2f} {ratio:>9.2f}"
            f"  {a['unit']}"
        )
        lines.append(f"    Lix: {a['note']}")
        lines.append(f"    2.34: {b['note']}")
    text = "\n".join(lines) + "\n"
    print(text)
    if not opts.no_write:
        RESULTS.with_name("results-service-lix.txt").write_text(text)
    return 0


def main() -> int:
    opts = parse_args()
    if opts.suite == "lix" and os.environ.get("RECNIX_SUITE") != "lix":
        return lix_side_by_side(opts)
    if opts.suite and os.environ.get("RECNIX_SUITE") != opts.suite:
        from recnix_vm import rootfs

        script = os.path.abspath(sys.argv[0])
        inner = rootfs.command(rootfs.prepare(opts.suite), ["python3", script, *sys.argv[1:]])
        return subprocess.call(inner)
    # A --quick run never overwrites the full run's table.
    results = RESULTS.with_name(
        f"results-service-{opts.suite}.txt"
        if opts.suite
        else ("results-service-quick.txt" if opts.quick else RESULTS.name)
    )
    scenarios = RECNIX_ONLY if (opts.recnix_only or is_lix()) else SCENARIOS
    only = [name for name in (opts.only or list(scenarios)) if name in scenarios]

    # SIGTERM (e.g. `timeout`) must still stop the daemons started below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    nix_version = subprocess.run(  # Lix prints more lines: the first names it
        ["nix-store", "--version"], capture_output=True, text=True, check=True
    ).stdout.splitlines()[0]
    scratch = Path(tempfile.mkdtemp(prefix="recnix-bench-"))
    hosts: list[NixHost] = []
    bench: Bench | None = None
    rows: list[Row] = []
    try:
        # The hook environment `recnix nix-conf --daemon-env` renders for the service
        # started below (the NixOS module sets the same).
        loop_env = {"RECNIX_EVENT_LOOP": opts.event_loop} if opts.event_loop else {}
        # (the service starts with the daemon's environment, so it gets the event loop too)
        hooked = start_nix_host(hooks=True, rendered_env=True, daemon_env=loop_env)
        hosts.append(hooked)
        plain = start_nix_host(hooks=False)
        hosts.append(plain)
        # The floor of any hook: Nix spawning a do-nothing program twice per build.
        floor = start_nix_host(hooks=False, extra_conf=FLOOR_HOOKS)
        hosts.append(floor)
        fallback = start_nix_host(hooks=True)
        hosts.append(fallback)
        # The production log level (the host tier's services log at debug).
        service = start_recnix_service(hooked, daemon={"log-level": opts.service_log_level})
        # The fallback daemon's hooks scan the same config (they never reach a service).
        shutil.copy(hooked.recnix_config, fallback.recnix_config)
        busybox = busybox_store_path(plain.env)
        nix = bundle_nix(plain.env, gc_root=str(plain.root / "nix-bundle"))
        bench = Bench(opts, scratch, hooked, plain, floor, fallback, service, busybox, nix)
        for name in only:
            rows.extend(new := scenarios[name](bench))
            print(render(new, ""), flush=True)
        loops = re.findall(r"event loop: (\w+)", bench.service.log_text())
        event_loop = loops[-1] if loops else "?"
    finally:
        if bench is not None:
            stop_recnix_service(bench.service)
            if opts.service_log:
                shutil.copy(bench.service.log_path, opts.service_log)
        for host in hosts:
            host.stop()
            shutil.rmtree(host.root, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)

    header = (
        f"recnix service benchmark — {time.strftime('%Y-%m-%d %H:%M:%S')}, "
        f"{os.cpu_count()} CPUs, load average {load_before:.1f} → {os.getloadavg()[0]:.1f}, "
        f"{nix_version}, service on {event_loop}, total {time.perf_counter() - started:.0f} s"
        + (" (--quick: smaller sizes than the targets name)" if opts.quick else "")
    )
    text = render(rows, header)
    print(text)
    if not opts.no_write:
        results.write_text(text)
    if opts.json:
        import json

        opts.json.write_text(
            json.dumps(
                {
                    "nix": nix_version,
                    "rows": [
                        {"scenario": r.scenario, "value": r.recnix, "unit": r.unit, "note": r.note}
                        for r in rows
                    ],
                }
            )
        )
    return 0 if all(r.verdict != "FAIL" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
