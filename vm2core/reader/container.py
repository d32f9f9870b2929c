"""HyperVStorage: the key-value container under .vmrs / .vsv / .vmcx files.

Knows nothing about virtual machines.  It answers "which keys exist", "what is the value of
this key" and "where in the file do this key's bytes live" (so that 1 MiB RAM blocks can be
copied or decoded without going through a Python-level copy of the whole value).

Sources of the facts (see ``vmrs-format.md`` §1): [FMT] OpenVMM ``support/hvs_file/FORMAT.md``,
[DIS] dissect.hypervisor ``c_hyperv.py``.  Every size read from the file is checked against
the file size or the table that contains it before it is used.

What must lie inside the file is what holds data: a header copy (a missing one is only noted), the
object tables, the key tables, the bytes of every referenced file object, and a replay log's header
and pending entries when the header is there.  What Hyper-V does not keep inside the file is not
required: the rest of the replay-log region (files Hyper-V writes end inside it), a log header past
the end (counted as an empty log), and the objects behind empty, free or unknown object-table entries.
"""

from __future__ import annotations

import contextlib
import os
import stat
import struct
import zlib
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

from vm2core.errors import FormatError, UnsupportedError
from vm2core.reader.keyindex import KEY_TYPE_NAMES, KeyEntry, KeyIndex, ObjectEntry, ObjectList

__all__ = ["KEY_TYPE_NAMES", "FileHeader", "HyperVStorage", "KeyEntry", "ObjectEntry", "ReplayLog"]

# --- on-disk structures ----------------------------------------------------------------------

# [FMT] "File Header": two copies, at 0 and 4096; the valid one with the higher sequence wins.
HEADER_OFFSETS = (0, 4096)
HEADER = struct.Struct("<IIHIIIIQQI")  # 46 bytes
HEADER_SIGNATURE = 0x01282014
HEADER_CRC_OFFSET = 4
FORMAT_VERSIONS = {0x0100, 0x0101, 0x0200, 0x0300, 0x0301, 0x0400}
# The data-alignment field (<= 65536) is not checked: object offsets are bounds-checked instead.

# [FMT] "Object Tables": root at 8192; header {u32 signature, u32 count}; 18-byte entries.
ROOT_OBJECT_TABLE_OFFSET = 8192
OBJECT_TABLE_HEADER = struct.Struct("<II")
OBJECT_TABLE_SIGNATURE = 0x01110001
OBJECT_ENTRY = struct.Struct("<BIQIB")  # type, crc, file_offset, size, flags
OBJ_EMPTY, OBJ_TABLE, OBJ_KEY_TABLE, OBJ_FILE, OBJ_FREE = 0, 1, 2, 3, 4
# [DIS] types seen in the wild beyond 0-4: 5 unknown, 6 replay log, 7 change tracking buffer.
# Entry flag bit 0 ("required") is ignored: OpenVMM sets it on key tables only, dissect skips
# entries without it; a reader must accept both styles (vmrs-format.md §1).
OBJECT_ENTRY_CRC_OFFSET = 1
# [FMT] "Format Versions": 3.1 "Fixed object table entry checksum"; older files may carry another.
OBJECT_ENTRY_CRC_SINCE = 0x0301
CHECKED_OBJECT_TYPES = (OBJ_TABLE, OBJ_KEY_TABLE, OBJ_FILE)   # the entries the reader follows
MAX_OBJECT_TABLE_ENTRIES = 1 << 20    # sanity bound on one table's entry count
MAX_OBJECT_TABLES = 1 << 16           # bound on the chain length

