"""recnix on Lix, the pure parts: version texts, nix.conf without the built-in, the
session socket in a chroot directory."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from recnix.cli.nixversion import NixVersionError, parse_nix_version
from recnix.config.loader import load_config, nix_conf_settings
from recnix.sandbox import sandboxsocket

# What Lix 2.94.2 printed for `nix --version` (issue 15; printVersion in Lix's
# libmain/shared.cc prints these lines always, not only with -v).
LIX_TEXT = """\
nix (Lix, like Nix) 2.94.2
System type: x86_64-linux
Additional system types: i686-linux, x86_64-v1-linux, x86_64-v2-linux, x86_64-v3-linux
Features: gc, signed-caches
System configuration file: /etc/nix/nix.conf
User configuration files: /root/.config/nix/nix.conf:/etc/xdg/nix/nix.conf
Store directory: /nix/store
State directory: /nix/var/nix
Data directory: /opt/lix/share
"""


@pytest.mark.parametrize(
    ("text", "implementation", "version", "release"),
    [
        ("nix (Nix) 2.8.0\n", "nix", "2.8.0", (2, 8, 0)),
        ("nix (Nix) 2.26.3\n", "nix", "2.26.3", (2, 26, 3)),
        ("nix (Nix) 2.34.0pre20260101_abcdef0\n", "nix", "2.34.0pre20260101_abcdef0", (2, 34, 0)),
        ("nix-store (Nix) 2.8.0\n", "nix", "2.8.0", (2, 8, 0)),
        ("nix 2.34.1\n", "nix", "2.34.1", (2, 34, 1)),
        (LIX_TEXT, "lix", "2.94.2", (2, 94, 2)),
        ("nix (Lix, like Nix) 2.90.0-lix\n", "lix", "2.90.0-lix", (2, 90, 0)),
        (
            "nix (Lix, like Nix) 2.95.0-dev-pre20260101-abcdef0\nSystem type: x86_64-linux\n",
            "lix",
            "2.95.0-dev-pre20260101-abcdef0",
            (2, 95, 0),
        ),
    ],
)
def test_parse_nix_version(text, implementation, version, release):
    parsed = parse_nix_version(text)
    assert (parsed.implementation, parsed.version, parsed.release) == (
        implementation,
        version,
        release,
    )
    assert parsed.is_lix == (implementation == "lix")


@pytest.mark.parametrize("text", ["", "\n\n", "/opt/lix/share\n", "nix (Nix)\n", "garbage"])
def test_parse_nix_version_rejects_what_is_no_version(text):
    with pytest.raises(NixVersionError):
        parse_nix_version(text)


def test_the_last_line_of_lix_text_is_not_taken_for_the_version():
    # recnix before issue 15 took the last word of the output: '/opt/lix/share'
    assert LIX_TEXT.split()[-1] == "/opt/lix/share"
    assert parse_nix_version(LIX_TEXT).version == "2.94.2"


def test_nix_conf_for_lix_leaves_out_the_builtin_recursive_nix():
    raw = load_config(None).raw
    nix = nix_conf_settings(raw, "/pre", "/post")
    lix = nix_conf_settings(raw, "/pre", "/post", lix=True)
    assert "recursive-nix" in nix["experimental-features"].split()
    assert "recursive-nix" in nix["extra-system-features"].split()
    assert "experimental-features" not in lix
    assert lix["extra-system-features"].split() == ["recnix", "recnix-readonly"]
    assert {k: v for k, v in nix.items() if "features" not in k} == {
        k: v for k, v in lix.items() if "features" not in k
    }


HOOK_PATHS = [
    "--pre-build-hook=/opt/r/pre",
    "--post-build-hook=/opt/r/post",
    "--build-hook=/opt/r/build",
]


def _fake_nix(tmp_path: Path, text: str) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nix"
    fake.write_text(f"#!/bin/sh\ncat <<'EOF'\n{text}EOF\n")
    fake.chmod(0o755)
    return bin_dir


@pytest.mark.parametrize(("text", "lix"), [(LIX_TEXT, True), ("nix (Nix) 2.8.0\n", False)])
def test_nix_conf_command_detects_lix_from_nix_on_path(tmp_path, text, lix):
    bin_dir = _fake_nix(tmp_path, text)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("RECNIX_CONFIG", None)
    out = subprocess.run(
        [sys.executable, "-m", "recnix.cli.main", "nix-conf", "--config", "/dev/null", *HOOK_PATHS],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert ("recursive-nix" in out) == (not lix), out
    assert "extra-system-features = recnix recnix-readonly" in out
    assert "pre-build-hook = " in out
    # Lix >= 2.94's build hook speaks Cap'n Proto: recnix's is for Nix only
    assert any(line.startswith("build-hook = ") for line in out.splitlines()) == (not lix), out


def test_nix_conf_command_lix_flag_overrides_detection(tmp_path):
    bin_dir = _fake_nix(tmp_path, LIX_TEXT)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    out = subprocess.run(
        [sys.executable, "-m", "recnix.cli.main", "nix-conf", "--config", "/dev/null", "--no-lix"]
        + HOOK_PATHS,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "experimental-features = recursive-nix" in out


def test_nix_conf_command_never_prints_a_relative_hook(tmp_path):
    """Nix refuses to start with a relative build-hook: without the hooks beside recnix
    or on PATH, nix-conf fails naming the option that gives the path."""
    bin_dir = _fake_nix(tmp_path, "nix (Nix) 2.8.0\n")
    done = subprocess.run(
        [sys.executable, "-m", "recnix.cli.main", "nix-conf", "--config", "/dev/null"],
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and done.stdout == "", done.stdout
    assert "cannot find recnix-pre-build-hook beside recnix or on PATH" in done.stderr
    assert "--pre-build-hook" in done.stderr
    relative = subprocess.run(
        [sys.executable, "-m", "recnix.cli.main", "nix-conf", "--config", "/dev/null"]
        + [*HOOK_PATHS, "--build-hook=recnix-build-hook"],
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
        capture_output=True,
        text=True,
    )
    assert relative.returncode == 1 and "recnix-build-hook is not an absolute path" in (
        relative.stderr
    ), relative.stderr


def test_sandbox_socket_is_placed_and_replaced_atomically(tmp_path):
    # a chroot path longer than sun_path's 108 bytes, like <store>/<hash>-<name>.drv.chroot/root
    chroot = tmp_path / ("x" * 120) / "root"
    chroot.mkdir(parents=True)
    first, inode = sandboxsocket.place(chroot)
    path = chroot / "nix/var/nix/daemon-socket/socket"
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o666
    assert stat.S_IMODE(os.stat(chroot / "nix/var/nix").st_mode) == 0o755
    assert sandboxsocket.in_place(chroot, inode)
    second, inode2 = sandboxsocket.place(chroot)  # a restarted service
    assert inode2 != inode
    assert not sandboxsocket.in_place(chroot, inode) and sandboxsocket.in_place(chroot, inode2)
    assert sorted(os.listdir(path.parent)) == ["socket"]  # no temporary name left
    # a client reaching the path gets the new listener
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(f"/proc/self/fd/{dir_fd}/socket")
            second.setblocking(True)
            conn, _ = second.accept()
            conn.close()
    finally:
        os.close(dir_fd)
        first.close()
        second.close()


def test_sandbox_socket_directories_are_traversable_whatever_the_umask(tmp_path):
    chroot = tmp_path / "root"
    chroot.mkdir()
    old = os.umask(0o077)  # recnix.service's unit (recnix/cli/unit.toml)
    try:
        sock, _ = sandboxsocket.place(chroot)
        sock.close()
    finally:
        os.umask(old)
    for sub in ("nix", "nix/var", "nix/var/nix", "nix/var/nix/daemon-socket"):
        assert stat.S_IMODE(os.stat(chroot / sub).st_mode) == 0o755, sub


def test_sandbox_socket_refuses_a_directory_others_can_write(tmp_path):
    chroot = tmp_path / "root"
    (chroot / "nix/var/nix/daemon-socket").mkdir(parents=True)
    os.chmod(chroot / "nix/var/nix/daemon-socket", 0o777)
    with pytest.raises(sandboxsocket.PlacementError, match="writable by others"):
        sandboxsocket.place(chroot)


def test_sandbox_socket_does_not_follow_a_symlink(tmp_path):
    chroot = tmp_path / "root"
    (chroot / "nix").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", chroot / "nix" / "var")
    with pytest.raises(sandboxsocket.PlacementError):
        sandboxsocket.place(chroot)
    assert os.listdir(tmp_path / "elsewhere") == []


@pytest.mark.parametrize(
    ("text", "ignores"),
    [
        ("nix (Nix) 2.8.0\n", False),
        ("nix (Nix) 2.24.9\n", False),
        ("nix (Nix) 2.25.0\n", True),
        ("nix (Nix) 2.26.3\n", True),
        ("nix (Nix) 2.33.1\n", True),
        ("nix (Nix) 2.34.8\n", False),
        (LIX_TEXT, False),
    ],
)
def test_which_nix_ignores_nix_confs_build_hook(text, ignores):
    """src/nix/main.cc of 2.25-2.33 sets build-hook's default after reading nix.conf."""
    assert parse_nix_version(text).ignores_conf_build_hook is ignores


