"""The core's layout, computed completely before the first byte is written.

A pure function of metadata (memory ranges, vCPU registers, the VMCOREINFO note or the room
reserved for it): no I/O, so it is trivially testable, and streaming can never discover late
that an offset must change.

File order, as QEMU's ``dump-guest-memory`` (``elf-vmcore.md`` §6), except that memory starts
page aligned so ``p_offset ≡ p_paddr (mod 4096)`` as in ``/proc/vmcore``::

    Ehdr | phdr[0] PT_NOTE | [kernel image PT_LOADs] | RAM PT_LOADs | [shdr for PN_XNUM] | notes | (room) | memory

Virtual addresses as ``/proc/vmcore`` has them when the guest's map is known (a
:class:`~vm2core.guest.kernelmap.KernelMap`): RAM at ``p_vaddr = page_offset_base + p_paddr``, and
the kernel image once more at its runtime address, as PT_LOADs whose file bytes are the RAM
segments' own (no data is written twice).  Without the map, ``p_vaddr = p_paddr`` (as QEMU).  The
room before memory always allows for the image PT_LOADs, so a header planned before the map was
known can be rewritten in place once it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

from vm2core.core import elf
from vm2core.guest.kernelmap import KernelMap
from vm2core.guest.vmcoreinfo import DESC_OFFSET, MAX_DESC_SIZE
from vm2core.reader.cpu import VpState
from vm2core.reader.memory import PAGE_SIZE

# Largest VMCOREINFO note the kernel can build: 12-byte header, "VMCOREINFO\0" padded to 12,
# desc <= VMCOREINFO_BYTES (= PAGE_SIZE on x86_64)  (linux: include/linux/vmcore_info.h).
VMCOREINFO_NOTE_MAX = DESC_OFFSET + MAX_DESC_SIZE
# PT_LOADs for the kernel image: one per RAM segment it overlaps (several only when --exclude-zero split
# the RAM inside the image: at most one per MiB of image); their header room (7 KiB) is always reserved.
MAX_IMAGE_SEGMENTS = 128


@dataclass(frozen=True)
class Segment:
    """One PT_LOAD: guest-physical ``[paddr, paddr + memsz)``, file bytes ``[offset, offset + filesz)``."""

    paddr: int
    memsz: int
    filesz: int
    offset: int


@dataclass(frozen=True)
class ImageSegment:
    """A PT_LOAD of the kernel image at its runtime address; its bytes are a RAM segment's."""

    vaddr: int
    paddr: int
    memsz: int
    filesz: int
    offset: int


@dataclass(frozen=True)
class CoreLayout:
    segments: tuple[Segment, ...]
    cpu_notes: bytes
    vmcoreinfo_note: bytes | None
    notes_offset: int
    notes_room: int          # bytes between notes_offset and data_offset available to notes
    data_offset: int
    total_size: int
    page_offset_base: int | None = None                 # RAM p_vaddr = this + p_paddr (else p_paddr)
    image_segments: tuple[ImageSegment, ...] = ()

    @property
    def phnum(self) -> int:
        return 1 + len(self.image_segments) + len(self.segments)

    @property
    def uses_xnum(self) -> bool:
        return self.phnum >= elf.PN_XNUM_THRESHOLD

    @property
    def notes(self) -> bytes:
        return self.cpu_notes + (self.vmcoreinfo_note or b"")

    def header(self, vmcoreinfo_note: bytes | None = None) -> bytes:
        """Ehdr, phdrs, (shdr) and notes: every byte before ``data_offset``.

        ``vmcoreinfo_note`` overrides the planned note (used when patching a reserved area).
        """
        note = self.vmcoreinfo_note if vmcoreinfo_note is None else vmcoreinfo_note
        notes = self.cpu_notes + (note or b"")
        if len(notes) > self.notes_room:
            raise ValueError("notes do not fit the room planned for them")
        phoff_end = elf.E_PHOFF + self.phnum * elf.PHDR.size
        if self.uses_xnum:
            out = bytearray(elf.ehdr(elf.PN_XNUM, shoff=phoff_end, shnum=1))
        else:
            out = bytearray(elf.ehdr(self.phnum))
        out += elf.phdr(elf.PT_NOTE, self.notes_offset, 0, 0, len(notes), len(notes))
        for i in self.image_segments:
            out += elf.phdr(elf.PT_LOAD, i.offset if i.filesz else 0, i.vaddr, i.paddr, i.filesz, i.memsz,
                            flags=elf.PF_R | elf.PF_W | elf.PF_X)
        base = self.page_offset_base
        for s in self.segments:
            vaddr = s.paddr if base is None else base + s.paddr
            out += elf.phdr(elf.PT_LOAD, s.offset if s.filesz else 0, vaddr, s.paddr, s.filesz, s.memsz,
                            flags=elf.PF_R | elf.PF_W | elf.PF_X)
        if self.uses_xnum:
            out += elf.xnum_shdr(self.phnum)
        assert len(out) == self.notes_offset
        out += notes
        out += bytes(self.data_offset - len(out))
        return bytes(out)


