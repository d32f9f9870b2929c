"""Substring search over large buffers without holding the GIL.

The VMCOREINFO search looks at every byte of guest RAM.  ``bytes.find`` holds the GIL, so while
it runs the decoding threads cannot parse records; the C library's ``memmem`` (glibc, musl, BSD
and macOS libc), called through ctypes, releases it and is faster too.  Used for writable buffers
(bytearray, ``mmap`` with ``ACCESS_COPY``) of at least :data:`MIN_LENGTH` bytes; everything else,
and platforms without ``memmem`` (Windows, or ``VM2CORE_PORTABLE=1``), use the buffer's own ``find``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Any

from vm2core.portable import PORTABLE

MIN_LENGTH = 64 << 10        # below this the ctypes call costs more than it saves


def _load_memmem() -> Any:
    if sys.platform == "win32" or PORTABLE:
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        memmem = libc.memmem
    except (OSError, AttributeError):
        return None
    memmem.restype = ctypes.c_void_p
    memmem.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t)
    return memmem


_MEMMEM = _load_memmem()


def find(buf: Any, needle: bytes, start: int, end: int) -> int:
    """``buf.find(needle, start, end)``, without the GIL where possible."""
    length = end - start
    if _MEMMEM is None or length < MIN_LENGTH or isinstance(buf, bytes):
        return int(buf.find(needle, start, end))
    try:
        window = (ctypes.c_char * length).from_buffer(buf, start)
    except (TypeError, ValueError, BufferError):     # read-only or unsuitable buffer
        return int(buf.find(needle, start, end))
    try:
        base = ctypes.addressof(window)
        hit = _MEMMEM(base, length, needle, len(needle))
        return -1 if hit is None else start + (hit - base)
    finally:
        del window            # release the export at once (an mmap cannot close while exported)
