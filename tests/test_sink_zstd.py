"""ZstdSink and HashingSink against ground truth: the zstd CLI and hashlib."""

from __future__ import annotations

import hashlib
import io
import random
import shutil
import subprocess

import pytest
import zstandard

from vm2core.errors import OutputError
from vm2core.sinks.base import Sink
from vm2core.sinks.hashing import HashingSink
from vm2core.sinks.zstd import ZstdSink


class MemorySink(Sink):
    """Test-only sink: keeps bytes, counts explicit zero runs, records commit/abort."""

    def __init__(self) -> None:
        super().__init__()
        self.data = bytearray()
        self.zero_calls: list[int] = []
        self.state = "open"

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.data += data
        self.position += len(data)

    def write_zeros(self, length: int) -> None:
        self.zero_calls.append(length)
        super().write_zeros(length)

    def commit(self) -> None:
        self.state = "committed"

    def abort(self) -> None:
        self.state = "aborted"


def plain_sample(seed: int = 7) -> bytes:
    rng = random.Random(seed)
    text = b"".join(b"[%8d.000000] usb 1-%d: new device\n" % (i, i % 7) for i in range(40000))
    return rng.randbytes(1 << 20) + text + bytes(3 << 20) + rng.randbytes(12345)


def feed(sink: Sink, data: bytes) -> bytes:
    """Write ``data`` in uneven pieces, a zero run and a copy_from; return what was meant."""
    sink.write(data[:1])
    sink.write(memoryview(data)[1:700001])
    sink.write(bytearray(data[700001:]))
    sink.write_zeros((9 << 20) + 3)
    source = io.BytesIO(b"xx" + data[:5 << 20])
    sink.copy_from(source, 2, min(len(data), 5 << 20))
    return data + bytes((9 << 20) + 3) + data[:5 << 20]


@pytest.mark.skipif(shutil.which("zstd") is None, reason="needs the zstd CLI")
def test_zstd_cli_decompresses_to_the_plain_bytes() -> None:
    inner = MemorySink()
    sink = ZstdSink(inner)
    expected = feed(sink, plain_sample())
    sink.commit()
    assert inner.state == "committed"
    assert sink.position == len(expected)
    assert inner.position == len(inner.data) < len(expected) // 2
    out = subprocess.run(["zstd", "-d", "-c"], input=bytes(inner.data), capture_output=True, check=True).stdout
    assert out == expected


def test_frame_is_streaming_and_level_is_honoured() -> None:
    data = plain_sample(3)
    sizes = {}
    for level in (1, 19):
        inner = MemorySink()
        sink = ZstdSink(inner, level=level, threads=0)
        sink.write(data)
        sink.commit()
        params = zstandard.get_frame_parameters(bytes(inner.data))
        assert params.content_size == zstandard.CONTENTSIZE_UNKNOWN
        assert zstandard.ZstdDecompressor().decompressobj().decompress(bytes(inner.data)) == data
        sizes[level] = len(inner.data)
    assert sizes[19] < sizes[1]


def test_zstd_abort_aborts_inner_and_bad_level_is_an_output_error() -> None:
    inner = MemorySink()
    sink = ZstdSink(inner)
    sink.write(b"partial")
    sink.abort()
    assert inner.state == "aborted"
    assert not sink.seekable
    with pytest.raises(OutputError):
        ZstdSink(MemorySink(), level=99)


def test_hashing_sink_digest_matches_hashlib_and_keeps_holes() -> None:
    inner = MemorySink()
    sink = HashingSink(inner)
    expected = feed(sink, plain_sample(11))
    sink.commit()
    assert inner.state == "committed"
    assert sink.hexdigest() == hashlib.sha256(expected).hexdigest()
    assert bytes(inner.data) == expected
    assert sink.position == len(expected)
    assert inner.zero_calls == [(9 << 20) + 3]  # zeros reached the inner sink as zeros
    assert not sink.seekable


def test_hashing_over_zstd_hashes_the_compressed_stream() -> None:
    """Order matters: HashingSink(ZstdSink(x)) hashes plain bytes, the reverse the .zst file."""
    data = plain_sample(5)
    inner = MemorySink()
    outer = HashingSink(ZstdSink(inner))
    outer.write(data)
    outer.commit()
    assert outer.hexdigest() == hashlib.sha256(data).hexdigest()
    compressed = MemorySink()
    hashing = HashingSink(compressed)
    zsink = ZstdSink(hashing)
    zsink.write(data)
    zsink.commit()
    assert hashing.hexdigest() == hashlib.sha256(bytes(compressed.data)).hexdigest()


def test_zstd_level_from_name_or_option() -> None:
    from vm2core.sinks.zstd import DEFAULT_LEVEL, zstd_level
    assert zstd_level("x.core.zst", None) == DEFAULT_LEVEL
    assert zstd_level("/cores/X.CORE.ZSTD", None) == DEFAULT_LEVEL
    assert zstd_level("x.core", None) is None
    assert zstd_level(None, None) is None
    assert zstd_level("-", 9) == 9
