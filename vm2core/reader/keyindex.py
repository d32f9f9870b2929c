"""Compact in-memory indexes of a HyperVStorage file's object entries and keys.

A hostile (or simply huge: 1 TiB of RAM is a million ``RamBlock`` keys) file must not cost
hundreds of bytes of Python objects per entry.  These indexes keep one small record per entry
in typed arrays and build the public :class:`ObjectEntry` / :class:`KeyEntry` objects only when
they are asked for, so memory stays near the size of the metadata in the file.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import overload

# [FMT] "Key Types" (the numbers are container.KEY_FREE ... KEY_NODE).
KEY_TYPE_NAMES = {1: "free", 3: "int", 4: "uint", 5: "double", 6: "string", 7: "array", 8: "bool", 9: "node"}

FILE_OBJECT_FLAG = 0x01     # [FMT] key entry flag PointsToFileObject (container.KEY_FLAG_FILE_OBJECT)


@dataclass(frozen=True)
class ObjectEntry:
    table_offset: int       # where the entry itself lives (for messages)
    type: int
    crc: int
    offset: int
    size: int
    flags: int


@dataclass
class KeyEntry:
    """One key as stored; ``data_offset``/``data_size`` locate the value's bytes in the file."""

    path: str
    type: int
    flags: int
    table_index: int
    table_offset: int       # offset of this entry inside its key table
    data_offset: int        # absolute file offset of the value bytes (after any length prefix)
    data_size: int
    in_file_object: bool

    @property
    def type_name(self) -> str:
        return KEY_TYPE_NAMES.get(self.type, f"type{self.type}")


class ObjectList(Sequence[ObjectEntry]):
    """Object table entries (chain slots excluded), ~26 bytes each instead of a dataclass."""

    def __init__(self) -> None:
        self._where = array("Q")
        self._type = array("B")
        self._crc = array("I")
        self._offset = array("Q")
        self._size = array("I")
        self._flags = array("B")

    def append(self, where: int, obj_type: int, crc: int, offset: int, size: int, flags: int) -> None:
        self._where.append(where)
        self._type.append(obj_type)
        self._crc.append(crc)
        self._offset.append(offset)
        self._size.append(size)
        self._flags.append(flags)

    def __len__(self) -> int:
        return len(self._type)

    @overload
    def __getitem__(self, i: int) -> ObjectEntry: ...

    @overload
    def __getitem__(self, i: slice) -> list[ObjectEntry]: ...

    def __getitem__(self, i: int | slice) -> ObjectEntry | list[ObjectEntry]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return ObjectEntry(self._where[i], self._type[i], self._crc[i], self._offset[i], self._size[i],
                           self._flags[i])

    def of_type(self, obj_type: int) -> Iterator[tuple[int, int, int]]:
        """(entry position in the file, object offset, object size) of every entry of one type."""
        for i, t in enumerate(self._type):
            if t == obj_type:
                yield self._where[i], self._offset[i], self._size[i]

    def type_counts(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for t in self._type:
            counts[t] = counts.get(t, 0) + 1
        return counts


class KeyIndex(Mapping[str, KeyEntry]):
    """path -> KeyEntry for millions of keys in ~70 bytes each.

    A dict of a million path strings costs ~140 MB; here every path is UTF-8 in one bytearray,
    found through an open-addressing hash table of slot numbers (linear probing, at most half
    full), and every key's fields are one record in typed arrays.
    """

    def __init__(self) -> None:
        self._blob = bytearray()
        self._start = array("Q", [0])   # path i is blob[start[i]:start[i + 1]]
        self._live = array("B")         # 0 once a later key with the same path replaced it
        self._table = array("I", bytes(4 * 8))   # slot + 1 per bucket, 0 = empty
        self._count = 0
        self._type = array("B")
        self._flags = array("B")
        self._loc = array("Q")          # table_index << 32 | offset of the entry inside its table
        self._data_offset = array("Q")
        self._data_size = array("I")    # u32 on disk (file-object size, or inside a <= 16 MiB table)

    def _path(self, slot: int) -> bytes:
        return bytes(self._blob[self._start[slot]:self._start[slot + 1]])

    def _bucket(self, key: bytes) -> int:
        """The bucket holding ``key``, or the empty bucket where it would go."""
        table = self._table
        mask = len(table) - 1
        i = hash(key) & mask
        while True:
            slot = table[i]
            if slot == 0 or self._blob[self._start[slot - 1]:self._start[slot]] == key:
                return i
            i = (i + 1) & mask

    def _grow(self) -> None:
        old = self._table
        self._table = array("I", bytes(8 * len(old)))
        for slot in old:
            if slot:
                self._table[self._bucket(self._path(slot - 1))] = slot

    def add(self, path: str, ktype: int, flags: int, loc: int, data_offset: int, data_size: int) -> None:
        key = path.encode()
        slot = len(self._type)
        self._blob += key
        self._start.append(len(self._blob))
        self._live.append(1)
        self._type.append(ktype)
        self._flags.append(flags)
        self._loc.append(loc)
        self._data_offset.append(data_offset)
        self._data_size.append(data_size)
        i = self._bucket(key)
        if self._table[i]:
            self._live[self._table[i] - 1] = 0
        else:
            self._count += 1
        self._table[i] = slot + 1
        if 2 * self._count > len(self._table):
            self._grow()

    def _find(self, path: str) -> int | None:
        slot = self._table[self._bucket(path.encode())]
        return slot - 1 if slot else None

    def _entry(self, path: str, i: int) -> KeyEntry:
        loc = self._loc[i]
        return KeyEntry(path, self._type[i], self._flags[i], loc >> 32, loc & 0xFFFFFFFF, self._data_offset[i],
                        self._data_size[i], bool(self._flags[i] & FILE_OBJECT_FLAG))

    def __getitem__(self, path: str) -> KeyEntry:
        i = self._find(path)
        if i is None:
            raise KeyError(path)
        return self._entry(path, i)

    def get(self, path: str, default: KeyEntry | None = None) -> KeyEntry | None:  # type: ignore[override]
        i = self._find(path)
        return default if i is None else self._entry(path, i)

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and self._find(path) is not None

    def __iter__(self) -> Iterator[str]:
        """Paths in the order their (surviving) keys were stored."""
        return (self._path(i).decode() for i, live in enumerate(self._live) if live)

    def __len__(self) -> int:
        return self._count

    def children(self, path: str) -> Iterator[str]:
        """Paths of the keys directly below ``path`` (a walk over every key: for small trees such as a
        host registry; the index keeps no per-node lists, so memory does not follow the key count)."""
        prefix = path.rstrip("/").encode() + b"/"
        for i, live in enumerate(self._live):
            if live:
                p = self._path(i)
                if p.startswith(prefix) and b"/" not in p[len(prefix):]:
                    yield p.decode()

    def sorted_paths(self) -> Iterator[str]:
        """Paths in sorted order (UTF-8 byte order is code point order)."""
        return (key.decode() for key in sorted(self._path(i) for i, live in enumerate(self._live) if live))
