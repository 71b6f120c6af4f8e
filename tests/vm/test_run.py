"""`recnix-vm run` as a person uses it (issue 14): run it in a terminal, read the
banner, type each command it lists into the SSH root shell, exactly as printed.
In that guest `recnix doctor` passes, its test build included."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pexpect
from recnix_vm.guestprep import banner_commands
from recnix_vm.image import Image

from tests.host.test_readme import readme_block

RECNIX_VM = Path(sys.executable).parent / "recnix-vm"
BOOT_TIMEOUT = 900  # boot (TCG) and preparation (bundling Nix into the store)
COMMAND_TIMEOUT = 600
PROMPT = "[recnix-run]# "
BANNER_END = "The guest is discarded when you leave (exit)."


class Shell:
    """The guest's shell at the far end of `recnix-vm run`'s SSH session."""

    def __init__(self, child: pexpect.spawn) -> None:
        self.child = child

    def run(self, command: str) -> tuple[int, str]:
        """Type ``command``; return its exit status and output."""
        self.child.sendline(f"{command}; echo RC=$?")
        self.child.expect(r"RC=(\d+)\r?\n", timeout=COMMAND_TIMEOUT)
        rc = int(self.child.match.group(1))
        output = self.child.before.replace("\r\n", "\n")
        self.child.expect_exact(PROMPT, timeout=60)
        # The echo of the typed line comes first.
        return rc, output.split("\n", 1)[1] if "\n" in output else ""


def test_banner_commands_work_as_printed(vm_image: Image, tmp_path: Path) -> None:
    log = (tmp_path / "recnix-vm-run.log").open("w")
    child = pexpect.spawn(
        str(RECNIX_VM),
        ["run", "--global-timeout", "1800"],
        env={**os.environ, "TERM": "dumb"},
        encoding="utf-8",
        codec_errors="replace",
        timeout=BOOT_TIMEOUT,
        dimensions=(50, 250),
    )
    child.logfile_read = log
    try:
        child.expect_exact(BANNER_END)
        text = child.before.replace("\r\n", "\n")
        banner = text[text.index("recnix runs in this guest") :] + BANNER_END
        commands = banner_commands(banner)
        assert commands[:3] == ["nix-build example.nix", "nix-store -qR result",
                                "recnix tree result"], banner  # fmt: skip
        assert "recnix doctor" in commands and any(
            c.startswith("journalctl -u recnix") for c in commands
        )
        # The shell's own prompt ends in "# "; ours makes the test independent of it.
        child.expect(r"# $", timeout=120)
        child.sendline(f"PS1='{PROMPT[:-2]}''# '")
        child.expect_exact(PROMPT, timeout=60)
        shell = Shell(child)

        rc, env = shell.run('echo "nix=$RECNIX_NIX busybox=$RECNIX_BUSYBOX"')
        nix, busybox = re.search(r"nix=(\S+) busybox=(\S+)", env).groups()
        assert f"$RECNIX_NIX = {nix}" in banner and f"$RECNIX_BUSYBOX = {busybox}" in banner
        assert rc == 0 and shell.run(f"test -x {nix}/bin/nix-build")[0] == 0, env

        outputs = {}
        for command in commands:
            rc, out = shell.run(command)
            assert rc == 0, f"{command!r} (from the banner) exited {rc}:\n{out}"
            outputs[command] = out
        built = outputs["nix-build example.nix"]
        assert re.search(r"/nix/store/\S+-example-outer", built), built
        closure = outputs["nix-store -qR result"]
        assert "-example-inner" in closure and "-note.txt" in closure, closure
        assert "example-inner" in outputs["recnix tree result"], outputs["recnix tree result"]
        assert "no open recnix sessions" in outputs["recnix status"]
        doctor = outputs["recnix doctor"]
        assert "recnix doctor: everything a recursive build needs is in place" in doctor, doctor
        assert re.search(r"^ok +build ", doctor, re.MULTILINE), doctor
        # The README shows this guest's `recnix doctor`: every check it shows ok is ok here.
        sample = readme_block("ok    nix-version")
        shown = re.findall(r"^ok +(\S+) ", sample, re.MULTILINE)
        assert "hook-channel" in shown, sample
        for name in shown:
            assert re.search(rf"^ok +{re.escape(name)} ", doctor, re.MULTILINE), (name, doctor)
        journal = next(out for cmd, out in outputs.items() if cmd.startswith("journalctl"))
        assert "recnix" in journal, journal

        child.sendline("exit")
        child.expect(pexpect.EOF, timeout=300)
        child.close()
        assert child.exitstatus == 0, child.exitstatus
    finally:
        if child.isalive():
            child.terminate(force=True)
        log.close()
        print(f"recnix-vm run transcript: {tmp_path / 'recnix-vm-run.log'}")
