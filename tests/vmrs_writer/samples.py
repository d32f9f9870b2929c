"""Recognisable synthetic guest memory and VP states for sample .vmrs files.

Every page is generated from its guest-physical address alone (streaming, nothing held), so a
test can recompute any page with sample_page(gpa) and compare.
"""

from __future__ import annotations

import random
import struct

from tests.vmrs_writer.options import RangeSpec, ReadFn
from vm2core.reader.cpu import Segment, TableRegister, VpState

PAGE_SIZE = 4096
MIB = 1 << 20
HIGH_RANGE_GPA = 1 << 32            # second range above a 4 GiB MMIO hole, as on real Hyper-V guests
_LINE = b"vm2core sample page gpa=%#014x line %03d: the quick brown fox jumps over the lazy dog\n"


def page_kind(gpa: int) -> str:
    """Deterministic mix: ~40% zero, ~12% fill, rest text, random or structured data."""
    slot = ((gpa // PAGE_SIZE) * 2654435761 >> 7) % 16
    if slot < 6:
        return "zero"
    if slot < 8:
        return "fill"
    if slot < 12:
        return "text"
    if slot < 14:
        return "random"
    return "table"


def sample_page(gpa: int) -> bytes:
    """The 4096 bytes of the page at gpa (page aligned)."""
    kind = page_kind(gpa)
    if kind == "zero":
        return bytes(PAGE_SIZE)
    if kind == "fill":
        return struct.pack("<Q", 0x0101010101010101 * ((gpa >> 12) & 0xFF)) * (PAGE_SIZE // 8)
    header = b"VM2CORE-SAMPLE gpa=%#014x kind=%-6s\n" % (gpa, kind.encode())
    if kind == "text":
        body = b"".join(_LINE % (gpa, line) for line in range(48))
    elif kind == "random":
        body = random.Random(gpa).randbytes(PAGE_SIZE)
    else:
        body = struct.pack("<512Q", *((gpa + 8 * i) | 0x8000000000000063 for i in range(512)))
    return (header + body)[:PAGE_SIZE]


def sample_reader(gpa_start: int) -> ReadFn:
    def read(offset: int, length: int) -> bytes:
        return b"".join(sample_page(gpa_start + offset + at) for at in range(0, length, PAGE_SIZE))

    return read


def sample_ranges(size_mib: int) -> list[RangeSpec]:
    """Two ranges with a hole: size_mib // 2 MiB at 0, the rest at 4 GiB minus 3 pages (partial block)."""
    if size_mib < 2:
        raise ValueError("a sample needs at least 2 MiB")
    low_pages = size_mib // 2 * MIB // PAGE_SIZE
    high_pages = (size_mib - size_mib // 2) * MIB // PAGE_SIZE - 3
    return [RangeSpec(0, low_pages, sample_reader(0)),
            RangeSpec(HIGH_RANGE_GPA, high_pages, sample_reader(HIGH_RANGE_GPA))]


def sample_vps(count: int) -> list[VpState]:
    """Plausible x86-64 long-mode Linux kernel register sets, distinct per VP."""
    cs = Segment(base=0, limit=0xFFFFFFFF, selector=0x10, attributes=0xA09B)
    ds = Segment(base=0, limit=0xFFFFFFFF, selector=0x18, attributes=0xC093)
    tr = Segment(base=0xFFFFFE0000003000, limit=0x4087, selector=0x40, attributes=0x008B)
    vps = []
    for index in range(count):
        vps.append(VpState(
            index=index,
            gp={"rax": index, "rbx": 0x1000 + index, "rsp": 0xFFFFC90000010000 + index * 0x4000 - 0x100,
                "rbp": 0xFFFFC90000010000 + index * 0x4000 - 0x80, "rip": 0xFFFFFFFF81A0B4C0 + index,
                "rflags": 0x246},
            control={"cr0": 0x80050033, "cr2": 0, "cr3": 0x0000000002A0A000, "cr4": 0x3506F0, "cr8": 0,
                     "efer": 0xD01},
            debug={"dr6": 0xFFFF0FF0, "dr7": 0x400},
            segments={"es": ds, "cs": cs, "ss": ds, "ds": ds, "fs": Segment(),
                      "gs": Segment(base=0xFFFF88807DC00000 + index * 0x40000), "ldtr": Segment(), "tr": tr},
            cpl=0,
            idtr=TableRegister(base=0xFFFFFE0000000000, limit=0xFFF),
            gdtr=TableRegister(base=0xFFFFFE0000001000 + index * 0x13000, limit=0x7F),
            msrs={"kernel_gs_base": 0, "apic_base": 0xFEE00900 if index == 0 else 0xFEE00800,
                  "star": 0x0023001000000000, "lstar": 0xFFFFFFFF81C00080, "sfmask": 0x47700},
        ))
    return vps


def sample_source(size_mib: int, vps: int, seed: int = 0) -> tuple[list[RangeSpec], list[VpState]]:
    """The default source of scripts/make-sample-vmrs, in the --source MODULE:FUNCTION shape."""
    return sample_ranges(size_mib), sample_vps(vps)
