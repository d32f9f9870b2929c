"""The ``partition_state`` blob: the hypervisor's CPU-state chunk stream (``vmrs-format.md`` §3).

Source of every layout here: [HVD] OpenVMM ``vm/hv1/hvdef/src/save_restore.rs`` (the canonical
structures of ``onecore/hv/hvx/inc/vm.h``) and ``vmm_core/hyperv_dump/src/partition_state.rs``.
Unknown chunk ids are skipped, never rejected: Hyper-V versions add chunks over time.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from vm2core.errors import FormatError
from vm2core.reader.cpu import (
    CONTROL_REGISTER_NAMES,
    DEBUG_REGISTER_NAMES,
    GP_REGISTER_NAMES,
    SEGMENT_NAMES,
    Segment,
    TableRegister,
    VpState,
)

# VidSavedStateDescriptor {u64 descriptor_size, u64 header_size, u64 total_size}; chunks start at
# header_size + 16 [HVD].
DESCRIPTOR = struct.Struct("<QQQ")
CHUNK_START_PAD = 16
# VmSaveChunkHeader {u32 id, u32 data_length, 8 bytes pad}; no padding between chunks [HVD].
CHUNK_HEADER = struct.Struct("<II8x")

PROLOG = 0x00000000
EPILOG = 0xF0000000
OS_ID = 0x20001000
VP_INDICES = 0x30000000
VP = 0x30001000
VP_GP_REGISTERS = 0x30005000
VP_CONTROL_REGISTERS = 0x30007000
VP_DEBUG_REGISTERS = 0x30008000
VP_SEGMENT_REGISTERS = 0x30009000
VP_TABLE_REGISTERS = 0x3000A000
VP_XSAVE_CONTROL = 0x3000D000
VP_VTL = 0x3001A000

PROLOG_DATA = struct.Struct("<IB3xI")          # 'duTP' tag, is_summary, vendor
PROLOG_TAG = 0x50546475
VENDORS = {0x0: "AMD", 0x1: "Intel", 0x2: "Hygon", 0x10: "ARM"}
VENDOR_ARM = 0x10
GP_X64 = struct.Struct("<18Q")
CONTROL_X64 = struct.Struct("<6Q")
DEBUG_X64 = struct.Struct("<6Q")
SEGMENT = struct.Struct("<QIHH")               # HvX64SegmentRegister {base, limit, selector, attributes}
SEGMENTS_X64 = SEGMENT.size * len(SEGMENT_NAMES)
TABLE = struct.Struct("<6xHQ")                 # HvX64TableRegister {3 x u16 pad, u16 limit, u64 base}
# ARM64 GP chunk: x0..x28, fp, lr, elr_el2, spsr_el2, esr_el1, spsr_el1, far_el1, par_el1,
# elr_el1, sp_el0, sp_el1, afsr0_el1, afsr1_el1 [HVD VpArm64SaveChunkGpRegisters].
ARM64_GP_NAMES = tuple(f"x{i}" for i in range(29)) + (
    "fp", "lr", "elr_el2", "spsr_el2", "esr_el1", "spsr_el1", "far_el1", "par_el1", "elr_el1",
    "sp_el0", "sp_el1", "afsr0_el1", "afsr1_el1")

MAX_CHUNKS = 1 << 20
REGISTER_CHUNKS = frozenset({VP_GP_REGISTERS, VP_CONTROL_REGISTERS, VP_DEBUG_REGISTERS, VP_SEGMENT_REGISTERS,
                             VP_TABLE_REGISTERS, VP_XSAVE_CONTROL, VP_VTL})
MAX_VPS = 4096


@dataclass
class PartitionState:
    vendor: int | None = None
    os_id: int | None = None
    bsp: int | None = None
    present_vps: list[int] = field(default_factory=list)   # from VP_INDICES: salvage names VPs never reached
    states: list[VpState] = field(default_factory=list)   # every (VP, VTL) register set found
    unknown_chunks: dict[int, int] = field(default_factory=dict)
    # Salvage only: (VP, VTL) register sets that could not be read, with why; and damage that
    # could not be tied to one VP.  Both stay empty when parsing strictly (errors raise instead).
    damaged: dict[tuple[int, int], str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def architecture(self) -> str:
        return "aarch64" if self.vendor == VENDOR_ARM else "x86_64"

    @property
    def vendor_name(self) -> str:
        if self.vendor is None:
            return "unknown"
        return VENDORS.get(self.vendor, f"vendor {self.vendor:#x}")

    def vtl0_vps(self) -> list[VpState]:
        """One register set per VP, VTL 0 (what a Linux guest runs in), ordered by VP index."""
        by_vp: dict[int, VpState] = {}
        for s in self.states:
            if s.vtl == 0 and (s.index, 0) not in self.damaged:
                by_vp.setdefault(s.index, s)
        return [by_vp[i] for i in sorted(by_vp)]

    def lost_vps(self) -> dict[int, str]:
        """Salvage: VPs whose VTL0 register set is unreadable (damaged, or listed in VP_INDICES
        but never reached because the chunk stream broke first), with the reason."""
        lost = {vp: why for (vp, vtl), why in self.damaged.items() if vtl == 0}
        seen = {s.index for s in self.states if s.vtl == 0}
        for vp in self.present_vps:
            if vp not in seen and vp not in lost and self.problems:
                lost[vp] = f"no register chunks found ({self.problems[-1]})"
        return dict(sorted(lost.items()))


def parse_partition_state(blob: bytes, *, path: Path | str | None = None, base_offset: int | None = None,
                          salvage: bool = False) -> PartitionState:
    """Parse the chunk stream; ``base_offset`` (blob position in the file) is for messages only.

    ``salvage``: a register chunk too short for its type marks that VP's register set as damaged
    (``PartitionState.damaged``) and parsing goes on; a broken stream (a chunk overrunning the
    blob, no EPILOG, a wild VP index) ends parsing there, keeping the VPs read before it and
    marking the one being read as damaged.  Only the descriptor itself is still fatal.
    """
    view = memoryview(blob)
    where = "partition_state"

    def err(msg: str, pos: int) -> FormatError:
        return FormatError(msg, path=path, structure=where,
                           offset=None if base_offset is None else base_offset + pos)

    if len(view) < DESCRIPTOR.size:
        raise err("blob shorter than its descriptor", 0)
    _desc_size, header_size, total_size = DESCRIPTOR.unpack_from(view, 0)
    end = len(view) if total_size == 0 or total_size > len(view) else total_size
    pos = header_size + CHUNK_START_PAD
    if header_size > len(view) or pos > end:
        raise err(f"descriptor header size {header_size} lies beyond the blob ({len(view)} bytes)", 0)

    state = PartitionState()
    current_vp: int | None = None
    current: dict[int, VpState] = {}   # vtl -> state for the current VP
    current_vtl = 0

    def vp_state() -> VpState:
        if current_vp is None:
            raise err("register chunk before any VP marker chunk", pos)
        s = current.get(current_vtl)
        if s is None:
            s = VpState(index=current_vp, vtl=current_vtl)
            current[current_vtl] = s
            state.states.append(s)
        return s

    def stream_broken(e: FormatError) -> None:
        """Salvage: keep what was read before ``e``; the VP being read is incomplete."""
        if not salvage:
            raise e
        state.problems.append(str(e))
        s = current.get(current_vtl) if current_vp is not None else None
        if current_vp is not None and (s is None or not (s.gp and s.control and s.segments)):
            state.damaged.setdefault((current_vp, current_vtl), f"its register chunks are cut short: {e}")

    for _ in range(MAX_CHUNKS):
        if pos + CHUNK_HEADER.size > end:
            stream_broken(err("chunk stream ends without an EPILOG chunk (truncated?)", pos))
            break
        chunk_id, length = CHUNK_HEADER.unpack_from(view, pos)
        data_pos = pos + CHUNK_HEADER.size
        if data_pos + length > end:
            stream_broken(err(f"chunk {chunk_id:#010x} of {length} bytes overruns the blob", pos))
            break
        data = view[data_pos:data_pos + length]

        def need(n: int, what: str, _len: int = length, _id: int = chunk_id, _pos: int = pos) -> None:
            if _len < n:
                raise err(f"{what} chunk {_id:#010x} has {_len} bytes, needs {n}", _pos)

        if chunk_id == EPILOG:
            break
        try:
            if chunk_id == PROLOG:
                need(PROLOG_DATA.size, "PROLOG")
                tag, _summary, vendor = PROLOG_DATA.unpack_from(data)
                if tag != PROLOG_TAG:
                    raise err(f"PROLOG tag {tag:#010x} is not 'duTP'", pos)
                state.vendor = vendor
            elif chunk_id == OS_ID:
                need(8, "OS_ID")
                state.os_id = struct.unpack_from("<Q", data)[0]
            elif chunk_id == VP_INDICES:
                need(4, "VP_INDICES")
                state.bsp = struct.unpack_from("<I", data)[0]
                bitmap = bytes(data[4:])
                state.present_vps = [i for i in range(min(len(bitmap) * 8, MAX_VPS))
                                     if bitmap[i // 8] >> (i % 8) & 1]
            elif chunk_id == VP:
                need(4, "VP")
                current_vp = struct.unpack_from("<I", data)[0]
                if current_vp >= MAX_VPS:
                    raise err(f"VP index {current_vp} is implausible", pos)
                current = {}
                current_vtl = 0
            elif chunk_id == VP_VTL:
                need(1, "VP_VTL")
                current_vtl = data[0]
            elif chunk_id == VP_GP_REGISTERS:
                s = vp_state()
                if state.vendor == VENDOR_ARM:
                    n = min(length // 8, len(ARM64_GP_NAMES))
                    s.gp.update(zip(ARM64_GP_NAMES, struct.unpack_from(f"<{n}Q", data), strict=False))
                else:
                    need(GP_X64.size, "GP registers")
                    s.gp.update(zip(GP_REGISTER_NAMES, GP_X64.unpack_from(data), strict=False))
            elif chunk_id == VP_CONTROL_REGISTERS and state.vendor != VENDOR_ARM:
                need(CONTROL_X64.size, "control registers")
                vp_state().control.update(zip(CONTROL_REGISTER_NAMES, CONTROL_X64.unpack_from(data), strict=False))
            elif chunk_id == VP_DEBUG_REGISTERS and state.vendor != VENDOR_ARM:
                need(DEBUG_X64.size, "debug registers")
                vp_state().debug.update(zip(DEBUG_REGISTER_NAMES, DEBUG_X64.unpack_from(data), strict=False))
            elif chunk_id == VP_SEGMENT_REGISTERS and state.vendor != VENDOR_ARM:
                need(SEGMENTS_X64, "segment registers")
                s = vp_state()
                for i, name in enumerate(SEGMENT_NAMES):
                    base, limit, selector, attributes = SEGMENT.unpack_from(data, i * SEGMENT.size)
                    s.segments[name] = Segment(base, limit, selector, attributes)
                if length > SEGMENTS_X64:
                    s.cpl = data[SEGMENTS_X64]
            elif chunk_id == VP_TABLE_REGISTERS and state.vendor != VENDOR_ARM:
                need(2 * TABLE.size, "table registers")
                s = vp_state()
                limit, base = TABLE.unpack_from(data, 0)
                s.idtr = TableRegister(base, limit)
                limit, base = TABLE.unpack_from(data, TABLE.size)
                s.gdtr = TableRegister(base, limit)
            elif chunk_id == VP_XSAVE_CONTROL and state.vendor != VENDOR_ARM and length >= 8:
                vp_state().msrs["xcr0"] = struct.unpack_from("<Q", data)[0]
            else:
                state.unknown_chunks[chunk_id] = state.unknown_chunks.get(chunk_id, 0) + 1
        except FormatError as e:
            if not salvage:
                raise
            # The chunk's length was in bounds, so the stream stays in step: skip just this chunk.
            if chunk_id in REGISTER_CHUNKS and current_vp is not None:
                state.damaged.setdefault((current_vp, current_vtl), str(e))
            else:
                state.problems.append(str(e))
                if chunk_id == VP:
                    current_vp = None       # its register chunks cannot be attributed to any VP
        pos = data_pos + length
    else:
        stream_broken(err("more chunks than any real VM has (corrupt stream?)", pos))

    return state
