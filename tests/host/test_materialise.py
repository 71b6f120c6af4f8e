"""recnix.sandbox.materialise against real sandboxed Nix 2.8 builds (both mechanisms)."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from recnix.sandbox import materialise
from recnix.sandbox.materialise import (
    MaterialiseError,
    SandboxView,
    find_sandbox_pid,
    peer_in_sandbox,
)
from tests.nixversion import sandbox_root

pytestmark = pytest.mark.host

# The builder waits until every path of $want exists, records what it sees, then waits for
# $marker and records whether the $want paths are still there (they must be gone after
# cleanup()).
WAITER = r"""
{ bb, want, marker, plant ? "", nonce }:
derivation {
  name = "recnix-waiter";
  system = "x86_64-linux";
  builder = "${bb}/bin/sh";
  inherit want marker plant nonce;
  args = [ "-c" ''
    B=${bb}/bin/busybox
    waitfor() {
      i=0
      while ! $B test -e "$1" && ! $B test -L "$1"; do
        i=$((i+1)); if [ $i -gt 1200 ]; then echo "timeout waiting for $1" >&2; exit 1; fi
        $B sleep 0.05
      done
    }
    if [ -n "$plant" ]; then $B mkdir "$plant" && echo fake > "$plant/a"; fi
    $B mkdir $out
    for p in $want; do waitfor "$p"; done
    for p in $want; do
      n=$($B basename "$p")
      if $B test -L "$p"; then $B readlink "$p" > "$out/$n.link"
      elif $B test -d "$p"; then
        (cd "$p" && $B find . | $B sort > "$out/$n.find")
        for f in $($B find "$p" -type f | $B sort); do
          echo "$f=$($B cat "$f")"
        done > "$out/$n.cat"
        for f in $($B find "$p" -type l | $B sort); do
          echo "$f->$($B readlink "$f")"
        done > "$out/$n.links"
      else $B cat "$p" > "$out/$n.file"; fi
    done
    $B touch "$out/seen"
    waitfor "$marker"
    for p in $want; do
      if $B test -e "$p" || $B test -L "$p"; then echo "$p" >> "$out/still-there"; fi
    done
    $B touch "$out/done"
  '' ];
}
"""


def _mountinfo() -> str:
    return Path("/proc/self/mountinfo").read_text()


def _add(nix_host, directory: Path, *names: str) -> list[str]:
    result = subprocess.run(
        ["nix-store", "--add", *(str(directory / n) for n in names)],
        env=nix_host.env,
        check=True,
        capture_output=True,
        text=True,
    )
    return result.stdout.split()


@pytest.fixture
def store_paths(nix_host, tmp_path):
    """Fresh store paths: a directory (files, subdir, symlink), a file, a symlink, 50 files."""
    nonce = uuid.uuid4().hex
    d = tmp_path / "tree"
    (d / "sub").mkdir(parents=True)
    (d / "a").write_text(f"alpha-{nonce}\n")
    (d / "sub" / "b").write_text("beta\n")
    (d / "link").symlink_to("sub/b")
    (tmp_path / "single").write_text(f"single-{nonce}\n")
    (tmp_path / "slink").symlink_to(f"/nix/store/target-{nonce}")
    (tmp_path / "marker").write_text(f"marker-{nonce}\n")
    for i in range(50):
        (tmp_path / f"many{i}").write_text(f"many-{i}-{nonce}\n")
    tree, single, slink, marker = _add(nix_host, tmp_path, "tree", "single", "slink", "marker")
    many = _add(nix_host, tmp_path, *(f"many{i}" for i in range(50)))
    return {
        "nonce": nonce,
        "tree": tree,
        "single": single,
        "slink": slink,
        "marker": marker,
        "many": many,
    }


class Waiter:
    """A background nix-build of WAITER, with its chroot and a process inside it."""

    def __init__(self, nix_host, busybox, tmp_path, want, marker, plant="") -> None:
        expr = tmp_path / "waiter.nix"
        expr.write_text(WAITER)
        args = [
            "--arg", "bb", f'builtins.storePath "{busybox}"',
            "--argstr", "want", " ".join(want),
            "--argstr", "marker", marker,
            "--argstr", "plant", plant,
            "--argstr", "nonce", uuid.uuid4().hex,
        ]  # fmt: skip
        inst = subprocess.run(
            ["nix-instantiate", str(expr), *args],
            env=nix_host.env,
            check=True,
            capture_output=True,
            text=True,
        )
        self.drv = inst.stdout.strip()
        self.chroot = sandbox_root(self.drv)
        self.proc = subprocess.Popen(
            ["nix-store", "--realise", self.drv],
            env=nix_host.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        self.pid = None
        while time.monotonic() < deadline and self.proc.poll() is None:
            if self.chroot.is_dir():
                self.pid = find_sandbox_pid(self.chroot)
                if self.pid is not None:
                    break
            time.sleep(0.05)
        if self.pid is None:
            self.proc.kill()
            out, err = self.proc.communicate()
            pytest.fail(f"sandboxed build of {self.drv} did not start: {err}")

    def finish(self, timeout: float = 60) -> Path:
        out, err = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, f"build of {self.drv} failed: {err}"
        return Path(out.strip())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture
def waiters():
    started: list[Waiter] = []
    yield started
    for w in started:
        w.kill()


def _check_outputs(out: Path, paths) -> None:
    tree, single, slink = paths["tree"], paths["single"], paths["slink"]
    tn = os.path.basename(tree)
    assert (out / f"{tn}.find").read_text().split() == [".", "./a", "./link", "./sub", "./sub/b"]
    assert (out / f"{tn}.cat").read_text().splitlines() == [
        f"{tree}/a=alpha-{paths['nonce']}",
        f"{tree}/sub/b=beta",
    ]
    assert (out / f"{tn}.links").read_text().splitlines() == [f"{tree}/link->sub/b"]
    single_file = out / f"{os.path.basename(single)}.file"
    assert single_file.read_text() == f"single-{paths['nonce']}\n"
    slink_file = out / f"{os.path.basename(slink)}.link"
    assert slink_file.read_text() == f"/nix/store/target-{paths['nonce']}\n"
    assert (out / "done").exists()


@pytest.mark.parametrize("mechanism", ["mount", "link"])
def test_materialise_into_running_build(
    nix_host, busybox, tmp_path, store_paths, waiters, mechanism
):
    want = [store_paths["tree"], store_paths["single"], store_paths["slink"]]
    before = _mountinfo()
    w = Waiter(nix_host, busybox, tmp_path, want, store_paths["marker"])
    waiters.append(w)
    view = SandboxView(w.chroot, builder_pid=w.pid, known_present={busybox}, mechanism=mechanism)
    assert view.is_alive()
    assert peer_in_sandbox(w.pid, w.chroot)
    assert not peer_in_sandbox(os.getpid(), w.chroot)
    assert not peer_in_sandbox(w.proc.pid, w.chroot)  # the host-side nix-store client
    assert view.visible(busybox)
    assert not any(view.visible(p) for p in want)

    view.materialise_many(want)
    assert all(view.visible(p) for p in want)
    view.materialise_many(want)  # idempotent
    view.materialise(busybox)  # an input: Nix put it there, nothing to do
    assert set(view.materialised) == set(want)
    during = _mountinfo()
    assert not any(os.path.basename(p) in during for p in want), "mount leaked into host"

    # The builder has now recorded what it saw; take everything away while it still runs.
    deadline = time.monotonic() + 30
    while not list(w.chroot.glob("nix/store/*-recnix-waiter/seen")):
        assert time.monotonic() < deadline, "builder did not see the paths"
        time.sleep(0.05)
    view.cleanup()
    assert view.materialised == {}
    assert not any(view.visible(p) for p in want)
    assert not any(os.path.lexists(str(w.chroot) + p) for p in want)

    marker_view = SandboxView(w.chroot, mechanism=mechanism)
    marker_view.materialise(store_paths["marker"])
    out = w.finish()
    _check_outputs(out, store_paths)
    assert not (out / "still-there").exists(), (out / "still-there").read_text()
    assert not w.chroot.exists()
    assert not marker_view.is_alive()
    marker_view.cleanup()  # sandbox gone: nothing to do, no error
    after = _mountinfo()
    assert after == before, "host mount table changed"


def test_refuses_preplanted_target(nix_host, busybox, tmp_path, store_paths, waiters):
    # The builder guesses a path it will be given later and plants a fake copy of it.
    fake = store_paths["tree"]
    w = Waiter(nix_host, busybox, tmp_path, [], store_paths["marker"], plant=fake)
    waiters.append(w)
    deadline = time.monotonic() + 30
    planted = Path(str(w.chroot) + fake) / "a"
    while not (planted.is_file() and planted.read_text() == "fake\n"):  # written, not only made
        assert time.monotonic() < deadline, "builder did not plant its fake path"
        time.sleep(0.05)
    for mechanism in ("mount", "link"):
        view = SandboxView(w.chroot, builder_pid=w.pid, mechanism=mechanism)
        with pytest.raises(MaterialiseError, match=r"already exists in the sandbox"):
            view.materialise(fake)
        assert view.materialised == {}
        assert not view.visible(store_paths["single"])
    # The refusal left the builder's planted file alone (it was not ours to remove).
    assert (Path(str(w.chroot) + fake) / "a").read_text() == "fake\n"
    SandboxView(w.chroot, builder_pid=w.pid).materialise(store_paths["marker"])
    w.finish()


def test_errors_name_the_path(tmp_path):
    view = SandboxView(tmp_path / "gone.drv.chroot")
    missing = "/nix/store/00000000000000000000000000000000-missing"
    with pytest.raises(MaterialiseError, match="00000000000000000000000000000000-missing"):
        view.materialise(missing)
    with pytest.raises(MaterialiseError, match="not-a-store-path"):
        view.materialise("/tmp/not-a-store-path")
    assert not view.is_alive()
    view.cleanup()


def test_materialise_many_fifty_paths_is_fast(nix_host, busybox, tmp_path, store_paths, waiters):
    many, marker = store_paths["many"], store_paths["marker"]
    # timing, in a sandbox whose builder waits only for the marker (so the paths
    # coming and going under it are not read half-way)
    t = Waiter(nix_host, busybox, tmp_path, [marker], marker)
    waiters.append(t)
    timings = {}
    for mechanism in ("mount", "link"):
        view = SandboxView(t.chroot, builder_pid=t.pid, mechanism=mechanism)
        start = time.perf_counter()
        view.materialise_many(many)
        timings[mechanism] = time.perf_counter() - start
        assert all(view.visible(p) for p in many)
        assert set(view.materialised.values()) == {mechanism}
        view.cleanup()
        assert not any(view.visible(p) for p in many)
    print(f"materialise_many(50): {timings}")
    assert timings["mount"] < 2.0, timings
    SandboxView(t.chroot, builder_pid=t.pid).materialise_many([marker])
    t.finish()
    # contents, in a fresh sandbox that reads every path once all are there
    w = Waiter(nix_host, busybox, tmp_path, many, marker)
    waiters.append(w)
    final = SandboxView(w.chroot, builder_pid=w.pid)
    final.materialise_many([*many, store_paths["marker"]])
    # by default regular files are hard-linked (as Nix does), the rest mounted
    for path, mechanism in final.materialised.items():
        expected = "link" if stat.S_ISREG(os.lstat(path).st_mode) else "mount"
        assert mechanism == expected, (path, mechanism)
    out = w.finish()  # no cleanup(): the mounts die with the sandbox
    assert not w.chroot.exists()
    assert not any(os.path.basename(p) in _mountinfo() for p in many)
    for p in many:
        assert (out / f"{os.path.basename(p)}.file").read_text().startswith("many-")


def test_falls_back_to_links_without_mount_syscalls(
    nix_host, busybox, tmp_path, store_paths, waiters, monkeypatch
):
    def no_open_tree(path: str) -> int:  # a kernel without open_tree cannot be had here
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS), path)

    monkeypatch.setattr(materialise, "_open_tree", no_open_tree)
    want = [store_paths["tree"], store_paths["single"], store_paths["slink"]]
    w = Waiter(nix_host, busybox, tmp_path, want, store_paths["marker"])
    waiters.append(w)
    view = SandboxView(w.chroot, builder_pid=w.pid)
    view.materialise_many([*want, store_paths["marker"]])
    assert view.materialised == dict.fromkeys([*want, store_paths["marker"]], "link")
    _check_outputs(w.finish(), store_paths)