# [FMT] "Key Tables": header {u16 signature 2, u16 table_index, u16 sequence, u32 crc}.
KEY_TABLE_HEADER = struct.Struct("<HHHI")
KEY_TABLE_SIGNATURE = 0x0002
KEY_TABLE_CRC_OFFSET = 6                # [FMT]: the CRC covers only these 10 bytes, CRC field zeroed
MAX_KEY_TABLE_SIZE = 16 << 20
# [FMT] "Key Table Entry Header" (21 bytes).
KEY_ENTRY = struct.Struct("<BBIHIIIB")  # type, flags, size, parent_table, parent_offset, crc, seq, name_len
KEY_FREE, KEY_INT, KEY_UINT, KEY_DOUBLE, KEY_STRING, KEY_ARRAY, KEY_BOOL, KEY_NODE = 1, 3, 4, 5, 6, 7, 8, 9
KEY_ENTRY_CRC_OFFSET = 12
# [FMT] "Key Types": value bytes of the fixed-size types (a node holds {u64, u32}); string and
# array values are a u32 length + that many bytes; a file-object reference is 12 bytes.
FIXED_VALUE_SIZES = {KEY_INT: 8, KEY_UINT: 8, KEY_DOUBLE: 8, KEY_BOOL: 4, KEY_NODE: 12}
KEY_FLAG_FILE_OBJECT = 0x01
FILE_OBJECT_REF = struct.Struct("<IQ")  # {u32 size, u64 file_offset}
LENGTH_PREFIX = struct.Struct("<I")     # string and array values
MAX_KEY_DEPTH = 64
MAX_KEYS = 1 << 30                      # (a 240 TiB guest has ~2^28 RamBlock keys; the index is ~70 B/key)
ZERO_CRC = bytes(4)                     # stands in for a CRC field while the CRC is computed
_SPAN_HEADERS, _SPAN_OBJECT_TABLE, _SPAN_KEY_TABLE, _SPAN_FILE_OBJECT = range(4)   # overlap check

# Replay log header, 34 bytes ([DIS] HyperVStorageReplayLog, [FMT] defs.rs agree on these fields):
# {u32 signature, u32 crc (of the 34 bytes, crc zeroed), u32 entry_count, u8, u32 max_entries, 17 bytes}.
REPLAY_LOG_HEADER = struct.Struct("<IIIBI17x")
REPLAY_LOG_SIGNATURE = 0x01110003
# Entries follow the header, 28 bytes each ([DIS] and [FMT] agree on the size, not on the field order,
# so vm2core does not interpret them: it never applies the log, it only reports that one is pending).
REPLAY_LOG_ENTRY_SIZE = 28


@dataclass(frozen=True)
class FileHeader:
    copy: int               # 0 or 1: which of the two copies this is
    sequence: int
    format_version: int
    data_version: int
    flags: int
    data_alignment: int
    replay_log_offset: int
    replay_log_size: int
    replay_log_header_size: int


@dataclass(frozen=True)
class ReplayLog:
    """The replay log named by the file header.

    Hyper-V reserves a log *region* (``size`` bytes) that may run past the end of the file: only
    the header and the pending entries hold data.  A header that lies (partly) past the end of
    the file is reported as ``header_present=False`` and counts as an empty log.
    """

    offset: int
    size: int
    signature_ok: bool
    entry_count: int
    header_present: bool = True
    crc_ok: bool = True
    file_size: int = 0

    @property
    def dirty(self) -> bool:
        """A non-zero entry count means changes were never committed into the file body."""
        return self.signature_ok and self.entry_count > 0

    @property
    def region_past_eof(self) -> bool:
        return self.offset + self.size > self.file_size

    def describe(self) -> dict[str, object]:
        """What ``inspect --json`` shows."""
        if not self.header_present:
            state = "absent (header past the end of the file; counted as empty)"
        elif not self.signature_ok:
            state = "no log header (bad signature; counted as empty)"
        else:
            state = "dirty" if self.dirty else "clean"
        return {"offset": self.offset, "region_size": self.size, "region_past_end_of_file": self.region_past_eof,
                "header_present": self.header_present, "signature_ok": self.signature_ok,
                "header_crc_ok": self.crc_ok, "entries": self.entry_count, "state": state}


def require_regular(mode: int, path: Path) -> None:
    if not stat.S_ISREG(mode):
        kind = ("a FIFO or pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file")
        raise FormatError(f"not a regular file ({kind}): give the saved-state file itself, not a stream",
                          path=path)


