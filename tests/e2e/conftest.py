"""Session fixtures for the real-kernel tests: one QEMU capture, crash/drgn runs on QEMU's own core.

Everything here is expensive (a guest boot, several 600 MB vmlinux loads), so each result is computed once per
session and shared. Without the lab (scripts/lab/setup.sh) every e2e test is skipped with the reason.

``VM2CORE_LAB_CAPTURE=DIR`` reuses an existing capture directory (from ``python -m scripts.lab.capture DIR``)
instead of booting a fresh guest; handy while debugging, never needed in CI.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from scripts.lab import capture, config, readers
from scripts.lab.vmcoreinfo_scan import find_vmcoreinfo
from tests.e2e.helpers import BASELINE_CRASH_COMMANDS, Capture


def _unavailable(reason: str) -> None:
    """Skip, unless the run demands the lab (scripts/test sets VM2CORE_REQUIRE_LAB=1): then fail."""
    if os.environ.get("VM2CORE_REQUIRE_LAB"):
        pytest.fail(f"the real-kernel lab is required but unavailable: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def lab() -> config.LabConfig:
    if not sys.platform.startswith("linux"):
        _unavailable("the real-kernel lab is Linux-only")
    if shutil.which("qemu-system-x86_64") is None:
        _unavailable("qemu-system-x86_64 not installed: run scripts/lab/setup.sh as root")
    try:
        return config.load()
    except config.LabNotReady as exc:
        _unavailable(f"real-kernel lab not set up: {exc}")
        raise


@pytest.fixture(scope="session")
def guest(lab: config.LabConfig, tmp_path_factory: pytest.TempPathFactory) -> Capture:
    reuse = os.environ.get("VM2CORE_LAB_CAPTURE")
    if reuse:
        directory = Path(reuse)
        description = capture.read_description(directory)
        if description["kernel_release"] != lab.kernel_release:
            pytest.fail(f"{directory} holds a {description['kernel_release']} capture, "
                        f"the lab is {lab.kernel_release}")
    else:
        directory = tmp_path_factory.mktemp("capture")
        description = capture.capture(directory, cfg=lab)
    return Capture(directory, description)


@pytest.fixture(scope="session")
def qemu_crash(lab: config.LabConfig, guest: Capture) -> dict[str, str]:
    """crash's view of QEMU's own dump (the reference), one output per command."""
    outputs = readers.run_crash_each(guest.qemu_core, BASELINE_CRASH_COMMANDS, lab)
    return dict(zip(BASELINE_CRASH_COMMANDS, outputs, strict=True))


@pytest.fixture(scope="session")
def qemu_drgn(lab: config.LabConfig, guest: Capture) -> dict[str, Any]:
    """drgn's view of QEMU's own dump. That dump has no VMCOREINFO note (the guest never handed it to QEMU),
    so the note is taken from the guest's RAM image by an independent scan."""
    vmcoreinfo = find_vmcoreinfo(guest.ram, guest.release)
    return readers.run_drgn_checks(guest.qemu_core, guest.marker, vmcoreinfo, lab)
