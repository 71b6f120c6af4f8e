"""README.md's first example, read from the README itself (never copied) and run as a
user runs it: its command line against a nix-daemon whose hooks are recnix's."""

from __future__ import annotations

import re
from pathlib import Path

from tests.host.conftest import NixHost, RecnixService

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_block(first_line_prefix: str) -> str:
    """The README's fenced code block whose first line starts with ``first_line_prefix``."""
    for block in re.findall(r"^```\w*\n(.*?)^```", README.read_text(), re.M | re.S):
        if block.startswith(first_line_prefix):
            return block
    raise AssertionError(f"README.md has no code block starting with {first_line_prefix!r}")


def test_outer_nix_example_builds_with_the_inner_output_in_its_closure(
    nix_host_recnix: NixHost,
    recnix_service: RecnixService,
    busybox: str,
    nix_bundle: str,
    tmp_path: Path,
) -> None:
    example = readme_block("# outer.nix")
    # its first line: "# outer.nix — <the command that builds it>"
    command = example.splitlines()[0].split("—", 1)[1].strip()
    assert command.startswith("nix-build outer.nix"), command
    (tmp_path / "outer.nix").write_text(example)
    built = nix_host_recnix.run(
        ["sh", "-c", f"cd {tmp_path} && {command}"],
        check=False,
        env={"nix": nix_bundle, "bb": busybox},
    )
    assert built.returncode == 0, built.stderr[-3000:]
    result = tmp_path / "result"
    closure = nix_host_recnix.run(["nix-store", "-qR", str(result)]).stdout.split()
    inner = [p for p in closure if p.endswith("-inner")]
    assert inner, f"the inner output is missing from the closure of {result}: {closure}"
    assert (Path(inner[0])).read_text() == "hi\n"
