#!/usr/bin/env python3
"""Write what is generated from recnix/config/config-keys.toml (each key's one declaration):
recnix/config/defaults.toml, recnix/config/settings.py (the typed settings) and the table between
the markers below in README.md.

    scripts/gen-config.py          # rewrite them
    scripts/gen-config.py --check  # exit 1 if one is stale

(`recnix daemon --help` and the NixOS module read config-keys.toml themselves.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from recnix.config import configdocs  # noqa: E402
from recnix.config.loader import DEFAULTS_FILE  # noqa: E402

README = REPO / "README.md"
SETTINGS_FILE = REPO / "recnix" / "config" / "settings.py"
BEGIN = "<!-- config-keys:begin -->"
END = "<!-- config-keys:end -->"


def generated() -> dict[Path, str]:
    """Each generated file's path and the text it must have."""
    readme = README.read_text()
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f"gen-config: README.md lacks the {BEGIN} ... {END} markers")
    return {
        DEFAULTS_FILE: configdocs.render_defaults_toml(),
        SETTINGS_FILE: configdocs.render_settings_module(),
        README: configdocs.replace_block(readme, BEGIN, END, configdocs.render_readme_table()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a file is stale")
    args = parser.parse_args(argv)
    return configdocs.update_files(generated(), args.check, "gen-config", REPO)


if __name__ == "__main__":
    sys.exit(main())
