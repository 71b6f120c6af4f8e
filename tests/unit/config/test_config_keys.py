"""recnix/config/config-keys.toml: every key declared once, and what is generated from it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from recnix.config import configdocs
from recnix.config.loader import ConfigError, _type_problem, load_config, load_defaults, load_keys

REPO = Path(__file__).resolve().parents[3]
TYPES = {"str", "path", "bool", "positive", "unsigned", "enum", "upstream", "str-list",
         "host-list", "nix"}  # fmt: skip

# A value of the right TOML type that each declared type refuses (None: none exists).
REFUSED = {
    "path": '"relative/path"',
    "positive": "0",
    "unsigned": "-1",
    "enum": '"no-such-choice"',
    "upstream": '"tcp://host"',
    "str-list": "[1]",
    "host-list": '[" "]',
}


def all_keys() -> list[tuple[str, str, dict]]:
    return [(s, n, spec) for s, keys in load_keys().items() for n, spec in keys.items()]


def test_every_key_is_declared_with_a_known_type_a_default_and_a_doc() -> None:
    for section, name, spec in all_keys():
        assert spec["type"] in TYPES, (section, name)
        assert "default" in spec and spec["doc"].strip(), (section, name)
        assert spec["type"] != "enum" or spec["default"] in spec["choices"], (section, name)
        assert _type_problem(spec, spec["default"]) is None, (section, name)


@pytest.mark.parametrize(("section", "name", "spec"), all_keys(), ids=lambda v: str(v)[:40])
def test_a_value_the_type_refuses_is_an_error_naming_the_key(
    section: str, name: str, spec: dict, tmp_path: Path
) -> None:
    bad = REFUSED.get(spec["type"])
    if bad is None:
        assert spec["type"] in ("str", "bool", "nix")  # any value of the right kind is fine
        return
    conf = tmp_path / "config.toml"
    conf.write_text(f"[{section}]\n{name} = {bad}\n")
    with pytest.raises(ConfigError, match=rf"{conf}: '{section}\.{name}' "):
        load_config(conf)


def test_the_defaults_are_the_declared_ones_and_load() -> None:
    assert load_config(None).raw == load_defaults()
    assert load_defaults()["daemon"]["finalise-grace"] == 60


def test_generated_files_are_current() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen-config.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr


def test_defaults_toml_is_a_valid_site_config_equal_to_the_defaults(tmp_path: Path) -> None:
    conf = tmp_path / "config.toml"
    conf.write_text(configdocs.render_defaults_toml())
    assert load_config(conf).raw == load_defaults()


def test_daemon_help_and_readme_name_every_key() -> None:
    help_text = configdocs.render_daemon_help()
    table = configdocs.render_readme_table()
    for section, name, _spec in all_keys():
        if section != "nix":
            assert f"  {name} (default: " in help_text, name
            assert f"`{section}.{name}`" in table, name
