"""Guest-physical memory model shared by every backend.

A backend describes RAM as ordered :class:`MemoryRange` objects and streams each range as
:data:`Piece` objects, so the writer never needs to know how a page was stored: zero runs
can become holes and raw spans can be copied from the input file without passing through
Python buffers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

PAGE_SIZE = 4096


@dataclass(frozen=True)
class MemoryRange:
    """One contiguous guest-physical RAM range (a ``RamMemoryBlock``)."""

    index: int
    gpa_start: int          # bytes, page aligned
    page_count: int
    mbp_index_start: int = 0  # first data page number in the RamBlock numbering
    numa_node: int = 0
    flags: int = 0

    @property
    def size(self) -> int:
        return self.page_count * PAGE_SIZE

    @property
    def gpa_end(self) -> int:
        return self.gpa_start + self.size


@dataclass(frozen=True)
class Zeros:
    """``length`` zero bytes (a pattern-0 fill record or a missing RamBlock)."""

    length: int


@dataclass(frozen=True)
class Data:
    """Decoded bytes held in memory."""

    data: bytes | memoryview

    @property
    def length(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class FileSpan:
    """``length`` bytes stored verbatim at ``offset`` of the input file."""

    offset: int
    length: int


Piece = Zeros | Data | FileSpan


class PhysicalMemory(Protocol):
    """Random access to guest-physical memory (used by the guest-kernel analysis)."""

    def read_physical(self, gpa: int, length: int) -> bytes:
        """``length`` bytes at ``gpa``; raises :class:`NotInMemory` if any byte is not guest RAM."""
        ...


class NotInMemory(LookupError):
    """A guest-physical address outside every RAM range."""

    def __init__(self, gpa: int) -> None:
        super().__init__(f"guest-physical address {gpa:#x} is not in any RAM range")
        self.gpa = gpa
