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
PAGES_PER_BLOCK = BLOCK_SIZE // PAGE_SIZE

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


def decode_records(data: bytes | memoryview, *, decompressor: Decompressor = decompress,
                   name: str = "RamBlock", file_offset: int | None = None,
                   path: Path | str | None = None) -> list[Piece]:
    """Decode a record-encoded block into pieces totalling exactly :data:`BLOCK_SIZE` bytes.

    ``file_offset`` (where ``data`` starts in the input file) only serves error messages.
    """
    view = memoryview(data)
    size = len(view)
    pos = 0
    produced = 0
    out: list[Piece] = []

    def fail(msg: str) -> BlockError:
        off = None if file_offset is None else file_offset + pos
        return BlockError(f"{msg} (decoded {produced:#x} of {BLOCK_SIZE:#x} bytes)", path=path, structure=name,
                          offset=off)

    def need(n: int) -> None:
        if pos + n > size:
            raise fail(f"record truncated: needs {n} bytes, {size - pos} left")

    def emit(piece: Piece, length: int) -> None:
        nonlocal produced
        if produced + length > BLOCK_SIZE:
            raise fail(f"records decode to more than {BLOCK_SIZE} bytes")
        produced += length
        if isinstance(piece, Zeros) and out and isinstance(out[-1], Zeros):
            out[-1] = Zeros(out[-1].length + length)
        else:
            out.append(piece)

    def emit_payload(payload: memoryview, out_size: int) -> None:
        """A page or chunk payload: stored as is when it fills its output, else XPRESS."""
        if len(payload) == out_size:
            emit(Data(payload), out_size)
        else:
            emit(Data(_xpress(decompressor, payload, out_size, fail)), out_size)

    while True:
        if produced == BLOCK_SIZE and (pos == size or (pos + 4 <= size and U32.unpack_from(view, pos)[0]
                                                        == TAG_END)):
            break
        need(4)
        (tag,) = U32.unpack_from(view, pos)
        if tag == TAG_END:
            if produced != BLOCK_SIZE:
                raise fail("end-of-block record before 1 MiB was decoded")
            break
        if tag == TAG_FILL_PAGE:
            need(4 + 8)
            (pattern,) = U64.unpack_from(view, pos + 4)
            emit(_fill(pattern, 1), PAGE_SIZE)
            pos += 12
        elif tag == TAG_FILL_RUN:
            need(4 + FILL_RUN.size)
            pattern, count = FILL_RUN.unpack_from(view, pos + 4)
            if count == 0 or produced + count * PAGE_SIZE > BLOCK_SIZE:
                raise fail(f"fill record of {count} pages does not fit the block")
            emit(_fill(pattern, count), count * PAGE_SIZE)
            pos += 4 + FILL_RUN.size
        elif tag == TAG_CHUNK:
            need(4 + CHUNK.size)
            out_size, stored = CHUNK.unpack_from(view, pos + 4)
            if out_size == 0 or produced + out_size > BLOCK_SIZE:
                raise fail(f"chunk record of {out_size} bytes does not fit the block")
            if stored > out_size:
                raise fail(f"chunk record stores {stored} bytes for {out_size} bytes of output")
            pos += 4 + CHUNK.size
            need(stored)
            emit_payload(view[pos:pos + stored], out_size)
            pos += stored
        else:
            if tag == 0 or tag > PAGE_SIZE:
                raise fail(f"unknown record tag {tag:#010x}")
            pos += 4
            need(tag)
            emit_payload(view[pos:pos + tag], PAGE_SIZE)
            pos += tag
    return out


def _xpress(decompressor: Decompressor, payload: memoryview, out_size: int,
            fail: Callable[[str], BlockError]) -> bytes:
    try:
        result = decompressor(payload, out_size)
    except XpressError as e:
        raise fail(f"XPRESS data does not decode: {e.message}") from None
    if len(result) != out_size:
        raise fail(f"XPRESS data decodes to {len(result)} bytes, expected {out_size}")
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
