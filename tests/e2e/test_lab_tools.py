"""The lab's own parsers, on real output saved from a lab run (no QEMU/crash needed).

data/hmp_info_registers_2cpu.txt: QEMU 7.2 ``info registers -a`` of the 2-vCPU guest;
data/crash_bt_a_qemu_core.txt: crash 8.0.6 ``bt -a`` on QEMU's dump of that same pause.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from scripts.lab import hmp_registers, initramfs, readers

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
