"""Record-encoded RAM block -> one reused 1 MiB buffer, with as little Python per page as possible.

:func:`vm2core.reader.ramblock.decode_records` is the reference decoder: it builds a piece per
record, which is right for random access but costs as much Python time as the XPRESS decoder
itself when streaming.  This fast path writes every record straight into the caller's buffer and
only remembers long zero runs (so they can still become holes).  It applies the same bounds
checks; on anything unexpected it gives up (:class:`Fallback`) and the caller runs the reference
decoder, which produces the canonical error message (or, if it disagrees, the canonical result).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from vm2core.reader import xpress
from vm2core.reader.memory import PAGE_SIZE
from vm2core.reader.ramblock import (
    BLOCK_SIZE,
    CHUNK,
    FILL_RUN,
    TAG_CHUNK,
    TAG_END,
    TAG_FILL_PAGE,
    TAG_FILL_RUN,
    U32,
    U64,
)

ZEROS = memoryview(bytes(BLOCK_SIZE))
FILL_PAGE = struct.Struct("<IQ")     # tag, pattern (vmrs-format.md §4)


class Fallback(Exception):
    """The fast path cannot (or will not) decide: run the reference decoder."""


def _page_decoder() -> Callable[[bytes, int], bytes]:
    """The raw native call when it is libfwnt (its wrapper's extra copies and checks are redone
    here per page), else the portable entry point."""
    if xpress.BACKEND == "pyfwnt":
        import pyfwnt  # the backend module itself: already imported by vm2core.reader.xpress
        native: Callable[[bytes, int], bytes] = pyfwnt.lzxpress_decompress
        return native
    return xpress.decompress


_PAGE_DECODE = _page_decoder()


def decode_into(stored: bytes, out: bytearray, zero_run_min: int) -> list[tuple[int, int]]:
    """Decode a record stream into ``out`` (>= 1 MiB); return zero runs ``(start, length)`` of at
    least ``zero_run_min`` bytes, which are *not* written (shorter ones are).  Raises Fallback."""
    view = memoryview(out)
    size = len(stored)
    pos = produced = 0
    zero_start = zero_len = 0           # current zero run, not yet written
    runs: list[tuple[int, int]] = []
    page_decode = _PAGE_DECODE
    unpack_u32 = U32.unpack_from

    def close_zero_run() -> None:
        if zero_len >= zero_run_min:
            runs.append((zero_start, zero_len))
        elif zero_len:
            view[zero_start:zero_start + zero_len] = ZEROS[:zero_len]

    while produced < BLOCK_SIZE:
        if pos + 4 > size:
            raise Fallback
        (tag,) = unpack_u32(stored, pos)
        if 0 < tag < PAGE_SIZE:                                  # XPRESS page: the common case
            end = pos + 4 + tag
            if end > size or produced + PAGE_SIZE > BLOCK_SIZE:
                raise Fallback
            try:
                page = page_decode(stored[pos + 4:end], PAGE_SIZE)
            except Exception:
                raise Fallback from None
            if len(page) != PAGE_SIZE:
                raise Fallback
            if zero_len:
                close_zero_run()
                zero_len = 0
            view[produced:produced + PAGE_SIZE] = page
            produced += PAGE_SIZE
            pos = end
        elif tag in (TAG_FILL_PAGE, TAG_FILL_RUN):
            if tag == TAG_FILL_PAGE:
                if pos + FILL_PAGE.size > size:
                    raise Fallback
                pattern = U64.unpack_from(stored, pos + 4)[0]
                count = 1
                pos += FILL_PAGE.size
            else:
                if pos + 4 + FILL_RUN.size > size:
                    raise Fallback
                pattern, count = FILL_RUN.unpack_from(stored, pos + 4)
                pos += 4 + FILL_RUN.size
            n = count * PAGE_SIZE
            if count == 0 or produced + n > BLOCK_SIZE:
                raise Fallback
            if pattern == 0:
                if not zero_len:
                    zero_start = produced
                zero_len += n
            else:
                if zero_len:
                    close_zero_run()
                    zero_len = 0
                view[produced:produced + n] = U64.pack(pattern) * (n // 8)
            produced += n
        elif tag == PAGE_SIZE:                                   # raw page
            end = pos + 4 + PAGE_SIZE
            if end > size or produced + PAGE_SIZE > BLOCK_SIZE:
                raise Fallback
            if zero_len:
                close_zero_run()
                zero_len = 0
            view[produced:produced + PAGE_SIZE] = stored[pos + 4:end]
            produced += PAGE_SIZE
            pos = end
        elif tag == TAG_CHUNK:
            if pos + 4 + CHUNK.size > size:
                raise Fallback
            out_size, stored_size = CHUNK.unpack_from(stored, pos + 4)
            start = pos + 4 + CHUNK.size
            end = start + stored_size
            if out_size == 0 or produced + out_size > BLOCK_SIZE or stored_size > out_size or end > size:
                raise Fallback
            if stored_size == out_size:
                data = stored[start:end]
            else:
                try:
                    data = xpress.decompress(stored[start:end], out_size)
                except Exception:
                    raise Fallback from None
                if len(data) != out_size:
                    raise Fallback
            if zero_len:
                close_zero_run()
                zero_len = 0
            view[produced:produced + out_size] = data
            produced += out_size
            pos = end
        else:                                                    # END too early, or unknown
            raise Fallback
    if zero_len:
        close_zero_run()
    # As the reference decoder: after 1 MiB only the end of the stream or an end record may follow.
    if pos != size and not (pos + 4 <= size and unpack_u32(stored, pos)[0] == TAG_END):
        raise Fallback
    return runs