class HyperVStorage:
    """A parsed HyperVStorage file.  Construct with :meth:`open` or from a binary file object."""

    def __init__(self, fh: BinaryIO, path: Path | str = "<input>", *, salvage: bool = False) -> None:
        self._fh = fh
        self.path = Path(path) if not isinstance(path, Path) else path
        # salvage: damage that costs only what it touches (a checksum, overlapping file objects, a file
        # object past the end) is recorded in ``damage`` instead of raised; the saved-state layer turns it
        # into losses or warnings. A bad header copy always falls back to the other.
        self.salvage = salvage
        self.damage: list[FormatError] = []
        fh.seek(0, 2)
        self.file_size = fh.tell()
        self.header_problems: list[str] = []
        self.header = self._read_headers()
        self.objects = self._read_object_tables()
        self.skipped_object_types: dict[int, int] = {}
        self.keys = KeyIndex()
        self.key_tables_used = 0
        self.stale_key_tables = 0
        self._read_key_tables()
        self.replay_log = self._read_replay_log()

    @classmethod
    def open(cls, path: Path | str, *, salvage: bool = False) -> HyperVStorage:
        p = Path(path)
        if p.is_dir():
            raise FormatError("is a directory, not a saved-state file", path=p)
        # Checked before opening (opening a FIFO would wait for a writer) and again on the handle
        # (the name may change in between): the reader seeks and reads at offsets, which a pipe,
        # a socket or a `<(...)` process substitution cannot do.
        with contextlib.suppress(OSError):   # a missing file is reported by open() below
            require_regular(p.stat().st_mode, p)
        try:
            fh = p.open("rb")
        except OSError as e:
            raise FormatError(f"cannot open: {e.strerror or e}", path=p) from None
        try:
            require_regular(os.fstat(fh.fileno()).st_mode, p)
            return cls(fh, p, salvage=salvage)
        except BaseException:
            fh.close()
            raise

    @property
    def file(self) -> BinaryIO:
        return self._fh

    def close(self) -> None:
        self._fh.close()

    # --- low-level reads -------------------------------------------------------------------

    def _error(self, message: str, structure: str, offset: int | None = None) -> FormatError:
        return FormatError(message, path=self.path, structure=structure, offset=offset)

    def read_at(self, offset: int, size: int, structure: str) -> bytes:
        """Exactly ``size`` bytes at ``offset`` or a FormatError naming the structure."""
        if offset < 0 or size < 0 or offset + size > self.file_size:
            raise self._error(f"{size} bytes at {offset:#x} lie beyond the end of the file "
                              f"({self.file_size:#x} bytes): truncated?", structure, offset)
        self._fh.seek(offset)
        data = self._fh.read(size)
        if len(data) != size:
            raise self._error("short read (file changed while reading?)", structure, offset)
        return data

    # --- header ---------------------------------------------------------------------------

    def _read_headers(self) -> FileHeader:
        candidates: list[FileHeader] = []
        for copy, off in enumerate(HEADER_OFFSETS):
            if off + HEADER.size > self.file_size:
                self.header_problems.append(f"header copy {copy} missing (file too short)")
                continue
            raw = self.read_at(off, HEADER.size, "file header")
            (sig, crc, seq, fmt, data_ver, flags, align, rl_off, rl_size, rl_hdr) = HEADER.unpack(raw)
            if sig != HEADER_SIGNATURE:
                self.header_problems.append(f"header copy {copy}: bad signature {sig:#010x}")
                continue
            zeroed = raw[:HEADER_CRC_OFFSET] + b"\0\0\0\0" + raw[HEADER_CRC_OFFSET + 4:]
            if zlib.crc32(zeroed) != crc:
                self.header_problems.append(f"header copy {copy}: CRC mismatch")
                continue
            candidates.append(FileHeader(copy, seq, fmt, data_ver, flags, align, rl_off, rl_size, rl_hdr))
        if not candidates:
            detail = "; ".join(self.header_problems)
            raise self._error(f"not a Hyper-V saved-state (HyperVStorage) file: {detail}", "file header", 0)
        best = max(candidates, key=lambda h: h.sequence)
        if best.format_version not in FORMAT_VERSIONS:
            raise UnsupportedError(f"unknown container format version {best.format_version:#06x}",
                                   path=self.path, structure="file header",
                                   offset=HEADER_OFFSETS[best.copy] + 10)
        return best

    @property
    def wide_key_names(self) -> bool:
        """Format 1.0 stores key names as UTF-16 ([FMT] "Format Versions")."""
        return self.header.format_version == 0x0100

    def _problem(self, message: str, structure: str, offset: int | None = None) -> None:
        """Damage that salvage mode may read past (a checksum): an error, or a ``damage`` entry."""
        err = self._error(message, structure, offset)
        if not self.salvage:
            raise err
        self.damage.append(err)

    # --- object tables --------------------------------------------------------------------

    def _read_object_tables(self) -> ObjectList:
        entries = ObjectList()
        tables = _Extents()
        offset: int | None = ROOT_OBJECT_TABLE_OFFSET
        verify = self.header.format_version >= OBJECT_ENTRY_CRC_SINCE
        while offset is not None:
            if len(tables) >= MAX_OBJECT_TABLES:
                raise self._error("object table chain loops", "object table", offset)
            sig, count = OBJECT_TABLE_HEADER.unpack(
                self.read_at(offset, OBJECT_TABLE_HEADER.size, "object table header"))
            if sig != OBJECT_TABLE_SIGNATURE:
                raise self._error(f"bad object table signature {sig:#010x}", "object table", offset)
            if count > MAX_OBJECT_TABLE_ENTRIES:
                raise self._error(f"implausible entry count {count}", "object table", offset)
            # Tables may not share bytes (or a chain could re-read one region 65536 times).
            other = tables.overlap(offset, OBJECT_TABLE_HEADER.size + count * OBJECT_ENTRY.size)
            if other is not None:
                what = "object table chain loops" if other == offset else f"overlaps the object table at {other:#x}"
                raise self._error(what, "object table", offset)
            tables.add(offset, OBJECT_TABLE_HEADER.size + count * OBJECT_ENTRY.size)
            first = offset + OBJECT_TABLE_HEADER.size
            raw = self.read_at(first, count * OBJECT_ENTRY.size, "object table")
            # [FMT]: the last entry of every table is the chain slot.
            offset = None
            for i, (otype, crc, obj_offset, size, flags) in enumerate(OBJECT_ENTRY.iter_unpack(raw)):
                where = first + i * OBJECT_ENTRY.size
                if otype in CHECKED_OBJECT_TYPES and verify:
                    self._check_object_crc(raw, i * OBJECT_ENTRY.size, crc, where)
                if i == count - 1:
                    if otype == OBJ_TABLE:
                        offset = obj_offset
                    continue
                if otype == OBJ_TABLE:  # a chain pointer in the middle: follow it after this one
                    raise self._error("object table pointer outside the chain slot", "object table entry", where)
                entries.append(where, otype, crc, obj_offset, size, flags)
        self._check_object_overlaps(entries, tables)
        return entries

    def _check_object_crc(self, raw: bytes, at: int, stored: int, where: int) -> None:
        """[FMT] "3.1: Fixed object table entry checksum": CRC-32 of the 18 bytes, CRC field zeroed."""
        computed = zlib.crc32(raw[at + OBJECT_ENTRY_CRC_OFFSET + 4:at + OBJECT_ENTRY.size],
                              zlib.crc32(ZERO_CRC, zlib.crc32(raw[at:at + OBJECT_ENTRY_CRC_OFFSET])))
        if computed != stored:
            self._problem(f"checksum mismatch (stored {stored:#010x}, computed {computed:#010x})",
                          "object table entry", where)

    def _check_object_overlaps(self, entries: ObjectList, tables: _Extents) -> None:
        """Key tables and file objects may overlap neither each other, nor the object tables,
        nor the two header pages: aliased metadata is how a small file claims huge work."""
        for where, _offset, size in entries.of_type(OBJ_KEY_TABLE):
            if size < KEY_TABLE_HEADER.size or size > MAX_KEY_TABLE_SIZE:
                raise self._error(f"implausible key table size {size}", "object table entry", where)
        # One int per span, start << 34 | size << 2 | kind (a million tuples would cost ~200 MB).
        spans = [ROOT_OBJECT_TABLE_OFFSET << 2 | _SPAN_HEADERS]
        spans += [off << 34 | size << 2 | _SPAN_OBJECT_TABLE for off, size in tables.items()]
        for otype, kind in ((OBJ_KEY_TABLE, _SPAN_KEY_TABLE), (OBJ_FILE, _SPAN_FILE_OBJECT)):
            spans += [off << 34 | size << 2 | kind for _where, off, size in entries.of_type(otype) if size]
        spans.sort()
        reach_end, reach = 0, spans[0]
        for span in spans:
            start, size, kind = span >> 34, span >> 2 & 0xFFFFFFFF, span & 3
            if start < reach_end:
                self._report_overlap(entries, span, reach)
            if start + size > reach_end:
                reach_end, reach = start + size, span

    def _report_overlap(self, entries: ObjectList, span: int, reach: int) -> None:
        names = {_SPAN_HEADERS: "the file headers", _SPAN_OBJECT_TABLE: "the object table",
                 _SPAN_KEY_TABLE: "key table", _SPAN_FILE_OBJECT: "file object"}
        if span & 3 in (_SPAN_HEADERS, _SPAN_OBJECT_TABLE) and reach & 3 in (_SPAN_KEY_TABLE, _SPAN_FILE_OBJECT):
            span, reach = reach, span       # name the object entry that points at the wrong place
        start, kind = span >> 34, span & 3
        message = f"{names[kind]} at {start:#x} overlaps {names[reach & 3]} at {reach >> 34:#x}"
        if kind == _SPAN_OBJECT_TABLE:
            raise self._error(message, "object table", start)
        otype = OBJ_KEY_TABLE if kind == _SPAN_KEY_TABLE else OBJ_FILE
        where = next(w for w, off, _size in entries.of_type(otype) if off == start)
        if kind == _SPAN_FILE_OBJECT and reach & 3 == _SPAN_FILE_OBJECT:
            self._problem(message, "object table entry", where)
        else:
            raise self._error(message, "object table entry", where)

    # --- key tables -----------------------------------------------------------------------

    def _read_key_tables(self) -> None:
        """Pick the current copy of every key table, then parse them one at a time.

        Pass 1 verifies every entry and remembers only the nodes (to build paths); pass 2 reads
        each table again and indexes every key under its full path.  At most one table's bytes
        are held at a time, and (objects may not overlap) all tables together are at most the
        file's size: memory and time follow the input, not what it claims.
        """
        self.skipped_object_types = {t: n for t, n in self.objects.type_counts().items()
                                     if t not in (OBJ_EMPTY, OBJ_KEY_TABLE, OBJ_FILE, OBJ_FREE)}
        # Several key tables may share an index; the highest sequence is current [DIS].
        current: dict[int, tuple[int, int, int]] = {}
        for _where, offset, size in self.objects.of_type(OBJ_KEY_TABLE):
            # Both flag styles exist (OpenVMM: "required" only on key tables; dissect: on all);
            # we accept key tables with or without it.  (Sizes were checked with the overlaps.)
            if offset + size > self.file_size:
                raise self._error(f"key table of {size} bytes at {offset:#x} lies beyond the end of the file "
                                  f"({self.file_size:#x} bytes): truncated?", "key table", offset)
            raw = self.read_at(offset, KEY_TABLE_HEADER.size, "key table")
            sig, index, seq, crc = KEY_TABLE_HEADER.unpack(raw)
            if sig != KEY_TABLE_SIGNATURE:
                raise self._error(f"bad key table signature {sig:#06x}", "key table", offset)
            computed = zlib.crc32(raw[:KEY_TABLE_CRC_OFFSET] + ZERO_CRC)
            if computed != crc:
                self._problem(f"key table header checksum mismatch (stored {crc:#010x}, computed "
                              f"{computed:#010x})", "key table", offset)   # (salvage: still used)
            prev = current.get(index)
            if prev is None or seq > prev[0]:
                if prev is not None:
                    self.stale_key_tables += 1
                current[index] = (seq, offset, size)
            else:
                self.stale_key_tables += 1
        self.key_tables_used = len(current)

        # Pass 1: nodes only.  loc = table_index << 32 | offset of the entry inside its table.
        nodes: dict[int, tuple[int, str]] = {}
        # One buffer for every table: sixteen 16 MiB reads would leave holes in the C heap.
        buffer = bytearray(max((size for _seq, _off, size in current.values()), default=0))
        for index, (_seq, offset, size) in sorted(current.items()):
            for e in self._walk_key_table(index, offset, self._read_into(buffer, offset, size), verify=True):
                if e.type == KEY_NODE:
                    nodes[e.loc] = (e.parent, e.name)
        paths = _node_paths(nodes)
        del nodes
        # Pass 2: every key whose parent chain reaches the root (others are orphans of a stale table).
        for index, (_seq, offset, size) in sorted(current.items()):
            for e in self._walk_key_table(index, offset, self._read_into(buffer, offset, size), verify=False):
                parent_path = paths.get(e.parent)
                if parent_path is None:
                    continue
                path = f"{parent_path}/{e.name}"
                if e.type == KEY_NODE and path in self.keys:
                    continue
                if len(self.keys) >= MAX_KEYS:
                    raise self._error(f"more than {MAX_KEYS} keys", "key table entry", offset + (e.loc & 0xFFFFFFFF))
                self.keys.add(path, e.type, e.flags, e.loc, e.data_offset, e.data_size)

    def _read_into(self, buffer: bytearray, offset: int, size: int) -> memoryview:
        """The ``size`` bytes at ``offset`` (checked against the file size) in ``buffer``."""
        view = memoryview(buffer)[:size]
        self._fh.seek(offset)
        got = 0
        while got < size:
            n = self._fh.readinto(view[got:])  # type: ignore[attr-defined]  # (binary files have it)
            if not n:
                raise self._error("short read (file changed while reading?)", "key table", offset + got)
            got += n
        return view

    def _walk_key_table(self, index: int, table_offset: int, data: memoryview, *,
                        verify: bool) -> Iterator[_Raw]:
        pos = KEY_TABLE_HEADER.size
        end = len(data)
        wide = self.wide_key_names
        view = data
        # [FMT]: entries exactly fill the table; trailing room of <= 21 bytes is unused slack.
        while pos + KEY_ENTRY.size < end:
            ktype, flags, size, p_table, p_off, crc, _ins, name_len = KEY_ENTRY.unpack_from(data, pos)
            where = table_offset + pos
            if size < KEY_ENTRY.size or pos + size > end:
                raise self._error(f"key entry size {size} does not fit its table", "key table entry", where)
            if ktype == KEY_FREE or ktype == 0:
                pos += size
                continue
            name_bytes_len = name_len * 2 if wide else name_len
            name_start = pos + KEY_ENTRY.size
            value_start = name_start + name_bytes_len
            if value_start > pos + size:
                raise self._error("key name overruns its entry", "key table entry", where)
            raw_name = bytes(data[name_start:value_start])
            name = (raw_name.decode("utf-16-le", "replace") if wide
                    else raw_name.decode("utf-8", "replace")).rstrip("\0")
            value_len = pos + size - value_start
            data_off, data_size, covered = self._locate_value(ktype, flags, data, value_start, value_len,
                                                              table_offset, where)
            if verify and covered is not None:
                # [FMT] "Key Table Entry Header": CRC-32 of the 21-byte header with the CRC field
                # zeroed, the name and the value's meaningful bytes (not the slack after them).
                computed = zlib.crc32(view[pos + KEY_ENTRY_CRC_OFFSET + 4:value_start + covered], zlib.crc32(
                    ZERO_CRC, zlib.crc32(view[pos:pos + KEY_ENTRY_CRC_OFFSET])))
                if computed != crc:
                    self._problem(f"checksum mismatch in the entry of key {name!r} (stored {crc:#010x}, "
                                  f"computed {computed:#010x})", "key table entry", where)
            yield _Raw(index << 32 | pos, ktype, flags, name, data_off, data_size, p_table << 32 | p_off)
            pos += size

    def _locate_value(self, ktype: int, flags: int, data: memoryview, start: int, avail: int,
                      table_file_offset: int, where: int) -> tuple[int, int, int | None]:
        """(file offset, size) of the value, and how many value bytes the entry CRC covers
        (None for a type whose layout is unknown: not verified)."""
        if flags & KEY_FLAG_FILE_OBJECT:
            if avail < FILE_OBJECT_REF.size:
                raise self._error("file-object reference truncated", "key table entry", where)
            size, offset = FILE_OBJECT_REF.unpack_from(data, start)
            if offset + size > self.file_size:
                error = self._error(f"file object of {size} bytes at {offset:#x} lies beyond the end of the "
                                    f"file ({self.file_size:#x}): truncated?", "file object", offset)
                if not self.salvage:
                    raise error
                # Kept: reading the key fails later with this message; a RamBlock becomes a loss.
                self.damage.append(error)
            elif size and offset < ROOT_OBJECT_TABLE_OFFSET:
                raise self._error(f"file object of {size} bytes at {offset:#x} overlaps the file headers",
                                  "file object", offset)
            return offset, size, FILE_OBJECT_REF.size
        if ktype in (KEY_STRING, KEY_ARRAY):
            if avail < LENGTH_PREFIX.size:
                raise self._error("value length prefix truncated", "key table entry", where)
            (length,) = LENGTH_PREFIX.unpack_from(data, start)
            if length > avail - LENGTH_PREFIX.size:
                raise self._error(f"inline value of {length} bytes overruns its entry", "key table entry", where)
            return table_file_offset + start + LENGTH_PREFIX.size, length, LENGTH_PREFIX.size + length
        fixed = FIXED_VALUE_SIZES.get(ktype)
        return table_file_offset + start, avail, None if fixed is None else min(fixed, avail)

    # --- replay log -----------------------------------------------------------------------

    def _read_replay_log(self) -> ReplayLog | None:
        """The log header and its pending entries must be in the file; the rest of the region need not.

        Files Hyper-V writes name a region that runs past the end of the file (e.g. 0x4000 bytes
        at 0x8000 in a 0xB024-byte file) around a present, empty log header; that is normal.
        """
        off, size = self.header.replay_log_offset, self.header.replay_log_size
        if off == 0:
            return None
        if off + REPLAY_LOG_HEADER.size > self.file_size:
            return ReplayLog(off, size, False, 0, header_present=False, crc_ok=False, file_size=self.file_size)
        raw = self.read_at(off, REPLAY_LOG_HEADER.size, "replay log header")
        sig, crc, count, _reserved, _max_entries = REPLAY_LOG_HEADER.unpack(raw)
        if sig != REPLAY_LOG_SIGNATURE:
            return ReplayLog(off, size, False, 0, crc_ok=False, file_size=self.file_size)
        crc_ok = zlib.crc32(raw[:4] + b"\0\0\0\0" + raw[8:]) == crc
        entries_end = off + REPLAY_LOG_HEADER.size + count * REPLAY_LOG_ENTRY_SIZE
        if count and entries_end > off + max(size, REPLAY_LOG_HEADER.size):
            raise self._error(f"{count} pending entries do not fit the {size}-byte log region", "replay log",
                              off + 8)
        if entries_end > self.file_size:
            raise self._error(f"{count} pending entries (up to {entries_end:#x}) lie beyond the end of the file "
                              f"({self.file_size:#x} bytes): truncated?", "replay log", off)
        return ReplayLog(off, size, True, count, crc_ok=crc_ok, file_size=self.file_size)

    # --- key access -----------------------------------------------------------------------

    def get(self, path: str) -> KeyEntry | None:
        return self.keys.get(path)

    def require(self, path: str) -> KeyEntry:
        entry = self.keys.get(path)
        if entry is None:
            raise self._error(f"required key {path} is missing", "key tree")
        return entry

    def read_bytes(self, entry: KeyEntry, limit: int = 64 << 20) -> bytes:
        """The raw value bytes of an array/string/fixed-size key (bounded by ``limit``)."""
        if entry.data_size > limit:
            raise self._error(f"value of {entry.path} is {entry.data_size} bytes, more than the "
                              f"{limit}-byte limit", "key value", entry.data_offset)
        return self.read_at(entry.data_offset, entry.data_size, f"value of {entry.path}")

    def read_int(self, path: str) -> int | None:
        entry = self.keys.get(path)
        if entry is None:
            return None
        if entry.type not in (KEY_INT, KEY_UINT, KEY_BOOL):
            raise self._error(f"{path} is a {entry.type_name}, expected an integer", "key value",
                              entry.data_offset)
        # Fixed-size values carry no length: the entry may also hold table slack after them.
        width = 4 if entry.type == KEY_BOOL else 8
        if entry.data_size < width:
            raise self._error(f"{path}: integer value truncated", "key value", entry.data_offset)
        raw = self.read_at(entry.data_offset, width, f"value of {path}")
        if entry.type == KEY_BOOL:
            return int.from_bytes(raw[:4], "little", signed=True)
        return int.from_bytes(raw[:8], "little", signed=entry.type == KEY_INT)

    def read_string(self, path: str) -> str | None:
        entry = self.keys.get(path)
        if entry is None:
            return None
        if entry.type != KEY_STRING:
            raise self._error(f"{path} is a {entry.type_name}, expected a string", "key value",
                              entry.data_offset)
        return self.read_bytes(entry, 1 << 20).decode("utf-16-le", "replace").rstrip("\0")

    def __enter__(self) -> HyperVStorage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Raw(NamedTuple):
    """A key table entry before its path is known (parents may live in later tables)."""

    loc: int
    type: int
    flags: int
    name: str
    data_offset: int
    data_size: int
    parent: int


