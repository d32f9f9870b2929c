"""Every slot of every x86-64 register group, pinned against positions written here by hand.

No position below is taken from vm2core or from the test writer; each comes from the format sources:

- ``.vmrs`` register chunks: vmrs-format.md §3, i.e. OpenVMM ``vm/hv1/hvdef/src/save_restore.rs``
  (``VpX64SaveChunkGpRegisters``, ``SynicX64SaveChunkControlRegisters``, ``VpX64SaveChunkDebugRegisters``,
  ``VpX64SaveChunkSegmentRegisters``, ``VpX64SaveChunkTableRegisters``); offsets are into the chunk data
  (after the 16-byte chunk header).
- ``NT_PRSTATUS``: elf-vmcore.md §2.1, ``struct user_regs_struct`` at desc offset 112.
- ``"QEMU"`` note: elf-vmcore.md §2.4, QEMUCPUState version 1.

Each register group has its own test. Every slot gets a value no other slot (or VP) has, so a reader, writer
or ELF layer that swaps two slots (rsp/rbp, ds/ss, idtr/gdtr, ...) fails here.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from tests.test_convert import MemorySink, notes_of
from tests.test_vmrs_writer import parse_partition_state, parse_vmrs
from tests.vmrs_writer import RangeSpec, WriterOptions, ram_from_bytes, write_vmrs
from vm2core.core.convert import convert
from vm2core.reader.cpu import Segment, TableRegister, VpState
from vm2core.reader.savedstate import SavedState

PAGE = 4096

# --- .vmrs chunk ids and data offsets [HVD save_restore.rs] -------------------------------------------------
GP_CHUNK, CONTROL_CHUNK, DEBUG_CHUNK, SEGMENT_CHUNK, TABLE_CHUNK = (
    0x30005000, 0x30007000, 0x30008000, 0x30009000, 0x3000A000)
VMRS_GP = {"rax": 0x00, "rcx": 0x08, "rdx": 0x10, "rbx": 0x18, "rsp": 0x20, "rbp": 0x28, "rsi": 0x30,
           "rdi": 0x38, "r8": 0x40, "r9": 0x48, "r10": 0x50, "r11": 0x58, "r12": 0x60, "r13": 0x68,
           "r14": 0x70, "r15": 0x78, "rip": 0x80, "rflags": 0x88}
VMRS_CONTROL = {"cr0": 0x00, "cr2": 0x08, "cr3": 0x10, "cr4": 0x18, "cr8": 0x20, "efer": 0x28}
VMRS_DEBUG = {"dr0": 0x00, "dr1": 0x08, "dr2": 0x10, "dr3": 0x18, "dr6": 0x20, "dr7": 0x28}
# HvX64SegmentRegister {u64 base, u32 limit, u16 selector, u16 attributes}, 16 bytes each; cpl at 0x80.
VMRS_SEGMENT = {"es": 0x00, "cs": 0x10, "ss": 0x20, "ds": 0x30, "fs": 0x40, "gs": 0x50, "ldtr": 0x60,
                "tr": 0x70}
VMRS_CPL = 0x80
# HvX64TableRegister {3 x u16 pad, u16 limit, u64 base}: limit at +6, base at +8.
VMRS_TABLE = {"idtr": 0x00, "gdtr": 0x10}

# --- NT_PRSTATUS pr_reg (user_regs_struct) offsets, from the start of the desc [elf-vmcore.md §2.1] --------
PR_REG = 112
PRSTATUS = {"r15": 0, "r14": 8, "r13": 16, "r12": 24, "rbp": 32, "rbx": 40, "r11": 48, "r10": 56, "r9": 64,
            "r8": 72, "rax": 80, "rcx": 88, "rdx": 96, "rsi": 104, "rdi": 112, "orig_rax": 120, "rip": 128,
            "cs": 136, "eflags": 144, "rsp": 152, "ss": 160, "fs_base": 168, "gs_base": 176, "ds": 184,
            "es": 192, "fs": 200, "gs": 208}

# --- QEMUCPUState v1 offsets [elf-vmcore.md §2.4] ---------------------------------------------------------
QEMU_GP = {"rax": 8, "rbx": 16, "rcx": 24, "rdx": 32, "rsi": 40, "rdi": 48, "rsp": 56, "rbp": 64, "r8": 72,
           "r9": 80, "r10": 88, "r11": 96, "r12": 104, "r13": 112, "r14": 120, "r15": 128, "rip": 136,
           "rflags": 144}
# QEMUCPUSegment {u32 selector, u32 limit, u32 flags, u32 pad, u64 base}, 24 bytes each.
QEMU_SEGMENT = {"cs": 152, "ds": 176, "es": 200, "fs": 224, "gs": 248, "ss": 272, "ldtr": 296, "tr": 320}
QEMU_GDT, QEMU_IDT = 344, 368
QEMU_CR = {"cr0": 392, "cr1": 400, "cr2": 408, "cr3": 416, "cr4": 424}


def _value(group: int, slot: int, vp: int) -> int:
    """A 64-bit value unique to (group, slot, vp), with high and low bits set."""
    return (0x8000_0000_0000_0000 | (group << 52) | (slot << 44) | (vp << 40)
            | (0x0101_0101 * (slot + 1) + 0x10 * group + vp))


def _vp(index: int, *, gp: dict[str, int] | None = None, control: dict[str, int] | None = None,
        debug: dict[str, int] | None = None, segments: dict[str, Segment] | None = None, cpl: int = 0,
        idtr: TableRegister | None = None, gdtr: TableRegister | None = None) -> VpState:
    return VpState(index=index, gp=gp or {}, control=control or {}, debug=debug or {}, segments=segments or {},
                   cpl=cpl, idtr=idtr or TableRegister(), gdtr=gdtr or TableRegister())


def _write(tmp_path: Path, vps: list[VpState]) -> Path:
    path = tmp_path / "regs.vmrs"
    memory = bytes(range(256)) * (4 * PAGE // 256)
    write_vmrs(path, [RangeSpec(0, len(memory) // PAGE, ram_from_bytes(memory))], vps, WriterOptions())
    return path


def _chunks(path: Path) -> dict[int, dict[int, bytes]]:
    """{vp index: {chunk id: data}} for VTL 0, by the writer test's independent parser."""
    parsed = parse_vmrs(path)
    _vendor, vps, _ids = parse_partition_state(parsed.value("/savedstate/savedVM/partition_state"))
    return {index: by_vtl[0] for index, by_vtl in vps.items()}


