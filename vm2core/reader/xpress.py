"""Plain LZ77 XPRESS decompression ([MS-XCA] 2.4), as used for compressed RamBlock pages.

Not LZNT1 and not XPRESS-Huffman: this is Windows COMPRESSION_FORMAT_XPRESS (3).
Three interchangeable backends, picked once at import (fastest available first):

- ``pyfwnt``: libfwnt's C decoder (PyPI ``libfwnt-python``), every platform.
- ``ntdll``: Windows' own ``RtlDecompressBufferEx``, Windows only.
- ``pure``: the portable fallback below, fully bounds-checked.

Set ``VM2CORE_XPRESS=pure|pyfwnt|ntdll`` to force one (for tests and comparisons).
Every backend returns exactly ``out_size`` bytes or raises :class:`XpressError`.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from vm2core.errors import FormatError, Vm2coreError

Decompressor = Callable[[bytes | memoryview, int], bytes]

# Sanity cap on one decompressed unit; RamBlock records are at most 1 MiB [vmrs-format.md §4].
MAX_OUT_SIZE = 64 << 20
# [MS-XCA] 2.4: the u16/u32 long-length forms carry length-3, which must be at least 15 + 7.
_MIN_LONG_LENGTH = 15 + 7
# libfwnt rejects (or, near 64 KiB, mis-decodes) matches longer than this many bytes;
# a stream for a larger output may legitimately contain such matches.
_PYFWNT_MAX_MATCH = 32771
# Windows: COMPRESSION_FORMAT_XPRESS, plain LZ77 [MS-XCA] 2.3/2.4.
_COMPRESSION_FORMAT_XPRESS = 3

ENV_VAR = "VM2CORE_XPRESS"


class XpressError(FormatError):
    """A compressed unit is corrupt or truncated; the caller adds path, structure and offset."""


class XpressBackendError(Vm2coreError):
    """The backend forced with VM2CORE_XPRESS is unknown or not available on this machine (bad usage)."""

    exit_code = 2


def _check_out_size(out_size: int) -> None:
    if not 0 <= out_size <= MAX_OUT_SIZE:
        raise XpressError(f"XPRESS output size {out_size} out of range (0..{MAX_OUT_SIZE})")


def _truncated(out_pos: int, out_size: int) -> XpressError:
    return XpressError(f"XPRESS stream truncated after {out_pos} of {out_size} bytes")


def _bad_match(offset: int, length: int, out_pos: int, out_size: int) -> XpressError:
    if offset > out_pos:
        return XpressError(f"XPRESS match offset {offset} reaches before the output start at {out_pos}")
    return XpressError(f"XPRESS match of {length} bytes at {out_pos} overruns the {out_size}-byte output")


def decompress_pure(data: bytes | memoryview, out_size: int) -> bytes:
    """Decode with the portable Python decoder.

    Follows [MS-XCA] 2.4.4, but copies whole literal runs (found from the flag word) and
    whole matches with slices; overlapping matches repeat their period, which is exactly
    what the byte-at-a-time copy of the spec produces. Stops as soon as out_size bytes
    exist, like the Windows and libfwnt decoders.
    """
    _check_out_size(out_size)
    if out_size == 0:
        return b""
    src = bytes(data)
    end = len(src)
    out = bytearray()
    out_pos = 0
    pos = 0
    nibble_at = 0  # [MS-XCA] LastLengthHalfByte: 0 means no half-used nibble byte pending
    while True:
        if pos + 4 > end:
            raise _truncated(out_pos, out_size)
        # [MS-XCA] 2.4: 32 flags, little-endian, consumed from the most significant bit; 1 = match.
        flags = src[pos] | src[pos + 1] << 8 | src[pos + 2] << 16 | src[pos + 3] << 24
        pos += 4
        bits = 32  # flags not consumed yet; flags holds only those bits
        while bits:
            # Literal run: the zero flags above the highest remaining one bit.
            run = bits - flags.bit_length()
            if run:
                if run > out_size - out_pos:
                    run = out_size - out_pos
                if pos + run > end:
                    raise _truncated(out_pos, out_size)
                out += src[pos:pos + run]
                pos += run
                out_pos += run
                if out_pos == out_size:
                    return bytes(out)
                bits -= run
                if not bits:
                    break
            bits -= 1
            flags ^= 1 << bits
            if pos + 2 > end:
                if pos == end:
                    # [MS-XCA]: a match flag at the end of input is the end-of-stream marker.
                    raise XpressError(f"XPRESS stream ends after {out_pos} of {out_size} bytes")
                raise _truncated(out_pos, out_size)
            token = src[pos] | src[pos + 1] << 8
            pos += 2
            offset = (token >> 3) + 1
            length = (token & 7) + 3
            if length == 10:
                # Lengths of 10 and more continue in a shared nibble, then a byte, u16 or u32.
                if nibble_at == 0:
                    if pos >= end:
                        raise _truncated(out_pos, out_size)
                    length = src[pos] & 15
                    nibble_at = pos
                    pos += 1
                else:
                    length = src[nibble_at] >> 4
                    nibble_at = 0
                if length == 15:
                    if pos >= end:
                        raise _truncated(out_pos, out_size)
                    length = src[pos]
                    pos += 1
                    if length == 255:
                        if pos + 2 > end:
                            raise _truncated(out_pos, out_size)
                        length = src[pos] | src[pos + 1] << 8
                        pos += 2
                        if length == 0:
                            if pos + 4 > end:
                                raise _truncated(out_pos, out_size)
                            length = int.from_bytes(src[pos:pos + 4], "little")
                            pos += 4
                        if length < _MIN_LONG_LENGTH:
                            raise XpressError(f"XPRESS long match length {length} below {_MIN_LONG_LENGTH}")
                        length -= _MIN_LONG_LENGTH
                    length += 15
                length += 10
            if offset > out_pos or length > out_size - out_pos:
                raise _bad_match(offset, length, out_pos, out_size)
            start = out_pos - offset
            if offset >= length:
                out += out[start:start + length]
            else:
                period = out[start:out_pos]
                out += (period * (length // offset + 1))[:length]
            out_pos += length
            if out_pos == out_size:
                return bytes(out)


def _load_pyfwnt() -> Decompressor | None:
    try:
        import pyfwnt
    except ImportError:
        return None
    native = pyfwnt.lzxpress_decompress

    def decompress_pyfwnt(data: bytes | memoryview, out_size: int) -> bytes:
        """Decode with libfwnt; its failures are re-judged by the pure decoder when they may be its limits."""
        _check_out_size(out_size)
        if out_size == 0:
            return b""
        src = bytes(data)
        try:
            result = native(src, out_size)
        except Exception as exc:  # libfwnt raises OSError/IOError variants on bad data
            problem = f"XPRESS stream rejected by libfwnt: {exc}"
        else:
            if len(result) == out_size:
                return bytes(result)
            problem = f"XPRESS stream decodes to {len(result)} bytes, expected {out_size}"
        if out_size > _PYFWNT_MAX_MATCH:
            # Long matches are valid XPRESS that libfwnt cannot decode: let the exact decoder decide.
            return decompress_pure(src, out_size)
        raise XpressError(problem)

    return decompress_pyfwnt


def _load_ntdll() -> Decompressor | None:
    if sys.platform != "win32":
        return None
    import ctypes

    try:
        ntdll: Any = ctypes.WinDLL("ntdll")
        get_workspace_size = ntdll.RtlGetCompressionWorkSpaceSize
        native = ntdll.RtlDecompressBufferEx
    except (OSError, AttributeError):
        return None
    ulong = ctypes.c_ulong
    get_workspace_size.argtypes = [ctypes.c_ushort, ctypes.POINTER(ulong), ctypes.POINTER(ulong)]
    get_workspace_size.restype = ctypes.c_long  # NTSTATUS
    native.argtypes = [ctypes.c_ushort, ctypes.c_void_p, ulong, ctypes.c_void_p, ulong,
                       ctypes.POINTER(ulong), ctypes.c_void_p]
    native.restype = ctypes.c_long  # NTSTATUS
    buffer_workspace, fragment_workspace = ulong(0), ulong(0)
    status = get_workspace_size(_COMPRESSION_FORMAT_XPRESS, ctypes.byref(buffer_workspace),
                                ctypes.byref(fragment_workspace))
    if status < 0:
        return None
    workspace_size = max(buffer_workspace.value, fragment_workspace.value, 16)
    per_thread = threading.local()  # the workspace is scratch memory: one per thread

    def decompress_ntdll(data: bytes | memoryview, out_size: int) -> bytes:
        """Decode with Windows' RtlDecompressBufferEx (COMPRESSION_FORMAT_XPRESS)."""
        _check_out_size(out_size)
        if out_size == 0:
            return b""
        workspace = getattr(per_thread, "workspace", None)
        if workspace is None:
            workspace = per_thread.workspace = ctypes.create_string_buffer(workspace_size)
        src = bytes(data)
        in_buf = ctypes.create_string_buffer(src, len(src) or 1)
        out_buf = ctypes.create_string_buffer(out_size)
        final_size = ulong(0)
        code = native(_COMPRESSION_FORMAT_XPRESS, ctypes.addressof(out_buf), out_size,
                      ctypes.addressof(in_buf), len(src), ctypes.byref(final_size),
                      ctypes.addressof(workspace))
        if code < 0:
            raise XpressError(f"XPRESS stream rejected by ntdll (NTSTATUS {code & 0xFFFFFFFF:#010x})")
        if final_size.value != out_size:
            raise XpressError(f"XPRESS stream decodes to {final_size.value} bytes, expected {out_size}")
        return out_buf.raw[:out_size]

    return decompress_ntdll


