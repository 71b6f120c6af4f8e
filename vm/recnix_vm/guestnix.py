"""Nix inside the guest's builds, and the scenario runner wired to a guest.

The guest runs Debian's nix from /usr; builds need it in the store. This uses
recnix's own bundler (``recnix.cli.bundle``, installed in the guest under
``/opt/recnix``) so the VM tier puts the very same bundle in the store as the
host tier does.
"""

from __future__ import annotations

import importlib.util
import shlex
import sys
from types import ModuleType
from typing import TYPE_CHECKING

from .image import GUEST_RECNIX_DIR, GUEST_SCENARIOS_DIR, source_dirs

if TYPE_CHECKING:
    from .machine import Machine

# GC root keeping the bundle (and the busybox in its closure) alive in the guest.
BUNDLE_GC_ROOT = "/root/nix-bundle"

_BUNDLE_SNIPPET = f"""
import sys
sys.path.insert(0, {GUEST_RECNIX_DIR!r})
from recnix.cli.bundle import bundle_nix, busybox_store_path
print(busybox_store_path())
print(bundle_nix(gc_root={BUNDLE_GC_ROOT!r}))
"""


def bundle_nix_in_guest(machine: Machine, timeout: float = 300.0) -> tuple[str, str]:
    """Put busybox and the nix bundle into the guest's store; return their store paths."""
    with machine.nested("bundling the guest's nix into its store (recnix.cli.bundle)"):
        out = machine.succeed(f"python3 -c {shlex.quote(_BUNDLE_SNIPPET)}", timeout=timeout)
    paths = [line for line in out.split() if line.startswith("/nix/store/")]
    if len(paths) != 2:
        raise RuntimeError(f"recnix.cli.bundle printed {out!r}, expected two store paths")
    return paths[0], paths[1]


def load_runner_module() -> ModuleType:
    """Import ``tests/scenarios/runner.py`` from the working tree."""
    name = "recnix_scenarios_runner"
    if name in sys.modules:
        return sys.modules[name]
    path = source_dirs()[1] / "runner.py"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the scenario runner from {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def guest_exec(machine: Machine, via_daemon: bool = False):  # noqa: ANN201 - the runner's Exec
    """An ``exec(argv, timeout) -> (rc, stdout, stderr)`` running argv in the guest over SSH.

    Commands run as root, so nix would use the store directly; ``via_daemon``
    sets ``NIX_REMOTE=daemon`` so they go through the guest's nix-daemon as a
    user's would.
    """
    prefix = ["env", "NIX_REMOTE=daemon"] if via_daemon else []

    def run(argv: list[str], timeout: float) -> tuple[int, str, str]:
        return machine.execute(shlex.join(prefix + argv), timeout)

    return run


def scenario_runner(machine: Machine, busybox: str, nix: str, timeout: float = 600.0):  # noqa: ANN201
    """A ``ScenarioRunner`` for this guest, building through its nix-daemon."""
    runner = load_runner_module()
    return runner.ScenarioRunner(
        exec=guest_exec(machine, via_daemon=True),
        scenario_dir=GUEST_SCENARIOS_DIR,
        busybox=busybox,
        nix=nix,
        timeout=timeout,
    )


# Lix 2.93-2.95 runs the pre-build hook but drops its output; this wrapper makes
# the guest's Nix do the same (recnix's CI "hook output discarded" mode).
DISCARDING_HOOK = "/usr/local/bin/recnix-discarding-pre-build-hook"
GUEST_NIX_CONF = "/etc/nix/nix.conf"


def discard_hook_output(machine: Machine) -> None:
    """Make the guest's nix.conf pre-build-hook a wrapper that runs recnix's hook and
    drops its stdout (as Lix 2.93-2.95 does), and restart nix-daemon on it."""
    from .image import PRE_BUILD_HOOK

    wrapper = (
        "#!/bin/sh\n"
        "# recnix test mode: Nix never sees the hook's output (Lix 2.93-2.95)\n"
        f'"{PRE_BUILD_HOOK}" "$@" > /dev/null || exit $?\n'
    )
    with machine.nested("pre-build hook output discarded (as Lix 2.93-2.95 does)"):
        machine.succeed(
            f"printf %s {shlex.quote(wrapper)} > {DISCARDING_HOOK} && chmod 755 {DISCARDING_HOOK}"
            f" && sed -i 's|^pre-build-hook = .*|pre-build-hook = {DISCARDING_HOOK}|'"
            f" {GUEST_NIX_CONF} && grep -qx 'pre-build-hook = {DISCARDING_HOOK}' {GUEST_NIX_CONF}"
            " && systemctl restart nix-daemon.service"
        )
