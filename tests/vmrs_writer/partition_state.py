"""The /savedstate/savedVM/partition_state blob: a VidSavedStateDescriptor and a chunk stream.

Layouts from vmrs-format.md section 3, i.e. OpenVMM hvdef save_restore.rs / hyperv_dump
partition_state.rs [HVD]: every chunk is a 16-byte header {u32 id, u32 data_length, 8 pad} + data,
packed back to back; data_length of the fixed x64 register chunks is the C struct size minus 16
(the structs are 16-aligned, so e.g. the segment chunk carries cpl + 15 pad bytes).
"""

from __future__ import annotations

import struct
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Protocol


class _Segment(Protocol):
    @property
    def base(self) -> int: ...
    @property
    def limit(self) -> int: ...
    @property
    def selector(self) -> int: ...
    @property
    def attributes(self) -> int: ...


class _Table(Protocol):
    @property
    def base(self) -> int: ...
    @property
    def limit(self) -> int: ...


class VpRegisters(Protocol):
    """What the writer reads from a VP: registers by name (any object with these attributes will do).

    The writer never asks the product for a register order: every slot below comes from the format
    sources, so a reader that swaps two slots fails the tests instead of agreeing with its own writer.
    """

    @property
    def index(self) -> int: ...
    @property
    def vtl(self) -> int: ...
    @property
    def gp(self) -> Mapping[str, int]: ...
    @property
    def control(self) -> Mapping[str, int]: ...
    @property
    def debug(self) -> Mapping[str, int]: ...
    @property
    def segments(self) -> Mapping[str, _Segment]: ...
    @property
    def cpl(self) -> int: ...
    @property
    def idtr(self) -> _Table: ...
    @property
    def gdtr(self) -> _Table: ...
    @property
    def msrs(self) -> Mapping[str, int]: ...


# [HVD] VidSavedStateDescriptor {descriptor_size, header_size, total_size}; chunks at header_size + 16.
DESCRIPTOR = struct.Struct("<QQQ")
CHUNK_HEADER = struct.Struct("<II8x")

# [HVD] chunk ids.
PROLOG = 0x00000000
EPILOG = 0xF0000000
CPUID_DATA = 0x20000000
OS_ID = 0x20001000
PARTITION_VTL = 0x20008000
VP_INDICES = 0x30000000
VP = 0x30001000
GP_REGISTERS = 0x30005000
FP_REGISTERS = 0x30006000
CONTROL_REGISTERS = 0x30007000
DEBUG_REGISTERS = 0x30008000
SEGMENT_REGISTERS = 0x30009000
TABLE_REGISTERS = 0x3000A000
VIRTUAL_MSRS = 0x3000B000
XSAVE_CONTROL = 0x3000D000
VP_VTL_CONTROL_PAGE = 0x30018000
VP_VTL = 0x3001A000
# Ids no source names, emitted to check that readers skip what they do not know.
UNKNOWN_PARTITION_CHUNK = 0x2FFF0000
UNKNOWN_VP_CHUNK = 0x3000C000

# [HVD] prolog: tag 'duTP', u8 is_summary, 3 pad, u32 vendor, 4052 reserved -> 4080 bytes in total.
PROLOG_DATA = struct.Struct("<IB3xI4052x")
PROLOG_TAG = 0x50546475
# [HVD] {u64 base, u32 limit, u16 selector, u16 attributes}.
SEGMENT = struct.Struct("<QIHH")
# [HVD] HvX64TableRegister {3 x u16 pad, u16 limit, u64 base}.
TABLE_REGISTER = struct.Struct("<6xHQ")

