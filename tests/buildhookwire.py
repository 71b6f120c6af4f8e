"""What Nix sends its build hook (HookInstance, tryBuildHook; Nix 2.8 to 2.34), encoded
for tests and benchmarks that stand in for the nix-daemon."""

from __future__ import annotations


def wire_str(text: str) -> bytes:
    """A Nix wire string: 64-bit length, bytes, padding to 8."""
    data = text.encode()
    return len(data).to_bytes(8, "little") + data + b"\0" * (-len(data) % 8)


def wire_int(n: int) -> bytes:
    """A Nix wire integer (64-bit little-endian)."""
    return n.to_bytes(8, "little")


def settings(**values: str) -> bytes:
    """The settings Nix sends first: (1, name, value)... 0."""
    out = b"".join(wire_int(1) + wire_str(k) + wire_str(v) for k, v in values.items())
    return out + wire_int(0)


def try_request(drv: str, features: list[str], local_now: bool = True) -> bytes:
    """One "try": am-willing, system, drv path, required features."""
    out = wire_str("try") + wire_int(int(local_now)) + wire_str("x86_64-linux") + wire_str(drv)
    return out + wire_int(len(features)) + b"".join(wire_str(f) for f in features)