def _node_paths(nodes: dict[int, tuple[int, str]]) -> dict[int, str]:
    """Full path of every node whose parent chain reaches the virtual root (loc 0) within
    MAX_KEY_DEPTH steps; nodes in a parent loop or under a missing parent get none."""
    paths: dict[int, str] = {0: ""}
    for loc in nodes:
        chain: list[int] = []
        cur = loc
        while cur not in paths and cur in nodes and len(chain) <= MAX_KEY_DEPTH:
            chain.append(cur)
            cur = nodes[cur][0]
        if cur not in paths:
            continue
        base = paths[cur]
        for item in reversed(chain):
            base = f"{base}/{nodes[item][1]}"
            paths[item] = base
    return paths


class _Extents:
    """Non-overlapping [offset, offset + size) spans, kept sorted for an O(log n) overlap test."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def __len__(self) -> int:
        return len(self._starts)

    def overlap(self, offset: int, size: int) -> int | None:
        """Start of a stored span that shares bytes with (or starts at) [offset, offset + size)."""
        i = bisect_right(self._starts, offset)
        if i and (self._ends[i - 1] > offset or self._starts[i - 1] == offset):
            return self._starts[i - 1]
        if i < len(self._starts) and self._starts[i] < offset + size:
            return self._starts[i]
        return None

    def add(self, offset: int, size: int) -> None:
        i = bisect_right(self._starts, offset)
        self._starts.insert(i, offset)
        self._ends.insert(i, offset + size)

    def items(self) -> Iterator[tuple[int, int]]:
        return ((s, e - s) for s, e in zip(self._starts, self._ends, strict=True))