# Register slots of the x64 register chunks, in on-disk order (u64 each, right after the 16-byte chunk
# header). Source for every slot: OpenVMM vm/hv1/hvdef/src/save_restore.rs (the canonical structures of
# onecore/hv/hvx/inc/vm.h) [HVD]; vmrs-format.md section 3 lists the same orders.
# VpX64SaveChunkGpRegisters: rax rcx rdx rbx rsp rbp rsi rdi r8..r15 rip rflags (Windows register
# numbering, NOT Linux pt_regs order).
GP_SLOTS: tuple[str, ...] = (
    "rax",      # data +0x00
    "rcx",      # +0x08
    "rdx",      # +0x10
    "rbx",      # +0x18
    "rsp",      # +0x20
    "rbp",      # +0x28
    "rsi",      # +0x30
    "rdi",      # +0x38
    "r8",       # +0x40
    "r9",       # +0x48
    "r10",      # +0x50
    "r11",      # +0x58
    "r12",      # +0x60
    "r13",      # +0x68
    "r14",      # +0x70
    "r15",      # +0x78
    "rip",      # +0x80
    "rflags",   # +0x88
)
# SynicX64SaveChunkControlRegisters (chunk VP_VTL_CONTROL_REGISTERS 0x30007000) [HVD].
CONTROL_SLOTS: tuple[str, ...] = (
    "cr0",      # +0x00
    "cr2",      # +0x08 (there is no cr1)
    "cr3",      # +0x10
    "cr4",      # +0x18
    "cr8",      # +0x20
    "efer",     # +0x28
)
# VpX64SaveChunkDebugRegisters [HVD].
DEBUG_SLOTS: tuple[str, ...] = (
    "dr0",      # +0x00
    "dr1",      # +0x08
    "dr2",      # +0x10
    "dr3",      # +0x18
    "dr6",      # +0x20 (no dr4/dr5)
    "dr7",      # +0x28
)
# VpX64SaveChunkSegmentRegisters: 8 x HvX64SegmentRegister (16 bytes each), then u8 cpl + 15 pad [HVD].
SEGMENT_SLOTS: tuple[str, ...] = (
    "es",       # +0x00
    "cs",       # +0x10
    "ss",       # +0x20
    "ds",       # +0x30
    "fs",       # +0x40
    "gs",       # +0x50
    "ldtr",     # +0x60
    "tr",       # +0x70
)
# VpX64SaveChunkTableRegisters: idtr (+0x00), then gdtr (+0x10), each an HvX64TableRegister [HVD].

# Virtual MSR chunk: 12 u64. [RE] (P. Beyer's reader) identifies slots 0 tsc, 1 kernel GS base,
# 2 APIC base, 7 star, 8 lstar, 9 cstar, 10 sfmask; slots 3-6 and 11 are named after the
# HvX64Register enumeration order (Tsc, [Efer], KernelGsBase, ApicBase, Pat, SysenterCs,
# SysenterEip, SysenterEsp, Star, Lstar, Cstar, Sfmask, InitialApicId), which fits every known slot.
VIRTUAL_MSR_NAMES: tuple[str, ...] = (
    "tsc", "kernel_gs_base", "apic_base", "pat", "sysenter_cs", "sysenter_eip", "sysenter_esp",
    "star", "lstar", "cstar", "sfmask", "initial_apic_id",
)


def _chunk(chunk_id: int, data: bytes) -> bytes:
    return CHUNK_HEADER.pack(chunk_id, len(data)) + data


def _u64s(values: list[int]) -> bytes:
    return struct.pack(f"<{len(values)}Q", *(v & 0xFFFFFFFFFFFFFFFF for v in values))


