"""recnix.service for a non-NixOS host: the unit `recnix setup` installs and the VM
images ship, with the privilege and hardening settings of ``unit.toml`` (the NixOS
module reads the same file)."""

from __future__ import annotations

import tomllib
from pathlib import Path

UNIT_SETTINGS_FILE = Path(__file__).with_name("unit.toml")


def service_settings() -> list[tuple[str, str]]:
    """``unit.toml``'s [Service] settings as systemd ``Key=value`` pairs."""
    with UNIT_SETTINGS_FILE.open("rb") as f:
        service = tomllib.load(f)["Service"]
    rendered = []
    for key, value in service.items():
        if isinstance(value, bool):
            value = "yes" if value else "no"
        elif isinstance(value, list):
            value = " ".join(str(v) for v in value)
        rendered.append((key, str(value)))
    return rendered


def render_unit(exec_start: str) -> str:
    """The whole recnix.service unit, running ``exec_start`` (``/path/to/recnix daemon``)."""
    hardening = "".join(f"{key}={value}\n" for key, value in service_settings())
    return (
        "[Unit]\n"
        "Description=recnix: per-build restricted Nix daemon sockets (recursive Nix)\n"
        "After=nix-daemon.socket nix-daemon.service\n"
        "Wants=nix-daemon.socket\n"
        "\n"
        "[Service]\n"
        f"ExecStart={exec_start}\n"
        "Restart=on-failure\n"
        "RestartSec=1\n"
        "RuntimeDirectory=recnix\n"
        "LogsDirectory=recnix\n"
        "Environment=NIX_PAGER=cat\n"
        "# privilege and hardening: recnix/cli/unit.toml, as on NixOS\n"
        f"{hardening}"
        "\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )
