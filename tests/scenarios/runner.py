"""Run the scenario .nix files on some machine through an `exec` callable.

Transport-agnostic: the host tier passes a function running a local command
against its test nix-daemon, the VM tier one running it over SSH. Nothing in
here depends on pytest.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass

# (argv, timeout in seconds) -> (exit status, stdout, stderr)
Exec = Callable[[list[str], float], tuple[int, str, str]]

SCENARIOS = (
    "inner",
    "add",
    "deep",
    "fod",
    "failure",
    "gc",
    "many",
    "readonly",
    "denied",
)


class ScenarioCommandError(RuntimeError):
    """A command the runner needed to succeed did not."""


@dataclass(frozen=True)
class BuildOutcome:
    """What one ``nix-build`` of a scenario gave."""

    rc: int
    out_path: str | None  # the output path when rc == 0
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.rc == 0 and self.out_path is not None

    def describe(self) -> str:
        return f"exit status {self.rc}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


def nix_arg(name: str, value: str | int | bool) -> list[str]:
    """``--argstr``/``--arg`` for one scenario argument."""
    if isinstance(value, bool):
        return ["--arg", name, "true" if value else "false"]
    if isinstance(value, int):
        return ["--arg", name, str(value)]
    if isinstance(value, str):
        return ["--argstr", name, value]
    raise TypeError(f"scenario argument {name} has unsupported type {type(value).__name__}")


class ScenarioRunner:
    """Builds scenarios and inspects store paths on one machine.

    ``scenario_dir`` is this directory as seen by that machine; ``busybox`` and
    ``nix`` are store paths there; ``nix_bin`` is a directory prefix for the
    nix commands ("" = look them up in PATH).
    """

    def __init__(
        self,
        exec: Exec,
        scenario_dir: str,
        busybox: str,
        nix: str,
        nix_bin: str = "",
        timeout: float = 600.0,
    ) -> None:
        self.exec = exec
        self.scenario_dir = scenario_dir.rstrip("/")
        self.busybox = busybox
        self.nix = nix
        self.nix_bin = nix_bin.rstrip("/") + "/" if nix_bin else ""
        self.timeout = timeout

    def command(self, name: str) -> str:
        return self.nix_bin + name

    def build_argv(
        self,
        scenario: str,
        feature: str,
        tag: str,
        extra_args: Mapping[str, str | int | bool] | None = None,
    ) -> list[str]:
        """The nix-build command line for a scenario."""
        argv = [
            self.command("nix-build"),
            f"{self.scenario_dir}/{scenario}.nix",
            "--no-out-link",
        ]
        args: dict[str, str | int | bool] = {
            "feature": feature,
            "busybox": self.busybox,
            "nix": self.nix,
            "tag": tag,
        }
        args.update(extra_args or {})
        for name, value in args.items():
            argv += nix_arg(name, value)
        return argv

    def build(
        self,
        scenario: str,
        feature: str,
        tag: str,
        extra_args: Mapping[str, str | int | bool] | None = None,
        timeout: float | None = None,
    ) -> BuildOutcome:
        """``nix-build`` a scenario; never raises for a failed build."""
        argv = self.build_argv(scenario, feature, tag, extra_args)
        return self.outcome(*self.exec(argv, timeout or self.timeout))

    @staticmethod
    def outcome(rc: int, stdout: str, stderr: str) -> BuildOutcome:
        """The outcome of a ``nix-build`` that exited with ``rc`` and printed these."""
        lines = stdout.split()
        out_path = lines[-1] if rc == 0 and lines and lines[-1].startswith("/") else None
        return BuildOutcome(rc, out_path, stdout, stderr)

    def _checked(self, argv: list[str]) -> str:
        rc, stdout, stderr = self.exec(argv, self.timeout)
        if rc != 0:
            raise ScenarioCommandError(
                f"{shlex.join(argv)} exited with {rc}\nstdout:\n{stdout}\nstderr:\n{stderr}"
            )
        return stdout

    def closure(self, path: str) -> set[str]:
        """``nix-store -qR``: the path and everything it references, transitively."""
        return set(self._checked([self.command("nix-store"), "-qR", path]).split())

    def references(self, path: str) -> set[str]:
        """``nix-store -q --references``: the path's direct references."""
        return set(self._checked([self.command("nix-store"), "-q", "--references", path]).split())

    def verify_path(self, path: str) -> bool:
        """``nix-store --verify-path``: the contents still match the recorded hash."""
        rc, _, _ = self.exec([self.command("nix-store"), "--verify-path", path], self.timeout)
        return rc == 0

    def is_valid(self, path: str) -> bool:
        """``nix-store --check-validity``."""
        rc, _, _ = self.exec([self.command("nix-store"), "--check-validity", path], self.timeout)
        return rc == 0

    def read(self, path: str) -> str:
        """A file's text."""
        return self._checked(["cat", path])

    def readlink(self, path: str) -> str:
        """A symlink's target."""
        return self._checked(["readlink", path]).strip()

    def exists(self, path: str) -> bool:
        rc, _, _ = self.exec(["test", "-e", path], self.timeout)
        return rc == 0

    def check_results(self, out_path: str) -> dict[str, int]:
        """The ``<check>.rc`` files left by the readonly and denied scenarios."""
        listing = self._checked(["ls", out_path]).split()
        return {
            name[: -len(".rc")]: int(self.read(f"{out_path}/{name}").strip())
            for name in listing
            if name.endswith(".rc")
        }
