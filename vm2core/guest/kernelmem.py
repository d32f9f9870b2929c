"""Guest-virtual reads of the kernel's memory, through the kernel's own page tables.

The kernel log, and anything else read by symbol, lives at kernel virtual addresses: SYMBOL()
values of VMCOREINFO are runtime (already KASLR-relocated) addresses in the kernel image, and the
objects they point to may sit in the randomized direct map (``log_buf_len=`` moves the ring
there).  So every address is translated by walking ``init_top_pgt`` (docs/dmesg.md §2), as
makedumpfile does; only the table root itself is found with the image rule
``pa = va - __START_KERNEL_map + phys_base``.  No vCPU register is needed, so a core written by
vm2core (which has the note but no live CR3 of interest) reads the same way as a saved state.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping

from ..reader.memory import NotInMemory, PhysicalMemory
from .paging import CR4_LA57, AddressSpace, TranslationError
from .vmcoreinfo import KERNEL_MAP_BASE, BadValue, hex_value, signed_value

MASK64 = (1 << 64) - 1
MAX_READ = 1 << 31                         # LOG_BUF_LEN_MAX: nothing the log reader wants is larger

_U16, _U32, _U64 = struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<Q")


class MissingKey(LookupError):
    """A VMCOREINFO key the caller needs is absent or malformed."""

    def __init__(self, key: str, detail: str = "missing") -> None:
        super().__init__(f"{key} {detail} in VMCOREINFO")
        self.key = key


def symbol(info: Mapping[str, str], name: str) -> int:
    """``SYMBOL(name)``: ``%lx``, a runtime virtual address (never add KERNELOFFSET to it)."""
    return _required(info, f"SYMBOL({name})", hex_value)


def number(info: Mapping[str, str], key: str) -> int:
    """``NUMBER()``/``SIZE()``/``OFFSET()``/``LENGTH()`` (``%ld``/``%lu``: signed decimal covers both)."""
    return _required(info, key, signed_value)


def _required(info: Mapping[str, str], key: str, parse: Callable[[Mapping[str, str], str], int | None]) -> int:
    """The value of ``key`` by the note parser's own rules; MissingKey when absent or malformed."""
    try:
        value = parse(info, key)
    except BadValue:
        raise MissingKey(key, f"malformed ({info[key][:30]!r})") from None
    if value is None:
        raise MissingKey(key)
    return value


class CountingMemory:
    """A :class:`PhysicalMemory` that counts the bytes read through it (the dmesg benchmark's budget)."""

    def __init__(self, memory: PhysicalMemory) -> None:
        self.memory = memory
        self.bytes_read = 0

    def read_physical(self, gpa: int, length: int) -> bytes:
        self.bytes_read += max(length, 0)
        return self.memory.read_physical(gpa, length)


class KernelMemory:
    """Reads kernel virtual memory of one guest kernel, described by its VMCOREINFO."""

    def __init__(self, memory: PhysicalMemory, info: Mapping[str, str], phys_base: int | None = None) -> None:
        """``phys_base``: the validated value when known (else ``NUMBER(phys_base)`` of the note)."""
        self.memory = memory
        self.info = info
        if phys_base is None:
            phys_base = number(info, "NUMBER(phys_base)")
        self.phys_base = phys_base
        try:
            top = symbol(info, "init_top_pgt")
        except MissingKey:
            top = symbol(info, "init_level4_pgt")          # kernels before 4.13 (makedumpfile does the same)
        five_level = info.get("NUMBER(pgtable_l5_enabled)", "0").strip() == "1"
        sme_mask = number(info, "NUMBER(sme_mask)") & MASK64 if "NUMBER(sme_mask)" in info else 0
        self.space = AddressSpace(memory, 0, CR4_LA57 if five_level else 0, sme_mask=sme_mask)
        self.space.root = self.image_pa(top) & self.space.address_mask

    @property
    def levels(self) -> int:
        return self.space.levels

    def image_pa(self, va: int) -> int:
        """Physical address of a kernel-image address by the image rule (``__phys_addr_symbol``)."""
        return (va - KERNEL_MAP_BASE + self.phys_base) & MASK64

    def translate(self, va: int) -> int:
        """Physical address of ``va``; raises :class:`TranslationError`."""
        return self.space.translate(va)

    def try_translate(self, va: int) -> int | None:
        return self.space.try_translate(va)

    def read(self, va: int, length: int) -> bytes:
        """``length`` bytes at ``va``, page by page; raises :class:`TranslationError` on a hole."""
        if not 0 <= length <= MAX_READ:
            raise ValueError(f"kernel read of {length} bytes (limit {MAX_READ})")
        parts = []
        while length:
            walk = self.space.walk(va & MASK64)
            count = min(length, walk.page_size - (walk.pa & (walk.page_size - 1)))
            try:
                parts.append(self.memory.read_physical(walk.pa, count))
            except NotInMemory:
                raise TranslationError(va, f"maps to {walk.pa:#x}, outside guest RAM") from None
            va, length = va + count, length - count
        return b"".join(parts)

    def u16(self, va: int) -> int:
        value: int = _U16.unpack(self.read(va, 2))[0]
        return value

    def u32(self, va: int) -> int:
        value: int = _U32.unpack(self.read(va, 4))[0]
        return value

    def u64(self, va: int) -> int:
        value: int = _U64.unpack(self.read(va, 8))[0]
        return value
