"""The lab itself works: crash and drgn read QEMU's own dump of the captured guest.

If these fail, failures in test_real_kernel.py say nothing about vm2core.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from scripts.lab import readers
from tests.e2e.helpers import Capture, kernel_mode, parse_ps, shows_saved_registers

pytestmark = pytest.mark.e2e


def test_capture_has_every_vcpu_and_all_ram(guest: Capture) -> None:
    description = guest.description
    assert [v["index"] for v in guest.vcpus] == list(range(len(guest.vcpus))) and guest.vcpus
    assert guest.ram.stat().st_size == description["ram_size"]
    for vcpu in guest.vcpus:
        assert vcpu["regs"]["cr3"] != 0 and vcpu["idtr"]["base"] != 0
        assert vcpu["regs"]["efer"] & 0x400, "guest must be in long mode (EFER.LMA)"


def test_crash_sys_shows_release(qemu_crash: dict[str, str], guest: Capture) -> None:
    assert f"RELEASE: {guest.release}" in qemu_crash["sys"]
    assert f"CPUS: {len(guest.vcpus)}" in qemu_crash["sys"]


def test_crash_log_shows_marker(qemu_crash: dict[str, str], guest: Capture) -> None:
    assert guest.marker in qemu_crash["log"]


def test_crash_ps_lists_the_guest_processes(qemu_crash: dict[str, str], qemu_drgn: dict[str, Any]) -> None:
    rows = parse_ps(qemu_crash["ps"])
    comms = Counter(row["comm"] for row in rows)
    assert comms["dd"] == 1
    assert comms["sleep"] >= 2          # "sleep 1000" and the init loop's "sleep 3600" (plus the 1 s loop's)
    assert any(row["pid"] == 1 and row["comm"] == "init" for row in rows)
    # Two independent readers agree on the task set (crash also lists each CPU's idle task as pid 0).
    crash_tasks = sorted((row["pid"], row["comm"].strip("[]")) for row in rows if row["pid"] != 0)
    drgn_tasks = sorted((task["pid"], task["comm"]) for task in qemu_drgn["tasks"] if task["pid"] != 0)
    assert crash_tasks == drgn_tasks


def test_crash_bt_all_starts_at_each_saved_rip(qemu_crash: dict[str, str], guest: Capture) -> None:
    blocks = readers.normalise_bt(qemu_crash["bt -a"])
    assert sorted(blocks) == [v["index"] for v in guest.vcpus], qemu_crash["bt -a"]
    for vcpu in guest.vcpus:
        block = blocks[vcpu["index"]]
        assert block.frames, block.text
    # crash 8.0.6 takes a vCPU's saved RIP/RSP only when its symbol search of the stacks finds no
    # better start (x86_64_get_dumpfile_stack_frame); a vCPU paused on an entry path, e.g. in a
    # syscall, can start from a stack-scan frame instead.  The idle vCPUs always show theirs.
    kernel = [v for v in guest.vcpus if kernel_mode(v)]
    if kernel:
        assert any(shows_saved_registers(blocks[v["index"]].text, v) for v in kernel), qemu_crash["bt -a"]


def test_drgn_reads_release_tasks_and_log(qemu_drgn: dict[str, Any], guest: Capture) -> None:
    assert qemu_drgn["release"] == guest.release
    comms = Counter(task["comm"] for task in qemu_drgn["tasks"])
    assert comms["dd"] == 1 and comms["sleep"] >= 2 and comms["init"] >= 1
    assert qemu_drgn["marker_found"], qemu_drgn["log_tail"]


def test_drgn_stack_trace_per_cpu(qemu_drgn: dict[str, Any], guest: Capture) -> None:
    assert sorted(int(cpu) for cpu in qemu_drgn["cpus"]) == [v["index"] for v in guest.vcpus]
    for vcpu in guest.vcpus:
        entry = qemu_drgn["cpus"][str(vcpu["index"])]
        assert "error" not in entry, entry
        assert entry["frames"], entry
        if kernel_mode(vcpu):
            assert entry["frames"][0]["pc"] == vcpu["regs"]["rip"], entry
