"""Where the structures of a (test-writer) .vmrs file are, found without the vm2core reader.

The mutators aim their damage with this map: every region and numeric field is tagged with the
structure it belongs to, so a case can say "set the page count of RamMemoryBlock0 to 2^64-1" or
"cut the file inside key table 2".  Built from the writer's own structure definitions.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.vmrs_writer.damage import object_entries
from tests.vmrs_writer.partition_state import CHUNK_HEADER, DESCRIPTOR
from tests.vmrs_writer.ramblock import (
    CHUNK_HEADER as RECORD_CHUNK,
)
from tests.vmrs_writer.ramblock import (
    FILL_RECORD,
    MULTI_FILL_RECORD,
    PAGE_HEADER,
    TAG_CHUNK,
    TAG_END,
    TAG_FILL,
    TAG_MULTI_FILL,
    TAG_RAW_PAGE,
)
from tests.vmrs_writer.ramdesc import RAM_MEMORY_BLOCK
from tests.vmrs_writer.structs import (
    FILE_HEADER,
    FILE_OBJECT_DATA,
    HEADER_COPY_OFFSETS,
    KEY_ENTRY_HEADER,
    KEY_FLAG_FILE_OBJECT,
    KEY_NODE,
    KEY_TABLE_HEADER,
    OBJ_KEY_TABLE,
    OBJ_OBJECT_TABLE,
    OBJECT_ENTRY,
    OBJECT_TABLE_HEADER,
    ROOT_OBJECT_TABLE_OFFSET,
)

BLOCK_SIZE = 1 << 20


@dataclass(frozen=True)
class Field:
    """A little-endian unsigned integer field of ``width`` bytes at ``offset``."""

    kind: str
    offset: int
    width: int


@dataclass
class Layout:
    size: int
    regions: list[tuple[str, int, int]] = field(default_factory=list)      # kind, start, end
    fields: list[Field] = field(default_factory=list)
    boundaries: list[int] = field(default_factory=list)
    chain_slots: list[int] = field(default_factory=list)                   # object entry positions
    object_tables: list[int] = field(default_factory=list)
    nodes: list[tuple[int, int]] = field(default_factory=list)             # (entry pos, table start)
    names: list[tuple[int, int]] = field(default_factory=list)             # (name start, NUL position)
    file_refs: list[int] = field(default_factory=list)                     # {u32 size, u64 offset}
    file_objects: list[tuple[int, int]] = field(default_factory=list)      # (offset, size)
    multi_fills: list[tuple[int, int]] = field(default_factory=list)       # (record pos, pages before)
    xpress: list[tuple[int, int]] = field(default_factory=list)            # (payload pos, length)
    _groups: dict[int, dict[str, list[Any]]] = field(default_factory=dict, repr=False)

    def pick_field(self, rng: random.Random) -> Field:
        """A field of a kind chosen first (so 64 empty object entries do not drown one page count)."""
        by_kind = self._by_kind(self.fields, lambda f: f.kind)
        return rng.choice(by_kind[rng.choice(sorted(by_kind))])

    def pick_region(self, rng: random.Random) -> tuple[str, int, int]:
        by_kind = self._by_kind(self.regions, lambda r: r[0])
        return rng.choice(by_kind[rng.choice(sorted(by_kind))])

    def _by_kind(self, items: list[Any], kind_of: Callable[[Any], str]) -> dict[str, list[Any]]:
        key = id(items)
        cached = self._groups.get(key)
        if cached is None or sum(map(len, cached.values())) != len(items):
            cached = {}
            for item in items:
                cached.setdefault(kind_of(item), []).append(item)
            self._groups[key] = cached
        return cached

    def region(self, kind: str, start: int, end: int) -> None:
        start, end = max(0, start), min(self.size, end)
        if start < end:
            self.regions.append((kind, start, end))
            self.boundaries += [start, end]

    def add_field(self, kind: str, offset: int, width: int) -> None:
        if offset >= 0 and offset + width <= self.size:
            self.fields.append(Field(kind, offset, width))


def map_file(data: bytes) -> Layout:
    lay = Layout(len(data))
    for copy, base in enumerate(HEADER_COPY_OFFSETS):
        lay.region(f"header copy {copy}", base, base + FILE_HEADER.size)
        for name, at, width in (("sequence", 8, 2), ("format version", 10, 4), ("alignment", 22, 4),
                                ("replay log offset", 26, 8), ("replay log size", 34, 8)):
            lay.add_field(f"header {copy} {name}", base + at, width)
    wide = len(data) >= FILE_HEADER.size and FILE_HEADER.unpack_from(data, 0)[3] == 0x0100
    tables_seen = set()
    for at, otype, offset, size in object_entries(data):
        used = "object entry" if otype else "empty object entry"
        lay.region(used, at, at + OBJECT_ENTRY.size)
        lay.add_field(f"{used} offset", at + 5, 8)
        lay.add_field(f"{used} size", at + 13, 4)
        if otype == OBJ_OBJECT_TABLE:
            lay.chain_slots.append(at)
            tables_seen.add(offset)
        if otype == OBJ_KEY_TABLE:
            _map_key_table(data, lay, offset, size, wide)
    lay.object_tables = [ROOT_OBJECT_TABLE_OFFSET, *sorted(tables_seen)]
    for offset in lay.object_tables:
        lay.region("object table header", offset, offset + OBJECT_TABLE_HEADER.size)
        lay.add_field("object table count", offset + 4, 4)
    lay.boundaries = sorted(set(lay.boundaries))
    return lay


def _map_key_table(data: bytes, lay: Layout, offset: int, size: int, wide: bool) -> None:
    end = min(offset + size, len(data))
    if offset + KEY_TABLE_HEADER.size > end:
        return
    lay.region("key table header", offset, offset + KEY_TABLE_HEADER.size)
    pos = offset + KEY_TABLE_HEADER.size
    while pos + KEY_ENTRY_HEADER.size < end:
        ktype, flags, entry_size, _pt, _po, _crc, _seq, name_len = KEY_ENTRY_HEADER.unpack_from(data, pos)
        if entry_size < KEY_ENTRY_HEADER.size or pos + entry_size > end:
            return
        lay.region("key entry", pos, pos + entry_size)
        lay.add_field("key entry size", pos + 2, 4)
        lay.add_field("key entry parent", pos + 6, 2)
        lay.add_field("key entry parent offset", pos + 8, 4)
        lay.add_field("key name length", pos + 20, 1)
        name_at = pos + KEY_ENTRY_HEADER.size
        name_bytes = name_len * (2 if wide else 1)
        value_at = name_at + name_bytes
        if ktype not in (0, 1) and name_len:
            lay.names.append((name_at, value_at - (2 if wide else 1)))
        if ktype == KEY_NODE:
            lay.nodes.append((pos, offset))
        name = data[name_at:value_at].decode("utf-16-le" if wide else "utf-8", "replace").rstrip("\0")
        value_end = pos + entry_size
        if flags & KEY_FLAG_FILE_OBJECT and value_at + FILE_OBJECT_DATA.size <= value_end:
            lay.file_refs.append(value_at)
            lay.add_field("file object size", value_at, 4)
            lay.add_field("file object offset", value_at + 4, 8)
            vsize, voffset = FILE_OBJECT_DATA.unpack_from(data, value_at)
            if voffset + vsize <= len(data):
                lay.file_objects.append((voffset, vsize))
                lay.region("file object", voffset, voffset + vsize)
                _map_value(data, lay, name, voffset, vsize)
        elif ktype in (6, 7) and value_at + 4 <= value_end:
            lay.add_field("value length", value_at, 4)
            length = struct.unpack_from("<I", data, value_at)[0]
            if value_at + 4 + length <= value_end:
                _map_value(data, lay, name, value_at + 4, length)
        pos += entry_size


def _map_value(data: bytes, lay: Layout, name: str, at: int, size: int) -> None:
    if name == "partition_state":
        _map_partition_state(data, lay, at, size)
    elif name.startswith("RamMemoryBlock") and size >= RAM_MEMORY_BLOCK.size:
        lay.region("RamMemoryBlock", at, at + size)
        for fname, off, width in (("version", 0, 4), ("flags", 4, 4), ("page count", 8, 8),
                                  ("first data page", 16, 8), ("GPA page", 24, 8), ("NUMA node", 32, 4)):
            lay.add_field(f"RamMemoryBlock {fname}", at + off, width)
    elif name.startswith("RamBlock") and size != BLOCK_SIZE:
        _map_records(data, lay, at, size)


def _map_partition_state(data: bytes, lay: Layout, at: int, size: int) -> None:
    if size < DESCRIPTOR.size:
        return
    lay.region("partition_state descriptor", at, at + DESCRIPTOR.size)
    for i in range(3):
        lay.add_field("partition_state descriptor", at + 8 * i, 8)
    _dsize, header_size, total = DESCRIPTOR.unpack_from(data, at)
    pos = header_size + 16
    end = min(total, size)
    count = 0
    while pos + CHUNK_HEADER.size <= end and count < 10000:
        chunk_id, length = CHUNK_HEADER.unpack_from(data, at + pos)
        lay.region("partition_state chunk", at + pos, at + min(pos + CHUNK_HEADER.size + length, end))
        lay.add_field("chunk id", at + pos, 4)
        lay.add_field("chunk length", at + pos + 4, 4)
        if chunk_id == 0xF0000000:
            break
        pos += CHUNK_HEADER.size + length
        count += 1


def _map_records(data: bytes, lay: Layout, at: int, size: int) -> None:
    pos, end, pages = at, at + size, 0
    while pos + 4 <= end:
        (tag,) = PAGE_HEADER.unpack_from(data, pos)
        start = pos
        if tag == TAG_END:
            lay.region("RamBlock record", pos, pos + 4)
            return
        if tag == TAG_FILL:
            pos += FILL_RECORD.size
            pages += 1
        elif tag == TAG_MULTI_FILL:
            if pos + MULTI_FILL_RECORD.size > end:
                return
            lay.multi_fills.append((pos, pages))
            lay.add_field("fill count", pos + 12, 4)
            pages += MULTI_FILL_RECORD.unpack_from(data, pos)[2]
            pos += MULTI_FILL_RECORD.size
        elif tag == TAG_CHUNK:
            if pos + RECORD_CHUNK.size > end:
                return
            _tag, out_size, stored = RECORD_CHUNK.unpack_from(data, pos)
            lay.add_field("chunk out size", pos + 4, 4)
            lay.add_field("chunk stored size", pos + 8, 4)
            if stored != out_size:
                lay.xpress.append((pos + RECORD_CHUNK.size, stored))
            pos += RECORD_CHUNK.size + stored
            pages += out_size // 4096
        elif 0 < tag <= TAG_RAW_PAGE:
            lay.add_field("page record length", pos, 4)
            if tag != TAG_RAW_PAGE:
                lay.xpress.append((pos + 4, tag))
            pos += 4 + tag
            pages += 1
        else:
            return
        lay.region("RamBlock record", start, min(pos, end))
