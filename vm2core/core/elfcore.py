"""Reading an ELF core back (one vm2core wrote, or a /proc/vmcore copy): its VMCOREINFO note and its
memory by physical address, so ``vm2core dmesg x.core`` needs no saved state.

Only what the guest layer needs: the PT_NOTE's VMCOREINFO note and the PT_LOADs by ``p_paddr``
(bytes past ``p_filesz`` read as zeros, as crash and drgn read them).  Every size is checked against
the file before it is used.  Structures: :mod:`vm2core.core.elf`.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from vm2core.core import elf
from vm2core.errors import FormatError
from vm2core.guest.vmcoreinfo import parse_vmcoreinfo
from vm2core.reader.memory import NotInMemory

ELF_MAGIC = b"\x7fELF"
MAX_PHDRS = 1 << 20                # far above any core we write (one per RAM range or zero run)
MAX_NOTES_SIZE = 64 << 20


@dataclass(frozen=True)
class Load:
    paddr: int
    vaddr: int
    offset: int
    filesz: int
    memsz: int


def is_elf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == ELF_MAGIC
    except OSError:
        return False


class ElfCore:
    """An x86-64 ELF core opened for reading; a :class:`~vm2core.reader.memory.PhysicalMemory`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._file: BinaryIO = path.open("rb")
            self.file_size = os.fstat(self._file.fileno()).st_size
        except OSError as e:
            raise FormatError(f"cannot open: {e.strerror or e}", path=path) from None
        try:
            self._parse()
        except BaseException:
            self._file.close()
            raise

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ElfCore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _error(self, message: str, structure: str, offset: int | None = None) -> FormatError:
        return FormatError(message, path=self.path, structure=structure, offset=offset)

    def _read(self, offset: int, length: int, structure: str) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.file_size:
            raise self._error(f"{length} bytes at {offset:#x} lie past the end of the file", structure, offset)
        self._file.seek(offset)
        data = self._file.read(length)
        if len(data) != length:
            raise self._error("file ended early", structure, offset)
        return data

    def _parse(self) -> None:
        header = self._read(0, elf.EHDR.size, "ELF header")
        ident, e_type, machine, _, _, phoff, shoff, _, _, phentsize, phnum, _, shnum, _ = elf.EHDR.unpack(header)
        if ident[:4] != ELF_MAGIC or ident[4] != 2 or ident[5] != 1:
            raise self._error("not a little-endian ELF64 file", "ELF header", 0)
        if e_type != elf.ET_CORE or machine != elf.EM_X86_64:
            raise self._error(f"not an x86-64 core (e_type {e_type}, e_machine {machine})", "ELF header", 0)
        if phentsize != elf.PHDR.size:
            raise self._error(f"e_phentsize {phentsize} (expected {elf.PHDR.size})", "ELF header", 0)
        if phnum == elf.PN_XNUM and shnum:
            phnum = elf.SHDR.unpack(self._read(shoff, elf.SHDR.size, "section header 0"))[7]
        if not 0 < phnum <= MAX_PHDRS:
            raise self._error(f"{phnum} program headers", "ELF header", 0)
        table = self._read(phoff, phnum * elf.PHDR.size, "program headers")
        self.loads: list[Load] = []
        self.notes = b""
        for i in range(phnum):
            p_type, _, offset, vaddr, paddr, filesz, memsz, _ = elf.PHDR.unpack_from(table, i * elf.PHDR.size)
            at = phoff + i * elf.PHDR.size
            if p_type == elf.PT_NOTE:
                if filesz > MAX_NOTES_SIZE:
                    raise self._error(f"PT_NOTE of {filesz} bytes", "program headers", at)
                self.notes += self._read(offset, filesz, "PT_NOTE")
            elif p_type == elf.PT_LOAD:
                if filesz > memsz or (filesz and offset + filesz > self.file_size):
                    raise self._error("PT_LOAD data lies past the end of the file (truncated core?)",
                                      "program headers", at)
                self.loads.append(Load(paddr, vaddr, offset, filesz, memsz))
        # Physical lookups: sorted, overlaps dropped (a kdump-style image PT_LOAD aliases RAM bytes).
        self._by_paddr: list[Load] = []
        for load in sorted(self.loads, key=lambda ld: (ld.paddr, -ld.memsz)):
            if load.memsz and (not self._by_paddr or load.paddr >= self._by_paddr[-1].paddr + self._by_paddr[-1].memsz):
                self._by_paddr.append(load)
        self._starts = [ld.paddr for ld in self._by_paddr]

    def vmcoreinfo_note(self) -> bytes | None:
        """The VMCOREINFO note's desc (KEY=VALUE text), or None."""
        pos = 0
        while pos + elf.NHDR.size <= len(self.notes):
            namesz, descsz, _ = elf.NHDR.unpack_from(self.notes, pos)
            name_at = pos + elf.NHDR.size
            desc_at = name_at + elf.pad4(namesz)
            end = desc_at + elf.pad4(descsz)
            if end > len(self.notes):
                break
            if self.notes[name_at:name_at + namesz].rstrip(b"\0") == elf.VMCOREINFO_NAME:
                return self.notes[desc_at:desc_at + descsz]
            pos = end
        return None

    def vmcoreinfo(self) -> dict[str, str] | None:
        desc = self.vmcoreinfo_note()
        return None if desc is None else parse_vmcoreinfo(desc)

    def _load_at(self, gpa: int) -> Load | None:
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0 and gpa < self._by_paddr[i].paddr + self._by_paddr[i].memsz:
            return self._by_paddr[i]
        return None

    def read_physical(self, gpa: int, length: int) -> bytes:
        """Bytes at ``gpa`` by ``p_paddr``; raises :class:`NotInMemory` outside every PT_LOAD."""
        out = bytearray()
        while length > 0:
            load = self._load_at(gpa)
            if load is None:
                raise NotInMemory(gpa)
            inside = gpa - load.paddr
            count = min(length, load.memsz - inside)
            stored = max(0, min(count, load.filesz - inside))
            if stored:
                out += self._read(load.offset + inside, stored, "PT_LOAD data")
            out += bytes(count - stored)
            gpa, length = gpa + count, length - count
        return bytes(out)
