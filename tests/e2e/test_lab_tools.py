"""The lab's own parsers, on real output saved from a lab run (no QEMU/crash needed).

data/hmp_info_registers_2cpu.txt: QEMU 7.2 ``info registers -a`` of the 2-vCPU guest;
data/crash_bt_a_qemu_core.txt: crash 8.0.6 ``bt -a`` on QEMU's dump of that same pause;
data/hmp_info_registers_2cpu_b.txt + crash_help_{r,n}_vm2core_core.txt: another pause, and crash 8.0.6
``help -r`` / ``help -n`` on vm2core's core of it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from scripts.lab import hmp_registers, initramfs, readers
from tests.e2e.helpers import GP_NAMES, SEGMENT_NAMES, hmp_registers_by_name

DATA = Path(__file__).with_name("data")


def test_hmp_registers_every_vcpu() -> None:
    vcpus = hmp_registers.parse_all((DATA / "hmp_info_registers_2cpu.txt").read_text())
    assert [v["index"] for v in vcpus] == [0, 1]
    assert vcpus[0]["regs"]["rip"] == 0xFFFFFFFFAA8592EB and vcpus[0]["regs"]["rflags"] == 0x246
    assert vcpus[1]["regs"]["rip"] == 0xFFFFFFFFAA1676EB and vcpus[1]["regs"]["rsp"] == 0xFFFFD30AC03EBB38
    assert vcpus[1]["regs"]["r8"] == 0 and vcpus[1]["regs"]["r9"] == 0xFFFF8D32811ED2F0
    assert vcpus[0]["regs"]["cr3"] == 0x2658000 and vcpus[0]["regs"]["efer"] == 0xD01
    assert vcpus[0]["idtr"] == {"base": 0xFFFFFE0000000000, "limit": 0xFFF}
    assert vcpus[0]["gdtr"] == {"base": 0xFFFFFE0000001000, "limit": 0x7F}
    assert vcpus[1]["segments"]["gs"]["base"] != vcpus[0]["segments"]["gs"]["base"]  # per-CPU area


@pytest.mark.parametrize(("qemu_flags", "vmx"), [
    (0x00AF9B00, 0xA09B),  # 64-bit kernel code, G=1 (the classic VMX value for a long-mode CS)
    (0x00A09B00, 0xA09B),
    (0x00CF9300, 0xC093),  # flat data, D/B=1, G=1
    (0x00008900, 0x0089),  # available 64-bit TSS
    (0x00008B00, 0x008B),  # busy 64-bit TSS
    (0x00008200, 0x0082),  # LDT
])
def test_segment_attributes_vmx_form(qemu_flags: int, vmx: int) -> None:
    assert hmp_registers.qemu_flags_to_vmx_attributes(qemu_flags) == vmx


def test_hmp_parse_rejects_truncated_output() -> None:
    text = (DATA / "hmp_info_registers_2cpu.txt").read_text()
    with pytest.raises(hmp_registers.RegisterParseError):
        hmp_registers.parse_all(text.replace("CR3=", "XX3="))
    with pytest.raises(hmp_registers.RegisterParseError):
        hmp_registers.parse_all(text.replace("TR =", "TX ="))


def test_normalise_bt() -> None:
    text = (DATA / "crash_bt_a_qemu_core.txt").read_text()
    blocks = readers.normalise_bt(text)
    assert sorted(blocks) == [0, 1]
    assert (blocks[0].pid, blocks[0].command) == (0, "swapper/0")
    assert blocks[0].frames[:3] == ["!native_safe_halt", "amd_e400_idle", "default_idle_call"]
    assert (blocks[1].pid, blocks[1].command) == (92, "dd")
    assert blocks[1].frames[0] == "!ksys_write" and blocks[1].frames[-1] == "entry_SYSCALL_64_after_hwframe"
    assert len(blocks[1].frames) == 14
    # Stack-slot addresses do not matter; function names do.
    moved = readers.normalise_bt(text.replace("[ffffffffab803e", "[ffffffffab903e"))
    assert moved[0].key() == blocks[0].key()
    renamed = readers.normalise_bt(text.replace("do_idle at", "do_idle2 at"))
    assert renamed[0].key() != blocks[0].key()


def test_bt_saved_registers_are_qemus() -> None:
    """On QEMU's own dump, the register frame crash starts each CPU from is QEMU's "info registers"."""
    vcpus = hmp_registers.parse_all((DATA / "hmp_info_registers_2cpu.txt").read_text())
    blocks = readers.normalise_bt((DATA / "crash_bt_a_qemu_core.txt").read_text())
    for vcpu in vcpus:
        shown = readers.bt_saved_registers(blocks[vcpu["index"]].text)
        want = hmp_registers_by_name(vcpu)
        assert set(shown) == {*GP_NAMES, "cs", "ss"}
        assert shown == {name: want[name] for name in shown}
    assert readers.bt_saved_registers("PID: 0  TASK: 0  CPU: 0  COMMAND: x\n #0 [0] f at 0") == {}


def test_help_r_and_help_n_of_a_vm2core_core_are_qemus() -> None:
    """Saved from one lab run: crash 8.0.6 ``help -r`` / ``help -n`` on vm2core's core of a pause, and QEMU's
    ``info registers -a`` of that same pause (hmp_info_registers_2cpu_b.txt)."""
    vcpus = hmp_registers.parse_all((DATA / "hmp_info_registers_2cpu_b.txt").read_text())
    shown = readers.parse_help_r((DATA / "crash_help_r_vm2core_core.txt").read_text())
    notes = readers.parse_prstatus_notes((DATA / "crash_help_n_vm2core_core.txt").read_text())
    assert sorted(shown) == [0, 1] and len(notes) == 2
    for vcpu, note in zip(vcpus, notes, strict=True):
        want = hmp_registers_by_name(vcpu)
        cpu = shown[vcpu["index"]]
        assert cpu["regs"] == {**{n: want[n] for n in (*GP_NAMES, "cr0", "cr2", "cr3", "cr4")}, "cr1": 0}
        assert {n: cpu["segments"][n]["selector"] for n in SEGMENT_NAMES} == {n: want[n] for n in SEGMENT_NAMES}
        assert cpu["segments"]["idtr"]["base"] == vcpu["idtr"]["base"]
        names = (*GP_NAMES, "cs", "ss", "ds", "es", "fs", "gs", "fs_base", "gs_base")
        assert note["pid"] == vcpu["index"] + 1
        assert {n: note["regs"][n] for n in names} == {n: want[n] for n in names}


def test_help_r_and_prstatus_parsers() -> None:
    help_r = (
        "CPU 0:\n"
        "  RAX: 0000000000000001  RBX: 0000000000000002  RCX: 0000000000000003\n"
        "  RDX: 0000000000000004  RSI: 0000000000000005  RDI:0000000000000006\n"
        "  RSP: 0000000000000007  RBP: 0000000000000008   R8: 0000000000000009\n"
        "  R15: 0000000000000010  RIP: ffffffff81000000  RFLAGS: 00000246\n"
        "   CS: selector: 0010  limit: ffffffff  flags: 00af9b00\n"
        "       pad: 00000000   base: 0000000000000000\n"
        "  LDT: selector: 0000  limit: 00000000  flags: 00008200\n"
        "       pad: 00000000   base: 00000000000000ab\n"
        "  IDT: selector: 0000  limit: 00000fff  flags: 00000000\n"
        "       pad: 00000000   base: fffffe0000000000\n"
        "  CR0: 0000000080050033  CR1: 0000000000000000  CR2: 0000000000000000\n"
        "  CR3: 0000000002658000  CR4: 00000000000006f0\n\n"
        "CPU 1:\n  RAX: 00000000000000ff\n")
    cpus = readers.parse_help_r(help_r)
    assert sorted(cpus) == [0, 1]
    assert cpus[0]["regs"]["rdi"] == 6 and cpus[0]["regs"]["rflags"] == 0x246 and cpus[0]["regs"]["cr3"] == 0x2658000
    assert cpus[0]["segments"]["cs"] == {"selector": 0x10, "limit": 0xFFFFFFFF, "flags": 0xAF9B00, "pad": 0,
                                         "base": 0}
    assert cpus[0]["segments"]["ldtr"]["base"] == 0xAB and cpus[0]["segments"]["idtr"]["limit"] == 0xFFF
    assert "selector" not in cpus[0]["regs"] and cpus[1]["regs"] == {"rax": 0xFF}
    help_n = (
        "Elf64_Nhdr:\n               n_namesz: 5 (\"CORE\")\n               n_descsz: 336\n"
        "                 n_type: 1 (NT_PRSTATUS)\n"
        "                         pid: 2  ppid: 0  pgrp: 0  sid:0\n"
        "                         ORIG_RAX: 0  fpvalid: 0\n"
        "                              R15: 0000000000000001  R14: 0000000000000002\n"
        "                           RFLAGS: 0000000000000246  RSP: ffffc90000003e38\n"
        "                          FS_BASE: 0000000000000000\n"
        "                               CS: 0010  SS: 0018  DS: 0000\n"
        "                         0000000000000000 0000000000000000\n"
        "Elf64_Nhdr:\n               n_namesz: 5 (\"QEMU\")\n                 n_type: 0 (QEMU)\n"
        "                         RAX: 0000000000000009\n")
    notes = readers.parse_prstatus_notes(help_n)
    assert len(notes) == 1 and notes[0]["pid"] == 2
    assert notes[0]["regs"] == {"orig_rax": 0, "r15": 1, "r14": 2, "rflags": 0x246, "rsp": 0xFFFFC90000003E38,
                                "fs_base": 0, "cs": 0x10, "ss": 0x18, "ds": 0}


@pytest.mark.skipif(not initramfs.BUSYBOX.is_file() or shutil.which("cpio") is None,
                    reason="needs busybox-static and cpio (scripts/lab/setup.sh)")
def test_initramfs_archive(tmp_path: Path) -> None:
    archive = initramfs.build(tmp_path / "initramfs.cpio", "marker-123")
    listing = subprocess.run(["cpio", "-itv"], stdin=archive.open("rb"), capture_output=True, text=True,
                             check=True).stdout
    names = {line.split()[-1] for line in listing.splitlines() if line.strip()}
    assert {"init", "bin/busybox", "dev/console", "proc", "sys"} <= names
    console = next(line for line in listing.splitlines() if line.endswith("dev/console"))
    assert console.startswith("c") and "5,   1" in console
    extract = tmp_path / "x"
    extract.mkdir()
    subprocess.run(["cpio", "-id", "--no-absolute-filenames", "init"], stdin=archive.open("rb"), cwd=extract,
                   capture_output=True, check=True)
    init = (extract / "init").read_text()
    assert 'echo "marker-123" > /dev/kmsg' in init
    assert (extract / "init").stat().st_mode & 0o111
