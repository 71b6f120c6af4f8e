"""`dump_path`/`NarParser`/`restore_nar` against the real `nix-store` (Debian's nix-bin)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from recnix.formats.storepath import hash_part, validate_store_path
from recnix.protocol.nar import NarParser, dump_path, nar_hash, restore_nar, scan_for_hashes

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def nix_env() -> dict[str, str]:
    """Environment for nix-store on the local store (root, no daemon needed)."""
    if os.geteuid() != 0:
        pytest.fail("host tests need root (local Nix store)")
    if shutil.which("nix-store") is None:
        pytest.fail("host tests need nix-store (Debian package nix-bin)")
    env = dict(os.environ)
    env.pop("NIX_REMOTE", None)
    return env


def nix_dump(path: Path | str, env: dict[str, str]) -> bytes:
    return subprocess.run(
        ["nix-store", "--dump", os.fsencode(path)], env=env, capture_output=True, check=True
    ).stdout


def make_tree(root: Path) -> Path:
    """A tree with every node kind and awkward names."""
    src = root / "tree"
    src.mkdir()
    (src / "regular").write_bytes(b"hello\n")
    (src / "empty").write_bytes(b"")
    (src / "exec").write_bytes(b"#!/bin/sh\necho hi\n")
    (src / "exec").chmod(0o755)
    (src / "group-exec-only").write_bytes(b"x")
    (src / "group-exec-only").chmod(0o654)  # Nix looks at the owner's x bit only
    (src / "eight").write_bytes(b"12345678")
    (src / "big").write_bytes(os.urandom(200_003))
    (src / "link").symlink_to("regular")
    (src / "dangling").symlink_to("/nonexistent/target")
    (src / "link-to-dir").symlink_to("nested")
    nested = src / "nested" / "deeper" / "deepest"
    nested.mkdir(parents=True)
    (nested / "leaf").write_bytes(b"leaf")
    (src / "nested" / "empty-dir").mkdir()
    for name in ["with space", "ünïcødé", "Zebra", "apple", "_under", "-dash", "B", "a", "é"]:
        (src / name).write_text(name)
    os.mkdir(os.path.join(os.fsencode(src), b"latin1-\xe9\xff"))
    return src


def test_dump_matches_nix_store_dump(tmp_path: Path, nix_env: dict[str, str]) -> None:
    src = make_tree(tmp_path)
    expected = nix_dump(src, nix_env)
    assert b"".join(dump_path(src)) == expected
    for sub in ["regular", "empty", "exec", "group-exec-only", "big", "link", "dangling", "nested"]:
        assert b"".join(dump_path(src / sub)) == nix_dump(src / sub, nix_env), sub


def test_parser_finds_end_of_real_nar(tmp_path: Path, nix_env: dict[str, str]) -> None:
    nar = nix_dump(make_tree(tmp_path), nix_env)
    p = NarParser()
    assert p.feed(nar + b"\x01garbage-after-the-end") == len(nar)
    assert p.done
    p = NarParser()
    used = sum(p.feed(nar[i : i + 1000]) for i in range(0, len(nar) + 5000, 1000))
    assert used == len(nar) and p.done


def test_restore_of_nix_dump_dumps_identically(tmp_path: Path, nix_env: dict[str, str]) -> None:
    nar = nix_dump(make_tree(tmp_path), nix_env)
    restore_nar([nar[i : i + 4099] for i in range(0, len(nar), 4099)], tmp_path / "restored")
    assert nix_dump(tmp_path / "restored", nix_env) == nar
    assert b"".join(dump_path(tmp_path / "restored")) == nar


def test_nix_restores_our_dump(tmp_path: Path, nix_env: dict[str, str]) -> None:
    ours = b"".join(dump_path(make_tree(tmp_path)))
    subprocess.run(
        ["nix-store", "--restore", str(tmp_path / "by-nix")],
        input=ours,
        env=nix_env,
        check=True,
    )
    assert nix_dump(tmp_path / "by-nix", nix_env) == ours


def test_real_store_path(tmp_path: Path, nix_env: dict[str, str]) -> None:
    src = make_tree(tmp_path)
    # Make the content unique so that the store path is new for this run.
    (src / "nonce").write_bytes(os.urandom(16))
    out = subprocess.run(
        ["nix-store", "--add", str(src)], env=nix_env, capture_output=True, text=True, check=True
    ).stdout.strip()
    store_path = validate_store_path(out)
    assert b"".join(dump_path(store_path)) == nix_dump(store_path, nix_env)

    def query(flag: str) -> str:
        return subprocess.run(
            ["nix-store", "-q", flag, store_path],
            env=nix_env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    assert nar_hash(store_path) == (query("--hash"), int(query("--size")))
    # the store path's own hash part is not in its contents; another one we put there is
    assert scan_for_hashes(store_path, [hash_part(store_path)]) == set()


SCAN_NIX = r"""
{ nonce }:
let
  dep = builtins.toFile "dep" "x";
  dep2 = builtins.toFile "dep2" "y";
  unused = builtins.toFile "unused" "z";
in derivation {
  name = "scan-${nonce}";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  inherit unused;
  args = [ "-c" ''
    /bin/mkdir $out
    /usr/bin/head -c 65515 /dev/zero | /usr/bin/tr '\0' . > $out/split
    echo ${dep} >> $out/split
    /bin/ln -s ${dep2} $out/link
  '' ];
}
"""


def test_scan_agrees_with_nix_reference_scanner(tmp_path: Path, nix_env: dict[str, str]) -> None:
    """Build a derivation: Nix's scanner records its references; ours must find the same
    among the inputs (one of them across a 64 KiB chunk boundary, one in a symlink target)."""
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "nix.conf").write_text("sandbox = false\nsubstituters =\nbuild-users-group =\n")
    env = dict(nix_env, NIX_CONF_DIR=str(conf))
    (tmp_path / "scan.nix").write_text(SCAN_NIX)
    out = subprocess.run(
        [
            "nix-build",
            "--no-out-link",
            str(tmp_path / "scan.nix"),
            "--argstr",
            "nonce",
            os.urandom(6).hex(),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()

    def q(flag: str, path: str) -> list[str]:
        res = subprocess.run(
            ["nix-store", "-q", flag, path], env=env, capture_output=True, text=True, check=True
        )
        return res.stdout.split()

    drv = q("--deriver", out)[0]
    inputs = [p for p in q("--references", drv) if not p.endswith(".drv")]
    assert len(inputs) == 3
    nix_refs = {hash_part(p) for p in q("--references", out)}
    assert len(nix_refs) == 2
    assert scan_for_hashes(out, [hash_part(p) for p in inputs]) == nix_refs
