#!/usr/bin/env python3
"""recnix service overhead against Nix's built-in recursive-nix, measured side by side.

Three scenarios, each run on private nix-daemons started here (tests/host/conftest.py):

1. QueryPathInfo round trip from inside a waiting sandboxed build: recnix's
   session socket ÷ the built-in's ``<build dir>/.nix-socket``. The client is a
   forked child that chroots into the build's sandbox root first (as a sandboxed
   process would be; recnix refuses any other peer; done for both for fairness).
2. Wall time of ``tests/scenarios/many.nix`` (n nested ``nix-build`` calls, fresh
   tags): recnix (daemon with hooks + service) ÷ built-in (daemon without hooks).
3. Trivial non-recursive builds with the recnix hooks installed ÷ without: all in
   one ``nix-build`` call, and one ``nix-build`` call each.

Prints a table and writes it to bench/results-service.txt.
Run as root: .venv/bin/python bench/service_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import glob
import os
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

from recnix import control  # noqa: E402
from recnix.bundle import bundle_nix, busybox_store_path  # noqa: E402
from recnix.protocol import (  # noqa: E402
    NEED_DATA,
    ClientConnection,
    HandshakeDone,
    Op,
    PathInfo,
    Reply,
)
from tests.host.conftest import (  # noqa: E402
    NixHost,
    RecnixService,
    scenario_runner,
    start_nix_host,
    start_recnix_service,
    stop_recnix_service,
)
from tests.nixversion import build_top_glob, sandbox_root  # noqa: E402

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
{ busybox, prefix, n }:
let bb = builtins.storePath busybox;
in builtins.genList (i: derivation {
  name = "bench-trivial-${toString i}";
  system = builtins.currentSystem;
  builder = "${bb}/bin/sh";
  args = [ "-c" "echo $tag > $out" ];
  tag = "${prefix}-${toString i}";
}) n
"""


FLOOR_HOOKS = "pre-build-hook = /bin/true\npost-build-hook = /bin/true\n"


def fresh_tag() -> str:
    return secrets.token_hex(6)


@dataclass
class Row:
    """One scenario: interleaved runs of both sides (``runs_*[i]`` measured back to back)."""

    scenario: str
    runs_recnix: list[float]
    runs_baseline: list[float]
    unit: str
    target: float | None  # None: a reference row, no target
    note: str = ""

    @property
    def recnix(self) -> float:
        return statistics.median(self.runs_recnix)

    @property
    def baseline(self) -> float:
        return statistics.median(self.runs_baseline)

    @property
    def ratio(self) -> float:
        """Median of the paired ratios: each pair ran back to back, so the machine's
        drift (other load, a slow minute) cancels within a pair."""
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
        a, b = interleaved(
            rounds,
            lambda: qpi_from_sandbox(*recnix_args, busybox, n),
            lambda: qpi_from_sandbox(*builtin_args, busybox, n),
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
        1.5,
        f"rounds recnix {spread([x * 1e6 for x in a], 0)} µs, built-in "
        f"{spread([x * 1e6 for x in b], 0)} µs; client chrooted into the sandbox root for "
        "both; path = busybox (an input)",
    )


# -- 2. nested builds, 3. trivial builds


def many_runner(host: NixHost, busybox: str, nix: str, feature: str, n: int) -> Callable[[], None]:
    runner = scenario_runner(host, busybox, nix)

    def run() -> None:
        tag = fresh_tag()
        outcome = runner.build("many", feature, tag, {"innerTag": tag, "n": n})
        if not outcome.ok:
            raise RuntimeError(f"many.nix ({feature}) failed: {outcome.describe()}")

    return run


def trivial_runner(
    host: NixHost, expr: Path, busybox: str, n: int, separate: bool
) -> Callable[[], None]:
    def run() -> None:
        args = ["--argstr", "busybox", busybox, "--argstr", "prefix", fresh_tag()]
        args += ["--arg", "n", str(n)]
        if separate:
            for i in range(n):
                host.run(["nix-build", "--no-out-link", str(expr), *args, "-A", str(i)])
        else:
            out = host.run(["nix-build", "--no-out-link", str(expr), *args]).stdout.split()
            if len(out) != n:
                raise RuntimeError(f"expected {n} outputs, got {len(out)}")

    return run


# -- main


