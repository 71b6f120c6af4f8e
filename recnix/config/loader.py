"""recnix configuration: the declared keys (``config-keys.toml``: type, default, doc)
overlaid with a site TOML file, validated against their declarations.

``config-keys.toml`` is the single source of truth for settings; the NixOS
module (``module/``) reads it too, and ``scripts/gen-config.py`` writes
``defaults.toml``, the typed settings (``recnix.config.settings``, as
``Config.settings``) and the README's table from it.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from recnix.config.settings import Settings

KEYS_FILE = Path(__file__).with_name("config-keys.toml")
DEFAULTS_FILE = Path(__file__).with_name("defaults.toml")  # generated from KEYS_FILE
SYSTEM_CONFIG_FILE = Path("/etc/recnix/config.toml")
CONFIG_ENV = "RECNIX_CONFIG"


class ConfigError(Exception):
    """A configuration file is unreadable or has a bad key or value."""


_keys: dict[str, dict[str, dict[str, Any]]] | None = None


def load_keys() -> dict[str, dict[str, dict[str, Any]]]:
    """Every key's declaration (type, default, doc, ...) by section and name."""
    global _keys
    if _keys is None:
        with KEYS_FILE.open("rb") as f:
            _keys = tomllib.load(f)
    return _keys


def load_defaults() -> dict[str, Any]:
    """Return the defaults as nested dicts (sections of ``config-keys.toml``)."""
    return {
        section: {name: spec["default"] for name, spec in keys.items()}
        for section, keys in load_keys().items()
    }


_TYPE_WORDS = {bool: "true or false", int: "an integer", str: "a string", list: "a list"}


def toml_value(value: Any) -> str:
    """``value`` as a TOML literal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return str(value)


def _merge(base: dict[str, Any], override: dict[str, Any], where: str) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if key not in base:
            import difflib

            close = difflib.get_close_matches(key, list(base), n=1)
            hint = f"did you mean '{where}{close[0]}'? " if close else ""
            raise ConfigError(
                f"unknown setting '{where}{key}': {hint}known "
                f"{'in [' + where.rstrip('.') + ']' if where else 'tables'}: "
                f"{', '.join(sorted(base))} (`recnix daemon --help` describes them)"
            )
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"'{where}{key}' must be a table ([{where}{key}])")
            merged[key] = _merge(base[key], value, f"{where}{key}.")
        else:
            expected = type(base[key])
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise ConfigError(
                    f"'{where}{key}' must be {_TYPE_WORDS.get(expected, expected.__name__)}, "
                    f"not {toml_value(value)} (e.g. {key} = {toml_value(base[key])})"
                )
            merged[key] = value
    return merged


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The config file to read: explicit > $RECNIX_CONFIG > /etc/recnix/config.toml > none."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    if SYSTEM_CONFIG_FILE.exists():
        return SYSTEM_CONFIG_FILE
    return None


class Config:
    """Validated settings; ``raw`` keeps the merged TOML tables, ``source`` the file read.

    A plain class, not a dataclass: the hooks load the config on every opted-in
    build, and importing ``dataclasses`` costs them milliseconds.
    """

    __slots__ = ("raw", "source", "_settings")

    def __init__(self, raw: dict[str, Any], source: Path | None = None) -> None:
        self.raw = raw
        self.source = source
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        """The typed settings (``recnix.config.settings``, generated from config-keys.toml)."""
        if self._settings is None:
            self._settings = Settings(self.raw)
        return self._settings

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self.raw[section]

    @property
    def control_socket(self) -> Path:
        return self.settings.daemon.control_socket

    @property
    def state_dir(self) -> Path:
        return self.settings.daemon.state_dir


def load_config(explicit: str | os.PathLike[str] | None = None) -> Config:
    """Load defaults, overlay the config file (if any), validate and return it."""
    raw = load_defaults()
    path = config_path(explicit)
    if path is not None:
        try:
            with path.open("rb") as f:
                site = tomllib.load(f)
        except FileNotFoundError as e:
            raise ConfigError(f"config file {path} does not exist") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path}: {e}") from e
        try:
            raw = _merge(raw, site, "")
            _validate(raw)
        except ConfigError as e:
            raise ConfigError(f"config file {path}: {e}") from None
    else:
        _validate(raw)
    return Config(raw=raw, source=path)


def _validate(raw: dict[str, Any]) -> None:
    """ConfigError for the first value its key's declared type does not admit."""
    for section, keys in load_keys().items():
        for name, spec in keys.items():
            problem = _type_problem(spec, raw[section][name])
            if problem:
                raise ConfigError(f"'{section}.{name}' {problem}")


def _type_problem(spec: dict[str, Any], value: Any) -> str | None:
    """What is wrong with ``value`` for a key declared as ``spec`` (None: nothing)."""
    kind = spec["type"]
    if kind == "positive" and value < 1:
        return "must be at least 1"
    if kind == "unsigned" and value < 0:
        return "must not be negative"
    if kind == "path" and not value.startswith("/"):
        return f"must be an absolute path, not {value!r}"
    if kind == "enum" and value not in spec["choices"]:
        return f"is {value!r}: use " + ", ".join(f'"{c}"' for c in spec["choices"])
    if kind == "upstream" and value not in ("daemon", "stdio") and not value.startswith("unix://"):
        return f'is {value!r}: use "daemon", "stdio" or "unix:///path/to/socket"'
    if kind == "str-list" and not all(isinstance(v, str) for v in value):
        return "must be a list of strings"
    if kind == "host-list" and not all(isinstance(v, str) and v.strip() for v in value):
        return 'must be a list of builder host names (e.g. ["builder", "ssh-ng://user@builder"])'
    return None


