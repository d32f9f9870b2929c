"""x86-64 virtual -> guest-physical translation through the guest's own page tables.

Used to check a VMCOREINFO candidate against the live kernel: a note from the running kernel
names symbols that the vCPUs' page tables really map where the note says they are.  The walk has
a fixed depth (4 or 5 levels), so hostile or self-referencing tables cannot make it loop.

Facts from the Intel SDM vol. 3A, chapter 4.5 ("4-level and 5-level paging"):
- CR3 bits 0..11 are flags or the PCID (CR4.PCIDE), bits 12..51 the root table address; bits 61..63
  may carry LAM / no-flush flags.  Linux PTI additionally sets CR3 bit 12 to select the user half of
  an 8 KiB PGD (``arch/x86/include/asm/pgtable.h``: ``PTI_PGTABLE_SWITCH_BIT``); the kernel half is
  the lower, 8 KiB-aligned page, so clearing bit 12 always yields the kernel's tables.
- CR4.LA57 (bit 12) selects 5-level paging (57-bit canonical addresses) instead of 4-level (48-bit).
- Entry bit 0 = present, bit 7 = page size (1 GiB in a PDPTE, 2 MiB in a PDE; reserved above);
  the next-level or frame address is bits 12..51 (bit 12 is PAT in a large-page entry, so a large
  frame is aligned to its size).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..reader.cpu import VpState
from ..reader.memory import NotInMemory, PhysicalMemory

CR4_LA57 = 1 << 12
CR3_PTI_USER_BIT = 1 << 12
ADDRESS_MASK = 0x000F_FFFF_FFFF_F000          # bits 12..51 of CR3 and of every paging entry
ENTRY_PRESENT = 1 << 0
ENTRY_PAGE_SIZE = 1 << 7
ENTRY_SIZE = 8
INDEX_BITS = 9                                 # 512 entries per table
PAGE_SHIFT = 12
_ENTRY = struct.Struct("<Q")                   # one little-endian 64-bit paging-structure entry

# Level number -> name, counting the leaf (PTE) table as level 1.
LEVEL_NAMES = {5: "PML5", 4: "PML4", 3: "PDPT", 2: "PD", 1: "PT"}
# Levels whose entries may map a large page (PS bit): PDPTE -> 1 GiB, PDE -> 2 MiB.
LARGE_PAGE_LEVELS = (3, 2)


class TranslationError(LookupError):
    """A virtual address the given page tables do not map (or map through unreadable tables)."""

    def __init__(self, va: int, reason: str) -> None:
        super().__init__(f"virtual address {va:#x}: {reason}")
        self.va = va
        self.reason = reason


@dataclass(frozen=True)
class Translation:
    """Where a virtual address lands, and the size of the page that maps it."""

    pa: int
    page_size: int


def page_table_root(cr3: int) -> int:
    """The kernel's top-level table address in CR3: PCID, PTI user bit and high flags removed."""
    return cr3 & ADDRESS_MASK & ~CR3_PTI_USER_BIT


def paging_levels(cr4: int) -> int:
    return 5 if cr4 & CR4_LA57 else 4


def is_canonical(va: int, levels: int) -> bool:
    """True when bits 63..(width-1) all equal bit width-1 (width 48 or 57)."""
    width = 12 + INDEX_BITS * levels
    top = va >> (width - 1)
    return top == 0 or top == (1 << (65 - width)) - 1


class AddressSpace:
    """One set of page tables (a CR3/CR4 pair) over guest-physical memory."""

    def __init__(self, memory: PhysicalMemory, cr3: int, cr4: int = 0, *, sme_mask: int = 0) -> None:
        self.memory = memory
        self.cr3 = cr3
        self.cr4 = cr4
        self.root = page_table_root(cr3)
        self.levels = paging_levels(cr4)
        # AMD SME/SEV: the encryption bit (NUMBER(sme_mask)) is set in entries; it is no address bit.
        self.address_mask = ADDRESS_MASK & ~sme_mask

    @classmethod
    def of_vp(cls, memory: PhysicalMemory, vp: VpState) -> AddressSpace:
        return cls(memory, vp.reg("cr3"), vp.reg("cr4"))

    def walk(self, va: int) -> Translation:
        """Translate ``va``; raises :class:`TranslationError` when it is not mapped."""
        if not 0 <= va < 1 << 64:
            raise TranslationError(va, "not a 64-bit address")
        if not is_canonical(va, self.levels):
            raise TranslationError(va, f"not canonical for {self.levels}-level paging")
        table = self.root
        for level in range(self.levels, 0, -1):
            shift = PAGE_SHIFT + INDEX_BITS * (level - 1)
            index = (va >> shift) & ((1 << INDEX_BITS) - 1)
            entry = self._read_entry(va, level, table + index * ENTRY_SIZE)
            if not entry & ENTRY_PRESENT:
                raise TranslationError(va, f"{LEVEL_NAMES[level]} entry {index} not present")
            page_size = 1 << shift
            if level == 1 or (entry & ENTRY_PAGE_SIZE and level in LARGE_PAGE_LEVELS):
                frame = entry & self.address_mask & ~(page_size - 1)
                return Translation(frame | (va & (page_size - 1)), page_size)
            if entry & ENTRY_PAGE_SIZE:
                raise TranslationError(va, f"{LEVEL_NAMES[level]} entry {index} has the reserved PS bit")
            table = entry & self.address_mask
        raise AssertionError("unreachable: the level-1 entry always returns")

    def translate(self, va: int) -> int:
        """Guest-physical address of ``va``; raises :class:`TranslationError`."""
        return self.walk(va).pa

    def try_translate(self, va: int) -> int | None:
        """Guest-physical address of ``va``, or None when it is not mapped."""
        try:
            return self.walk(va).pa
        except TranslationError:
            return None

    def _read_entry(self, va: int, level: int, entry_pa: int) -> int:
        try:
            raw = self.memory.read_physical(entry_pa, ENTRY_SIZE)
        except NotInMemory:
            raise TranslationError(
                va, f"{LEVEL_NAMES[level]} table entry at {entry_pa:#x} is outside guest RAM") from None
        if len(raw) != ENTRY_SIZE:
            raise TranslationError(va, f"short read of the {LEVEL_NAMES[level]} entry at {entry_pa:#x}")
        value: int = _ENTRY.unpack(raw)[0]
        return value
