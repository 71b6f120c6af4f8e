"""recnix.remote.sshproxy's decisions (which ssh calls it proxies, the order it copies in) and
recnix.hooks.buildhook's environment for Nix's build-remote."""

from __future__ import annotations

import os
import subprocess
import sys

from recnix.cli.main import main
from recnix.hooks import buildhook
from recnix.remote.sshproxy import announces_start, is_worker_session, remote_command


def test_worker_sessions_as_each_nix_starts_them() -> None:
    # Nix 2.8-2.19: the command is one last argument
    assert is_worker_session(["builder", "-x", "-a", "nix-daemon --stdio"])
    assert is_worker_session(["root@b", "-x", "-a", "-S", "/tmp/s", "nix-daemon --stdio"])
    # Nix >= 2.20: words after "--", maybe a remote-program path and --store
    assert is_worker_session(["b", "-x", "--", "/run/current-system/sw/bin/nix-daemon", "--stdio"])
    assert is_worker_session(["b", "-x", "--", "nix-daemon", "--stdio", "--store", "/x"])
    assert remote_command(["b", "-x", "--", "nix-daemon", "--stdio"]) == ["nix-daemon", "--stdio"]


def test_everything_else_goes_to_ssh() -> None:
    assert not is_worker_session(["b", "-M", "-N", "-S", "/tmp/s"])  # the master
    assert not is_worker_session(["b", "-O", "check", "-S", "/tmp/s"])
    assert not is_worker_session(["b", "-x", "-a", "nix-store --serve --write"])  # ssh://
    assert not is_worker_session(["b", "echo", "started"])
    assert not is_worker_session(["b"])
    assert not is_worker_session(["b", "-x", "nix-daemon --stdio 'unbalanced"])


def test_build_hook_env_puts_the_shim_first(tmp_path) -> None:
    ssh = tmp_path / "ssh"
    ssh.write_text("#!/bin/sh\n")
    ssh.chmod(0o755)
    env = buildhook.hook_env({"PATH": f"{tmp_path}:/usr/bin"})
    assert env["PATH"] == f"{buildhook.shim_dir()}:{tmp_path}:/usr/bin"
    assert env["RECNIX_REAL_SSH"] == str(ssh)
    assert env["RECNIX_HOOK_PYTHON"] == sys.executable
    assert os.path.isfile(env["RECNIX_HOOK_ENTRY"])
    assert os.access(os.path.join(buildhook.shim_dir(), "ssh"), os.X_OK)


def test_shim_hands_other_commands_to_the_real_ssh(tmp_path) -> None:
    """The shim runs the real ssh (here a script printing its argv) for a non-session."""
    real = tmp_path / "real-ssh"
    real.write_text('#!/bin/sh\necho "real: $*"\n')
    real.chmod(0o755)
    env = buildhook.hook_env({"PATH": os.environ["PATH"], "RECNIX_REAL_SSH": str(real)})
    r = subprocess.run(
        ["ssh", "b", "-x", "-a", "nix-store --serve --write"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0 and r.stdout == "real: b -x -a nix-store --serve --write\n", r


def test_nix_conf_prints_the_build_hook(capsys) -> None:
    hooks = ["--pre-build-hook", "/pre", "--post-build-hook", "/post", "--build-hook", "/bh"]
    assert main(["nix-conf", "--config", "/dev/null", "--no-lix", *hooks]) == 0
    assert "build-hook = /bh\n" in capsys.readouterr().out


def test_remote_build_marks(tmp_path) -> None:
    from recnix.remote.guards import mark_remote_build, take_remote_mark

    drv = "/nix/store/" + "a" * 32 + "-outer.drv"
    assert not take_remote_mark(tmp_path, drv)
    mark_remote_build(tmp_path, drv)
    assert take_remote_mark(tmp_path, drv)
    assert not take_remote_mark(tmp_path, drv)  # taken once


def test_announced_start_as_nix_2_20_on_asks_for_it() -> None:
    opts = ["-oPermitLocalCommand=yes", "-oLocalCommand=echo started"]
    assert announces_start(["b", "-x", *opts, "--", "nix-daemon", "--stdio"])
    assert announces_start(["b", "-o", "LocalCommand=echo started", "--", "nix-daemon", "--stdio"])
    assert not announces_start(["b", "-x", "-a", "nix-daemon --stdio"])  # Nix 2.8
    assert not announces_start(["b", "--", "echo", "-oLocalCommand=echo started"])


def test_shim_first_on_the_daemons_path_alone(tmp_path) -> None:
    """Nix 2.25-2.33: the shim is first on nix-daemon's PATH, without the build hook's
    variables: it runs python3 with the recnix package's hooks/entry.py, and finds the real
    ssh after itself on PATH."""
    real = tmp_path / "ssh"
    real.write_text('#!/bin/sh\necho "real: $*"\n')
    real.chmod(0o755)
    python_dir = os.path.dirname(sys.executable)
    env = {"PATH": f"{buildhook.shim_dir()}:{tmp_path}:{python_dir}:/usr/bin:/bin"}
    r = subprocess.run(
        ["ssh", "b", "-O", "check"], env=env, capture_output=True, text=True, check=False
    )
    assert r.returncode == 0 and r.stdout == "real: b -O check\n", r


def test_single_file_of_a_nar(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A .drv's contents from the builder's NAR: one regular file, else refused (the
    whole NAR is still read)."""
    import asyncio

    import pytest

    from recnix.protocol.nar import dump_path
    from recnix.remote.remotetrust import UntrustedPath
    from recnix.remote.sshproxy import single_file

    async def contents(path) -> bytes:  # type: ignore[no-untyped-def]
        async def chunks():  # type: ignore[no-untyped-def]
            for chunk in dump_path(path):
                yield chunk

        return await single_file(chunks(), "/nix/store/x.drv")

    drv = tmp_path / "x.drv"
    drv.write_bytes(b"Derive([])" * 1000)
    assert asyncio.run(contents(drv)) == b"Derive([])" * 1000
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("x")
    with pytest.raises(UntrustedPath, match="not a"):
        asyncio.run(contents(tmp_path / "d"))
    (tmp_path / "l").symlink_to("x.drv")
    with pytest.raises(UntrustedPath, match="not a regular file"):
        asyncio.run(contents(tmp_path / "l"))