@dataclass(frozen=True)
class LoadRange:
    """Input to the planner: a run of guest-physical memory and how much of it goes in the file."""

    paddr: int
    memsz: int
    filesz: int


def plan_core(loads: list[LoadRange], vps: list[VpState], *, vmcoreinfo_note: bytes | None,
              reserve_vmcoreinfo: bool, kernel_map: KernelMap | None = None) -> CoreLayout:
    """Lay out the core.

    ``reserve_vmcoreinfo``: leave room for the largest possible VMCOREINFO note, so a seekable
    output can have it patched in after memory has been streamed (and scanned) once.
    ``kernel_map``: the guest's page_offset_base and image, for kdump-style ``p_vaddr``.
    """
    loads = sorted(loads, key=lambda r: r.paddr)
    for a, b in pairwise(loads):
        if b.paddr < a.paddr + a.memsz:
            raise ValueError(f"PT_LOAD ranges overlap at {b.paddr:#x}")
    for r in loads:
        if r.paddr % PAGE_SIZE or r.memsz % PAGE_SIZE or r.filesz % PAGE_SIZE or r.filesz > r.memsz:
            raise ValueError(f"PT_LOAD range at {r.paddr:#x} is not page aligned")
    cpu = elf.cpu_notes(vps)
    room = len(cpu) + (VMCOREINFO_NOTE_MAX if reserve_vmcoreinfo else len(vmcoreinfo_note or b""))
    # The data offset allows for every image PT_LOAD, so it does not move when the map becomes known.
    data_offset = _page_up(_notes_offset(1 + MAX_IMAGE_SEGMENTS + len(loads)) + room)
    segments = []
    offset = data_offset
    for r in loads:
        segments.append(Segment(r.paddr, r.memsz, r.filesz, offset))
        offset += r.filesz
    images = _image_segments(kernel_map, segments) if kernel_map is not None else ()
    notes_offset = _notes_offset(1 + len(images) + len(loads))
    return CoreLayout(tuple(segments), cpu, vmcoreinfo_note, notes_offset, data_offset - notes_offset,
                      data_offset, offset, kernel_map.page_offset_base if kernel_map else None, images)


def _notes_offset(phnum: int) -> int:
    offset = elf.E_PHOFF + phnum * elf.PHDR.size
    return offset + elf.SHDR.size if phnum >= elf.PN_XNUM_THRESHOLD else offset


def _image_segments(kernel_map: KernelMap, segments: list[Segment]) -> tuple[ImageSegment, ...]:
    """The image's physical range cut along the RAM segments that hold it (at most MAX_IMAGE_SEGMENTS)."""
    start, end = kernel_map.image_pa, kernel_map.image_pa + kernel_map.image_size
    pieces = []
    for s in segments:
        lo, hi = max(start, s.paddr), min(end, s.paddr + s.memsz)
        if lo >= hi:
            continue
        stored = max(0, min(hi - lo, s.filesz - (lo - s.paddr)))
        pieces.append(ImageSegment(kernel_map.image_va + lo - start, lo, hi - lo, stored,
                                   s.offset + lo - s.paddr if stored else 0))
    return tuple(pieces[:MAX_IMAGE_SEGMENTS])


def _page_up(n: int) -> int:
    return (n + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