def _conf_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return str(value)


# Nix's built-in recursive Nix: its experimental feature and system feature. Lix
# (2.93+) removed it: it warns about the unknown experimental feature on every
# command, and a build asking for the system feature would start without any socket.
BUILTIN_RECURSIVE_NIX = "recursive-nix"


def _without_builtin(key: str, value: Any) -> Any:
    """``value`` of [nix] ``key`` with Nix's built-in recursive-nix left out (for Lix)."""
    if key in ("experimental-features", "extra-experimental-features", "extra-system-features"):
        if isinstance(value, list):
            return [v for v in value if v != BUILTIN_RECURSIVE_NIX]
        if isinstance(value, str):
            return " ".join(v for v in value.split() if v != BUILTIN_RECURSIVE_NIX)
    return value


def nix_conf_settings(
    raw: dict[str, Any],
    pre_build_hook: str,
    post_build_hook: str,
    lix: bool = False,
    build_hook: str | None = None,
) -> dict[str, str]:
    """The nix.conf settings a host needs for recnix, as name -> value strings.

    ``lix``: the host runs Lix, which has no built-in recursive-nix: its
    experimental feature and system feature are left out (a setting left empty
    is left out), and so is ``build_hook``. ``build_hook``: recnix's build-hook
    (``recnix-build-hook``): recursive builds wait for a session before Nix takes a
    build user for them, and clients get back the closures of opted-in builds they
    dispatch to ``ssh-ng://`` builders.
    """
    nix = raw["nix"]
    if lix:
        nix = {key: _without_builtin(key, value) for key, value in nix.items()}
        nix = {key: value for key, value in nix.items() if value not in ([], "")}
    settings = {key: _conf_value(value) for key, value in nix.items()}
    settings["pre-build-hook"] = pre_build_hook
    settings["post-build-hook"] = post_build_hook
    if build_hook and not lix:  # Lix >= 2.94's build hook speaks Cap'n Proto: it keeps its own
        settings["build-hook"] = build_hook
    return dict(sorted(settings.items()))


def render_nix_conf(
    raw: dict[str, Any],
    pre_build_hook: str,
    post_build_hook: str,
    lix: bool = False,
    build_hook: str | None = None,
) -> str:
    """Render :func:`nix_conf_settings` as nix.conf lines (sorted, one per line)."""
    settings = nix_conf_settings(raw, pre_build_hook, post_build_hook, lix, build_hook)
    return "".join(f"{key} = {value}\n" for key, value in settings.items())


HOOK_SOCKET_ENV = "RECNIX_HOOK_SOCKET"
HOOK_PYTHON_ENV = "RECNIX_HOOK_PYTHON"
HOOK_ENTRY_ENV = "RECNIX_HOOK_ENTRY"
HOOK_MARKS_ENV = "RECNIX_HOOK_MARKS"
HOOK_CHANNEL_ENV = "RECNIX_HOOK_CHANNEL"


def hook_marks_dir(raw: dict[str, Any]) -> Path:
    """Where the pre-build hook marks builds that mention recnix (``RECNIX_HOOK_MARKS``)."""
    return Path(raw["daemon"]["state-dir"]) / "hook-marks"


def hook_channel_dir(raw: dict[str, Any]) -> Path:
    """Where the service keeps the hook channel (``RECNIX_HOOK_CHANNEL``,
    recnix.hooks.channel): opted-in builds' hooks talk to it without Python."""
    return Path(raw["daemon"]["state-dir"]) / "hook-channel"


def hook_environment(
    raw: dict[str, Any], python: str | None = None, entry: str | None = None
) -> dict[str, str]:
    """nix-daemon's environment for the hook script, decided once from the config.

    ``RECNIX_HOOK_SOCKET`` (only when ``[hooks]`` chains nothing) spares every
    build the script's config scan, and ``RECNIX_HOOK_MARKS``
    (``<state-dir>/hook-marks``) the post-build hook's read of the ``.drv``: the
    pre-build hook marks there the builds that mention recnix. With them,
    ``RECNIX_HOOK_CHANNEL`` (``<state-dir>/hook-channel``) lets the hooks of an
    opted-in build ask the service through FIFOs (``bin/recnix-hook-channel``,
    bash) rather than start Python. ``RECNIX_HOOK_PYTHON`` and
    ``RECNIX_HOOK_ENTRY`` (``recnix/hooks/entry.py``) let opted-in builds start
    Python with ``-I -S``. Rendered by ``recnix nix-conf --daemon-env`` and the
    NixOS module; a config change needs them rendered again.
    """
    env: dict[str, str] = {}
    hooks = raw["hooks"]
    if not hooks["pre-build"] and not hooks["post-build"]:
        env[HOOK_SOCKET_ENV] = str(raw["daemon"]["control-socket"])
        env[HOOK_MARKS_ENV] = str(hook_marks_dir(raw))
        env[HOOK_CHANNEL_ENV] = str(hook_channel_dir(raw))
    if python and entry:
        env[HOOK_PYTHON_ENV] = python
        env[HOOK_ENTRY_ENV] = entry
    return env