def _read(path: Path) -> list[VpState]:
    with SavedState.open(path) as state:
        return state.vps


def _notes(path: Path) -> tuple[list[bytes], list[bytes]]:
    """(NT_PRSTATUS descs, QEMU descs) of the core converted from ``path``, in CPU order."""
    sink = MemorySink(True)
    with SavedState.open(path) as state:
        convert(state, sink, warn=lambda _msg: None)
    notes = notes_of(sink.buf.getvalue())
    return ([d for name, t, d in notes if name == "CORE" and t == 1],
            [d for name, t, d in notes if name == "QEMU" and t == 0])


def _u64(data: bytes, offset: int) -> int:
    return int(struct.unpack_from("<Q", data, offset)[0])


def test_gp_slots(tmp_path: Path) -> None:
    names = list(VMRS_GP)
    gps = [{name: _value(1, slot, vp) for slot, name in enumerate(names)} for vp in range(2)]
    path = _write(tmp_path, [_vp(i, gp=gps[i]) for i in range(2)])

    chunks = _chunks(path)
    for i, gp in enumerate(gps):
        assert {n: _u64(chunks[i][GP_CHUNK], off) for n, off in VMRS_GP.items()} == gp
    for got, gp in zip(_read(path), gps, strict=True):
        assert got.gp == gp

    prstatus, qemu = _notes(path)
    for cpu, gp in enumerate(gps):
        regs = {n: _u64(prstatus[cpu], PR_REG + off) for n, off in PRSTATUS.items()}
        for name in ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx",
                     "rsi", "rdi", "rip", "rsp"):
            assert regs[name] == gp[name], f"NT_PRSTATUS {name}"
        assert regs["eflags"] == gp["rflags"]
        assert regs["orig_rax"] == 0
        assert {n: _u64(qemu[cpu], off) for n, off in QEMU_GP.items()} == gp


def test_control_slots(tmp_path: Path) -> None:
    names = list(VMRS_CONTROL)
    controls = [{name: _value(2, slot, vp) for slot, name in enumerate(names)} for vp in range(2)]
    path = _write(tmp_path, [_vp(i, control=controls[i]) for i in range(2)])

    chunks = _chunks(path)
    for i, control in enumerate(controls):
        assert {n: _u64(chunks[i][CONTROL_CHUNK], off) for n, off in VMRS_CONTROL.items()} == control
    for got, control in zip(_read(path), controls, strict=True):
        assert got.control == control

    _prstatus, qemu = _notes(path)
    for cpu, control in enumerate(controls):
        # The QEMU note has cr0..cr4 (cr1 does not exist: 0); cr8 and EFER have no place in it.
        assert {n: _u64(qemu[cpu], off) for n, off in QEMU_CR.items()} == {
            "cr0": control["cr0"], "cr1": 0, "cr2": control["cr2"], "cr3": control["cr3"], "cr4": control["cr4"]}


