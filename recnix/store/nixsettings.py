"""The host Nix's own settings, as its CLI reports them (nix-daemon reads the same
nix.conf), and what the service derives from them: how many build users there are.
"""

from __future__ import annotations

import grp
import json
import subprocess
from collections.abc import Mapping
from typing import Any

NIX_COMMAND = ["--extra-experimental-features", "nix-command"]
# `nix config show` since Nix 2.20; `nix show-config` before (and deprecated after).
SHOW_CONFIG = (["config", "show", "--json"], ["show-config", "--json"])


def nix_settings(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Setting name -> value; empty if no `nix` command could say."""
    for args in SHOW_CONFIG:
        try:
            proc = subprocess.run(
                ["nix", *NIX_COMMAND, *args],
                capture_output=True,
                text=True,
                env=None if env is None else dict(env),
                timeout=60,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return {}
        if proc.returncode != 0:
            continue
        try:
            data = json.loads(proc.stdout)
        except ValueError:
            continue
        return {
            name: entry.get("value") if isinstance(entry, dict) else entry
            for name, entry in data.items()
        }
    return {}


def build_users(settings: Mapping[str, Any]) -> tuple[str, int] | None:
    """(build-users-group, its number of members), or None when builds do not take
    a user from a group (no group, ``auto-allocate-uids``) or the group is unknown."""
    if settings.get("auto-allocate-uids") is True:
        return None
    group = settings.get("build-users-group")
    if not isinstance(group, str) or not group:
        return None
    try:
        return group, len(grp.getgrnam(group).gr_mem)
    except KeyError:
        return None


def session_bound(configured: int, users: tuple[str, int] | None) -> tuple[int, str | None]:
    """The number of concurrent sessions to allow, and why it is below ``configured``.

    Every waiting outer build holds a build user, and its nested builds need
    more: with as many sessions as build users, they wait for each other
    forever (Nix issue #7297). So at most one session fewer than build users.
    """
    if users is None:
        return configured, None
    group, count = users
    if count < 2:
        return 1, (
            f"group {group!r} has {count} build user(s): nested builds need one more than "
            "their outer build and would wait forever (Nix issue #7297); add build users "
            "or enable auto-allocate-uids"
        )
    bound = count - 1
    if configured <= bound:
        return configured, None
    return bound, (
        f"daemon.max-sessions = {configured}, but group {group!r} has {count} build user(s): "
        f"allowing {bound} concurrent session(s), so that nested builds always find a free "
        "build user (Nix issue #7297); add build users or enable auto-allocate-uids for more"
    )


def fsync_paths(choice: str, settings: Mapping[str, Any]) -> bool:
    """Whether a session fsyncs its paths: ``daemon.fsync-paths`` ("nix": what nix.conf's
    ``fsync-store-paths`` says, false where Nix does not know it)."""
    if choice == "nix":
        return settings.get("fsync-store-paths") is True
    return choice == "always"
