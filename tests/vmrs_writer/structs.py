"""HyperVStorage on-disk structures, defined once.

Sources: vmrs-format.md section 1, which cites OpenVMM support/hvs_file FORMAT.md and src/defs.rs [FMT];
replay log layout from [FMT] defs.rs. All little-endian, packed.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

# [FMT] file header, 46 bytes, copies at 0 and 4096: signature, crc, sequence, format_version,
# data_version, flags, data_alignment, replay_log_offset, replay_log_size, replay_log_header_size.
FILE_HEADER = struct.Struct("<IIHIIIIQQI")
FILE_HEADER_SIGNATURE = 0x01282014
HEADER_COPY_OFFSETS = (0, 4096)
ROOT_OBJECT_TABLE_OFFSET = 8192        # [FMT] regardless of data alignment
DATA_ALIGNMENT = 4096

# [FMT] object table header {signature, entries_count} and 18-byte entry
# {type, crc, file_offset, size, flags}.
OBJECT_TABLE_HEADER = struct.Struct("<II")
OBJECT_TABLE_SIGNATURE = 0x01110001
OBJECT_ENTRY = struct.Struct("<BIQIB")
OBJ_EMPTY, OBJ_OBJECT_TABLE, OBJ_KEY_TABLE, OBJ_FILE_OBJECT, OBJ_FREE = 0, 1, 2, 3, 4
OBJ_FLAG_REQUIRED = 0x01

# [FMT] key table header {signature 2, table_index (from 1), sequence, crc of these 10 bytes}.
KEY_TABLE_HEADER = struct.Struct("<HHHI")
KEY_TABLE_SIGNATURE = 0x0002
# [FMT] 21-byte key entry header {type, flags, size (whole entry), parent_table, parent_offset, crc,
# insertion_sequence, name_size_in_symbols}.
KEY_ENTRY_HEADER = struct.Struct("<BBIHIIIB")
KEY_ENTRY_CRC_OFFSET = 12
KEY_FREE, KEY_INT, KEY_UINT, KEY_DOUBLE, KEY_STRING, KEY_ARRAY, KEY_BOOL, KEY_NODE = 1, 3, 4, 5, 6, 7, 8, 9
KEY_FLAG_FILE_OBJECT = 0x01
# [FMT] data of a key whose value lives in a file object: {u32 size, u64 file_offset}.
FILE_OBJECT_DATA = struct.Struct("<IQ")
# [FMT] node data {u64 change_tracking_sequence, u32 next_insertion_sequence}.
NODE_DATA = struct.Struct("<QI")
# [FMT] values of this many bytes or more go to a file object (">=").
FILE_OBJECT_THRESHOLD = 2048

# [FMT] defs.rs replay log header (34 bytes) {signature, crc, current_entries, u8 reserved,
# max_entries, u8 change_tracking_enabled, u64 ct_offset, u32 ct_size, u32 ct_used}.
REPLAY_LOG_HEADER = struct.Struct("<IIIBIBQII")
REPLAY_LOG_SIGNATURE = 0x01110003
# [FMT] defs.rs replay log entry (28 bytes) {header_crc, destination_offset, destination_size,
# offset_inside_log, data_crc}.
REPLAY_LOG_ENTRY = struct.Struct("<IQIQI")


def crc32(data: bytes | bytearray | memoryview) -> int:
    """[FMT] CRC-32 ISO 3309 (zlib), never CRC-32C."""
    return zlib.crc32(data) & 0xFFFFFFFF


def align_up(value: int, alignment: int = DATA_ALIGNMENT) -> int:
    return (value + alignment - 1) // alignment * alignment


@dataclass(frozen=True)
class HeaderFields:
    """The variable fields of a file header copy."""

    format_version: int
    data_version: int
    replay_log_offset: int
    replay_log_size: int
    replay_log_header_size: int


def pack_file_header(header: HeaderFields, sequence: int, corrupt_crc: bool = False) -> bytes:
    """A header copy padded to 4096 bytes; CRC over the 46 bytes with the CRC field zeroed."""
    fields = [FILE_HEADER_SIGNATURE, 0, sequence, header.format_version, header.data_version, 0,
              DATA_ALIGNMENT, header.replay_log_offset, header.replay_log_size, header.replay_log_header_size]
    crc = crc32(FILE_HEADER.pack(*fields))
    fields[1] = crc ^ 0xFFFFFFFF if corrupt_crc else crc
    return FILE_HEADER.pack(*fields).ljust(4096, b"\0")


def pack_object_entry(obj_type: int, offset: int, size: int, flags: int) -> bytes:
    """One object table entry; CRC over the 18 bytes with the CRC field zeroed ([FMT] 3.1 fix)."""
    crc = crc32(OBJECT_ENTRY.pack(obj_type, 0, offset, size, flags))
    return OBJECT_ENTRY.pack(obj_type, crc, offset, size, flags)


def pack_key_table_header(table_index: int, sequence: int) -> bytes:
    crc = crc32(KEY_TABLE_HEADER.pack(KEY_TABLE_SIGNATURE, table_index, sequence, 0))
    return KEY_TABLE_HEADER.pack(KEY_TABLE_SIGNATURE, table_index, sequence, crc)
