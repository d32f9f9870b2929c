"""The VM view of a .vmrs file: memory ranges, RAM blocks and virtual-processor state.

Built on :class:`~vm2core.reader.container.HyperVStorage`; knows the saved-state key schema
(``vmrs-format.md`` §2, [FMT] Appendix A, [HVD] ``defs.rs``).  Everything downstream (guest
analysis, layout, ELF) talks only to :class:`SavedState`, so another backend (Microsoft's DLL,
the legacy .vsv + .bin pair) only has to offer the same few members.
"""

from __future__ import annotations

import struct
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

from vm2core.errors import FormatError, UnsupportedError
from vm2core.reader.container import KEY_ARRAY, HyperVStorage, KeyEntry
from vm2core.reader.cpu import VpState
from vm2core.reader.memory import PAGE_SIZE, MemoryRange, NotInMemory, Piece, Zeros
from vm2core.reader.partition_state import PartitionState, parse_partition_state
from vm2core.reader.ramblock import (
    BLOCK_SIZE,
    decode_records,
    materialize,
    raw_block,
    slice_pieces,
)
from vm2core.reader.salvage import LossList, LostRange, LostVp, SalvageReport, lost_ranges

# [FMT] Appendix A: keys of VMs with version > 5.0.
VM_VERSION_KEYS = ("/savedstate/VmVersion", "/configuration/properties/version")
SAVED_STATE_TYPE_KEY = "/savedstate/type"
PARTITION_STATE_KEY = "/savedstate/savedVM/partition_state"
MEMORY_BLOCK_KEY = "/savedstate/RamMemoryBlock{}"
RAM_BLOCK_KEY = "/savedstate/RamBlock{}"
# [FMT] "Key Path Versioning": VMs <= 5.0 used other paths and (undocumented) layouts.
LEGACY_VM_VERSION = 0x0500
LEGACY_PARTITION_STATE_KEY = "/savedVM/partition_state"

# [HVD] MemoryBlockSaveStruct (48 bytes, SavedStateVersion 3).
MEMORY_BLOCK = struct.Struct("<IIQQQII Q")
MEMORY_BLOCK_VERSION = 3
MAX_RANGES = 4096
MAX_GPA = 1 << 52                       # x86-64 architectural physical-address limit
# The largest VM Hyper-V supports: 240 TB of RAM per VM (Windows Server 2025, generation 2;
# Microsoft "Plan for Hyper-V scalability in Windows Server").  Read generously as TiB.  A claim
# beyond it is damage (one flipped page-count bit), not a VM: refuse it before streaming zeros.
MAX_GUEST_RAM = 240 << 40
MAX_PARTITION_STATE = 256 << 20
BLOCK_CACHE_SIZE = 8


def is_legacy_layout(container: HyperVStorage) -> bool:
    """The pre-2016 key layout ([FMT] Appendix A "Key Path Versioning"): no current partition-state key,
    and the old one present or a VM version <= 5.0 recorded."""
    if container.get(PARTITION_STATE_KEY) is not None:
        return False
    if container.get(LEGACY_PARTITION_STATE_KEY) is not None:
        return True
    version = container.read_int(VM_VERSION_KEYS[0])
    return version is not None and 0x0100 < version <= LEGACY_VM_VERSION


@dataclass(frozen=True)
class BlockInfo:
    """Where one RamBlock's data lives and how it is encoded (known without decoding).

    A missing block (never-touched RAM) may stand for a run of ``count`` consecutive missing
    blocks, so sparse guests cost one step per run, not one per MiB.
    """

    number: int
    entry: KeyEntry | None
    count: int = 1

    @property
    def encoding(self) -> str:
        if self.entry is None:
            return "missing"
        return "raw" if self.entry.data_size == BLOCK_SIZE else "records"

    @property
    def stored_size(self) -> int:
        return 0 if self.entry is None else self.entry.data_size


