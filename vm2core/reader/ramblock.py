"""RamBlock data: one 1 MiB block of guest RAM, raw or record-encoded (``vmrs-format.md`` §4).

A block decodes into :mod:`pieces <vm2core.reader.memory>` rather than a flat buffer: zero
fills stay :class:`Zeros` (so they can become holes or be excluded without being materialised)
and a raw 1 MiB block stays a :class:`FileSpan` (so it can be copied by the kernel).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from vm2core.errors import FormatError
from vm2core.reader.memory import PAGE_SIZE, Data, FileSpan, Piece, Zeros
from vm2core.reader.xpress import XpressError, decompress

BLOCK_SIZE = 1 << 20                 # [FMT] 1 MiB per RamBlock

# [RE] record tags (vmrs-format.md §4); any other tag n is an n-byte page.
TAG_END = 0xFFFFFFFF
TAG_FILL_PAGE = 0xFFFFFFFE           # u64 pattern -> one page
TAG_FILL_RUN = 0xFFFFFFFD            # u64 pattern, u32 count -> count pages (pattern before count)
TAG_CHUNK = 0xFFFFFFFC               # u32 out_size, u32 stored_size, data
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
FILL_RUN = struct.Struct("<QI")
CHUNK = struct.Struct("<II")

Decompressor = Callable[[bytes | memoryview, int], bytes]


class BlockError(FormatError):
    """A RamBlock whose records do not decode to exactly 1 MiB."""


def _fill(pattern: int, pages: int) -> Piece:
    if pattern == 0:
        return Zeros(pages * PAGE_SIZE)
    return Data(U64.pack(pattern) * (PAGE_SIZE // 8 * pages))


# One bounds-checked record, as yielded by iter_records (a plain tuple: the zero map walks every
# record of a guest, and a tuple costs a third of a NamedTuple there):
#   (pos, out_pos, out_len, pattern, payload_start, payload_len)
# pos: where the record starts in the block's stored bytes; out_pos/out_len: its output in the
# decoded block; fill records: pattern (u64 repeated), payload_start -1; page and chunk records:
# pattern None and data[payload_start:payload_start + payload_len], stored as is when
# payload_len == out_len, else XPRESS.
Record = tuple[int, int, int, "int | None", int, int]


def iter_records(data: bytes | memoryview, *, name: str = "RamBlock", file_offset: int | None = None,
                 path: Path | str | None = None) -> Iterator[Record]:
    """Walk the records of a block with every bounds check, decoding no payload.

    The one walker of the record format (the optimised twin is ``core/fastdecode.py``): the
    records' outputs total exactly :data:`BLOCK_SIZE` bytes and nothing but an end record follows,
    else :class:`BlockError` naming the record's offset (``file_offset`` + position).
    """
    view = memoryview(data)
    size = len(view)
    pos = 0
    produced = 0

    def fail(msg: str, at: int | None = None) -> BlockError:
        return block_error(msg, produced, pos if at is None else at, name=name, file_offset=file_offset, path=path)

    def truncated(n: int, at: int) -> BlockError:
        return fail(f"record truncated: needs {n} bytes, {size - at} left", at)

    # (bounds checks are inlined: this loop runs for every record of every block of the zero map)
    while True:
        if produced == BLOCK_SIZE and (pos == size or (pos + 4 <= size and U32.unpack_from(view, pos)[0]
                                                        == TAG_END)):
            return
        if pos + 4 > size:
            raise truncated(4, pos)
        (tag,) = U32.unpack_from(view, pos)
        pattern: int | None = None
        start = length = -1
        if tag == TAG_FILL_PAGE:
            if pos + 4 + U64.size > size:
                raise truncated(4 + U64.size, pos)
            (pattern,) = U64.unpack_from(view, pos + 4)
            out_len, advance = PAGE_SIZE, 4 + U64.size
        elif 0 < tag <= PAGE_SIZE:
            start, length = pos + 4, tag
            if start + length > size:
                raise truncated(length, start)
            out_len, advance = PAGE_SIZE, 4 + length
        elif tag == TAG_FILL_RUN:
            if pos + 4 + FILL_RUN.size > size:
                raise truncated(4 + FILL_RUN.size, pos)
            pattern, count = FILL_RUN.unpack_from(view, pos + 4)
            if count == 0 or produced + count * PAGE_SIZE > BLOCK_SIZE:
                raise fail(f"fill record of {count} pages does not fit the block")
            out_len, advance = count * PAGE_SIZE, 4 + FILL_RUN.size
        elif tag == TAG_CHUNK:
            if pos + 4 + CHUNK.size > size:
                raise truncated(4 + CHUNK.size, pos)
            out_len, length = CHUNK.unpack_from(view, pos + 4)
            if out_len == 0 or produced + out_len > BLOCK_SIZE:
                raise fail(f"chunk record of {out_len} bytes does not fit the block")
            if length > out_len:
                raise fail(f"chunk record stores {length} bytes for {out_len} bytes of output")
            start = pos + 4 + CHUNK.size
            if start + length > size:
                raise truncated(length, start)
            advance = 4 + CHUNK.size + length
        elif tag == TAG_END:
            raise fail("end-of-block record before 1 MiB was decoded")
        else:
            raise fail(f"unknown record tag {tag:#010x}")
        if produced + out_len > BLOCK_SIZE:
            raise fail(f"records decode to more than {BLOCK_SIZE} bytes")
        yield pos, produced, out_len, pattern, start, length
        produced += out_len
        pos += advance


def block_error(msg: str, produced: int, pos: int, *, name: str, file_offset: int | None,
                path: Path | str | None) -> BlockError:
    off = None if file_offset is None else file_offset + pos
    return BlockError(f"{msg} (decoded {produced:#x} of {BLOCK_SIZE:#x} bytes)", path=path, structure=name,
                      offset=off)


def decode_records(data: bytes | memoryview, *, decompressor: Decompressor = decompress,
                   name: str = "RamBlock", file_offset: int | None = None,
                   path: Path | str | None = None) -> list[Piece]:
    """Decode a record-encoded block into pieces totalling exactly :data:`BLOCK_SIZE` bytes.

    ``file_offset`` (where ``data`` starts in the input file) only serves error messages.
    """
    view = memoryview(data)
    out: list[Piece] = []
    for pos, out_pos, out_len, pattern, start, length in iter_records(view, name=name, file_offset=file_offset,
                                                                      path=path):
        if pattern is not None:
            piece = _fill(pattern, out_len // PAGE_SIZE)
        elif length == out_len:                             # stored as is when it fills its output
            piece = Data(view[start:start + length])
        else:
            try:
                piece = Data(_xpress(decompressor, view[start:start + length], out_len))
            except _PayloadError as e:
                raise block_error(str(e), out_pos, pos, name=name, file_offset=file_offset, path=path) from None
        if isinstance(piece, Zeros) and out and isinstance(out[-1], Zeros):
            out[-1] = Zeros(out[-1].length + piece.length)
        else:
            out.append(piece)
    return out


class _PayloadError(Exception):
    """A payload that does not decode; the caller turns it into a BlockError at the record."""


def _xpress(decompressor: Decompressor, payload: memoryview, out_size: int) -> bytes:
    """XPRESS-decode a payload to exactly ``out_size`` bytes."""
    try:
        result = decompressor(payload, out_size)
    except XpressError as e:
        raise _PayloadError(f"XPRESS data does not decode: {e.message}") from None
    if len(result) != out_size:
        raise _PayloadError(f"XPRESS data decodes to {len(result)} bytes, expected {out_size}")
    return result


def raw_block(file_offset: int) -> list[Piece]:
    """A stored size of exactly 1 MiB means raw, uncompressed data."""
    return [FileSpan(file_offset, BLOCK_SIZE)]


def slice_pieces(pieces: Iterable[Piece], start: int, length: int) -> Iterator[Piece]:
    """The sub-range ``[start, start + length)`` of a piece sequence."""
    pos = 0
    end = start + length
    for p in pieces:
        p_len = p.length
        p_end = pos + p_len
        if p_end <= start:
            pos = p_end
            continue
        if pos >= end:
            break
        lo = max(start, pos) - pos
        hi = min(end, p_end) - pos
        if lo == 0 and hi == p_len:
            yield p
        elif isinstance(p, Zeros):
            yield Zeros(hi - lo)
        elif isinstance(p, FileSpan):
            yield FileSpan(p.offset + lo, hi - lo)
        else:
            yield Data(memoryview(p.data)[lo:hi])
        pos = p_end


def materialize(pieces: Iterable[Piece], read_file: Callable[[int, int], bytes]) -> bytes:
    """Concatenate pieces into bytes (for random access, not for streaming)."""
    parts: list[bytes] = []
    for p in pieces:
        if isinstance(p, Zeros):
            parts.append(bytes(p.length))
        elif isinstance(p, FileSpan):
            parts.append(read_file(p.offset, p.length))
        else:
            parts.append(bytes(p.data))
    return b"".join(parts)
