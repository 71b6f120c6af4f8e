"""``recnix-vm demo --remote-builder``: the outer build on a second guest.

Two guests on a private network (:mod:`recnix_vm.network`). The client's
``/etc/nix/machines`` names the builder (with the ``recnix`` feature), and
``nix-build --max-jobs 0`` of the ``inner`` scenario sends the outer build
there through Nix's own distributed builds. The client's ``build-hook`` is
recnix's: its ssh proxy gives the builder the ``.drv`` (so the builder's recnix
opens a session) and brings back the closure of the outputs, inner output
included (README, 'Distributed builds'). It prints the closure on the client.
"""

from __future__ import annotations

import shlex
import shutil
import tempfile
import time
from pathlib import Path

from .guestnix import bundle_nix_in_guest
from .image import GUEST_SCENARIOS_DIR, build_image, cache_dir
from .log import log
from .machine import Machine
from .network import Network, link_builder


def _ready(machine: Machine) -> None:
    machine.wait_for_unit("nix-daemon.socket")
    machine.wait_for_unit("recnix.service", timeout=120)
    machine.wait_until_succeeds("test -S /run/recnix/control.sock", timeout=120)


def demo_remote(
    *,
    memory_mb: int,
    smp: int,
    accel: str | None,
    global_timeout: float,
    keep: bool,
    state_dir: Path | None = None,
) -> int:
    """Boot client and builder, dispatch the inner scenario, print the result."""
    image = build_image()
    if state_dir is None:
        runs = cache_dir() / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        state_dir = Path(tempfile.mkdtemp(prefix="remote-", dir=runs))
    kwargs = dict(memory_mb=memory_mb, smp=smp, accel=accel, global_timeout=global_timeout)
    client = Machine(image, state_dir / "client", "client", **kwargs)
    builder = Machine(image, state_dir / "builder", "builder", **kwargs)
    net = Network(state_dir / "net")
    try:
        c, b = net.attach(client), net.attach(builder)
        for m in (client, builder):
            m.start(wait=False)
        for m in (client, builder):
            m.wait_for_boot()
        net.configure()
        _ready(client)
        _ready(builder)
        link = link_builder(c, b, untrusted_user=False)
        busybox, nix = bundle_nix_in_guest(client)
        client.succeed(f"echo {shlex.quote(link.machine_line('ssh-ng'))} > /etc/nix/machines")
        tag = f"remote-demo-{time.time_ns()}"
        build = shlex.join(
            [
                *("nix-build", "--no-out-link", "--max-jobs", "0"),
                f"{GUEST_SCENARIOS_DIR}/inner.nix",
                *("--argstr", "feature", "recnix", "--argstr", "busybox", busybox),
                *("--argstr", "nix", nix, "--argstr", "tag", tag, "--argstr", "innerTag", tag),
            ]
        )
        print(f"\non the client (builders: {link.host}): {build[:100]}...")
        start = time.monotonic()
        rc, out, err = client.execute(f"NIX_REMOTE=daemon {build}")
        elapsed = time.monotonic() - start
        if rc != 0:
            print(f"the build dispatched to the builder failed ({elapsed:.1f} s):\n{err}")
            return 1
        result = out.split()[-1]
        ran_on = [line for line in err.splitlines() if " on " in line and "building" in line]
        print(f"outer output ({elapsed:.1f} s): {result}")
        print("\n".join(f"  {line.strip()}" for line in ran_on))
        on_builder = builder.execute(f"nix-store --check-validity {result}")[0] == 0
        print(f"valid on the builder: {on_builder}")
        print(f"inner output: {client.succeed(f'cat {result}/inner-path').strip()}")
        print(f"\nclosure on the client (nix-store -qR {result}):")
        for path in sorted(client.succeed(f"nix-store -qR {result}").split()):
            print(f"  {path}")
        rc, tree, err = builder.execute(f"recnix tree {result}")
        print(f"\nrecnix tree {result} (on the builder):\n{tree}{err}")
        return rc
    finally:
        for m in (client, builder):
            if m.is_running:
                m.shutdown(timeout=60)
            m.close()
        net.close()
        if keep:
            log(f"kept {state_dir} (overlays and console logs)")
        else:
            shutil.rmtree(state_dir, ignore_errors=True)
