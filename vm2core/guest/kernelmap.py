"""Where the guest kernel maps RAM and its own image, for kdump-style ``p_vaddr`` in the core.

``/proc/vmcore`` gives every RAM PT_LOAD ``p_vaddr = __va(p_paddr) = page_offset_base + p_paddr``
and adds one PT_LOAD for the kernel image at its runtime address (linux ``kernel/crash_core.c:
crash_prepare_elf64_headers``); gdb and vmcore-dmesg read memory only through ``p_vaddr``
(docs/elf-vmcore.md §4, §8; docs/dmesg.md §2.2).

``page_offset_base`` is randomized (CONFIG_RANDOMIZE_MEMORY) and not in VMCOREINFO, so it is
found through the page tables: a pointer the kernel keeps to a direct-map object (the root of
``mem_section``, ``node_data[0]``, the printk ring's arrays) is translated, and ``pointer - pa``
is the base when it is 1 GiB aligned (the randomization granule, a PUD) and maps a known physical
page (the VMCOREINFO note itself) back to itself.  The image's extent comes from the same tables:
the 2 MiB granules from ``_stext`` on that map ``va - __START_KERNEL_map + phys_base``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from ..reader.memory import PAGE_SIZE, NotInMemory, PhysicalMemory
from .kernelmem import KernelMemory, MissingKey, number, symbol
from .paging import TranslationError
from .vmcoreinfo import KERNEL_MAP_BASE, GuestKernel

PUD_SIZE = 1 << 30                          # page_offset_base is randomized in PUD steps (kaslr.c)
PMD_SIZE = 2 << 20
DEFAULT_IMAGE_SIZE = 1 << 30                # KERNEL_IMAGE_SIZE with KASLR
MAX_IMAGE_GAP = 64                          # unmapped 2 MiB granules that end the image scan
# The direct map lies in the upper half below the kernel image: 0xffff8880_00000000 (4-level) or
# 0xff110000_00000000 (5-level) by default, moved up by KASLR (page_64_types.h, kaslr.c).
DIRECT_MAP_DEFAULTS = (0xFFFF_8880_0000_0000, 0xFF11_0000_0000_0000)


@dataclass(frozen=True)
class KernelMap:
    """What the planner needs for kdump-style virtual addresses."""

    page_offset_base: int
    image_va: int                          # runtime _text
    image_pa: int
    image_size: int                        # whole 2 MiB granules


def map_kernel(memory: PhysicalMemory, kernel: GuestKernel) -> tuple[KernelMap | None, str]:
    """The kernel's map, or None and the reason it could not be established."""
    try:
        mem = KernelMemory(memory, kernel.vmcoreinfo, kernel.phys_base)
    except MissingKey as e:
        return None, str(e)
    base = find_page_offset_base(mem, kernel.note_gpa)
    if base is None:
        return None, "page_offset_base not found through the page tables"
    image = _image_extent(mem)
    if image is None:
        return None, "the kernel image is not mapped where VMCOREINFO says"
    return KernelMap(base, *image), ""


def _direct_map_pointers(mem: KernelMemory) -> list[int]:
    """Pointers the kernel keeps to objects it allocated from memblock/slab (so in the direct map)."""
    found = []
    info = mem.info
    for name in ("mem_section", "node_data"):
        with contextlib.suppress(MissingKey, TranslationError):
            found.append(mem.u64(symbol(info, name)))
    try:
        rb = mem.u64(symbol(info, "prb"))
        ring = rb + number(info, "OFFSET(printk_ringbuffer.desc_ring)") + number(info, "OFFSET(prb_desc_ring.descs)")
        found.append(mem.u64(ring))
    except (MissingKey, TranslationError):
        pass
    return [p for p in found if p and p < KERNEL_MAP_BASE and p >> 63]


def find_page_offset_base(mem: KernelMemory, known_pa: int) -> int | None:
    """page_offset_base, verified by mapping ``known_pa`` (a page of guest RAM) through it."""
    candidates = []
    for pointer in _direct_map_pointers(mem):
        pa = mem.try_translate(pointer)
        if pa is not None:
            candidates.append(pointer - pa)
    candidates += DIRECT_MAP_DEFAULTS
    for base in candidates:
        if base % PUD_SIZE or not base >> 63 or base >= KERNEL_MAP_BASE:
            continue
        probe = known_pa & ~(PAGE_SIZE - 1)
        if mem.try_translate(base + probe) == probe:
            return base
    return None


def _image_extent(mem: KernelMemory) -> tuple[int, int, int] | None:
    """(va, pa, size) of the 2 MiB granules from _stext on that the image mapping covers."""
    try:
        stext = symbol(mem.info, "_stext")
    except MissingKey:
        return None
    size_limit = number(mem.info, "NUMBER(KERNEL_IMAGE_SIZE)") if "NUMBER(KERNEL_IMAGE_SIZE)" in mem.info \
        else DEFAULT_IMAGE_SIZE
    start = stext & ~(PMD_SIZE - 1)
    limit = min(KERNEL_MAP_BASE + size_limit, 1 << 64)
    end = None
    gap = 0
    va = start
    while va < limit and gap <= MAX_IMAGE_GAP:
        if any(_linear(mem, probe) for probe in (va, va + PMD_SIZE - PAGE_SIZE)):
            end, gap = va + PMD_SIZE, 0
        elif end is None:
            return None                                  # _stext itself is not mapped linearly
        else:
            gap += 1
        va += PMD_SIZE
    assert end is not None
    return start, mem.image_pa(start), end - start


def _linear(mem: KernelMemory, va: int) -> bool:
    try:
        return mem.translate(va) == mem.image_pa(va)
    except (TranslationError, NotInMemory):
        return False
