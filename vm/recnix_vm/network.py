"""A private Ethernet segment between guests, and named nodes on it.

Like the NixOS test driver's ``nodes``: each :class:`Machine` attached to a
:class:`Network` gets a second NIC (``virtio-net``) on a QEMU ``dgram``
netdev over unix datagram sockets. A hub thread on the host relays every
frame to the other guests' sockets (a repeater hub: no IP stack, no TCP/IP
traffic on the host at all; nothing leaves the host). Guests get
``192.168.77.<n>/24`` and each other's names in ``/etc/hosts``.

:func:`link_builder` then sets up what Nix's distributed builds need between
two nodes: an SSH key for the client's root (the nix-daemon's user), the
builder's host key in the client's known_hosts, SSH keep-alives (so that a
builder that goes away fails the build instead of hanging it), and optionally
a builder account that the builder's Nix does not trust.
"""

from __future__ import annotations

import contextlib
import os
import select
import shlex
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .log import log

if TYPE_CHECKING:
    from .machine import Machine

SUBNET = "192.168.77"
MAC_PREFIX = "52:54:00:77:00"
FRAME_MAX = 65536
# The client's ssh gives up on a builder that does not answer for
# ServerAliveInterval * ServerAliveCountMax seconds.
SSH_ALIVE_INTERVAL = 5
SSH_ALIVE_COUNT = 3
CLIENT_KEY = "/root/.ssh/id_recnix_builder"
# Nix 2.25-2.33 set build-hook's default after reading nix.conf (nix/main.cc), so
# nix.conf's `build-hook = recnix-build-hook` is lost there: recnix's ssh goes first
# on nix-daemon's PATH instead (README, "Distributed builds").
SSH_SHIM_DROP_IN = "/etc/systemd/system/nix-daemon.service.d/recnix-ssh-proxy.conf"
GUEST_SSH_SHIM_DIR = "/opt/recnix/recnix/remote/sshshim"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
UNTRUSTED_USER = "nixremote"


class NetworkError(Exception):
    """The private network could not be set up."""


@dataclass(frozen=True)
class Node:
    """One guest on the network."""

    name: str
    index: int
    machine: Machine

    @property
    def address(self) -> str:
        return f"{SUBNET}.{self.index}"

    @property
    def mac(self) -> str:
        return f"{MAC_PREFIX}:{self.index:02x}"


class Network:
    """A hub relaying Ethernet frames between the guests attached to it.

    Attach machines (:meth:`attach`) before starting them; call
    :meth:`configure` once they are up; :meth:`close` stops the hub.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.nodes: dict[str, Node] = {}
        self._hub_socks: dict[str, socket.socket] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe()

    def _paths(self, name: str) -> tuple[Path, Path]:
        """(the guest's own socket, the hub's socket for that guest)."""
        return self.directory / f"{name}.guest", self.directory / f"{name}.hub"

    def attach(self, machine: Machine) -> Node:
        """Give ``machine`` a NIC on this network (before it starts); return its node."""
        if machine.name in self.nodes:
            raise NetworkError(f"a node named {machine.name!r} is already attached")
        if machine.is_running:
            raise NetworkError(f"{machine.name} is running: attach it before start()")
        node = Node(machine.name, len(self.nodes) + 1, machine)
        guest, hub = self._paths(node.name)
        for p in (guest, hub):
            p.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(hub))
        self._hub_socks[node.name] = sock
        self.nodes[node.name] = node
        machine.extra_qemu_args += [
            "-netdev",
            f"dgram,id=rn1,local.type=unix,local.path={guest},remote.type=unix,remote.path={hub}",
            "-device",
            f"virtio-net-pci,netdev=rn1,mac={node.mac}",
        ]
        self._restart_hub()
        return node

    def _restart_hub(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._relay, daemon=True, name="recnix-hub")
            self._thread.start()
        else:
            os.write(self._wake_w, b"x")  # pick up the new socket

    def _relay(self) -> None:
        while not self._stop.is_set():
            socks = dict(self._hub_socks)
            by_fd = {s.fileno(): name for name, s in socks.items()}
            ready, _, _ = select.select([*socks.values(), self._wake_r], [], [], 1.0)
            for s in ready:
                if s == self._wake_r:
                    os.read(self._wake_r, 64)
                    continue
                try:
                    frame = s.recv(FRAME_MAX)
                except OSError:
                    continue
                sender = by_fd[s.fileno()]
                # all guests attached by now, not only those of this select()
                for name, out in list(self._hub_socks.items()):
                    if name == sender:
                        continue
                    with contextlib.suppress(OSError):  # that guest is down: drop
                        out.sendto(frame, str(self._paths(name)[0]))

    def configure(self) -> None:
        """Give every running node its address and the others' names (idempotent)."""
        hosts = "".join(f"{n.address} {n.name}\n" for n in self.nodes.values())
        for node in self.nodes.values():
            if not node.machine.is_running:
                continue
            node.machine.succeed(
                f"dev=$(ip -o link | awk -F': ' '/{node.mac}/ {{print $2}}') && "
                f'test -n "$dev" && ip link set dev "$dev" up && '
                f'ip addr replace {node.address}/24 dev "$dev" && '
                f"hostname {node.name} && echo {node.name} > /etc/hostname && "
                f"sed -i '/ {SUBNET.replace('.', '[.]')}[.]/d; /^{SUBNET}[.]/d' /etc/hosts && "
                f"printf %s {shlex.quote(hosts)} >> /etc/hosts"
            )

    def close(self) -> None:
        """Stop the hub and remove its sockets."""
        self._stop.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=5)
        for name, s in self._hub_socks.items():
            s.close()
            for p in self._paths(name):
                p.unlink(missing_ok=True)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class BuilderLink:
    """What a client needs to name a builder in nix.conf's ``builders``."""

    host: str
    key: str  # the client's private key file
    host_key_b64: str  # the builder's public host key, base64 (machines field 8)

    def machine_line(
        self,
        scheme: str = "ssh-ng",
        user: str = "root",
        features: tuple[str, ...] = ("recnix", "recnix-readonly"),
        mandatory: tuple[str, ...] = (),
        jobs: int = 2,
    ) -> str:
        """One line of ``/etc/nix/machines`` (Nix's machine specification format)."""
        return " ".join(
            [
                f"{scheme}://{user}@{self.host}",
                "x86_64-linux",
                self.key,
                str(jobs),
                "1",
                ",".join(features) or "-",
                ",".join(mandatory) or "-",
                self.host_key_b64,
            ]
        )


