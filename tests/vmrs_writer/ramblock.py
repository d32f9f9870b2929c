"""Encoders for /savedstate/RamBlock<n> values (vmrs-format.md section 4).

A value of exactly 1 MiB is raw; anything else is a record stream ending with 0xFFFFFFFF:
0xFFFFFFFE u64 pattern (one page), 0xFFFFFFFD u64 pattern u32 count (pattern before count),
0xFFFFFFFC u32 out_size u32 stored_size data (raw when sizes are equal, else XPRESS), and
n + n bytes for one page (raw when n == 0x1000, else plain LZ77 XPRESS of 4096 bytes).
"""

from __future__ import annotations

import random
import struct
import zlib
from collections.abc import Callable

from tests.vmrs_writer.options import PagePolicy

PAGE_SIZE = 4096
PAGES_PER_BLOCK = 256
BLOCK_SIZE = PAGE_SIZE * PAGES_PER_BLOCK

# [RE] record tags.
TAG_END = 0xFFFFFFFF
TAG_FILL = 0xFFFFFFFE
TAG_MULTI_FILL = 0xFFFFFFFD
TAG_CHUNK = 0xFFFFFFFC
TAG_RAW_PAGE = 0x1000

FILL_RECORD = struct.Struct("<IQ")          # tag, pattern
MULTI_FILL_RECORD = struct.Struct("<IQI")   # tag, pattern, count
CHUNK_HEADER = struct.Struct("<III")        # tag, out_size, stored_size
PAGE_HEADER = struct.Struct("<I")           # tag = stored length
END_RECORD = PAGE_HEADER.pack(TAG_END)

ZERO_BLOCK = bytes(BLOCK_SIZE)
_CACHE_LIMIT = 512  # compressed pages kept for reuse (RAM images repeat pages a lot)


def _may_compress(data: bytes) -> bool:
    """Cheap screen: data zlib level 1 cannot shrink by 3% is most unlikely to shrink under XPRESS,
    so skip the slow pure-Python compressor (the page is stored raw, as it would be anyway)."""
    return len(zlib.compress(data, 1)) < len(data) * 0.97


def _load_compressor() -> Callable[[bytes], bytes]:
    from tests.fixtures.xpress_compress import compress
    return compress


class RamBlockEncoder:
    """Turns 1 MiB of block data into the stored value, per policy; deterministic for a seed."""

    def __init__(self, policy: PagePolicy, seed: int = 0, xpress_fraction: float = 1.0) -> None:
        if not callable(policy) and policy not in ("raw-blocks", "records", "mixed"):
            raise ValueError(f"unknown page policy {policy!r}")
        if not 0.0 <= xpress_fraction <= 1.0:
            raise ValueError("xpress_fraction must be within [0, 1]")
        self.policy = policy
        self.seed = seed
        self.xpress_fraction = xpress_fraction
        self._candidates = 0           # pages/chunks that could have been XPRESS-compressed so far
        self._compress: Callable[[bytes], bytes] | None = None
        self._cache: dict[bytes, bytes] = {}

    def encode(self, block_number: int, data: bytes) -> bytes:
        if len(data) != BLOCK_SIZE:
            raise ValueError("a RamBlock holds exactly 1 MiB of data")
        if callable(self.policy):
            return self.policy(block_number, data)
        if self.policy == "raw-blocks":
            return data
        rng = random.Random(self.seed * 1_000_003 + block_number)
        if self.policy == "mixed" and rng.random() < 0.15:
            return data
        if data == ZERO_BLOCK and self.policy == "records":
            return MULTI_FILL_RECORD.pack(TAG_MULTI_FILL, 0, PAGES_PER_BLOCK) + END_RECORD
        encoded = self._records(data, rng, varied=self.policy == "mixed")
        # A stream of exactly 1 MiB would read as raw, a longer one gains nothing: store raw.
        return data if len(encoded) >= BLOCK_SIZE else encoded

    # -- records -----------------------------------------------------------------------------

    def _want_xpress(self) -> bool:
        """Evenly spaced selection of xpress_fraction of the candidates."""
        n = self._candidates
        self._candidates += 1
        return int((n + 1) * self.xpress_fraction) > int(n * self.xpress_fraction)

    def _xpress(self, data: bytes) -> bytes:
        if self._compress is None:
            self._compress = _load_compressor()
        if len(data) != PAGE_SIZE:
            return self._compress(data)
        cached = self._cache.get(data)
        if cached is None:
            cached = self._compress(data)
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.pop(next(iter(self._cache)))
            self._cache[data] = cached
        return cached

    def _page_record(self, page: bytes, force_raw: bool) -> bytes:
        if not force_raw and self._want_xpress() and _may_compress(page):
            packed = self._xpress(page)
            if len(packed) < PAGE_SIZE:
                return PAGE_HEADER.pack(len(packed)) + packed
        return PAGE_HEADER.pack(TAG_RAW_PAGE) + page

    def _chunk_record(self, data: bytes, force_raw: bool) -> bytes:
        if not force_raw and self._want_xpress() and _may_compress(data):
            packed = self._xpress(data)
            if len(packed) < len(data):
                return CHUNK_HEADER.pack(TAG_CHUNK, len(data), len(packed)) + packed
        return CHUNK_HEADER.pack(TAG_CHUNK, len(data), len(data)) + data

    def _records(self, data: bytes, rng: random.Random, varied: bool) -> bytes:
        """"records": fills merged into runs, other pages XPRESS or raw, rare chunks of non-fill pages.
        "mixed" (varied): also chunks over any pages, split fill runs, forced raw pages/chunks."""
        pages = [data[i:i + PAGE_SIZE] for i in range(0, BLOCK_SIZE, PAGE_SIZE)]
        patterns = [p[:8] if p[:8] * (PAGE_SIZE // 8) == p else None for p in pages]
        out = bytearray()
        i = 0
        while i < PAGES_PER_BLOCK:
            pattern = patterns[i]
            if varied and rng.random() < 0.08:
                count = rng.randint(1, min(8, PAGES_PER_BLOCK - i))
                out += self._chunk_record(b"".join(pages[i:i + count]), force_raw=rng.random() < 0.5)
                i += count
                continue
            if pattern is not None:
                end = i + 1
                while end < PAGES_PER_BLOCK and patterns[end] == pattern:
                    end += 1
                if varied and rng.random() < 0.4:
                    end = i + 1 if end - i == 1 else rng.randint(i + 1, end)
                if end - i == 1 or (varied and rng.random() < 0.3):
                    out += FILL_RECORD.pack(TAG_FILL, int.from_bytes(pattern, "little")) * (end - i)
                else:
                    out += MULTI_FILL_RECORD.pack(TAG_MULTI_FILL, int.from_bytes(pattern, "little"), end - i)
                i = end
                continue
            if not varied and rng.random() < 1 / 64:
                end = i + 1
                while end < min(i + 8, PAGES_PER_BLOCK) and patterns[end] is None:
                    end += 1
                if end - i > 1:
                    out += self._chunk_record(b"".join(pages[i:end]), force_raw=False)
                    i = end
                    continue
            out += self._page_record(pages[i], force_raw=varied and rng.random() < 0.2)
            i += 1
        out += END_RECORD
        return bytes(out)
