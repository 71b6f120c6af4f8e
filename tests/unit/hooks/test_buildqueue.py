"""recnix.hooks.buildqueue: the build hook protocol as Nix 2.8-2.34 speaks it (HookInstance,
tryBuildHook), with Nix's own build-remote behind it and an answering control socket."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from recnix.hooks import buildqueue
from tests import nixversion
from tests.buildhookwire import settings, try_request

REPO = Path(__file__).resolve().parents[3]
DRV = "/nix/store/" + "a" * 32 + "-outer.drv"


def test_settings_and_requests_are_read_with_their_raw_bytes() -> None:
    r, w = os.pipe()
    raw_settings = settings(builders="", **{"max-jobs": "4"})
    raw_try = try_request(DRV, ["recnix", "kvm"])
    os.write(w, raw_settings + raw_try)
    os.close(w)
    reader = buildqueue.WireReader(r)
    assert buildqueue.read_settings(reader) == {"builders": "", "max-jobs": "4"}
    assert reader.take_raw() == raw_settings
    assert buildqueue.read_try(reader) == (DRV, ["recnix", "kvm"], True)
    assert reader.take_raw() == raw_try
    assert buildqueue.read_try(reader) is None  # end of input between requests
    os.close(r)


def test_input_cut_inside_a_message_is_an_error() -> None:
    r, w = os.pipe()
    os.write(w, settings(builders="") + try_request(DRV, [])[:20])
    os.close(w)
    reader = buildqueue.WireReader(r)
    buildqueue.read_settings(reader)
    with pytest.raises(buildqueue.HookProtocolError, match="end of input"):
        buildqueue.read_try(reader)
    os.close(r)


@pytest.mark.parametrize(
    ("builders", "machines_file", "expected"),
    [
        ("", None, False),
        ("ssh-ng://b x86_64-linux", None, True),
        ("@{file}", "", False),
        ("@{file}", "# only a comment\n\n", False),
        ("@{file}", "ssh://b x86_64-linux - 1\n", True),
        ("@/nonexistent/machines", None, False),
        (" ; ", None, False),
    ],
)
def test_machines_configured(
    tmp_path: Path, builders: str, machines_file: str | None, expected: bool
) -> None:
    file = tmp_path / "machines"
    if machines_file is not None:
        file.write_text(machines_file)
    assert buildqueue.machines_configured({"builders": builders.format(file=file)}) is expected


def answering(path: Path, admit: bool, seen: list[dict]) -> socket.socket:
    """A control socket answering every `admit` with ``admit``."""
    import json

    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                seen.append(json.loads(conn.makefile().readline()))
                conn.sendall(json.dumps({"ok": True, "admit": admit}).encode() + b"\n")

    threading.Thread(target=serve, daemon=True).start()
    return server


def run_hook(
    tmp_path: Path, stdin: bytes, admit: bool, nix_hook: str, env: dict[str, str] | None = None
) -> tuple[int, str, list]:
    seen: list[dict] = []
    sock = tmp_path / "control.sock"
    server = answering(sock, admit, seen)
    code = (
        f"import sys; sys.path.insert(0, {str(REPO)!r}); from recnix.hooks import buildqueue; "
        f"sys.exit(buildqueue.serve([{nix_hook!r}, '0'], {{}}, {str(sock)!r}, 'build-remote'))"
    )
    log_r, log_w = os.pipe()  # Nix gives the hook the build log's pipe as fds 4 and 5
    # ...placed by bash's redirections: subprocess would close fds a preexec_fn dup2'd
    # there (close_fds comes after it), and Nix's build-remote, which drains fd 5 into
    # its error message, then read whatever file it had opened as fd 5 (here the Nix
    # database, by the store paths in it: hundreds of MB and a minute).
    placed = f'exec "$0" -I -S -c "$1" 4>&{log_w} 5<&{log_r} {log_w}>&- {log_r}<&-'
    try:
        proc = subprocess.run(
            ["bash", "-c", placed, sys.executable, code],
            input=stdin,
            capture_output=True,
            timeout=60,
            pass_fds=(log_r, log_w),
            env={"PATH": os.environ["PATH"], **(env or {})},
        )
    finally:
        server.close()
        os.close(log_r)
        os.close(log_w)
    return proc.returncode, proc.stderr.decode(), seen


NIX_BUILD_REMOTE = shutil.which("nix") or "nix"  # run as build-remote (Debian's nix-bin)


def test_a_recursive_build_waits_while_the_service_has_no_slot(tmp_path: Path) -> None:
    stdin = settings(builders="", **{"max-jobs": "3"})
    stdin += try_request(DRV, ["recnix"]) + try_request(DRV, ["recnix"])
    code, stderr, seen = run_hook(tmp_path, stdin, admit=False, nix_hook=str(NIX_BUILD_REMOTE))
    assert code == 0 and stderr == "# postpone\n# postpone\n", stderr
    # The service learns which Nix process asks (no nix* ancestor here: the hook's
    # parent, this test) and how many builds it runs at once (its max-jobs).
    asked = {"op": "admit", "drv": DRV, "worker": os.getpid(), "max_jobs": 3}
    assert seen == [asked] * 2


def test_max_jobs_the_hook_cannot_read_is_sent_as_unknown(tmp_path: Path) -> None:
    stdin = settings(builders="", **{"max-jobs": "auto"}) + try_request(DRV, ["recnix"])
    _, _, seen = run_hook(tmp_path, stdin, admit=False, nix_hook=str(NIX_BUILD_REMOTE))
    assert seen[0]["max_jobs"] is None


def test_builds_go_on_when_admitted_and_nix_keeps_asking(tmp_path: Path) -> None:
    other = "/nix/store/" + "b" * 32 + "-plain.drv"
    stdin = settings(builders="") + try_request(other, []) + try_request(DRV, ["recnix"])
    code, stderr, seen = run_hook(tmp_path, stdin, admit=True, nix_hook=str(NIX_BUILD_REMOTE))
    # never decline-permanently: Nix would stop asking about later recursive builds
    assert code == 0 and stderr == "# decline\n# decline\n", stderr
    assert [(s["op"], s["drv"]) for s in seen] == [("admit", DRV)]  # only the recursive one


def test_with_machines_nix_build_remote_answers_and_its_permanent_decline_is_softened(
    tmp_path: Path,
) -> None:
    """Nix's own build-remote is asked (its log lines pass through: it tries the machine,
    which cannot be reached, and declines); recnix passes on a plain decline, so that Nix
    keeps asking this hook."""
    if nixversion.is_lix():
        pytest.skip(
            f"{nixversion.label()}'s build-remote speaks Cap'n Proto, not the build hook "
            "protocol recnix's build-hook serves (never configured on Lix)"
        )
    machines = "ssh-ng://nowhere.invalid x86_64-linux - 1\n"
    stdin = settings(builders=machines) + try_request(DRV, []) + try_request(DRV, [])
    code, stderr, seen = run_hook(tmp_path, stdin, admit=True, nix_hook=str(NIX_BUILD_REMOTE))
    assert code == 0, stderr
    answers = [line for line in stderr.splitlines() if line.startswith("# ")]
    assert answers == ["# decline", "# decline"], stderr
    assert "nowhere.invalid" in stderr, stderr
    # build-remote drained the (empty) log pipe at fd 5 into its message, nothing else
    assert len(stderr) < 10_000, stderr[:2000]


def test_every_build_is_hinted_to_the_pre_build_hook(tmp_path: Path) -> None:
    """<drv>.plain for a build without recnix, <drv>.recnix for one that requires it (the
    pre-build hook then need not read the .drv either way)."""
    marks = tmp_path / "hook-marks"  # made by the hook, root-only, as the pre-build hook does
    plain = "/nix/store/" + "b" * 32 + "-plain.drv"
    stdin = settings(builders="") + try_request(plain, []) + try_request(DRV, ["recnix"])
    env = {"RECNIX_HOOK_MARKS": str(marks)}
    code, stderr, _ = run_hook(tmp_path, stdin, True, NIX_BUILD_REMOTE, env)
    assert code == 0, stderr
    assert sorted(p.name for p in marks.iterdir()) == sorted(
        [f"{'b' * 32}-plain.drv.plain", f"{Path(DRV).name}.recnix"]
    )
    assert marks.stat().st_mode & 0o777 == 0o700


def test_a_build_nix_would_not_start_now_takes_no_slot(tmp_path: Path) -> None:
    """At max-jobs Nix asks with am-willing = 0: the build waits for a build slot anyway
    (declined), and the service is not asked to reserve a session slot for it."""
    stdin = settings(builders="") + try_request(DRV, ["recnix"], local_now=False)
    code, stderr, seen = run_hook(tmp_path, stdin, admit=False, nix_hook=NIX_BUILD_REMOTE)
    assert code == 0 and stderr == "# decline\n", stderr
    assert seen == []