def link_builder(client: Node, builder: Node, untrusted_user: bool = True) -> BuilderLink:
    """Let ``client``'s root log in to ``builder`` (root, and ``nixremote`` if asked).

    ``nixremote`` is an ordinary account: the builder's Nix does not trust it
    (Debian's nix.conf trusts root only), which is the "client not trusted"
    case of distributed builds.
    """
    c, b = client.machine, builder.machine
    with c.nested(f"linking {client.name} -> {builder.name} for distributed builds"):
        c.succeed(
            f"test -f {CLIENT_KEY} || "
            f"ssh-keygen -q -t ed25519 -N '' -C {client.name} -f {CLIENT_KEY}"
        )
        pub = c.succeed(f"cat {CLIENT_KEY}.pub").strip()
        host_key = b.succeed("cat /etc/ssh/ssh_host_ed25519_key.pub").split()
        b.succeed(
            f"grep -qxF {shlex.quote(pub)} /root/.ssh/authorized_keys || "
            f"echo {shlex.quote(pub)} >> /root/.ssh/authorized_keys"
        )
        if untrusted_user:
            home = f"/home/{UNTRUSTED_USER}"
            b.succeed(
                f"id {UNTRUSTED_USER} >/dev/null 2>&1 || useradd -m -s /bin/sh {UNTRUSTED_USER}; "
                # Debian lets only the daemon socket directory's group (nix-users) in.
                f"usermod -aG $(stat -c %G /nix/var/nix/daemon-socket) {UNTRUSTED_USER} && "
                f"install -d -m 700 -o {UNTRUSTED_USER} {home}/.ssh && "
                f"echo {shlex.quote(pub)} > {home}/.ssh/authorized_keys && "
                f"chown {UNTRUSTED_USER} {home}/.ssh/authorized_keys"
            )
        known = f"{builder.name} {host_key[0]} {host_key[1]}"
        ssh_config = (
            f"Host {builder.name}\n"
            f"  ServerAliveInterval {SSH_ALIVE_INTERVAL}\n"
            f"  ServerAliveCountMax {SSH_ALIVE_COUNT}\n"
            f"  ConnectTimeout 10\n"
            f"  IdentityFile {CLIENT_KEY}\n"
        )
        c.succeed(
            f"sed -i '/^{builder.name} /d' /root/.ssh/known_hosts 2>/dev/null; "
            f"echo {shlex.quote(known)} >> /root/.ssh/known_hosts && "
            f"touch /root/.ssh/config && "
            f"sed -i '/^Host {builder.name}$/,/^$/d' /root/.ssh/config && "
            f"printf '%s\\n' {shlex.quote(ssh_config)} >> /root/.ssh/config && "
            f"ssh -i {CLIENT_KEY} -o BatchMode=yes root@{builder.name} true"
        )
    import base64

    host_key_b64 = base64.b64encode(f"{host_key[0]} {host_key[1]}\n".encode()).decode()
    log(f"{client.name} can ssh to {builder.name} ({builder.address})")
    return BuilderLink(builder.name, CLIENT_KEY, host_key_b64)


def ignores_nix_conf_build_hook(nix_version: tuple[int, int]) -> bool:
    """Whether this Nix loses nix.conf's ``build-hook`` (2.25 to 2.33)."""
    return (2, 25) <= nix_version < (2, 34)


def set_daemon_ssh_shim(machine: Machine, on: bool) -> None:
    """Put recnix's ssh first on the nix-daemon's PATH (a systemd drop-in), or take it
    away; restart the daemon (socket-activated: the socket stays)."""
    if on:
        unit = f"[Service]\nEnvironment=PATH={GUEST_SSH_SHIM_DIR}:{SYSTEM_PATH}\n"
        change = (
            f"mkdir -p {SSH_SHIM_DROP_IN.rpartition('/')[0]} && "
            f"printf %s {shlex.quote(unit)} > {SSH_SHIM_DROP_IN}"
        )
    else:
        change = f"rm -f {SSH_SHIM_DROP_IN}"
    machine.succeed(f"{change} && systemctl daemon-reload && systemctl restart nix-daemon.service")
