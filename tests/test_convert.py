"""End-to-end conversion of synthetic guests, checked against ground truth and with pyelftools."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from tests.fixtures.synthetic_guest import IMAGE_SIZE, KERNEL_MAP_BASE, SyntheticGuest, build_guest
from tests.test_reader import make_vp, two_ranges
from tests.vmrs_writer import WriterOptions, write_vmrs
from vm2core.core import elf
from vm2core.core.convert import convert
from vm2core.core.layout import LoadRange, plan_core
from vm2core.reader.cpu import VpState
from vm2core.reader.savedstate import SavedState
from vm2core.sinks.base import Sink

PAGE = 4096
MIB = 1 << 20
USER_REGS = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx", "rsi",
             "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs")


class MemorySink(Sink):
    """An in-memory sink; ``seekable`` (and ``positional``, for kdump) chosen by the test to exercise
    every conversion path."""

    def __init__(self, seekable: bool, positional: bool = False) -> None:
        super().__init__()
        self.seekable = seekable
        self.positional = positional
        self.buf = io.BytesIO()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.buf.seek(self.position)
        self.buf.write(data)
        self.position += len(data)

    def patch(self, offset: int, data: bytes) -> None:
        assert self.seekable
        self.buf.seek(offset)
        self.buf.write(data)

    def write_at(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        assert self.positional and offset + len(data) <= self.position
        self.buf.seek(offset)
        self.buf.write(data)

    def commit(self) -> None:
        pass

    def abort(self) -> None:
        pass


@pytest.fixture(scope="module")
def guest() -> SyntheticGuest:
    return build_guest(ranges=[(0, 128 * MIB), (0x1_0000_0000, 8 * MIB + 5 * PAGE)])


@pytest.fixture(scope="module")
def guest_vmrs(guest: SyntheticGuest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("guest") / "guest with spaces.vmrs"
    write_vmrs(path, guest.range_specs(), guest.vps, WriterOptions(policy="mixed", seed=7))
    return path


def notes_of(core: bytes) -> list[tuple[str, int, bytes]]:
    f = ELFFile(io.BytesIO(core))
    seg = f.get_segment(0)
    assert seg["p_type"] == "PT_NOTE"
    data = core[seg["p_offset"]:seg["p_offset"] + seg["p_filesz"]]
    out, pos = [], 0
    while pos < len(data):
        namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
        name = data[pos + 12:pos + 12 + namesz].rstrip(b"\0").decode()
        dpos = pos + 12 + (namesz + 3) // 4 * 4
        out.append((name, ntype, data[dpos:dpos + descsz]))
        pos = dpos + (descsz + 3) // 4 * 4
    assert pos == len(data), "PT_NOTE p_filesz is not the exact padded size of its notes"
    return out


def check_core(core: bytes, guest: SyntheticGuest, *, with_vmcoreinfo: bool = True) -> None:
    f = ELFFile(io.BytesIO(core))
    h = f.header
    assert (h["e_type"], h["e_machine"], h["e_phoff"], h["e_phentsize"], h["e_ehsize"]) == \
        ("ET_CORE", "EM_X86_64", 64, 56, 64)
    segs = list(f.iter_segments())
    assert segs[0]["p_type"] == "PT_NOTE" and segs[0]["p_align"] == 0
    assert all(s["p_type"] == "PT_LOAD" for s in segs[1:])
    # kdump-style (/proc/vmcore): first the kernel image at its runtime address, then RAM in the direct map.
    image = [s for s in segs[1:] if s["p_vaddr"] >= KERNEL_MAP_BASE]
    loads = segs[1 + len(image):]
    first_data = min(s["p_offset"] for s in loads)
    assert segs[0]["p_offset"] + segs[0]["p_filesz"] <= first_data
    assert [(s["p_paddr"], s["p_memsz"]) for s in loads] == list(guest.ram.ranges)
    if with_vmcoreinfo:
        assert [(s["p_vaddr"], s["p_paddr"], s["p_memsz"], s["p_align"]) for s in image] == \
            [(guest.truth.text_va, guest.truth.text_pa, IMAGE_SIZE, 0)]
        assert image[0].data() == guest.ram.read(guest.truth.text_pa, IMAGE_SIZE)
    else:
        assert image == []
    for s in loads:
        vaddr = guest.truth.page_offset + s["p_paddr"] if with_vmcoreinfo else s["p_paddr"]
        assert s["p_vaddr"] == vaddr and s["p_align"] == 0 and s["p_filesz"] == s["p_memsz"]
        assert s["p_offset"] % PAGE == s["p_paddr"] % PAGE
        assert s.data() == guest.ram.read(s["p_paddr"], s["p_memsz"]), f"PT_LOAD at {s['p_paddr']:#x} differs"
    assert len(core) == max(s["p_offset"] + s["p_filesz"] for s in loads)

    notes = notes_of(core)
    n = len(guest.vps)
    prstatus = [d for name, t, d in notes if name == "CORE" and t == 1]
    qemu = [d for name, t, d in notes if name == "QEMU" and t == 0]
    assert len(prstatus) == n and len(qemu) == n
    assert [name for name, _, _ in notes[:2 * n]] == ["CORE"] * n + ["QEMU"] * n
    for cpu, (vp, pr, q) in enumerate(zip(guest.vps, prstatus, qemu, strict=True)):
        check_prstatus(pr, vp, cpu)
        check_qemu(q, vp)
    vmcoreinfo = [(t, d) for name, t, d in notes if name == "VMCOREINFO"]
    if with_vmcoreinfo:
        assert len(vmcoreinfo) == 1
        raw = [n for n in _raw_notes(core) if n[12:22] == b"VMCOREINFO"]
        assert raw == [guest.truth.note], "VMCOREINFO note is not the guest's own, byte for byte"
        assert b"CRASHTIME" not in vmcoreinfo[0][1]
    else:
        assert not vmcoreinfo


def _raw_notes(core: bytes) -> list[bytes]:
    f = ELFFile(io.BytesIO(core))
    seg = f.get_segment(0)
    data = core[seg["p_offset"]:seg["p_offset"] + seg["p_filesz"]]
    out, pos = [], 0
    while pos < len(data):
        namesz, descsz, _ = struct.unpack_from("<III", data, pos)
        end = pos + 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
        out.append(data[pos:end])
        pos = end
    return out


def check_prstatus(desc: bytes, vp: VpState, cpu: int) -> None:
    assert len(desc) == 336
    assert struct.unpack_from("<I", desc, 32)[0] == cpu + 1
    regs = dict(zip(USER_REGS, struct.unpack_from("<27Q", desc, 112), strict=True))
    for name in ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx",
                 "rsi", "rdi", "rip", "rsp"):
        assert regs[name] == vp.gp.get(name, 0), name
    assert regs["eflags"] == vp.gp["rflags"]
    for seg in ("cs", "ss", "ds", "es", "fs", "gs"):
        assert regs[seg] == vp.segment(seg).selector, seg
    assert regs["fs_base"] == vp.segment("fs").base and regs["gs_base"] == vp.segment("gs").base
    assert regs["orig_rax"] == 0


def check_qemu(desc: bytes, vp: VpState) -> None:
    assert len(desc) == 432
    assert struct.unpack_from("<II", desc, 0) == (1, 432)
    gp = struct.unpack_from("<18Q", desc, 8)
    order = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13",
             "r14", "r15", "rip", "rflags")
    assert gp == tuple(vp.gp.get(n, 0) for n in order)
    # QEMUCPUSegment slots (elf-vmcore.md 2.4): cs ds es fs gs ss ldt tr, then gdt and idt, 24 bytes each.
    for i, name in enumerate(("cs", "ds", "es", "fs", "gs", "ss", "ldtr", "tr")):
        sel, limit, flags, _, base = struct.unpack_from("<IIIIQ", desc, 152 + 24 * i)
        seg = vp.segment(name)
        assert (sel, limit, base) == (seg.selector, seg.limit, seg.base), name
        # QEMU keeps descriptor bits 8..23 of the high dword; Hyper-V's attribute word packs bits 8..15, 20..23.
        assert ((flags >> 8) & 0xFF) | ((flags >> 8) & 0xF000) == seg.attributes, name
    assert struct.unpack_from("<IIIIQ", desc, 344) == (0, vp.gdtr.limit, 0, 0, vp.gdtr.base)
    assert struct.unpack_from("<IIIIQ", desc, 368) == (0, vp.idtr.limit, 0, 0, vp.idtr.base)
    assert struct.unpack_from("<5Q", desc, 392) == (vp.reg("cr0"), 0, vp.reg("cr2"), vp.reg("cr3"), vp.reg("cr4"))


@pytest.mark.parametrize("seekable", [True, False], ids=["file", "pipe"])
def test_convert_synthetic_guest(guest: SyntheticGuest, guest_vmrs: Path, seekable: bool) -> None:
    sink = MemorySink(seekable)
    with SavedState.open(guest_vmrs) as state:
        result = convert(state, sink)
    core = sink.buf.getvalue()
    check_core(core, guest)
    k = result.selection.kernel
    assert k is not None
    assert (k.osrelease, k.kernel_offset, k.phys_base, k.note) == \
        (guest.truth.osrelease, guest.truth.kernel_offset, guest.truth.phys_base, guest.truth.note)
    # Both paths choose by one rule: the page-aligned live note, not the identical heap copy below it.
    assert k.note_gpa == guest.truth.note_gpa
    if not seekable:
        # The pipe pre-scan may stop once the aligned note that passed every check has been seen.
        assert guest.truth.note_gpa < result.prescan_bytes <= sum(s for _, s in guest.ram.ranges)


def test_cli_file_and_stdout_are_identical(guest: SyntheticGuest, guest_vmrs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out dir" / "guest.core"
    out.parent.mkdir()
    r = subprocess.run([sys.executable, "-m", "vm2core", str(guest_vmrs), str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "6.1.0-13-amd64" in r.stderr
    core = out.read_bytes()
    check_core(core, guest)
    assert [p.name for p in out.parent.iterdir()] == ["guest.core"], "temporary file left behind"
    piped = subprocess.run([sys.executable, "-m", "vm2core", str(guest_vmrs), "-"], capture_output=True)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == core


def test_no_vmcoreinfo_still_converts(tmp_path: Path) -> None:
    g = build_guest(ram_size=128 * MIB, live_note=False, decoys=frozenset({"stale", "crashtime"}))
    path = tmp_path / "nonote.vmrs"
    write_vmrs(path, g.range_specs(), g.vps, WriterOptions(policy="records", xpress_fraction=0.1))
    sink = MemorySink(True)
    warnings: list[str] = []
    with SavedState.open(path) as state:
        result = convert(state, sink, warn=warnings.append)
    assert result.selection.kernel is None
    assert warnings and "VMCOREINFO" in warnings[0]
    check_core(sink.buf.getvalue(), g, with_vmcoreinfo=False)


def test_info_json(guest: SyntheticGuest, guest_vmrs: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "vm2core", "info", "--json", str(guest_vmrs)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["vp_count"] == len(guest.vps) and info["architecture"] == "x86_64"
    assert [(m["gpa_start"], m["gpa_end"] - m["gpa_start"]) for m in info["memory_ranges"]] == list(guest.ram.ranges)
    assert info["total_ram"] == sum(s for _, s in guest.ram.ranges)
    assert info["vps"][0]["cr3"] == guest.vps[0].reg("cr3")
    assert info["vps"][1]["rip"] == guest.vps[1].reg("rip")
    k = info["guest_kernel"]
    assert (k["osrelease"], k["kernel_offset"], k["phys_base"]) == \
        (guest.truth.osrelease, guest.truth.kernel_offset, guest.truth.phys_base)
    zero = sum(1 for gpa, size in guest.ram.ranges for p in range(0, size, PAGE)
               if guest.ram.read(gpa + p, PAGE) == bytes(PAGE))
    # Every all-zero page is a pattern-0 fill (or a missing block) in the writer's encoding, except
    # in raw blocks, which the statistics cannot see into without reading them.
    assert 0 < info["zero_pages"] <= zero
    text = subprocess.run([sys.executable, "-m", "vm2core", "info", str(guest_vmrs)], capture_output=True, text=True)
    assert text.returncode == 0 and "Linux 6.1.0-13-amd64" in text.stdout


def test_many_vps_and_vtls(tmp_path: Path) -> None:
    specs, truth = two_ranges()
    vps = [make_vp(i, vtl) for i in range(4) for vtl in (0, 1)]
    path = tmp_path / "vtl.vmrs"
    write_vmrs(path, specs, vps, WriterOptions(policy="mixed"))
    sink = MemorySink(False)
    with SavedState.open(path) as state:
        convert(state, sink)
    notes = notes_of(sink.buf.getvalue())
    prstatus = [d for name, t, d in notes if t == 1]
    vtl0 = [v for v in vps if v.vtl == 0]
    assert len(prstatus) == 4
    for cpu, (d, vp) in enumerate(zip(prstatus, vtl0, strict=True)):
        check_prstatus(d, vp, cpu)


def test_layout_switches_to_pn_xnum() -> None:
    loads = [LoadRange(i * 2 * PAGE, PAGE, PAGE) for i in range(70000)]
    layout = plan_core(loads, [make_vp(0)], vmcoreinfo_note=None, reserve_vmcoreinfo=True)
    header = layout.header()
    e = elf.EHDR.unpack_from(header)
    assert e[10] == elf.PN_XNUM                     # e_phnum
    shoff, shentsize, shnum = e[6], e[11], e[12]
    assert shoff == 64 + 70001 * 56 and shentsize == 64 and shnum == 1
    assert elf.SHDR.unpack_from(header, shoff)[7] == 70001    # sh_info = total phdrs
    f = ELFFile(io.BytesIO(header + bytes(layout.total_size - len(header))))
    assert f.num_segments() == 70001
    small = plan_core(loads[:100], [make_vp(0)], vmcoreinfo_note=None, reserve_vmcoreinfo=True)
    assert elf.EHDR.unpack_from(small.header())[10] == 101


def test_layout_rejects_overlap_and_misalignment() -> None:
    with pytest.raises(ValueError):
        plan_core([LoadRange(0, 2 * PAGE, 2 * PAGE), LoadRange(PAGE, PAGE, PAGE)], [], vmcoreinfo_note=None,
                  reserve_vmcoreinfo=False)
    with pytest.raises(ValueError):
        plan_core([LoadRange(100, PAGE, PAGE)], [], vmcoreinfo_note=None, reserve_vmcoreinfo=False)