# -- issue 20: recnix's build hook started by Lix >= 2.94 (Cap'n Proto on stdout)


def capnp_abort_reason(message: bytes) -> str:
    """The reason of a framed one-segment RPC Message(abort = Exception) (checks each word)."""
    import struct

    segments, words = struct.unpack_from("<II", message, 0)
    assert segments == 0 and len(message) == 8 + 8 * words
    seg = message[8:]
    word = [int.from_bytes(seg[i : i + 8], "little") for i in range(0, len(seg), 8)]
    # root: struct pointer, offset 0, 1 data word, 1 pointer (Message)
    assert word[0] == (1 << 32) | (1 << 48)
    assert word[1] & 0xFFFF == 1  # Message.which = abort
    assert word[2] == (1 << 32) | (1 << 48)  # -> Exception
    assert word[3] == 0  # Exception.type = failed
    assert word[4] & 3 == 1 and (word[4] >> 32) & 7 == 2  # a byte list (Text)
    count = word[4] >> 35
    text = seg[40 : 40 + count]
    assert text.endswith(b"\0")
    return text[:-1].decode()


def test_abort_message_carries_the_reason() -> None:
    from recnix.hooks.lixhook import abort_message

    assert capnp_abort_reason(abort_message("why")) == "why"
    long = "x" * 1000 + " — ünïcode"
    assert capnp_abort_reason(abort_message(long)) == long


