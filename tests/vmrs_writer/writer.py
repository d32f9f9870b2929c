"""write_vmrs: a streaming, test-only producer of Hyper-V saved-state (.vmrs) files.

File layout (the reader must follow offsets, not assume this):
  0, 4096        header copies
  8192           root object table (align_up(8 + 18 * object_table_entries) bytes)
  ...            file objects in write order: partition_state first, then RamBlocks by block number
  ...            key tables (current, then the stale duplicate if asked), each key_table_size bytes
  ...            replay log (4096-byte header page, + one data page run when dirty)
  ...            chained object tables 2..n
Every object starts on a 4096-byte boundary; file object data is zero-padded to the boundary.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

from tests.vmrs_writer.keystore import (
    KeyStore,
    KeyValue,
    array_value,
    bool_value,
    double_value,
    file_object_value,
    int_value,
    stale_mutator,
    string_value,
    uint_value,
)
from tests.vmrs_writer.options import RangeSpec, WriterOptions
from tests.vmrs_writer.partition_state import VpRegisters, build_partition_state
from tests.vmrs_writer.ramblock import BLOCK_SIZE, PAGE_SIZE, PAGES_PER_BLOCK, ZERO_BLOCK, RamBlockEncoder
from tests.vmrs_writer.ramdesc import pack_ram_memory_block
from tests.vmrs_writer.structs import (
    DATA_ALIGNMENT,
    FILE_OBJECT_THRESHOLD,
    HEADER_COPY_OFFSETS,
    KEY_ENTRY_HEADER,
    KEY_TABLE_HEADER,
    OBJ_EMPTY,
    OBJ_FILE_OBJECT,
    OBJ_FLAG_REQUIRED,
    OBJ_KEY_TABLE,
    OBJ_OBJECT_TABLE,
    OBJECT_ENTRY,
    OBJECT_TABLE_HEADER,
    OBJECT_TABLE_SIGNATURE,
    REPLAY_LOG_ENTRY,
    REPLAY_LOG_HEADER,
    REPLAY_LOG_SIGNATURE,
    ROOT_OBJECT_TABLE_OFFSET,
    HeaderFields,
    align_up,
    crc32,
    pack_file_header,
    pack_object_entry,
)

PARTITION_STATE_KEY = "/savedstate/savedVM/partition_state"
# [FMT] Appendix A "Key Path Versioning": VMs <= 5.0 write these instead.
LEGACY_KEYS = {"partition_state": "/savedVM/partition_state", "memory_block": "/RamMemoryBlock/{}",
               "ram_block": "/RamBlock/{}"}
CURRENT_KEYS = {"partition_state": PARTITION_STATE_KEY, "memory_block": "/savedstate/RamMemoryBlock{}",
                "ram_block": "/savedstate/RamBlock{}"}
SUPPORTED_FORMAT_VERSIONS = (0x0100, 0x0101, 0x0200, 0x0300, 0x0301, 0x0400)
REPLAY_LOG_HEADER_SIZE = 4096


@dataclass(frozen=True)
class _PlacedRange:
    spec: RangeSpec
    mbp_index_start: int


@dataclass(frozen=True)
class _Object:
    obj_type: int
    offset: int
    size: int


def _place_ranges(ranges: list[RangeSpec]) -> list[_PlacedRange]:
    """Give every range its first data page (OpenVMM style: each range starts on a fresh block)."""
    placed: list[_PlacedRange] = []
    next_block = 0
    for spec in ranges:
        if spec.gpa_start % PAGE_SIZE or spec.page_count <= 0:
            raise ValueError(f"range at {spec.gpa_start:#x}: GPA must be page aligned, page_count > 0")
        mbp = next_block * PAGES_PER_BLOCK if spec.mbp_index_start is None else spec.mbp_index_start
        if mbp < 0:
            raise ValueError("mbp_index_start must be >= 0")
        next_block = max(next_block, -(-(mbp + spec.page_count) // PAGES_PER_BLOCK))
        placed.append(_PlacedRange(spec, mbp))
    for spans in (sorted((p.spec.gpa_start // PAGE_SIZE, p.spec.page_count) for p in placed),
                  sorted((p.mbp_index_start, p.spec.page_count) for p in placed)):
        for (start_a, count_a), (start_b, _) in zip(spans, spans[1:], strict=False):
            if start_a + count_a > start_b:
                raise ValueError("ranges overlap (in guest-physical or in RamBlock page numbering)")
    return placed


def _blocks(placed: list[_PlacedRange]) -> Iterator[tuple[int, bytes, bool]]:
    """(data block number, 1 MiB of data, omit-if-zero) in increasing block order, streaming."""
    current: int | None = None
    buffer = bytearray()
    omit = False
    for item in sorted(placed, key=lambda p: p.mbp_index_start):
        spec = item.spec
        page = 0
        while page < spec.page_count:
            block, in_block = divmod(item.mbp_index_start + page, PAGES_PER_BLOCK)
            count = min(PAGES_PER_BLOCK - in_block, spec.page_count - page)
            data = spec.read(page * PAGE_SIZE, count * PAGE_SIZE)
            if len(data) != count * PAGE_SIZE:
                raise ValueError(f"range at {spec.gpa_start:#x}: read returned {len(data)} bytes, "
                                 f"wanted {count * PAGE_SIZE}")
            if block != current:
                if current is not None:
                    yield current, bytes(buffer), omit
                current, omit = block, False
                if count == PAGES_PER_BLOCK:
                    yield block, bytes(data), spec.omit_zero_blocks
                    current = None
                    page += count
                    continue
                buffer = bytearray(BLOCK_SIZE)
            buffer[in_block * PAGE_SIZE:(in_block + count) * PAGE_SIZE] = data
            omit = omit or spec.omit_zero_blocks
            page += count
    if current is not None:
        yield current, bytes(buffer), omit


class _ObjectWriter:
    """Appends aligned objects at the end of the data area and remembers them."""

    def __init__(self, file: BinaryIO, data_start: int) -> None:
        self.file = file
        self.data_end = data_start
        self.objects: list[_Object] = []
        file.seek(data_start)

    def append(self, data: bytes, obj_type: int | None, size: int | None = None) -> int:
        """Write data at the aligned end; record an object table entry unless obj_type is None."""
        offset = self.data_end
        aligned = align_up(len(data))
        self.file.seek(offset)
        self.file.write(data)
        if aligned > len(data):
            self.file.write(bytes(aligned - len(data)))
        self.data_end = offset + aligned
        if obj_type is not None:
            self.objects.append(_Object(obj_type, offset, aligned if size is None else size))
        return offset


def _object_table_bytes(entries: list[bytes], slots: int) -> bytes:
    body = OBJECT_TABLE_HEADER.pack(OBJECT_TABLE_SIGNATURE, slots) + b"".join(entries)
    return body.ljust(align_up(len(body)), b"\0")


def _entry_flags(obj_type: int, flag_style: str) -> int:
    if obj_type == OBJ_KEY_TABLE or flag_style == "all":
        return OBJ_FLAG_REQUIRED
    return 0


def _schema_keys(keys: KeyStore, placed: list[_PlacedRange], opts: WriterOptions) -> None:
    """The small metadata keys of vmrs-format.md section 2 (RAM data and CPU state come later)."""
    keys.put("/savedstate/VmVersion", int_value(opts.vm_version))
    names = LEGACY_KEYS if opts.key_layout == "pre-2016" else CURRENT_KEYS
    if opts.key_layout != "pre-2016":
        keys.put("/configuration/properties/version", int_value(opts.vm_version))
    if opts.saved_state_type is not None:
        keys.put("/savedstate/type", string_value(opts.saved_state_type))
    for index, item in enumerate(placed):
        spec = item.spec
        value = pack_ram_memory_block(
            flags=spec.flags, page_count=spec.page_count, mbp_index_start=item.mbp_index_start,
            gpa_page_start=spec.gpa_start // PAGE_SIZE, numa_node=spec.numa_node)
        value = value[:opts.memory_block_size].ljust(opts.memory_block_size, b"\0")
        keys.put(names["memory_block"].format(index), array_value(value))
    if opts.decoy_keys:
        _put_decoy_keys(keys)


def write_vmrs(path: str | Path, ranges: list[RangeSpec], vps: Sequence[VpRegisters],
               options: WriterOptions | None = None) -> None:
    """Write a .vmrs for the given RAM ranges and VP register sets; RAM is pulled block by block."""
    opts = options or WriterOptions()
    if opts.format_version not in SUPPORTED_FORMAT_VERSIONS:
        raise ValueError(f"unsupported format version {opts.format_version:#x}")
    if opts.object_table_entries < 2:
        raise ValueError("object_table_entries must be >= 2 (one entry + the chain slot)")
    if opts.key_table_size % DATA_ALIGNMENT or opts.key_table_size < DATA_ALIGNMENT:
        raise ValueError("key_table_size must be a positive multiple of 4096")
    if not ranges:
        raise ValueError("at least one RAM range is needed")
    seen_vp_vtl = [(vp.index, vp.vtl) for vp in vps]
    if len(set(seen_vp_vtl)) != len(seen_vp_vtl):
        raise ValueError("duplicate (VP index, VTL) in vps")
    placed = _place_ranges(ranges)

    keys = KeyStore(utf16_names=opts.format_version == 0x0100)
    names = LEGACY_KEYS if opts.key_layout == "pre-2016" else CURRENT_KEYS
    _schema_keys(keys, placed, opts)
    slots = opts.object_table_entries
    root_table_size = align_up(OBJECT_TABLE_HEADER.size + slots * OBJECT_ENTRY.size)
    encoder = RamBlockEncoder(opts.policy, opts.seed, opts.xpress_fraction)
    key_table_size = opts.key_table_size

    with open(path, "w+b") as file:
        writer = _ObjectWriter(file, ROOT_OBJECT_TABLE_OFFSET + root_table_size)

        if opts.decoy_keys:
            blob_data = bytes(range(256)) * 12
            keys.put("/savedstate/configuration/devices/blob",
                     file_object_value(len(blob_data), writer.append(blob_data, OBJ_FILE_OBJECT)))
        blob = build_partition_state(vps, vendor=opts.vendor, os_id=opts.os_id,
                                     extra_unknown_chunks=opts.extra_unknown_chunks,
                                     vp_indices_style=opts.vp_indices_style)
        if opts.partition_state_inline:
            # The PROLOG alone is 4080 bytes: grow every key table until the inline entry fits
            # (entry = header + name, counted as UTF-16 + NUL, + u32 length + blob).
            needed = KEY_TABLE_HEADER.size + KEY_ENTRY_HEADER.size + 32 + 4 + len(blob)
            key_table_size = max(key_table_size, align_up(needed))
        if len(blob) < FILE_OBJECT_THRESHOLD or opts.partition_state_inline:
            keys.put(names["partition_state"], array_value(blob))
        else:
            keys.put(names["partition_state"], file_object_value(len(blob), writer.append(blob, OBJ_FILE_OBJECT)))

        _write_ram_blocks(writer, keys, placed, encoder, names["ram_block"])

        _finish_container(file, writer, keys, opts, key_table_size, slots, root_table_size)


def write_hvs(path: str | Path, values: dict[str, KeyValue | bytes], options: WriterOptions | None = None) -> None:
    """A HyperVStorage file holding exactly ``values`` (no saved state): a .vmcx, data.vmcx or runtime .vmrs.

    ``bytes`` become arrays; values of 2048 bytes or more go to file objects (as for write_vmrs). Only
    the container options of WriterOptions apply (format version, tables, headers, replay log).
    """
    opts = options or WriterOptions()
    keys = KeyStore(utf16_names=opts.format_version == 0x0100)
    slots = opts.object_table_entries
    root_table_size = align_up(OBJECT_TABLE_HEADER.size + slots * OBJECT_ENTRY.size)
    with open(path, "w+b") as file:
        writer = _ObjectWriter(file, ROOT_OBJECT_TABLE_OFFSET + root_table_size)
        for key, value in values.items():
            if isinstance(value, (bytes, bytearray)):
                value = (file_object_value(len(value), writer.append(bytes(value), OBJ_FILE_OBJECT))
                         if len(value) >= FILE_OBJECT_THRESHOLD else array_value(bytes(value)))
            keys.put(key, value)
        _finish_container(file, writer, keys, opts, opts.key_table_size, slots, root_table_size)


def _finish_container(file: BinaryIO, writer: _ObjectWriter, keys: KeyStore, opts: WriterOptions,
                      key_table_size: int, slots: int, root_table_size: int) -> None:
    """Key tables, replay log, object tables and header copies after the file objects."""
    sequence = 2 if opts.duplicate_stale_keytable else 1
    tables = keys.build_tables(key_table_size, sequence)
    table_objects = [_Object(OBJ_KEY_TABLE, writer.append(t, None), key_table_size) for t in tables]
    if opts.duplicate_stale_keytable:
        # An older (sequence 1) copy of table 1 with wrong values, listed right after the current one.
        stale = keys.build_tables(key_table_size, 1, mutate=stale_mutator)[0]
        table_objects.insert(1, _Object(OBJ_KEY_TABLE, writer.append(stale, None), key_table_size))

    entries = [pack_object_entry(o.obj_type, o.offset, o.size, _entry_flags(o.obj_type, opts.flag_style))
               for o in table_objects + writer.objects]
    shaped = (opts.replay_log_offset, opts.replay_log_region_size, opts.replay_log_bytes_in_file) != (None,) * 3
    if shaped:
        # Hyper-V's shape: the log is the last thing in the file, and its region may run past the end.
        _write_object_tables(writer, entries, slots, root_table_size, opts.flag_style)
        if opts.replay_log_offset is not None:
            if opts.replay_log_offset < writer.data_end or opts.replay_log_offset % DATA_ALIGNMENT:
                raise ValueError(f"replay_log_offset must be aligned and >= {writer.data_end:#x}")
            writer.data_end = opts.replay_log_offset
    replay_offset, replay_size = _write_replay_log(writer, tables[0], table_objects[0].offset,
                                                   dirty=opts.dirty_replay_log)
    if not shaped:
        _write_object_tables(writer, entries, slots, root_table_size, opts.flag_style)
    else:
        if opts.replay_log_region_size is not None:
            replay_size = opts.replay_log_region_size
        if opts.replay_log_bytes_in_file is not None:
            file.truncate(replay_offset + opts.replay_log_bytes_in_file)

    current = HeaderFields(opts.format_version, 0, replay_offset, replay_size, REPLAY_LOG_HEADER_SIZE)
    copies = _header_copies(current, opts)
    for offset, copy in zip(HEADER_COPY_OFFSETS, copies, strict=True):
        file.seek(offset)
        file.write(copy)
    file.flush()


def _write_ram_blocks(writer: _ObjectWriter, keys: KeyStore, placed: list[_PlacedRange],
                      encoder: RamBlockEncoder, name: str = CURRENT_KEYS["ram_block"]) -> None:
    """Stream every data block: encode, then a file object (>= 2048 bytes) or an inline array."""
    for block, data, omit in _blocks(placed):
        if omit and data == ZERO_BLOCK:
            continue
        value = encoder.encode(block, data)
        if len(value) >= FILE_OBJECT_THRESHOLD:
            keys.put(name.format(block), file_object_value(len(value), writer.append(value, OBJ_FILE_OBJECT)))
        else:
            keys.put(name.format(block), array_value(value))


def _header_copies(current: HeaderFields, opts: WriterOptions) -> list[bytes]:
    """The header pages for offsets 0 and 4096."""
    if opts.newer_second_header:
        # The older copy at 0 differs visibly: it names another format version.
        older = replace(current, format_version=0x0300 if opts.format_version != 0x0300 else 0x0400)
        copies = [pack_file_header(older, 1), pack_file_header(current, 2)]
    else:
        copies = [pack_file_header(current, 2), pack_file_header(current, 1)]
    if opts.corrupt_first_header:
        # Highest sequence but a bad CRC, and nonsense fields: using it must visibly fail.
        bogus = replace(current, data_version=0xBAD, replay_log_offset=0x7FFF_F000_0000)
        copies[0] = pack_file_header(bogus, 3, corrupt_crc=True)
    return copies


def _put_decoy_keys(keys: KeyStore) -> None:
    keys.put("/savedstate/configuration/vmbus/channel_count", uint_value(3))
    keys.put("/savedstate/configuration/settings/enabled", bool_value(True))
    keys.put("/savedstate/configuration/settings/ratio", double_value(0.5))
    keys.put("/savedstate/configuration/settings/name", string_value("decoy"))
    keys.put("/savedstate/configuration/devices/small", array_value(b"\x01\x02\x03"))


def _write_replay_log(writer: _ObjectWriter, first_table: bytes, first_table_offset: int,
                      dirty: bool) -> tuple[int, int]:
    """Replay log header page; when dirty, one entry whose data re-writes key table 1 unchanged.

    Header CRC: CRC-32 of the 34-byte header with its CRC field zeroed. Entry CRC: of the 28-byte
    entry with header_checksum zeroed; data CRC: of the entry's data. offset_inside_log is relative
    to the replay log start. max_entries = (4096 - 34) // 28 = 145 ([FMT] writer's rule).
    """
    max_entries = (REPLAY_LOG_HEADER_SIZE - REPLAY_LOG_HEADER.size) // REPLAY_LOG_ENTRY.size
    count = 1 if dirty else 0

    def header_bytes() -> bytes:
        raw = REPLAY_LOG_HEADER.pack(REPLAY_LOG_SIGNATURE, 0, count, 0, max_entries, 0, 0, 0, 0)
        return REPLAY_LOG_HEADER.pack(REPLAY_LOG_SIGNATURE, crc32(raw), count, 0, max_entries, 0, 0, 0, 0)

    page = bytearray(header_bytes().ljust(REPLAY_LOG_HEADER_SIZE, b"\0"))
    if dirty:
        fields = [0, first_table_offset, len(first_table), REPLAY_LOG_HEADER_SIZE, crc32(first_table)]
        fields[0] = crc32(REPLAY_LOG_ENTRY.pack(*fields))
        entry_at = REPLAY_LOG_HEADER.size
        page[entry_at:entry_at + REPLAY_LOG_ENTRY.size] = REPLAY_LOG_ENTRY.pack(*fields)
        offset = writer.append(bytes(page) + first_table, None)
        return offset, REPLAY_LOG_HEADER_SIZE + align_up(len(first_table))
    return writer.append(bytes(page), None), REPLAY_LOG_HEADER_SIZE


def _write_object_tables(writer: _ObjectWriter, entries: list[bytes], slots: int, root_size: int,
                         flag_style: str) -> None:
    """Root table at 8192, overflow tables appended; the last slot of each table is the chain slot."""
    usable = slots - 1
    groups = [entries[i:i + usable] for i in range(0, len(entries), usable)] or [[]]
    empty = pack_object_entry(OBJ_EMPTY, 0, 0, 0)
    table_size = root_size
    # Overflow tables are appended after everything else, so their offsets are known up front.
    offsets = [ROOT_OBJECT_TABLE_OFFSET] + [writer.data_end + i * table_size for i in range(len(groups) - 1)]
    images = []
    for index, group in enumerate(groups):
        slot_entries = group + [empty] * (usable - len(group))
        if index + 1 < len(groups):
            chain = pack_object_entry(OBJ_OBJECT_TABLE, offsets[index + 1], table_size,
                                      _entry_flags(OBJ_OBJECT_TABLE, flag_style))
        else:
            chain = empty
        images.append(_object_table_bytes(slot_entries + [chain], slots))
    for index, image in enumerate(images[1:], start=1):
        if writer.append(image, None) != offsets[index]:
            raise AssertionError("object table placement drifted")
    writer.file.seek(ROOT_OBJECT_TABLE_OFFSET)
    writer.file.write(images[0])
