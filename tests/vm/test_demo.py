"""The README's first command, `recnix-vm demo`, as a new user runs it: it tells what
it sets up, shows the outer build with its nested one, the closure and `recnix tree`,
then what to try next; the harness's own steps stay out of sight."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from recnix_vm.image import Image

RECNIX_VM = Path(sys.executable).parent / "recnix-vm"


def test_demo_tells_its_story(vm_image: Image) -> None:
    done = subprocess.run(
        [str(RECNIX_VM), "demo"],
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "TERM": "dumb"},
    )
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    steps = [
        "1. A fresh Debian guest under QEMU",
        "2. The outer build",
        "3. Built in",
        "4. Its closure (nix-store -qR",
        "5. recnix tree",
        "Try next:",
    ]
    positions = [out.find(step) for step in steps]
    assert -1 not in positions and positions == sorted(positions), out
    closure = out[out.index("4. Its closure") : out.index("5. recnix tree")]
    assert "-inner\n" in closure, closure
    assert "-inner.drv" in out[out.index("5. recnix tree") :], out
    assert "must succeed:" not in out + done.stderr, "harness internals shown"
    assert "recnix-vm run" in out[out.index("Try next:") :]
