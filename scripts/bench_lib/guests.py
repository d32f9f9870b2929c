"""Realistic bench inputs written with the test-only .vmrs writer.

Two guest shapes (the issue's "raw-block" and "XPRESS-heavy" guests).  Both carry a synthetic
Linux kernel (page tables, a VMCOREINFO note and decoys: ``tests/fixtures/synthetic_guest.py``) in
their low memory, so the converter finds and validates a note exactly as on a real guest.  The rest
of RAM is generated per 1 MiB block from the block number, so a 64 GiB guest needs no 64 GiB buffer.

XPRESS-heavy pages come from a small pool compressed once by the test compressor (pure Python, a
few MB/s): the block encoder then only looks pages up, so writing 4 GiB takes seconds, not hours.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from tests.fixtures.printk_writer import PRINTK_KEYS, LocklessRing
from tests.fixtures.synthetic_guest import LINK_TEXT, SyntheticGuest, build_guest, vmcoreinfo_text
from tests.fixtures.xpress_compress import compress
from tests.vmrs_writer import RangeSpec
from tests.vmrs_writer.ramblock import (
    FILL_RECORD,
    MULTI_FILL_RECORD,
    PAGE_HEADER,
    TAG_END,
    TAG_FILL,
    TAG_MULTI_FILL,
    TAG_RAW_PAGE,
)

PAGE = 4096
BLOCK = 1 << 20
PAGES_PER_BLOCK = BLOCK // PAGE
GIB = 1 << 30
ZERO_PAGE = bytes(PAGE)
# Record structs and tags (vmrs-format.md section 4) are the test writer's; records_encoder below
# differs from the writer's encoder only in taking XPRESS records from a precompressed page pool.
WORDS = (b"kernel task page inode dentry socket buffer lock queue struct mutex slab cache irq "
         b"timer sched cgroup mount file vma pte pmd anon swap block request bio ext4 xfs").split()


@dataclass(frozen=True)
class GuestShape:
    """How generated RAM is made up: ``zero_blocks`` of the 1 MiB blocks are all zero (free
    memory comes in large runs); in the others, fractions of pages (the rest are raw pages).
    Defaults: ~60 % zero, ~35 % XPRESS, ~5 % raw pages overall."""

    zero_blocks: float = 0.40
    zero: float = 0.333
    xpress: float = 0.583
    data_gib: float | None = None    # only the first data_gib GiB hold data; the rest is never touched


def _text_page(rng: random.Random) -> bytes:
    """Compressible page (text-like, ~2:1 under XPRESS) as kernel and page-cache pages often are."""
    out = bytearray()
    while len(out) < PAGE:
        out += rng.choice(WORDS) + b" " + str(rng.randrange(1 << 20)).encode() + b"\n"
        if rng.random() < 0.3:
            out += rng.randbytes(rng.randrange(4, 24))
    return bytes(out[:PAGE])


class PagePool:
    """A few distinct page contents and their stored records (compressed once)."""

    def __init__(self, seed: int, compressible: int = 48, incompressible: int = 16) -> None:
        rng = random.Random(seed)
        self.text = [_text_page(rng) for _ in range(compressible)]
        self.random = [rng.randbytes(PAGE) for _ in range(incompressible)]
        self.records: dict[bytes, bytes] = {}
        for page in self.text:
            packed = compress(page)
            assert len(packed) < PAGE
            self.records[page] = PAGE_HEADER.pack(len(packed)) + packed
        for page in self.random:
            self.records[page] = PAGE_HEADER.pack(TAG_RAW_PAGE) + page


class GeneratedRam:
    """Guest RAM: the synthetic kernel's pages over procedurally generated blocks."""

    def __init__(self, size: int, shape: GuestShape, pool: PagePool, guest: SyntheticGuest, seed: int) -> None:
        self.size = size
        self.shape = shape
        self.pool = pool
        self.guest = guest
        self.seed = seed
        self.data_end = size if shape.data_gib is None else min(size, int(shape.data_gib * GIB))

    def block(self, number: int) -> bytes:
        """The 1 MiB at ``number * BLOCK`` (GPA = data offset: one range starting at 0)."""
        if number * BLOCK >= self.data_end:
            out = bytearray(BLOCK)
        else:
            rng = random.Random(self.seed * 7919 + number)
            pages = []
            if rng.random() < self.shape.zero_blocks:
                pages = [ZERO_PAGE] * PAGES_PER_BLOCK
            while len(pages) < PAGES_PER_BLOCK:
                r = rng.random()
                run = rng.randint(1, 24)
                if r < self.shape.zero:
                    pages += [ZERO_PAGE] * run
                elif r < self.shape.zero + self.shape.xpress:
                    pages += [rng.choice(self.pool.text) for _ in range(run)]
                else:
                    pages += [rng.choice(self.pool.random) for _ in range(max(1, run // 4))]
            out = bytearray(b"".join(pages[:PAGES_PER_BLOCK]))
        first = number * PAGES_PER_BLOCK
        for i in range(PAGES_PER_BLOCK):                 # the synthetic kernel's pages win
            page = self.guest.ram.pages.get(first + i)
            if page is not None:
                out[i * PAGE:(i + 1) * PAGE] = page
        return bytes(out)

    def read(self, offset: int, length: int) -> bytes:
        """``RangeSpec.read``: the writer asks for whole blocks in increasing order."""
        parts = []
        while length > 0:
            number, within = divmod(offset, BLOCK)
            n = min(length, BLOCK - within)
            parts.append(self.block(number)[within:within + n])
            offset += n
            length -= n
        return b"".join(parts)


def records_encoder(pool: PagePool) -> Callable[[int, bytes], bytes]:
    """``BlockEncoder``: zero pages as fill runs, pool pages as their records, others as raw pages."""

    def encode(_number: int, data: bytes) -> bytes:
        out = bytearray()
        i = 0
        while i < PAGES_PER_BLOCK:
            page = data[i * PAGE:(i + 1) * PAGE]
            if page == ZERO_PAGE:
                end = i + 1
                while end < PAGES_PER_BLOCK and data[end * PAGE:(end + 1) * PAGE] == ZERO_PAGE:
                    end += 1
                if end - i == 1:
                    out += FILL_RECORD.pack(TAG_FILL, 0)
                else:
                    out += MULTI_FILL_RECORD.pack(TAG_MULTI_FILL, 0, end - i)
                i = end
                continue
            out += pool.records.get(page) or PAGE_HEADER.pack(TAG_RAW_PAGE) + page
            i += 1
        out += PAGE_HEADER.pack(TAG_END)
        return data if len(out) >= BLOCK else bytes(out)

    return encode


KERNEL_OFFSET = 0x1E200000                 # build_guest's default: the image at 80..112 MiB
LOG_ARRAYS_PA = 0x7000000                  # the printk ring's arrays (log_buf_len=1M), right after the image
LOG_RECORDS = 40000                        # ~2.5 wraps of the 1 MiB data ring


def kernel_log(seed: int) -> LocklessRing:
    """A 1 MiB lockless ring (log_buf_len=1M: 32768 descriptors) written by the kernel's writer model."""
    rng = random.Random(seed)
    ring = LocklessRing(count_bits=15, size_bits=20)
    for n in range(LOG_RECORDS):
        words = b" ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 14)))
        ring.log(b"%s: %s" % (rng.choice(WORDS), words), ts=n * 2_500_000 + rng.randrange(1000),
                 caller_id=rng.randrange(1, 5000))
    return ring


def bench_guest(size: int, shape: GuestShape, *, seed: int = 1) -> tuple[list[RangeSpec], SyntheticGuest,
                                                                          GeneratedRam]:
    """One RAM range at GPA 0 of ``size`` bytes with the synthetic kernel (and its log) in low memory."""
    ring = kernel_log(seed)
    printk_keys = frozenset(line.partition("=")[0] for line in vmcoreinfo_text("x", 0, 0).decode().splitlines()
                            if any(word in line.partition("=")[0] for word in PRINTK_KEYS))
    guest = build_guest(ram_size=size, n_vcpus=2, seed=seed, kernel_offset=KERNEL_OFFSET, omit_keys=printk_keys,
                        extra_vmcoreinfo=ring.vmcoreinfo(LINK_TEXT + KERNEL_OFFSET))
    ring.place(guest, LOG_ARRAYS_PA)
    ram = GeneratedRam(size, shape, PagePool(seed), guest, seed)
    spec = RangeSpec(gpa_start=0, page_count=size // PAGE, read=ram.read,
                     omit_zero_blocks=shape.data_gib is not None)
    return [spec], guest, ram
