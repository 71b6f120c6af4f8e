"""What the key declarations (``config-keys.toml``) are rendered into: ``recnix daemon
--help``, ``defaults.toml`` (the defaults, commented, in a site config file's layout)
and the README's table. ``scripts/gen-config.py`` writes the files (and
``scripts/gen-nixos-options.py`` its table) with ``update_files``; a unit test
fails when one is stale."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Any

from recnix.config.loader import load_keys, toml_value

DAEMON_HELP_HEAD = """\
Run the recnix service: a root-only control socket for the hooks and one
restricted Nix daemon socket per opted-in build.

Configuration: TOML, read from --config, else $RECNIX_CONFIG, else
/etc/recnix/config.toml, over the built-in defaults (recnix/config/defaults.toml).
"""

DEFAULTS_HEAD = """\
# recnix's defaults, in the layout of a site config file (/etc/recnix/config.toml,
# $RECNIX_CONFIG or --config), which overrides any key. GENERATED from
# recnix/config/config-keys.toml (where each key is declared) by scripts/gen-config.py:
# edit that file, not this one.
"""

SECTION_NOTES = {
    "hooks": "Further hooks to chain after recnix's own.",
    "nix": "nix.conf settings a host needs for recnix (hook paths are added by whoever "
    "renders them: `recnix nix-conf`, `recnix setup`, the NixOS module, the VM images).",
}


def plain(doc: str) -> str:
    """A doc paragraph without Markdown's backticks (for comments and --help)."""
    return doc.replace("`", "")


def render_defaults_toml() -> str:
    """``defaults.toml``: every section and key with its default, the doc as a comment."""
    out = [DEFAULTS_HEAD]
    for section, keys in load_keys().items():
        out.append(f"\n[{section}]\n")
        if section in SECTION_NOTES:
            out.extend(
                f"# {line}\n"
                for line in textwrap.wrap(SECTION_NOTES[section], 78, break_on_hyphens=False)
            )
        for name, spec in keys.items():
            out.extend(
                f"# {line}\n"
                for line in textwrap.wrap(plain(spec["doc"]), 78, break_on_hyphens=False)
            )
            out.append(f"{name} = {toml_value(spec['default'])}\n")
    return "".join(out)


def render_daemon_help() -> str:
    """``recnix daemon --help``'s description: every key, what it means, its default."""
    out = [DAEMON_HELP_HEAD]
    for section, keys in load_keys().items():
        out.append(f"\n[{section}]\n")
        if section == "nix":
            out.append("  nix.conf settings the host needs (see `recnix nix-conf`).\n")
            continue
        for name, spec in keys.items():
            text = plain(spec.get("help", spec["doc"]))
            out.append(f"  {name} (default: {toml_value(spec['default'])})\n")
            out.extend(
                f"      {line}\n" for line in textwrap.wrap(text, 72, break_on_hyphens=False)
            )
    return "".join(out)


def _type_words(spec: dict[str, Any]) -> str:
    kind = spec["type"]
    if kind == "enum":
        return " \\| ".join(f'`"{c}"`' for c in spec["choices"])
    return {
        "str": "string",
        "path": "absolute path",
        "bool": "boolean",
        "positive": "integer ≥ 1",
        "unsigned": "integer ≥ 0",
        "upstream": '`"daemon"` \\| `"stdio"` \\| `"unix://…"`',
        "str-list": "list of strings",
        "host-list": "list of host names",
        "nix": "nix.conf value",
    }[kind]


def render_readme_table() -> str:
    """The README's table of every key but [nix]'s: key, type, default, meaning."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for section, keys in load_keys().items():
        if section == "nix":
            continue
        for name, spec in keys.items():
            default = toml_value(spec["default"]).replace("|", "\\|")
            doc = spec["doc"].replace("|", "\\|")
            rows.append(f"| `{section}.{name}` | {_type_words(spec)} | `{default}` | {doc} |")
    return "\n".join(rows) + "\n"


def replace_block(text: str, begin: str, end: str, content: str) -> str:
    """``text`` with what stands between the markers ``begin`` and ``end`` replaced."""
    start = text.index(begin) + len(begin)
    stop = text.index(end, start)
    return text[:start] + "\n" + content + text[stop:]


def update_files(files: dict[Path, str], check: bool, tool: str, repo: Path) -> int:
    """Write each of ``files`` (path -> the text it must have) that differs, or with
    ``check`` write nothing and return 1 if one differs (naming it and ``tool``, the
    script that writes them); 0 when all are current."""
    stale = []
    for path, text in files.items():
        if path.exists() and path.read_text() == text:
            continue
        if check:
            stale.append(str(path.relative_to(repo)))
        else:
            path.write_text(text)
            print(f"{tool}: updated {path.relative_to(repo)}")
    if stale:
        print(f"{tool}: stale: {', '.join(stale)}; run scripts/{tool}.py", file=sys.stderr)
        return 1
    return 0


# How each declared type reads into the typed settings (recnix/config/settings.py):
# (the attribute's annotation, the conversion of the TOML value; {v} is the value)
_SETTINGS_TYPES = {
    "str": ("str", "str({v})"),
    "path": ("Path", "Path({v})"),
    "bool": ("bool", "bool({v})"),
    "positive": ("int", "int({v})"),
    "unsigned": ("int", "int({v})"),
    "enum": ("str", "str({v})"),
    "upstream": ("str", "str({v})"),
    "str-list": ("tuple[str, ...]", "tuple({v})"),
    "host-list": ("tuple[str, ...]", "tuple({v})"),
    "nix": ("NixValue", "{v}"),
}

SETTINGS_HEAD = '''\
"""Typed settings: one class per section of ``recnix/config/config-keys.toml``, one attribute
per key (its name with ``_`` for ``-``), read from a validated config
(``Config.settings``).

Generated by scripts/gen-config.py from config-keys.toml: do not edit (a unit
test fails when it is stale). Plain classes, not dataclasses: the hooks load the
config, and importing ``dataclasses`` costs them milliseconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

NixValue = str | int | bool | list[str]  # a nix.conf value
'''


def _class_name(section: str) -> str:
    return "".join(part.capitalize() for part in section.split("-")) + "Settings"


def _slots(names: list[str]) -> str:
    if len(names) == 1:
        return f'    __slots__ = ("{names[0]}",)\n\n'
    lines = "".join(f'        "{name}",\n' for name in names)
    return f"    __slots__ = (\n{lines}    )\n\n"


def render_settings_module() -> str:
    """``recnix/config/settings.py``: the typed settings classes."""
    keys = load_keys()
    out = [SETTINGS_HEAD]
    for section, specs in keys.items():
        attrs = [name.replace("-", "_") for name in specs]
        out.append(f"\n\nclass {_class_name(section)}:\n")
        out.append(f'    """[{section}]"""\n\n')
        out.append(_slots(attrs))
        out.append("    def __init__(self, table: dict[str, Any]) -> None:\n")
        for name, attr in zip(specs, attrs, strict=True):
            annotation, conversion = _SETTINGS_TYPES[specs[name]["type"]]
            value = conversion.format(v=f'table["{name}"]')
            out.append(f"        self.{attr}: {annotation} = {value}\n")
    out.append("\n\nclass Settings:\n")
    out.append('    """Every section of a validated config."""\n\n')
    sections = [section.replace("-", "_") for section in keys]
    out.append(_slots(sections))
    out.append("    def __init__(self, raw: dict[str, Any]) -> None:\n")
    for section, attr in zip(keys, sections, strict=True):
        out.append(f'        self.{attr} = {_class_name(section)}(raw["{section}"])\n')
    return "".join(out)
