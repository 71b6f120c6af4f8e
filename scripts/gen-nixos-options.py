#!/usr/bin/env python3
"""Generate the NixOS options table from the module's own option declarations.

Evaluates module/default.nix with module/eval/eval.nix (Debian's Nix 2.8 is
enough: the evaluation harness in module/eval/lib.nix stands in for nixpkgs'
lib; `--lib /path/to/nixpkgs/lib` uses the real one) and rewrites the block
between the markers below in README.md and docs/nixos.md (those that have them).

    scripts/gen-nixos-options.py          # rewrite the blocks
    scripts/gen-nixos-options.py --check  # exit 1 if a block is stale
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from recnix.config import configdocs  # noqa: E402

EVAL_FILE = REPO / "module" / "eval" / "eval.nix"
TARGETS = (REPO / "README.md", REPO / "docs" / "nixos.md")
BEGIN = "<!-- nixos-options:begin -->"
END = "<!-- nixos-options:end -->"


def option_docs(lib_path: str | None = None) -> list[dict[str, Any]]:
    """The services.recnix options as dicts (name, type, default|defaultText, description)."""
    argv = ["nix-instantiate", "--eval", "--strict", "--json", str(EVAL_FILE), "-A", "docList"]
    if lib_path:
        argv += ["--arg", "lib", f"import {Path(lib_path).resolve()}"]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"gen-nixos-options: {' '.join(argv)} failed:\n{done.stderr}")
    return json.loads(done.stdout)


def nix_literal(value: Any) -> str:
    """A JSON value written as a Nix expression."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[ " + "".join(nix_literal(v) + " " for v in value) + "]" if value else "[ ]"
    if isinstance(value, dict):
        if not value:
            return "{ }"
        inner = "".join(f"{k} = {nix_literal(v)}; " for k, v in sorted(value.items()))
        return "{ " + inner + "}"
    raise TypeError(f"cannot write {type(value).__name__} as Nix")


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip()


def render_table(options: list[dict[str, Any]]) -> str:
    """The Markdown table, one row per option, in the order of the declarations' names."""
    rows = [
        "| option | type | default | description |",
        "|---|---|---|---|",
    ]
    for opt in sorted(options, key=lambda o: o["name"]):
        if "defaultText" in opt:
            default = f"`{cell(opt['defaultText'])}`"
        elif "default" in opt:
            default = f"`{cell(nix_literal(opt['default']))}`"
        else:
            default = "—"
        rows.append(
            f"| `{opt['name']}` | {cell(opt['type'])} | {default} | {cell(opt['description'])} |"
        )
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a block is stale")
    parser.add_argument("--lib", help="path to nixpkgs' lib/ (default: the evaluation harness)")
    args = parser.parse_args(argv)

    targets = [t for t in TARGETS if t.exists() and BEGIN in t.read_text() and END in t.read_text()]
    if not targets:
        names = ", ".join(str(t.relative_to(REPO)) for t in TARGETS)
        print(f"gen-nixos-options: no {BEGIN} ... {END} block in {names}", file=sys.stderr)
        return 2
    table = render_table(option_docs(args.lib))
    files = {t: configdocs.replace_block(t.read_text(), BEGIN, END, table) for t in targets}
    return configdocs.update_files(files, args.check, "gen-nixos-options", REPO)


if __name__ == "__main__":
    sys.exit(main())
