"""zstd compression in front of any other sink, as one streaming frame.

The frame header carries no content size (the stream is produced before its length is
final), which ``zstd -d`` and ``zstdcat`` handle; compression runs on all cores
(``threads=-1``) so it keeps up with reading the saved state.
"""

from __future__ import annotations

import zstandard

from vm2core.errors import OutputError, UsageError
from vm2core.sinks.base import Sink

#: Uncompressed bytes handed to the compressor per call: several zstd jobs at level 3,
#: so all worker threads stay busy while Python overhead stays negligible.
FEED_SIZE = 4 << 20
_ZEROS = bytes(FEED_SIZE)
DEFAULT_LEVEL = 3
#: Output names that ask for compression without --zstd.
ZSTD_SUFFIXES = (".zst", ".zstd")
#: ZSTD_minCLevel() of libzstd: the fastest negative level.
MIN_LEVEL = -(1 << 17)


class ZstdSink(Sink):
    """Compresses everything written and passes the compressed bytes to ``inner``.

    ``position`` counts uncompressed bytes (what the ELF writer reasons about);
    ``inner.position`` counts compressed bytes.  Not seekable: a compressed stream
    cannot be patched.
    """

    seekable = False
    copy_chunk = FEED_SIZE

    def __init__(self, inner: Sink, level: int = DEFAULT_LEVEL, threads: int = -1) -> None:
        super().__init__()
        if not MIN_LEVEL <= level <= zstandard.MAX_COMPRESSION_LEVEL:
            raise OutputError(f"zstd level {level} is outside {MIN_LEVEL}..{zstandard.MAX_COMPRESSION_LEVEL}")
        self.inner = inner
        self.level = level
        compressor = zstandard.ZstdCompressor(level=level, threads=threads, write_content_size=False)
        self._stream = compressor.compressobj()
        self._finished = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        try:
            out = self._stream.compress(data)
        except zstandard.ZstdError as exc:
            raise OutputError(f"zstd compression failed: {exc}") from exc
        self.position += len(data)
        if out:
            self.inner.write(out)

    def write_zeros(self, length: int) -> None:
        zeros = memoryview(_ZEROS)
        while length > 0:
            n = min(length, FEED_SIZE)
            self.write(zeros[:n])
            length -= n

    def commit(self) -> None:
        """End the frame (flushing every worker), then commit the inner sink."""
        if not self._finished:
            self._finished = True
            try:
                tail = self._stream.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH)
            except zstandard.ZstdError as exc:
                raise OutputError(f"zstd compression failed: {exc}") from exc
            if tail:
                self.inner.write(tail)
        self.inner.commit()

    def abort(self) -> None:
        self._finished = True
        self.inner.abort()

    @property
    def description(self) -> str:
        return f"{self.inner.description} (zstd level {self.level})"


def parse_level(text: str) -> int:
    """``--zstd=LEVEL`` / ``--zstd-level LEVEL`` as given: an integer libzstd accepts."""
    try:
        level = int(text.strip())
    except ValueError:
        raise UsageError(f"zstd level {text!r} is not an integer") from None
    if not MIN_LEVEL <= level <= zstandard.MAX_COMPRESSION_LEVEL:
        raise UsageError(f"zstd level {level} is outside {MIN_LEVEL}..{zstandard.MAX_COMPRESSION_LEVEL}")
    return level


def zstd_level(output_name: str | None, option: int | None) -> int | None:
    """The level to compress with, or None for no compression.

    ``option`` is ``--zstd[=LEVEL]`` (None when absent; the CLI passes DEFAULT_LEVEL for a
    bare ``--zstd``); without it, an output (file or remote path) named ``*.zst`` compresses.
    """
    if option is not None:
        return option
    if output_name and output_name.lower().endswith(ZSTD_SUFFIXES):
        return DEFAULT_LEVEL
    return None
