"""recnix.cli.bundle.resolve_in: another root filesystem's symlinks, followed inside it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from recnix.cli.bundle import BundleError, resolve_in


def test_absolute_links_stay_inside_the_sysroot(tmp_path):
    root = tmp_path / "root"
    (root / "usr/lib/x86_64-linux-gnu").mkdir(parents=True)
    (root / "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2").write_text("loader")
    (root / "lib").symlink_to("usr/lib")  # merged /usr, relative
    (root / "lib64").mkdir()
    # Debian's loader link is absolute: on the host it would name the host's own loader
    (root / "lib64/ld-linux-x86-64.so.2").symlink_to("/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    got = resolve_in(str(root), str(root / "lib64/ld-linux-x86-64.so.2"))
    assert got == str(root / "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    assert Path(got).read_text() == "loader"


def test_relative_links_and_plain_files(tmp_path):
    root = tmp_path / "root"
    (root / "lib").mkdir(parents=True)
    (root / "lib/libz.so.1.3").write_text("z")
    (root / "lib/libz.so.1").symlink_to("libz.so.1.3")
    assert resolve_in(str(root), str(root / "lib/libz.so.1")) == str(root / "lib/libz.so.1.3")
    assert resolve_in(str(root), str(root / "lib/libz.so.1.3")) == str(root / "lib/libz.so.1.3")


def test_a_link_loop_is_an_error(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    os.symlink("/b", root / "a")
    os.symlink("/a", root / "b")
    with pytest.raises(BundleError, match="too many levels"):
        resolve_in(str(root), str(root / "a"))
