"""Make damaged files look intact to checksums: recompute every CRC the format has.

A mutation that breaks a CRC is caught at the first check and never reaches the parsers behind
it; recomputing the CRCs after mutating ("CRC-consistent" damage) sends it deeper.  This walks a
file with the writer's own structure definitions (independent of the vm2core reader), best
effort: it never raises, it only stops where the damaged structure makes no sense.
"""

from __future__ import annotations

import struct

from tests.vmrs_writer.structs import (
    FILE_HEADER,
    FILE_HEADER_SIGNATURE,
    HEADER_COPY_OFFSETS,
    KEY_ARRAY,
    KEY_BOOL,
    KEY_DOUBLE,
    KEY_ENTRY_CRC_OFFSET,
    KEY_ENTRY_HEADER,
    KEY_FLAG_FILE_OBJECT,
    KEY_INT,
    KEY_NODE,
    KEY_STRING,
    KEY_TABLE_HEADER,
    KEY_TABLE_SIGNATURE,
    KEY_UINT,
    OBJ_KEY_TABLE,
    OBJ_OBJECT_TABLE,
    OBJECT_ENTRY,
    OBJECT_TABLE_HEADER,
    OBJECT_TABLE_SIGNATURE,
    ROOT_OBJECT_TABLE_OFFSET,
    crc32,
)

_U32 = struct.Struct("<I")
HEADER_CRC_AT = 4               # [FMT] file header: u32 signature, u32 CRC
OBJECT_ENTRY_CRC_AT = 1         # [FMT] object entry: u8 type, u32 CRC
KEY_TABLE_CRC_AT = 6            # [FMT] key table header: u16 sig, u16 index, u16 sequence, u32 CRC
# [FMT] "Key Types": bytes of the fixed-size values; strings/arrays are u32 length + data; a
# file-object reference is {u32 size, u64 offset}.
_FIXED = {KEY_INT: 8, KEY_UINT: 8, KEY_DOUBLE: 8, KEY_BOOL: 4, KEY_NODE: 12}
_FILE_OBJECT_REF = 12
_MAX_TABLES = 4096


def _with_crc(data: bytearray, start: int, size: int, crc_at: int) -> None:
    raw = bytearray(data[start:start + size])
    raw[crc_at:crc_at + 4] = bytes(4)
    _U32.pack_into(data, start + crc_at, crc32(raw))


def refresh_header_crcs(data: bytearray) -> None:
    for base in HEADER_COPY_OFFSETS:
        if base + FILE_HEADER.size <= len(data) and _U32.unpack_from(data, base)[0] == FILE_HEADER_SIGNATURE:
            _with_crc(data, base, FILE_HEADER.size, HEADER_CRC_AT)


def object_entries(data: bytes | bytearray) -> list[tuple[int, int, int, int]]:
    """(entry position, type, object offset, object size) of every object table entry reachable
    from the root table, chain slots included; stops at anything out of bounds or repeated."""
    found: list[tuple[int, int, int, int]] = []
    offset, seen = ROOT_OBJECT_TABLE_OFFSET, set[int]()
    while offset not in seen and len(seen) < _MAX_TABLES and offset + OBJECT_TABLE_HEADER.size <= len(data):
        seen.add(offset)
        sig, count = OBJECT_TABLE_HEADER.unpack_from(data, offset)
        if sig != OBJECT_TABLE_SIGNATURE:
            break
        first = offset + OBJECT_TABLE_HEADER.size
        if first + count * OBJECT_ENTRY.size > len(data):
            break
        nxt = None
        for i in range(count):
            at = first + i * OBJECT_ENTRY.size
            otype, _crc, obj_offset, size, _flags = OBJECT_ENTRY.unpack_from(data, at)
            found.append((at, otype, obj_offset, size))
            if i == count - 1 and otype == OBJ_OBJECT_TABLE:
                nxt = obj_offset
        if nxt is None:
            break
        offset = nxt
    return found


def _covered(data: bytearray, ktype: int, flags: int, value_at: int, value_end: int) -> int | None:
    if flags & KEY_FLAG_FILE_OBJECT:
        return _FILE_OBJECT_REF
    if ktype in (KEY_STRING, KEY_ARRAY):
        if value_at + 4 > value_end:
            return None
        return 4 + _U32.unpack_from(data, value_at)[0]
    return _FIXED.get(ktype)


def refresh_key_table(data: bytearray, offset: int, size: int, wide_names: bool = False) -> None:
    """Recompute a key table's header CRC and the CRC of every entry whose layout still parses."""
    end = min(offset + size, len(data))
    if offset + KEY_TABLE_HEADER.size > end or struct.unpack_from("<H", data, offset)[0] != KEY_TABLE_SIGNATURE:
        return
    _with_crc(data, offset, KEY_TABLE_HEADER.size, KEY_TABLE_CRC_AT)
    pos = offset + KEY_TABLE_HEADER.size
    while pos + KEY_ENTRY_HEADER.size < end:
        ktype, flags, entry_size, _pt, _po, _crc, _seq, name_len = KEY_ENTRY_HEADER.unpack_from(data, pos)
        if entry_size < KEY_ENTRY_HEADER.size or pos + entry_size > end:
            return
        if ktype not in (0, 1):
            value_at = pos + KEY_ENTRY_HEADER.size + name_len * (2 if wide_names else 1)
            covered = _covered(data, ktype, flags, value_at, pos + entry_size)
            if covered is not None and value_at + covered <= pos + entry_size:
                _with_crc(data, pos, value_at + covered - pos, KEY_ENTRY_CRC_OFFSET)
        pos += entry_size


def refresh_checksums(data: bytearray) -> None:
    """Every header, object entry, key table header and key entry CRC, recomputed in place."""
    refresh_header_crcs(data)
    wide = False
    if FILE_HEADER.size <= len(data):
        wide = FILE_HEADER.unpack_from(data, 0)[3] == 0x0100
    for _at, otype, obj_offset, size in object_entries(data):
        if otype == OBJ_KEY_TABLE and 0 < size <= 64 << 20:
            refresh_key_table(data, obj_offset, size, wide)
    for at, _otype, _obj_offset, _size in object_entries(data):
        _with_crc(data, at, OBJECT_ENTRY.size, OBJECT_ENTRY_CRC_AT)