class SavedState:
    """A Hyper-V saved state (.vmrs) opened for conversion."""

    backend = "native"
    layout = "current"
    # Key templates of this layout ([FMT] Appendix A); LegacySavedState has the pre-2016 ones.
    partition_state_key = PARTITION_STATE_KEY
    memory_block_key = MEMORY_BLOCK_KEY
    ram_block_key = RAM_BLOCK_KEY

    def __init__(self, container: HyperVStorage, *, salvage: bool = False) -> None:
        from vm2core.reader.filekind import require_memory  # filekind builds on this module's key names

        self.container = container
        self.path = container.path
        require_memory(container)   # a configuration or runtime file gets a plain answer, not a key error
        # salvage: unreadable RamBlocks become zeros and VPs with unreadable registers are left
        # out, each recorded in ``losses`` (reader/salvage.py); without it every error raises.
        self.salvage = salvage
        self.losses = LossList()
        if salvage:
            for problem in container.header_problems:
                self.losses.warn(f"{self.path}: file header: {problem} (the other copy was used)")
        self.vm_version = self._vm_version()
        self.saved_state_type = container.read_string(SAVED_STATE_TYPE_KEY)
        self.partition = self._partition_state()
        self.ranges = self._memory_ranges()
        self._present_blocks = self._index_blocks()
        if salvage:
            # The container's own salvage record (checksum mismatches, file objects past the end...).
            # A RamBlock's file object past the end is reported as the lost range it causes instead.
            blocks = {self.container.keys[RAM_BLOCK_KEY.format(n)].data_offset for n in self._present_blocks}
            for damage in getattr(container, "damage", []):
                if not (getattr(damage, "structure", None) == "file object" and damage.offset in blocks):
                    self.losses.warn(str(damage))
        self._cache: OrderedDict[int, list[Piece]] = OrderedDict()

    @classmethod
    def open(cls, path: Path | str, *, salvage: bool = False) -> SavedState:
        container = HyperVStorage.open(path, salvage=salvage)
        try:
            if cls is SavedState and is_legacy_layout(container):
                from vm2core.reader.legacy import LegacySavedState

                return LegacySavedState(container, salvage=salvage)
            return cls(container, salvage=salvage)
        except BaseException:
            container.close()
            raise

    def close(self) -> None:
        self.container.close()

    def __enter__(self) -> SavedState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- metadata -------------------------------------------------------------------------

    def _error(self, msg: str, structure: str, offset: int | None = None) -> FormatError:
        return FormatError(msg, path=self.path, structure=structure, offset=offset)

    def _vm_version(self) -> int:
        # /configuration/properties/version alone is a VM configuration (.vmcx), not a saved state.
        keys = VM_VERSION_KEYS if self.container.get(PARTITION_STATE_KEY) is not None else VM_VERSION_KEYS[:1]
        for key in keys:
            v = self.container.read_int(key)
            if v is not None:
                break
        else:
            if self.container.get(LEGACY_PARTITION_STATE_KEY) is not None:
                v = LEGACY_VM_VERSION
            else:
                raise self._error("no /savedstate/VmVersion key: this HyperVStorage file is not a VM "
                                  "saved state (a .vmcx configuration?); `vm2core inspect` lists its keys",
                                  "key tree")
        if v <= 0x0100:
            raise UnsupportedError(f"VM version {v >> 8}.{v & 0xff} is too old to read",
                                   path=self.path, structure="/savedstate/VmVersion")
        if v <= LEGACY_VM_VERSION and self.container.get(PARTITION_STATE_KEY) is None:
            raise UnsupportedError(
                f"VM version {v >> 8}.{v & 0xff} uses the pre-2016 saved-state layout (/savedVM/..., "
                "RamMemoryBlock/N/), which is not publicly documented; `vm2core inspect` lists its keys",
                path=self.path, structure="key tree")
        return v

    @property
    def dirty(self) -> bool:
        """Uncommitted replay-log entries: the file body may not reflect the last save."""
        rl = self.container.replay_log
        return bool(rl and rl.dirty)

    def _partition_state(self) -> PartitionState:
        key = self.partition_state_key
        entry = self.container.require(key)
        if entry.type != KEY_ARRAY:
            raise self._error(f"{key} is a {entry.type_name}, expected an array", "key tree")
        blob = self.container.read_bytes(entry, MAX_PARTITION_STATE)
        state = parse_partition_state(blob, path=self.path, base_offset=entry.data_offset, salvage=self.salvage)
        if not state.vtl0_vps():
            lost = "; ".join(state.lost_vps().values()) if self.salvage else ""
            raise self._error("no VTL0 register set for any virtual processor" + (f" ({lost})" if lost else ""),
                              key, entry.data_offset)
        for problem in state.problems:
            self.losses.warn(problem)
        for (vp, vtl), why in state.damaged.items():
            if vtl != 0:
                self.losses.warn(f"VTL{vtl} registers of vCPU {vp} (not used for Linux): {why}")
        return state

    @property
    def architecture(self) -> str:
        return self.partition.architecture

    @property
    def vps(self) -> list[VpState]:
        """VTL0 register set of every VP, by VP index (= Linux CPU number, see elf-vmcore.md §10)."""
        return self.partition.vtl0_vps()

    def _memory_ranges(self) -> list[MemoryRange]:
        ranges: list[MemoryRange] = []
        for i in range(MAX_RANGES + 1):
            entry = self.container.get(self.memory_block_key.format(i))
            if entry is None:
                break
            if i == MAX_RANGES:
                raise self._error(f"more than {MAX_RANGES} RamMemoryBlock keys", "key tree")
            name = self.memory_block_key.format(i)
            if entry.data_size < MEMORY_BLOCK.size:
                raise self._error(f"{entry.data_size} bytes, expected {MEMORY_BLOCK.size}", name,
                                  entry.data_offset)
            raw = self.container.read_bytes(entry, 4096)
            version, flags, pages, mbp, gpa_page, node, _pad, _ksr = MEMORY_BLOCK.unpack_from(raw)
            if version != MEMORY_BLOCK_VERSION:
                raise UnsupportedError(f"memory block save-state version {version} (only 3 is known)",
                                       path=self.path, structure=name, offset=entry.data_offset)
            if pages == 0:
                continue
            if (gpa_page + pages) * PAGE_SIZE > MAX_GPA or mbp + pages > MAX_GPA // PAGE_SIZE:
                raise self._error(f"range of {pages} pages at GPA page {gpa_page:#x} (data page {mbp}) "
                                  "is beyond any physical address", name, entry.data_offset)
            ranges.append(MemoryRange(i, gpa_page * PAGE_SIZE, pages, mbp, node, flags))
            claimed = sum(r.size for r in ranges)
            if claimed > MAX_GUEST_RAM:
                raise self._error(f"the memory ranges up to this one claim {claimed >> 30} GiB of guest RAM, "
                                  f"more than the {MAX_GUEST_RAM >> 40} TiB Hyper-V supports per VM",
                                  name, entry.data_offset)
        if not ranges:
            raise self._error(f"no {self.memory_block_key.format(0)} key: the saved state holds no RAM", "key tree")
        ranges.sort(key=lambda r: r.gpa_start)
        for a, b in pairwise(ranges):
            if b.gpa_start < a.gpa_end:
                raise self._error(f"memory ranges {a.index} and {b.index} overlap at GPA {b.gpa_start:#x}",
                                  self.memory_block_key.format(b.index))
        by_data = sorted(ranges, key=lambda r: r.mbp_index_start)
        for a, b in pairwise(by_data):
            if b.mbp_index_start < a.mbp_index_start + a.page_count:
                raise self._error(f"memory ranges {a.index} and {b.index} claim the same RAM data pages",
                                  self.memory_block_key.format(b.index))
        return ranges

    @property
    def total_ram(self) -> int:
        return sum(r.size for r in self.ranges)

    # --- RAM blocks -----------------------------------------------------------------------

    def _index_blocks(self) -> list[int]:
        """Sorted numbers of the RamBlock keys present (one pass over the key names)."""
        prefix = self.ram_block_key.format("")
        numbers = []
        for path in self.container.keys:
            if path.startswith(prefix) and path[len(prefix):].isdigit():
                numbers.append(int(path[len(prefix):]))
        numbers.sort()
        return numbers

    def missing_run(self, number: int) -> int:
        """How many consecutive RamBlocks from ``number`` on are missing (0 if it is present)."""
        i = bisect_left(self._present_blocks, number)
        if i < len(self._present_blocks):
            return self._present_blocks[i] - number
        return MAX_GPA // BLOCK_SIZE

    def block_info(self, number: int) -> BlockInfo:
        entry = self.container.get(self.ram_block_key.format(number))
        if entry is not None:
            try:
                if entry.type != KEY_ARRAY:
                    raise self._error(f"is a {entry.type_name}, expected an array", self.ram_block_key.format(number))
                if entry.data_size > BLOCK_SIZE:
                    raise self._error(f"{entry.data_size} bytes, more than 1 MiB", self.ram_block_key.format(number),
                                      entry.data_offset)
                if entry.data_offset + entry.data_size > self.container.file_size:
                    # Only reachable in salvage mode: the container refuses it otherwise.
                    raise self._error(f"{entry.data_size} bytes at {entry.data_offset:#x} lie beyond the end of "
                                      f"the file ({self.container.file_size:#x} bytes): truncated?",
                                      self.ram_block_key.format(number), entry.data_offset)
            except FormatError as e:
                if not self.salvage:
                    raise
                self.lose_block(number, e)
                return BlockInfo(number, None)      # streamed as zeros, like a missing block
        return BlockInfo(number, entry)

    def lose_block(self, number: int, error: FormatError) -> None:
        """Salvage: RamBlock ``number`` cannot be read; its bytes become zeros in the core."""
        assert self.salvage
        self.losses.lose_block(number, str(error))

    def blocks_of(self, r: MemoryRange) -> Iterator[tuple[BlockInfo, int, int]]:
        """(block, first byte used, bytes used) for the data blocks of a range, in GPA order.

        A run of missing blocks comes as one BlockInfo with ``count`` > 1 and a length to match.
        """
        pos = r.mbp_index_start * PAGE_SIZE
        end = pos + r.size
        while pos < end:
            block, start = divmod(pos, BLOCK_SIZE)
            missing = self.missing_run(block)
            if missing:
                n = min(missing * BLOCK_SIZE - start, end - pos)
                count = (start + n + BLOCK_SIZE - 1) // BLOCK_SIZE
                yield BlockInfo(block, None, count), start, n
            else:
                n = min(BLOCK_SIZE - start, end - pos)
                yield self.block_info(block), start, n
            pos += n

    def read_block_bytes(self, info: BlockInfo) -> bytes:
        assert info.entry is not None
        return self.container.read_at(info.entry.data_offset, info.entry.data_size,
                                      self.ram_block_key.format(info.number))

    def decode_block(self, info: BlockInfo, stored: bytes | None = None) -> list[Piece]:
        """Pieces of one block (exactly 1 MiB).  ``stored`` may carry already-read record bytes."""
        if info.entry is None:
            return [Zeros(BLOCK_SIZE * info.count)]
        if info.entry.data_size == BLOCK_SIZE:
            return raw_block(info.entry.data_offset)
        try:
            data = stored if stored is not None else self.read_block_bytes(info)
            return decode_records(data, name=self.ram_block_key.format(info.number),
                                  file_offset=info.entry.data_offset, path=self.path)
        except FormatError as e:
            if not self.salvage:
                raise
            self.lose_block(info.number, e)
            return [Zeros(BLOCK_SIZE)]

    # --- random access (guest analysis) -----------------------------------------------------

    def _cached_block(self, number: int) -> list[Piece]:
        pieces = self._cache.get(number)
        if pieces is None:
            pieces = self.decode_block(self.block_info(number))
            self._cache[number] = pieces
            if len(self._cache) > BLOCK_CACHE_SIZE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(number)
        return pieces

    def read_physical(self, gpa: int, length: int) -> bytes:
        """Guest-physical read across pages and blocks; NotInMemory outside RAM."""
        out = bytearray()
        while length > 0:
            r = self.range_of(gpa)
            if r is None:
                raise NotInMemory(gpa)
            data_byte = r.mbp_index_start * PAGE_SIZE + (gpa - r.gpa_start)
            block, in_block = divmod(data_byte, BLOCK_SIZE)
            n = min(length, BLOCK_SIZE - in_block, r.gpa_end - gpa)
            out += materialize(slice_pieces(self._cached_block(block), in_block, n), self._read_file)
            gpa += n
            length -= n
        return bytes(out)

    def range_of(self, gpa: int) -> MemoryRange | None:
        for r in self.ranges:
            if r.gpa_start <= gpa < r.gpa_end:
                return r
        return None

    def _read_file(self, offset: int, length: int) -> bytes:
        return self.container.read_at(offset, length, "RAM data")

    # --- salvage ----------------------------------------------------------------------------

    def salvage_report(self) -> SalvageReport:
        """What could not be read so far (complete once the whole core has been streamed)."""
        ranges: list[LostRange] = lost_ranges(self.losses.blocks, self.ranges, BLOCK_SIZE)
        vps = [LostVp(i, why) for i, why in self.partition.lost_vps().items()]
        warnings = self.losses.warnings
        kept = [vp.index for vp in self.vps]
        first_gap = next((v.index for v in vps if any(k > v.index for k in kept)), None)
        if first_gap is not None:
            # crash (netdump.c, QEMU-style notes present) gives the i-th NT_PRSTATUS note to CPU i.
            warnings.append(f"crash assigns the remaining CPU notes to CPUs in order, so from CPU {first_gap} on "
                            "it shows the registers of the next vCPU; drgn matches notes by pr_pid and is right")
        return SalvageReport(str(self.path), ranges, vps, warnings)