def test_debug_slots(tmp_path: Path) -> None:
    names = list(VMRS_DEBUG)
    debugs = [{name: _value(3, slot, vp) for slot, name in enumerate(names)} for vp in range(2)]
    path = _write(tmp_path, [_vp(i, debug=debugs[i]) for i in range(2)])

    chunks = _chunks(path)
    for i, debug in enumerate(debugs):
        assert {n: _u64(chunks[i][DEBUG_CHUNK], off) for n, off in VMRS_DEBUG.items()} == debug
    for got, debug in zip(_read(path), debugs, strict=True):
        assert got.debug == debug       # (no ELF note carries debug registers)


def _segments(vp: int) -> dict[str, Segment]:
    out = {}
    for slot, name in enumerate(VMRS_SEGMENT):
        v = _value(4, slot, vp)
        # Attributes: distinct per slot, only in the bits the QEMU flags encoding keeps (0-7, 12-15).
        attributes = (0x9B + slot * 0x10 + vp) & 0xFF | ((slot + 2) << 12)
        out[name] = Segment(base=v, limit=0x1000_0000 + slot * 0x111 + vp, selector=0x100 + slot * 8 + vp,
                            attributes=attributes)
    return out


def test_segment_slots(tmp_path: Path) -> None:
    segs = [_segments(vp) for vp in range(2)]
    path = _write(tmp_path, [_vp(i, segments=segs[i], cpl=i + 1) for i in range(2)])

    chunks = _chunks(path)
    for i, want in enumerate(segs):
        data = chunks[i][SEGMENT_CHUNK]
        for name, off in VMRS_SEGMENT.items():
            assert struct.unpack_from("<QIHH", data, off) == (want[name].base, want[name].limit,
                                                             want[name].selector, want[name].attributes), name
        assert data[VMRS_CPL] == i + 1
    for got, want, cpl in zip(_read(path), segs, (1, 2), strict=True):
        assert got.segments == want
        assert got.cpl == cpl

    prstatus, qemu = _notes(path)
    for cpu, want in enumerate(segs):
        regs = {n: _u64(prstatus[cpu], PR_REG + off) for n, off in PRSTATUS.items()}
        for name in ("cs", "ss", "ds", "es", "fs", "gs"):
            assert regs[name] == want[name].selector, f"NT_PRSTATUS {name}"
        assert regs["fs_base"] == want["fs"].base and regs["gs_base"] == want["gs"].base
        for name, off in QEMU_SEGMENT.items():
            selector, limit, flags, pad, base = struct.unpack_from("<IIIIQ", qemu[cpu], off)
            assert (selector, limit, pad, base) == (want[name].selector, want[name].limit, 0, want[name].base), name
            # QEMU flags hold the descriptor's attribute bits at 8-15 (type/S/DPL/P) and 20-23 (AVL/L/D/G).
            a = want[name].attributes
            assert flags == ((a & 0xFF) << 8) | ((a >> 12) << 20), name


def test_table_slots(tmp_path: Path) -> None:
    tables = [(TableRegister(base=_value(5, 0, vp), limit=0x0FFF - vp), TableRegister(base=_value(5, 1, vp),
                                                                                     limit=0x7F + vp))
              for vp in range(2)]
    path = _write(tmp_path, [_vp(i, idtr=tables[i][0], gdtr=tables[i][1]) for i in range(2)])

    chunks = _chunks(path)
    for i, (idtr, gdtr) in enumerate(tables):
        data = chunks[i][TABLE_CHUNK]
        for name, table in (("idtr", idtr), ("gdtr", gdtr)):
            off = VMRS_TABLE[name]
            assert data[off:off + 6] == bytes(6)
            assert struct.unpack_from("<HQ", data, off + 6) == (table.limit, table.base), name
    for got, (idtr, gdtr) in zip(_read(path), tables, strict=True):
        assert (got.idtr, got.gdtr) == (idtr, gdtr)

    _prstatus, qemu = _notes(path)
    for cpu, (idtr, gdtr) in enumerate(tables):
        for off, table in ((QEMU_GDT, gdtr), (QEMU_IDT, idtr)):
            selector, limit, flags, pad, base = struct.unpack_from("<IIIIQ", qemu[cpu], off)
            assert (selector, limit, flags, pad, base) == (0, table.limit, 0, 0, table.base)


@pytest.mark.parametrize("offsets", [VMRS_GP, VMRS_CONTROL, VMRS_DEBUG, VMRS_SEGMENT, PRSTATUS, QEMU_GP,
                                     QEMU_SEGMENT], ids=lambda d: next(iter(d)))
def test_hand_written_offsets_are_a_dense_layout(offsets: dict[str, int]) -> None:
    """Guard against a typo in the tables above: slots are contiguous and equally spaced."""
    values = list(offsets.values())
    step = values[1] - values[0]
    assert values == [values[0] + i * step for i in range(len(values))]
