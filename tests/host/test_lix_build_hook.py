"""Issue 20 on a real Lix (the ``lix`` suite): a Lix daemon whose nix.conf names
recnix's build-hook.

Lix >= 2.94 speaks Cap'n Proto to its build hook over the hook's stdout and keeps
its own end of that socket open: a hook that just exits (as recnix's did) leaves
every build waiting for ever. The first test reproduces that hang with such a hook;
the second shows that recnix's hook now turns it into a build error whose message
names the nix.conf line to remove. Elsewhere (Nix) both are skipped, saying why.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from tests import nixversion
from tests.host.conftest import BUILD_HOOK, NixHost, start_nix_host, stop_nix_host
from tests.scenarios.checks import fresh_tag

pytestmark = pytest.mark.host

HANG_SECONDS = 15.0  # a build that has not ended by then waits for ever (shown by hand)
ERROR_SECONDS = 120.0


def require_capnp_build_hook() -> None:
    if not nixversion.is_lix() or nixversion.version()[:2] < (2, 94):
        pytest.skip(
            f"{nixversion.label()} speaks Nix's own protocol to its build hook (recnix's "
            "build-hook serves it); the Cap'n Proto build hook is Lix >= 2.94's: runs in "
            "the lix suite (tests/versions)"
        )


def expression(busybox: str) -> str:
    return f"""derivation {{
      name = "lix-build-hook-probe"; system = builtins.currentSystem; tag = "{fresh_tag()}";
      builder = "{busybox}/bin/sh"; args = [ "-c" "echo built > $out" ];
    }}"""


def start_with(build_hook: str) -> NixHost:
    return start_nix_host(hooks=False, build_hook=build_hook)


def test_a_hook_that_just_exits_hangs_lix(busybox: str, tmp_path) -> None:
    """The bug, reproduced: a build hook that exits without a word (recnix's before
    issue 20: "end of input before the end of the settings") and Lix's build waits."""
    require_capnp_build_hook()
    hook = tmp_path / "exiting-build-hook"
    hook.write_text("#!/bin/sh\necho 'build hook: no settings on stdin' >&2\nexit 1\n")
    hook.chmod(0o755)
    host = start_with(str(hook))
    try:
        start = time.monotonic()
        with pytest.raises(subprocess.TimeoutExpired):
            host.run(
                ["nix-build", "--no-out-link", "-E", expression(busybox)],
                check=False,
                timeout=HANG_SECONDS,
            )
        assert time.monotonic() - start >= HANG_SECONDS
    finally:
        stop_nix_host(host)


def test_recnix_build_hook_on_lix_is_an_error_naming_the_line(busybox: str) -> None:
    """recnix's hook recognises Lix's Cap'n Proto peer and answers with an RPC abort:
    the build fails at once with recnix's message (which nix.conf line to remove)."""
    require_capnp_build_hook()
    host = start_with(str(BUILD_HOOK))
    try:
        start = time.monotonic()
        done = host.run(
            ["nix-build", "--no-out-link", "-E", expression(busybox)],
            check=False,
            timeout=ERROR_SECONDS,
        )
        elapsed = time.monotonic() - start
    finally:
        stop_nix_host(host)
    assert done.returncode != 0, done.stdout
    assert "recnix's build-hook cannot serve Lix" in done.stderr, done.stderr
    conf = host.conf_dir / "nix.conf"
    assert f"`build-hook = …recnix-build-hook` line from {conf}" in done.stderr, done.stderr
    assert elapsed < HANG_SECONDS, elapsed
