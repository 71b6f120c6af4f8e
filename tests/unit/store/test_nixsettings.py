"""What the service derives from the host Nix's settings (recnix/store/nixsettings.py): the bound
on concurrent sessions from the build users; whether sessions fsync their paths."""

from __future__ import annotations

import grp

from recnix.store.nixsettings import build_users, fsync_paths, session_bound


def test_the_configured_bound_stands_below_the_build_users():
    assert session_bound(4, None) == (4, None)
    assert session_bound(4, ("nixbld", 10)) == (4, None)
    assert session_bound(9, ("nixbld", 10)) == (9, None)


def test_a_bound_at_or_above_the_build_users_is_lowered_with_a_reason():
    bound, reason = session_bound(10, ("nixbld", 10))
    assert bound == 9
    assert reason is not None and "'nixbld' has 10 build user(s)" in reason
    assert "#7297" in reason and "auto-allocate-uids" in reason


def test_one_build_user_is_not_enough_for_nested_builds():
    bound, reason = session_bound(1, ("nixbld", 1))
    assert bound == 1 and reason is not None and "wait forever" in reason


def test_build_users_come_from_the_group():
    root = grp.getgrgid(0).gr_name
    assert build_users({"build-users-group": root}) == (root, len(grp.getgrgid(0).gr_mem))
    assert build_users({"build-users-group": root, "auto-allocate-uids": True}) is None
    assert build_users({"build-users-group": ""}) is None
    assert build_users({}) is None
    assert build_users({"build-users-group": "recnix-no-such-group"}) is None


def test_fsync_paths_follows_nix_unless_told():
    assert fsync_paths("nix", {"fsync-store-paths": True}) is True
    assert fsync_paths("nix", {"fsync-store-paths": False}) is False
    assert fsync_paths("nix", {}) is False  # Nix 2.8 has no such setting, and does not fsync
    assert fsync_paths("always", {"fsync-store-paths": False}) is True
    assert fsync_paths("never", {"fsync-store-paths": True}) is False
