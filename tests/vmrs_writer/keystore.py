"""The key/value tree of a HyperVStorage file, laid out into key tables.

Layout follows [FMT] (OpenVMM FORMAT.md): the root node is virtual (children point at table 0,
offset 0); nodes precede their children (depth-first, children sorted by name); insertion
sequences are 1-based per parent; a node's next_insertion_sequence is its child count + 1;
parent_offset is the parent entry's offset from the start of its key table (the 10-byte header
included); entries fill each table exactly; a leftover gap of 1..21 bytes is absorbed into the
last entry's size, a larger one becomes a Free entry.

Entry CRC (documented choice, as [FMT]): CRC-32 over the 21-byte header with the CRC field
zeroed (size field as written, i.e. including absorbed slack) + name bytes + data bytes, not the
slack. Free entries carry CRC 0 (as OpenVMM writes them).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, replace

from tests.vmrs_writer.structs import (
    FILE_OBJECT_DATA,
    KEY_ARRAY,
    KEY_BOOL,
    KEY_DOUBLE,
    KEY_ENTRY_CRC_OFFSET,
    KEY_ENTRY_HEADER,
    KEY_FLAG_FILE_OBJECT,
    KEY_FREE,
    KEY_INT,
    KEY_NODE,
    KEY_STRING,
    KEY_TABLE_HEADER,
    KEY_UINT,
    NODE_DATA,
    crc32,
    pack_key_table_header,
)

_U32 = struct.Struct("<I")


@dataclass(frozen=True)
class KeyValue:
    """A typed value as stored after the entry name (length prefix included where [FMT] has one)."""

    key_type: int
    data: bytes
    flags: int = 0


def int_value(value: int) -> KeyValue:
    return KeyValue(KEY_INT, struct.pack("<q", value))


def uint_value(value: int) -> KeyValue:
    return KeyValue(KEY_UINT, struct.pack("<Q", value))


def double_value(value: float) -> KeyValue:
    return KeyValue(KEY_DOUBLE, struct.pack("<d", value))


def bool_value(value: bool) -> KeyValue:
    return KeyValue(KEY_BOOL, struct.pack("<i", int(value)))


def string_value(value: str) -> KeyValue:
    """[FMT]/OpenVMM writer: u32 byte length then UTF-16LE including the terminating NUL."""
    encoded = value.encode("utf-16-le") + b"\0\0"
    return KeyValue(KEY_STRING, _U32.pack(len(encoded)) + encoded)


def array_value(value: bytes) -> KeyValue:
    return KeyValue(KEY_ARRAY, _U32.pack(len(value)) + bytes(value))


def file_object_value(size: int, file_offset: int, key_type: int = KEY_ARRAY) -> KeyValue:
    return KeyValue(key_type, FILE_OBJECT_DATA.pack(size, file_offset), KEY_FLAG_FILE_OBJECT)


@dataclass
class _Entry:
    path: str
    name: str
    parent: str          # "" for children of the virtual root
    value: KeyValue
    is_node: bool
    insertion_sequence: int = 0


Mutator = Callable[[str, KeyValue], KeyValue]


class KeyStore:
    """Collects path -> value pairs, then serialises them into key tables."""

    def __init__(self, *, utf16_names: bool = False) -> None:
        self.utf16_names = utf16_names
        self._values: dict[str, KeyValue] = {}

    def put(self, path: str, value: KeyValue) -> None:
        if not path.startswith("/") or path.endswith("/") or "//" in path:
            raise ValueError(f"bad key path {path!r}")
        self._values[path] = value

    def __len__(self) -> int:
        return len(self._values)

    def _entries(self, mutate: Mutator | None) -> list[_Entry]:
        children: dict[str, set[str]] = {"": set()}
        for path in self._values:
            parts = path[1:].split("/")
            for depth in range(len(parts)):
                parent = "/" + "/".join(parts[:depth]) if depth else ""
                children.setdefault(parent, set()).add(parts[depth])
        for path in self._values:
            if path in children:
                raise ValueError(f"key {path} is both a value and a node")
        out: list[_Entry] = []

        def visit(parent: str) -> None:
            for seq, name in enumerate(sorted(children.get(parent, ())), start=1):
                path = f"{parent}/{name}"
                if path in self._values:
                    value = self._values[path]
                    if mutate is not None:
                        value = mutate(path, value)
                    out.append(_Entry(path, name, parent, value, False, seq))
                else:
                    count = len(children.get(path, ()))
                    node = KeyValue(KEY_NODE, NODE_DATA.pack(0, count + 1))
                    out.append(_Entry(path, name, parent, node, True, seq))
                    visit(path)

        visit("")
        return out

    def _name_bytes(self, name: str) -> tuple[bytes, int]:
        """Encoded name and NameSizeInSymbols (NUL included)."""
        if self.utf16_names:
            encoded = name.encode("utf-16-le") + b"\0\0"
            symbols = len(encoded) // 2
        else:
            encoded = name.encode("utf-8") + b"\0"
            symbols = len(encoded)
        if symbols > 255:
            raise ValueError(f"key name too long: {name!r}")
        return encoded, symbols

    def build_tables(self, table_size: int, sequence: int, mutate: Mutator | None = None) -> list[bytes]:
        """Key tables (each exactly table_size bytes), table_index = list position + 1."""
        header_size = KEY_TABLE_HEADER.size
        entry_header_size = KEY_ENTRY_HEADER.size
        tables: list[bytearray] = []
        current = bytearray()
        locations: dict[str, tuple[int, int]] = {"": (0, 0)}

        def close_table() -> None:
            remaining = table_size - header_size - len(current)
            if remaining:
                # Invariant from the absorb rule below: remaining > 21, so a Free entry fits.
                current.extend(KEY_ENTRY_HEADER.pack(KEY_FREE, 0, remaining, 0, 0, 0, 0, 0))
                current.extend(bytes(remaining - entry_header_size))
            tables.append(current)

        for entry in self._entries(mutate):
            name_bytes, symbols = self._name_bytes(entry.name)
            size = entry_header_size + len(name_bytes) + len(entry.value.data)
            usable = table_size - header_size
            if size > usable:
                raise ValueError(f"key {entry.path} ({size} bytes) does not fit a {table_size}-byte table")
            if len(current) + size > usable:
                close_table()
                current = bytearray()
            table_index = len(tables) + 1
            offset = header_size + len(current)
            remaining_after = usable - len(current) - size
            slack = remaining_after if 0 < remaining_after <= entry_header_size else 0
            parent_table, parent_offset = locations[entry.parent]
            header = bytearray(KEY_ENTRY_HEADER.pack(
                entry.value.key_type, entry.value.flags, size + slack, parent_table, parent_offset, 0,
                entry.insertion_sequence, symbols))
            crc = crc32(bytes(header) + name_bytes + entry.value.data)
            _U32.pack_into(header, KEY_ENTRY_CRC_OFFSET, crc)
            current.extend(header)
            current.extend(name_bytes)
            current.extend(entry.value.data)
            current.extend(bytes(slack))
            if entry.is_node:
                locations[entry.path] = (table_index, offset)
        close_table()
        return [pack_key_table_header(i + 1, sequence) + bytes(body) for i, body in enumerate(tables)]


def stale_mutator(path: str, value: KeyValue) -> KeyValue:
    """Wrong-but-well-formed values for a stale key table copy: same sizes, different contents."""
    if value.flags & KEY_FLAG_FILE_OBJECT:
        return value
    if value.key_type in (KEY_INT, KEY_UINT):
        (number,) = struct.unpack("<Q", value.data)
        return replace(value, data=struct.pack("<Q", (number + 0x111) & 0xFFFFFFFFFFFFFFFF))
    if value.key_type == KEY_ARRAY and len(value.data) > 4:
        return replace(value, data=value.data[:4] + bytes(b ^ 0x5A for b in value.data[4:]))
    if value.key_type == KEY_STRING and len(value.data) > 6:
        symbols = (len(value.data) - 6) // 2
        return replace(value, data=value.data[:4] + ("X" * symbols).encode("utf-16-le") + value.data[-2:])
    return value