_LOADERS: dict[str, Callable[[], Decompressor | None]] = {
    "pyfwnt": _load_pyfwnt,
    "ntdll": _load_ntdll,
    "pure": lambda: decompress_pure,
}
_AVAILABLE: dict[str, Decompressor] = {
    name: found for name, load in _LOADERS.items() if (found := load()) is not None
}


def available_backends() -> list[str]:
    """Names of the backends usable here, preferred first."""
    return list(_AVAILABLE)


def get_decompressor(name: str) -> Decompressor:
    """The decoder called name; XpressBackendError if unknown or unavailable here."""
    if name not in _LOADERS:
        raise XpressBackendError(f"unknown XPRESS backend {name!r} (known: {', '.join(_LOADERS)})")
    try:
        return _AVAILABLE[name]
    except KeyError:
        raise XpressBackendError(f"XPRESS backend {name!r} is not available on this machine") from None


def _choose_backend() -> tuple[str, XpressBackendError | None]:
    """The backend to use, and the error to report if VM2CORE_XPRESS names an unusable one.

    Never raises: this runs at import, and ``vm2core --help`` must work whatever the
    environment says.  The CLI calls :func:`check_backend` before any command runs."""
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced:
        try:
            get_decompressor(forced)
        except XpressBackendError as e:
            return forced, XpressBackendError(f"{ENV_VAR}={forced}: {e}")
        return forced, None
    return available_backends()[0], None


BACKEND, BACKEND_ERROR = _choose_backend()


def check_backend() -> None:
    """Raise the XpressBackendError of a bad VM2CORE_XPRESS value (exit code 2 in the CLI)."""
    if BACKEND_ERROR is not None:
        raise BACKEND_ERROR


def _refuse(data: bytes | memoryview, out_size: int) -> bytes:
    check_backend()
    raise AssertionError("unreachable")


_decompress: Decompressor = _refuse if BACKEND_ERROR is not None else _AVAILABLE[BACKEND]


def decompress(data: bytes | memoryview, out_size: int) -> bytes:
    """Decode one plain LZ77 XPRESS stream to exactly out_size bytes (XpressError otherwise)."""
    return _decompress(data, out_size)
