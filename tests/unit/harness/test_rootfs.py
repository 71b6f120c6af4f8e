"""recnix_vm.rootfs without root: the build-user move and the command it builds."""

from __future__ import annotations

import grp
import os
import pwd

import pytest
from recnix_vm import rootfs
from recnix_vm.image import ImageError

PASSWD = """root:x:0:0:root:/root:/bin/bash
nixbld1:x:999:995:Nix build user 1:/var/empty:/usr/sbin/nologin
nixbld2:x:998:995:Nix build user 2:/var/empty:/usr/sbin/nologin
nixbldx:x:997:995::/:/bin/false
"""
GROUP = "root:x:0:\nnixbld:x:995:nixbld1,nixbld2\n"


def make_root(tmp_path, passwd=PASSWD, group=GROUP):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text(passwd)
    (tmp_path / "etc/group").write_text(group)
    (tmp_path / "nix/var/nix").mkdir(parents=True)
    return tmp_path


def test_build_users_move_to_their_own_range(tmp_path):
    root = make_root(tmp_path)
    rootfs._move_build_users(root, 32000)
    users = {
        line.split(":")[0]: line.split(":")
        for line in (root / "etc/passwd").read_text().splitlines()
    }
    assert users["nixbld1"][2:4] == ["32001", "32000"]
    assert users["nixbld2"][2:4] == ["32002", "32000"]
    assert users["nixbldx"][2] == "997" and users["root"][2] == "0"  # not a build user
    assert "nixbld:x:32000:nixbld1,nixbld2" in (root / "etc/group").read_text()


def test_the_ranges_collide_with_no_host_build_user():
    """No user or group of this system (inside a suite's rootfs: but its own) is in a
    suite's range."""
    host_uids = {p.pw_uid for p in pwd.getpwall()}
    host_gids = {g.gr_gid for g in grp.getgrall()}
    here = os.environ.get(rootfs.SUITE_ENV)
    for suite, base in rootfs.UID_BASES.items():
        if suite == here:
            continue
        assert base not in host_gids
        assert not host_uids & set(range(base, base + 64))
    bases = sorted(rootfs.UID_BASES.values())
    assert all(b - a >= 64 for a, b in zip(bases, bases[1:], strict=False))


def test_a_rootfs_without_build_users_is_an_error(tmp_path):
    root = make_root(tmp_path, group="root:x:0:\n")
    with pytest.raises(ImageError, match="no nixbld group"):
        rootfs._move_build_users(root, 31000)


def test_command_enters_with_pivot_root_not_chroot(tmp_path):
    root = tmp_path / "sid-0123"
    argv = rootfs.command(root, ["nix", "--version"], env={"X": "1"})
    assert argv[:4] == ["unshare", "--mount", "--propagation", "private"]
    script = argv[argv.index("-c") + 1]
    assert "pivot_root . ./.oldroot" in script and "chroot" not in script
    assert f"mount -t proc proc {root}/proc" in script
    assert argv[-2:] == ["nix", "--version"]
    assert f"{rootfs.SUITE_ENV}=sid" in argv and "X=1" in argv


def test_no_lix_tarball_says_how_to_build_one(tmp_path, monkeypatch):
    from recnix_vm import lix

    monkeypatch.setenv(lix.LIX_DIR_ENV, str(tmp_path))
    with pytest.raises(lix.LixUnavailable) as e:
        lix.find_tarball(rootfs.source_tree())
    assert f"scripts/build-lix-tarball.sh LIX_SOURCE_DIR {tmp_path}" in str(e.value)
    assert (rootfs.source_tree() / lix.BUILD_SCRIPT).is_file()
    # the other suites' roots are listed without it
    assert "lix" not in rootfs.version_roots(None)


def test_lix_tarball_found_with_its_packages(tmp_path, monkeypatch):
    from recnix_vm import lix

    (tmp_path / "lix-2.95.3-trixie-x86_64.tar.xz").write_bytes(b"not really xz")
    (tmp_path / "runtime-packages.txt").write_text("libc6\nbusybox-static\n")
    monkeypatch.setenv(lix.LIX_DIR_ENV, str(tmp_path))
    found = lix.find_tarball(rootfs.source_tree())
    assert found.version == "2.95.3"
    assert found.runtime_packages == ("libc6", "busybox-static")
    assert len(found.key()) == 12
    assert rootfs.rootfs_dir(rootfs.get_suite("lix")).name.endswith("-" + found.key())
