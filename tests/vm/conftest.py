"""VM tier fixtures: a cached Debian guest image and fresh guests booted from overlays.

Every test under tests/vm is marked ``vm``. Missing prerequisites (QEMU,
mmdebstrap, root, ...) make the tests FAIL with a message, never skip.

- ``vm_suite`` (module): the guest's Debian suite, bookworm unless a module
  parametrizes it (``pytest.mark.parametrize("vm_suite", [...], indirect=True,
  scope="module")``).
- ``vm_image`` (module): builds or reuses the cached image of that suite
  (``recnix-vm build-image --suite``).
- ``machine_factory`` (function) / ``module_machine_factory`` (module): call
  ``factory(name="machine", **Machine kwargs)`` to boot a guest from a fresh
  qcow2 overlay; it is always torn down. On failure the console log is kept
  (its path is printed); on success the state directory is removed.

Environment: ``RECNIX_VM_CACHE`` (image cache), ``RECNIX_VM_ACCEL``
(auto/tcg/kvm), ``RECNIX_VM_GLOBAL_TIMEOUT`` (seconds per guest, default 1800).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from recnix_vm.image import DEFAULT_SUITE, Image, build_image
from recnix_vm.machine import Machine

GLOBAL_TIMEOUT = float(os.environ.get("RECNIX_VM_GLOBAL_TIMEOUT", "1800"))
REQUIRED_TOOLS = ("qemu-system-x86_64", "qemu-img", "mmdebstrap", "mkfs.ext4", "ssh-keygen", "tar")

_FAILED_KEY = pytest.StashKey[set[str]]()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.vm)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        failed = item.config.stash.setdefault(_FAILED_KEY, set())
        failed.add(item.nodeid)
        failed.add(item.module.__name__ if item.module else "")  # type: ignore[attr-defined]


def _check_prerequisites() -> None:
    problems = [f"{tool} not found" for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if os.geteuid() != 0:
        problems.append("not root (mmdebstrap and the image cache need root)")
    if problems:
        pytest.fail(
            "vm tier prerequisites missing: " + "; ".join(problems) + " — run ./setup.sh as root",
            pytrace=False,
        )


_IMAGES: dict[str, Image] = {}


@pytest.fixture(scope="module")
def vm_suite(request: pytest.FixtureRequest) -> str:
    """The guest's suite: bookworm, or the module's parameter."""
    return getattr(request, "param", DEFAULT_SUITE)


@pytest.fixture(scope="module")
def vm_image(vm_suite: str) -> Image:
    """The cached guest image of ``vm_suite`` (built on first use: ~2 min base + seconds
    for the image; once per session and suite)."""
    if vm_suite not in _IMAGES:
        _check_prerequisites()
        _IMAGES[vm_suite] = build_image(suite=vm_suite)
    return _IMAGES[vm_suite]


class MachineFactory:
    """Boots guests from fresh overlays under ``root`` and tears them all down."""

    def __init__(self, image: Image, root: Path) -> None:
        self.image, self.root = image, root
        self.machines: list[Machine] = []

    def __call__(self, name: str = "machine", start: bool = True, **kwargs: Any) -> Machine:
        state = self.root / name
        if state.exists():
            shutil.rmtree(state)
        kwargs.setdefault("global_timeout", GLOBAL_TIMEOUT)
        machine = Machine(self.image, state, name, **kwargs)
        self.machines.append(machine)
        if start:
            machine.start()
        return machine

    def teardown(self, failed: bool) -> None:
        for machine in self.machines:
            try:
                if machine.is_running:
                    machine.shutdown(timeout=30)
            finally:
                machine.close()
                if failed:
                    machine.overlay.unlink(missing_ok=True)
                    print(f"\n{machine.name}: console log kept at {machine.console_log}")
                else:
                    shutil.rmtree(machine.state_dir, ignore_errors=True)


def _failed(request: pytest.FixtureRequest, key: str) -> bool:
    return key in request.config.stash.get(_FAILED_KEY, set())


@pytest.fixture
def machine_factory(
    vm_image: Image, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[MachineFactory]:
    """A factory for guests that live as long as one test."""
    factory = MachineFactory(vm_image, tmp_path)
    yield factory
    factory.teardown(_failed(request, request.node.nodeid))


@pytest.fixture(scope="module")
def module_machine_factory(
    vm_image: Image, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[MachineFactory]:
    """A factory for guests shared by the tests of one module."""
    factory = MachineFactory(vm_image, tmp_path_factory.mktemp(request.module.__name__))
    yield factory
    factory.teardown(_failed(request, request.module.__name__))


@pytest.fixture(scope="session")
def recnix_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """recnix's wheel built from this checkout, for guests that install it as users do."""
    from tests.wheel import build_wheel

    return build_wheel(tmp_path_factory.mktemp("wheel"))
