"""recnix_vm.network's hub: frames from one guest's socket reach every other guest's.

The guests here are plain unix datagram sockets bound where QEMU's ``dgram``
netdev would bind them; the QEMU command-line arguments are checked as text.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from recnix_vm.network import Network, NetworkError


@dataclass
class FakeMachine:
    """What Network.attach touches of a Machine."""

    name: str
    is_running: bool = False
    extra_qemu_args: list[str] = field(default_factory=list)


def _guest_socket(net: Network, name: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(net.directory / f"{name}.guest"))
    s.settimeout(10)
    return s


def test_hub_relays_frames_between_guests(tmp_path: Path) -> None:
    with Network(tmp_path / "net") as net:
        a, b, c = (FakeMachine(n) for n in ("client", "builder", "other"))
        nodes = [net.attach(m) for m in (a, b, c)]
        assert [n.address for n in nodes] == ["192.168.77.1", "192.168.77.2", "192.168.77.3"]
        netdev = a.extra_qemu_args[a.extra_qemu_args.index("-netdev") + 1]
        assert netdev.startswith("dgram,id=rn1,local.type=unix,") and "client.hub" in netdev
        assert f"mac={nodes[0].mac}" in a.extra_qemu_args[-1]
        sa, sb, sc = (_guest_socket(net, n) for n in ("client", "builder", "other"))
        frame = b"\xff" * 6 + bytes.fromhex(nodes[0].mac.replace(":", "")) + b"frame"
        sa.sendto(frame, str(net.directory / "client.hub"))
        assert sb.recv(65536) == frame and sc.recv(65536) == frame
        sa.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sa.recv(65536)  # not echoed to the sender
        for s in (sa, sb, sc):
            s.close()
    assert not list((tmp_path / "net").glob("*.hub"))


def test_attach_refuses_a_running_machine(tmp_path: Path) -> None:
    with Network(tmp_path / "net") as net, pytest.raises(NetworkError, match="before start"):
        net.attach(FakeMachine("up", is_running=True))
