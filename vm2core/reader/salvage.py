"""Salvage: what a damaged saved state could not give, kept as data (a loss list), never as log lines.

With ``--salvage`` the reader does not stop at the first unreadable RamBlock or register set. It
records each one here; the pipeline writes zeros where the block would be (so every byte that *was*
readable keeps its place and value), and the CLI prints the list and writes it as JSON. Without
``--salvage`` nothing here is used: every error is raised as before.

Losses are kept per RamBlock number (the unit that decodes or fails); a block may be decoded more
than once (the pipe path's pre-scan, random access during the VMCOREINFO check), so recording is
idempotent, and thread-safe because blocks decode on a thread pool. Guest-physical ranges are
derived at the end from the memory ranges, because one block can feed two ranges.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from vm2core.reader.memory import PAGE_SIZE, MemoryRange

# Exit code of a core written with losses (README "Exit codes").
EXIT_WITH_LOSSES = 4
REPORT_VERSION = 1


@dataclass(frozen=True)
class LostRange:
    """Guest-physical bytes ``[gpa_start, gpa_end)`` written as zeros because their RamBlock failed."""

    gpa_start: int
    gpa_end: int
    ram_block: int
    reason: str


@dataclass(frozen=True)
class LostVp:
    """A virtual processor whose VTL0 register set could not be read (its CPU notes are omitted)."""

    index: int
    reason: str


class LossList:
    """Thread-safe record of what could not be read (filled by the reader while converting)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._blocks: dict[int, str] = {}
        self._warnings: list[str] = []

    def lose_block(self, number: int, reason: str) -> None:
        """RamBlock ``number`` is unreadable; the first reason given is kept."""
        with self._lock:
            self._blocks.setdefault(number, reason)

    def warn(self, message: str) -> None:
        """Damage that by itself cost no guest byte (a bad header copy, a checksum mismatch...)."""
        with self._lock:
            if message not in self._warnings:
                self._warnings.append(message)

    @property
    def blocks(self) -> dict[int, str]:
        with self._lock:
            return dict(self._blocks)

    @property
    def warnings(self) -> list[str]:
        with self._lock:
            return list(self._warnings)


def lost_ranges(blocks: dict[int, str], ranges: Iterable[MemoryRange], block_size: int) -> list[LostRange]:
    """The guest-physical bytes each lost block stands for, in GPA order.

    A range's data pages start at ``mbp_index_start`` in the RamBlock numbering (vmrs-format.md §2),
    so block ``n`` holds data bytes ``[n * block_size, (n + 1) * block_size)`` of every range that
    reaches them.
    """
    out: list[LostRange] = []
    for r in ranges:
        data_lo = r.mbp_index_start * PAGE_SIZE
        data_hi = data_lo + r.size
        first, last = data_lo // block_size, (data_hi - 1) // block_size
        for number in sorted(n for n in blocks if first <= n <= last):
            lo = max(data_lo, number * block_size)
            hi = min(data_hi, (number + 1) * block_size)
            out.append(LostRange(r.gpa_start + lo - data_lo, r.gpa_start + hi - data_lo, number, blocks[number]))
    out.sort(key=lambda x: x.gpa_start)
    return out


@dataclass
class SalvageReport:
    """What a salvaged core lacks: the same facts for stderr and for ``--salvage-report FILE``."""

    file: str
    ranges: list[LostRange]
    vps: list[LostVp]
    warnings: list[str]

    @property
    def lost_bytes(self) -> int:
        return sum(r.gpa_end - r.gpa_start for r in self.ranges)

    @property
    def complete(self) -> bool:
        """True when nothing is missing from the core (warnings alone cost no data)."""
        return not self.ranges and not self.vps

    def as_json(self) -> dict[str, Any]:
        return {
            "version": REPORT_VERSION,
            "file": self.file,
            "complete": self.complete,
            "lost_bytes": self.lost_bytes,
            "lost_ranges": [{"gpa_start": r.gpa_start, "gpa_end": r.gpa_end, "bytes": r.gpa_end - r.gpa_start,
                             "ram_block": r.ram_block, "reason": r.reason} for r in self.ranges],
            "lost_vps": [{"index": v.index, "reason": v.reason} for v in self.vps],
            "warnings": list(self.warnings),
        }

    def lines(self) -> list[str]:
        """One line per loss and per warning, for stderr."""
        out = [f"lost GPA {r.gpa_start:#014x}-{r.gpa_end:#014x} ({(r.gpa_end - r.gpa_start) // PAGE_SIZE} pages "
               f"unreadable, zeros in the core): {r.reason}" for r in self.ranges]
        out += [f"lost registers of vCPU {v.index} (its CPU notes are omitted): {v.reason}" for v in self.vps]
        out += [f"damage: {w}" for w in self.warnings]
        return out
