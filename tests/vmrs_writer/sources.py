"""Memory sources for RangeSpec.read: a raw RAM image file, or bytes in memory."""

from __future__ import annotations

from pathlib import Path

from tests.vmrs_writer.options import ReadFn


def ram_from_file(path: str | Path, base_offset: int = 0) -> ReadFn:
    """read(offset, length) over a raw RAM image (e.g. QEMU pmemsave) starting at base_offset.

    Bytes past the end of the file read as zeros, so a range may be longer than the image.
    """
    image = Path(path)

    def read(offset: int, length: int) -> bytes:
        with image.open("rb") as handle:
            handle.seek(base_offset + offset)
            data = handle.read(length)
        return data + bytes(length - len(data))

    return read


def ram_from_bytes(buf: bytes | bytearray | memoryview) -> ReadFn:
    """read(offset, length) over an in-memory buffer; past its end reads as zeros."""
    view = memoryview(buf).cast("B")

    def read(offset: int, length: int) -> bytes:
        data = bytes(view[offset:offset + length])
        return data + bytes(length - len(data))

    return read