def test_lix_peer_is_recognised_by_its_descriptors() -> None:
    from recnix.hooks.lixhook import is_lix_rpc_peer

    a, b = socket.socketpair()
    r, w = os.pipe()
    null = os.open(os.devnull, os.O_RDWR)
    try:
        assert is_lix_rpc_peer(stdin=null, stdout=a.fileno())  # Lix >= 2.94
        assert not is_lix_rpc_peer(stdin=r, stdout=w)  # Nix: settings pipe, log pipe
        assert not is_lix_rpc_peer(stdin=r, stdout=a.fileno())
        assert not is_lix_rpc_peer(stdin=null, stdout=w)
    finally:
        for fd in (r, w, null):
            os.close(fd)
        a.close()
        b.close()


def test_build_hook_started_the_lix_way_refuses_with_the_nix_conf_line() -> None:
    """The hook script, given Lix >= 2.94's descriptors, answers with a Cap'n Proto abort
    naming the nix.conf to fix, says the same on stderr, and exits 1 (no hang)."""
    hook = Path(__file__).resolve().parents[2] / "bin" / "recnix-build-hook"
    hookentry = Path(__file__).resolve().parents[2] / "recnix" / "hooks" / "entry.py"
    ours, theirs = socket.socketpair()
    env = {
        "PATH": os.environ.get("PATH", os.defpath),
        "NIX_CONF_DIR": "/etc/lix-test",
        "RECNIX_HOOK_PYTHON": sys.executable,
        "RECNIX_HOOK_ENTRY": str(hookentry),
    }
    with open(os.devnull) as null:
        done = subprocess.run(
            [str(hook), "1"],
            stdin=null,
            stdout=theirs.fileno(),
            stderr=subprocess.PIPE,
            env=env,
            text=True,
            timeout=60,
        )
    theirs.close()
    received = b""
    while chunk := ours.recv(65536):
        received += chunk
    ours.close()
    assert done.returncode == 1
    reason = capnp_abort_reason(received)
    assert "recnix's build-hook cannot serve Lix" in reason
    assert "build-hook = …recnix-build-hook` line from /etc/lix-test/nix.conf" in reason
    assert reason in done.stderr