def render(rows: list[Row], header: str) -> str:
    lines = [header, "", "columns: medians of each side; ratio: median of the paired ratios", ""]
    lines.append(
        f"{'scenario':<64} {'recnix':>10} {'built-in/without':>17} {'ratio':>6} "
        f"{'target':>7}  verdict"
    )
    for r in rows:
        target = "-" if r.target is None else f"≤{r.target:.2f}"
        lines.append(
            f"{r.scenario:<64} {r.recnix:>8.2f}{r.unit:>2} {r.baseline:>15.2f}{r.unit:>2} "
            f"{r.ratio:>6.2f} {target:>7}  {r.verdict}"
        )
        if r.note:
            lines.append(f"    {r.note}")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qpi", type=int, default=1000, help="QueryPathInfo round trips per round")
    parser.add_argument("--qpi-rounds", type=int, default=11)
    parser.add_argument("--nested", type=int, default=20, help="nested builds in many.nix")
    parser.add_argument("--many-reps", type=int, default=5)
    parser.add_argument("--trivial", type=int, default=50, help="trivial builds per run")
    parser.add_argument("--trivial-reps", type=int, default=5)
    parser.add_argument("--only", choices=["qpi", "many", "trivial"], action="append")
    parser.add_argument("--no-write", action="store_true", help="do not write the results file")
    parser.add_argument(
        "--suite",
        choices=("trixie", "sid"),
        help="measure that Debian suite's Nix (2.26, 2.34): run inside its root filesystem "
        "(recnix_vm.rootfs; results in bench/results-service-SUITE.txt)",
    )
    opts = parser.parse_args()
    if opts.suite and os.environ.get("RECNIX_SUITE") != opts.suite:
        from recnix_vm import rootfs

        script = os.path.abspath(sys.argv[0])
        inner = rootfs.command(rootfs.prepare(opts.suite), ["python3", script, *sys.argv[1:]])
        return subprocess.call(inner)
    results = RESULTS.with_name(f"results-service-{opts.suite}.txt") if opts.suite else RESULTS
    only = set(opts.only or ["qpi", "many", "trivial"])

    # SIGTERM (e.g. `timeout`) must still stop the daemons started below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    nix_version = subprocess.run(
        ["nix-store", "--version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    scratch = Path(tempfile.mkdtemp(prefix="recnix-bench-"))
    hosts: list[NixHost] = []
    service: RecnixService | None = None
    rows: list[Row] = []
    try:
        hooked = start_nix_host(hooks=True)
        hosts.append(hooked)
        plain = start_nix_host(hooks=False)
        hosts.append(plain)
        # The floor of any hook: Nix spawning a do-nothing program twice per build.
        floor = start_nix_host(hooks=False, extra_conf=FLOOR_HOOKS)
        hosts.append(floor)
        service = start_recnix_service(hooked)
        busybox = busybox_store_path(plain.env)
        nix = bundle_nix(plain.env, gc_root=str(plain.root / "nix-bundle"))
        wait_nix = scratch / "wait.nix"
        wait_nix.write_text(WAIT_NIX)
        trivial_nix = scratch / "trivial.nix"
        trivial_nix.write_text(TRIVIAL_NIX)

        if "qpi" in only:
            rows.append(
                bench_qpi(hooked, service, plain, wait_nix, busybox, opts.qpi, opts.qpi_rounds)
            )
            print(render(rows[-1:], ""), flush=True)

        if "many" in only:
            n = opts.nested
            a, b = interleaved(
                opts.many_reps,
                timed(many_runner(hooked, busybox, nix, "recnix", n)),
                timed(many_runner(plain, busybox, nix, "recursive-nix", n)),
            )
            rows.append(
                Row(
                    f"many.nix: {n} nested nix-build, wall ({opts.many_reps} pairs)",
                    a,
                    b,
                    "s",
                    1.2,
                    f"runs recnix {spread(a)} s, built-in {spread(b)} s "
                    "(built-in on the daemon without hooks)",
                )
            )
            print(render(rows[-1:], ""), flush=True)

        if "trivial" in only:
            n = opts.trivial
            for separate in (False, True):
                how = f"{n} separate nix-build calls" if separate else f"one nix-build of {n}"
                a, b = interleaved(
                    opts.trivial_reps,
                    timed(trivial_runner(hooked, trivial_nix, busybox, n, separate)),
                    timed(trivial_runner(plain, trivial_nix, busybox, n, separate)),
                )
                rows.append(trivial_row(f"{n} trivial builds, {how}", a, b, n, "hooks"))
                print(render(rows[-1:], ""), flush=True)
            a, b = interleaved(
                opts.trivial_reps,
                timed(trivial_runner(floor, trivial_nix, busybox, n, False)),
                timed(trivial_runner(plain, trivial_nix, busybox, n, False)),
            )
            row = trivial_row(f"reference: /bin/true as both hooks, one of {n}", a, b, n, "true")
            row.target = None
            rows.append(row)
            print(render(rows[-1:], ""), flush=True)
            # what recnix's hooks cost above that floor
            a, b = interleaved(
                opts.trivial_reps,
                timed(trivial_runner(hooked, trivial_nix, busybox, n, False)),
                timed(trivial_runner(floor, trivial_nix, busybox, n, False)),
            )
            row = trivial_row(
                f"reference: recnix hooks ÷ /bin/true hooks, one of {n}", a, b, n, "hooks", "true"
            )
            row.target = None
            rows.append(row)
            print(render(rows[-1:], ""), flush=True)
    finally:
        if service is not None:
            stop_recnix_service(service)
        for host in hosts:
            host.stop()
            shutil.rmtree(host.root, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)

    header = (
        f"recnix service benchmark — {time.strftime('%Y-%m-%d %H:%M:%S')}, "
        f"{os.cpu_count()} CPUs, load average {load_before:.1f} → {os.getloadavg()[0]:.1f}, "
        f"{nix_version}, total {time.perf_counter() - started:.0f} s"
    )
    text = render(rows, header)
    print(text)
    if not opts.no_write:
        results.write_text(text)
    return 0 if all(r.verdict != "FAIL" for r in rows) else 1


def trivial_row(
    scenario: str, a: list[float], b: list[float], n: int, label: str, baseline: str = "without"
) -> Row:
    per_build = (statistics.median(a) - statistics.median(b)) / n * 1e3
    return Row(
        f"{scenario} ({len(a)} pairs)",
        a,
        b,
        "s",
        1.05,
        f"runs {label} {spread(a)} s, {baseline} {spread(b)} s; per build {per_build:+.1f} ms",
    )


if __name__ == "__main__":
    sys.exit(main())