def _vp_indices(indices: list[int], style: str) -> bytes:
    """u32 BSP (the first VP given) + bitmap of present VPs."""
    if style == "canonical":
        # [HVD] VpSaveChunkVpIndices: u32 bsp, u8 vp_present_map[30], 14 pad (max 240 VPs).
        if max(indices) >= 240:
            raise ValueError("canonical VP_INDICES holds at most 240 VPs")
        bitmap = bytearray(30)
        pad = bytes(14)
    else:
        # [HVD] OpenVMM writer: max(max_index // 8 + 1, 8) bytes rounded up to 4, no pad.
        size = max(max(indices) // 8 + 1, 8)
        bitmap = bytearray((size + 3) // 4 * 4)
        pad = b""
    for index in indices:
        bitmap[index // 8] |= 1 << (index % 8)
    return _chunk(VP_INDICES, struct.pack("<I", indices[0]) + bytes(bitmap) + pad)


def _register_chunks(vp: VpRegisters, extra_unknown: bool) -> bytes:
    for bank, names in ((vp.gp, GP_SLOTS), (vp.control, CONTROL_SLOTS),
                        (vp.debug, DEBUG_SLOTS), (vp.msrs, VIRTUAL_MSR_NAMES),
                        (vp.segments, SEGMENT_SLOTS)):
        unknown = set(bank) - set(names)
        if unknown:
            raise ValueError(f"VP {vp.index}: unknown register names {sorted(unknown)}")
    out = bytearray()
    out += _chunk(GP_REGISTERS, _u64s([vp.gp.get(n, 0) for n in GP_SLOTS]))
    out += _chunk(CONTROL_REGISTERS, _u64s([vp.control.get(n, 0) for n in CONTROL_SLOTS]))
    segments = b"".join(SEGMENT.pack(s.base, s.limit, s.selector, s.attributes) if s is not None
                        else SEGMENT.pack(0, 0, 0, 0)
                        for s in (vp.segments.get(n) for n in SEGMENT_SLOTS))
    out += _chunk(SEGMENT_REGISTERS, segments + struct.pack("<B15x", vp.cpl))
    out += _chunk(TABLE_REGISTERS, TABLE_REGISTER.pack(vp.idtr.limit, vp.idtr.base)
                  + TABLE_REGISTER.pack(vp.gdtr.limit, vp.gdtr.base))
    if extra_unknown:
        # An id no reader knows, with a length that is not a multiple of 16.
        out += _chunk(UNKNOWN_VP_CHUNK, bytes(range(40, 64)))
    out += _chunk(DEBUG_REGISTERS, _u64s([vp.debug.get(n, 0) for n in DEBUG_SLOTS]))
    # [HVD] FP chunk: xmm0-15, st0-7, fp control/status, xmm control/status (16-byte slots).
    out += _chunk(FP_REGISTERS, bytes(16 * 26))
    # [HVD] XSAVE control: u64 xfem + 7 reserved, struct padded to 16 -> 16 data bytes.
    out += _chunk(XSAVE_CONTROL, struct.pack("<Q8x", 0x7))
    if vp.msrs:
        out += _chunk(VIRTUAL_MSRS, _u64s([vp.msrs.get(n, 0) for n in VIRTUAL_MSR_NAMES]))
    return bytes(out)


def build_partition_state(vps: Sequence[VpRegisters], *, vendor: int = 1, os_id: int = 0,
                          extra_unknown_chunks: bool = True, vp_indices_style: str = "canonical") -> bytes:
    """The blob for /savedstate/savedVM/partition_state.

    VPs appear in ascending index order; the BSP is the lowest index. Each VP's register sets are
    emitted in the order given. A VP_VTL marker precedes a register set whenever that VP has
    several sets or its only set is not VTL 0; a lone VTL 0 set has no marker (reader default).
    """
    if not vps:
        raise ValueError("at least one VP is needed")
    by_index: dict[int, list[VpRegisters]] = defaultdict(list)
    for vp in vps:
        by_index[vp.index].append(vp)
    indices = sorted(by_index)
    vtls = sorted({vp.vtl for vp in vps})

    out = bytearray(DESCRIPTOR.size + 16)
    out += _chunk(PROLOG, PROLOG_DATA.pack(PROLOG_TAG, 0, vendor))
    if extra_unknown_chunks:
        out += _chunk(CPUID_DATA, bytes(range(48)))
    out += _chunk(OS_ID, struct.pack("<Q8x", os_id))
    for vtl in vtls:
        out += _chunk(PARTITION_VTL, struct.pack("<B15x", vtl))
    if extra_unknown_chunks:
        out += _chunk(UNKNOWN_PARTITION_CHUNK, b"\xAA" * 20)
    out += _vp_indices(indices, vp_indices_style)
    for index in indices:
        states = by_index[index]
        out += _chunk(VP, struct.pack("<I12x", index))
        if len(states) > 1:
            # [HVD] VsmSaveChunkVpVtlControlPage: 24 bytes of control contents, u8 runnable, 7 pad.
            out += _chunk(VP_VTL_CONTROL_PAGE, bytes(24) + struct.pack("<B7x", 1))
        for state in states:
            if len(states) > 1 or state.vtl != 0:
                out += _chunk(VP_VTL, struct.pack("<B15x", state.vtl))
            out += _register_chunks(state, extra_unknown_chunks)
    out += _chunk(EPILOG, b"")
    DESCRIPTOR.pack_into(out, 0, DESCRIPTOR.size, DESCRIPTOR.size, len(out))
    return bytes(out)
