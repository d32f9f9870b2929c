"""Find the running kernel's VMCOREINFO note in guest RAM and decide whether to trust it.

crash and drgn need the guest's VMCOREINFO note (release, KASLR offset, phys_base, ...).  A
snapshot has no device handing it over, so we search RAM for the note's byte signature while the
memory streams past, then pick the one candidate that matches the live kernel: stale notes from a
previous boot (kexec, warm reboot) and panic-time copies look identical but would mislead the
debugger.  Facts and the selection rule: ``docs/elf-vmcore.md`` sections 2.5, 3 and 5.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from mmap import mmap

from ..core.elf import NHDR as NOTE_HEADER
from ..core.elf import pad4
from ..reader.cpu import VpState
from ..reader.memory import PAGE_SIZE, NotInMemory, PhysicalMemory
from ._memmem import find
from .paging import AddressSpace, TranslationError

# --- The note as the kernel builds it (linux kernel/vmcore_info.c: update_vmcoreinfo_note) ------------------
# NOTE_HEADER (n_namesz, n_descsz, n_type: u32 also in ELF64 notes) and pad4 come from core/elf.py.
NOTE_NAME = b"VMCOREINFO\0"                # n_namesz = 11 ...
NAME_FIELD = b"VMCOREINFO\0\0"             # ... padded to 4 bytes
# What the scan looks for first: CPython's find is several times slower over zero-filled memory
# (most of a guest) when the needle ends in NUL bytes; the padding is checked afterwards.
SEARCH_KEY = NAME_FIELD.rstrip(b"\0")
NOTE_TYPE = 0
DESC_OFFSET = NOTE_HEADER.size + len(NAME_FIELD)   # 24
DESC_PREFIX = b"OSRELEASE="                # first line written by crash_save_vmcoreinfo_init
MIN_DESC_SIZE = len(DESC_PREFIX)
MAX_DESC_SIZE = 4096                       # VMCOREINFO_BYTES = PAGE_SIZE on x86-64
NOTE_ALIGNMENT = 4                         # notes are u32 arrays; the live one is even page aligned
SIGNATURE_LENGTH = DESC_OFFSET + len(DESC_PREFIX)  # bytes needed to recognise a note (34)
MAX_CANDIDATES = 1024                      # bound on memory kept for hostile RAM full of signatures

# --- x86-64 kernel facts --------------------------------------------------------------------------------
KERNEL_MAP_BASE = 0xFFFF_FFFF_8000_0000    # __START_KERNEL_map (arch/x86/include/asm/page_64_types.h)
UTS_FIELD_LENGTH = 65                      # __NEW_UTS_LEN + 1 (include/uapi/linux/utsname.h)
UTS_RELEASE_INDEX = 2                      # new_utsname: sysname, nodename, release, version, ...
# uts_namespace.name offset when the note does not say: 0 since the kref left the struct, 4 before.
UTS_NAME_OFFSET_GUESSES = (0, 4)

# Keys the selection rule needs (elf-vmcore.md section 5); KERNELOFFSET, NUMBER(phys_base),
# SYMBOL(_stext) may be missing on old kernels and are handled as degradations.
REQUIRED_KEYS = ("OSRELEASE", "PAGESIZE", "SYMBOL(swapper_pg_dir)")

# What the scanner can search in place: bytes, a reused bytearray, or an mmap window of the input.
Searchable = bytes | bytearray | mmap

_HEX = re.compile(r"[0-9a-fA-F]{1,16}")
_SIGNED_DECIMAL = re.compile(r"-?[0-9]{1,20}")
_DECIMAL = re.compile(r"[0-9]{1,20}")


# ---------------------------------------------------------------------------------------------------------
# Streaming scanner
# ---------------------------------------------------------------------------------------------------------

@dataclass
class NoteCandidate:
    """A VMCOREINFO note header found in RAM.

    ``data`` holds the bytes from ``gpa`` on (header, name, desc without padding); it is shorter
    than :attr:`size` while the scanner has not yet seen the rest, or when RAM ended first.
    """

    gpa: int
    descsz: int
    data: bytes

    @property
    def size(self) -> int:
        return DESC_OFFSET + self.descsz

    @property
    def complete(self) -> bool:
        return len(self.data) >= self.size


def _looks_like_note(buf: Searchable, start: int, gpa: int) -> int | None:
    """descsz when ``buf[start:]`` (at guest address ``gpa``) begins a plausible VMCOREINFO note."""
    if gpa % NOTE_ALIGNMENT:
        return None
    namesz, descsz, ntype = NOTE_HEADER.unpack_from(buf, start)
    if namesz != len(NOTE_NAME) or ntype != NOTE_TYPE or not MIN_DESC_SIZE <= descsz <= MAX_DESC_SIZE:
        return None
    prefix_at = start + DESC_OFFSET
    if buf[prefix_at:prefix_at + len(DESC_PREFIX)] != DESC_PREFIX:
        return None
    return int(descsz)


class VmcoreinfoScanner:
    """Collect VMCOREINFO note candidates from RAM streamed in GPA order.

    Call :meth:`feed` with consecutive chunks; a chunk whose GPA follows the previous one
    continues it (a note may straddle the boundary), any other GPA starts a new RAM range.
    """

    _CARRY = SIGNATURE_LENGTH - 1   # bytes of the previous chunk that can start a straddling signature

    def __init__(self, max_candidates: int = MAX_CANDIDATES) -> None:
        self.candidates: list[NoteCandidate] = []
        self.bytes_scanned = 0
        self.dropped = 0                       # candidates beyond max_candidates (never examined)
        self._max_candidates = max_candidates
        self._unaligned_kept = 0
        self._carry = b""
        self._next_gpa: int | None = None
        self._pending: list[NoteCandidate] = []  # candidates whose bytes continue in the next chunk
        self._aligned_ready: list[NoteCandidate] = []  # page-aligned candidates completed since last taken

    def take_aligned_ready(self) -> list[NoteCandidate]:
        """Page-aligned candidates whose bytes became complete since the last call (for early stopping)."""
        ready, self._aligned_ready = self._aligned_ready, []
        return ready

    def pending_below(self, gpa: int) -> bool:
        """Whether a candidate below ``gpa`` still waits for its bytes (it could still outrank one at ``gpa``)."""
        return any(c.gpa < gpa for c in self._pending)

    def feed(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        buf = data if isinstance(data, (bytes, bytearray)) else bytes(data)
        self.feed_window(gpa, buf, 0, len(buf))

    def feed_window(self, gpa: int, buf: Searchable, start: int, end: int) -> None:
        """Feed ``buf[start:end]`` (at guest address ``gpa``) without copying it.

        ``buf`` is anything with ``find`` and slicing: bytes, bytearray or an ``mmap`` of the input.
        """
        if gpa == self._next_gpa:
            self._extend_pending(buf, start, end)
            if self._carry:
                self._scan_boundary(gpa, buf, start, end)
        else:
            self._pending.clear()
            self._carry = b""
        self._scan_chunk(gpa, buf, start, end)
        self.bytes_scanned += end - start
        self._next_gpa = gpa + end - start
        self._carry = (self._carry + bytes(buf[max(start, end - self._CARRY):end]))[-self._CARRY:]

    def _extend_pending(self, buf: Searchable, start: int, end: int) -> None:
        still_pending = []
        for candidate in self._pending:
            need = candidate.size - len(candidate.data)
            candidate.data += bytes(buf[start:min(end, start + need)])
            if not candidate.complete:
                still_pending.append(candidate)
            elif candidate.gpa % PAGE_SIZE == 0:
                self._aligned_ready.append(candidate)
        self._pending = still_pending

    def _scan_boundary(self, gpa: int, buf: Searchable, start: int, end: int) -> None:
        """Signatures that start in the carried tail of the previous chunk."""
        carry = self._carry
        window = carry + bytes(buf[start:min(end, start + self._CARRY)])
        base = gpa - len(carry)
        pos = window.find(NAME_FIELD)
        while pos != -1:
            sig = pos - NOTE_HEADER.size
            if sig >= len(carry):
                break
            if sig >= 0 and sig + SIGNATURE_LENGTH <= len(window):
                descsz = _looks_like_note(window, sig, base + sig)
                if descsz is not None:
                    head = carry[sig:]
                    rest = DESC_OFFSET + descsz - len(head)
                    self._add(base + sig, descsz, head + bytes(buf[start:min(end, start + rest)]))
            pos = window.find(NAME_FIELD, pos + 1)

    def _scan_chunk(self, gpa: int, buf: Searchable, start: int, end: int) -> None:
        """Signatures wholly inside ``buf[start:end]``."""
        pos = find(buf, SEARCH_KEY, start + NOTE_HEADER.size, end)
        last_start = end - SIGNATURE_LENGTH
        while pos != -1:
            sig = pos - NOTE_HEADER.size
            if sig > last_start:
                break                                  # completed by the next chunk's boundary scan
            if buf[pos:pos + len(NAME_FIELD)] == NAME_FIELD:
                descsz = _looks_like_note(buf, sig, gpa + sig - start)
                if descsz is not None:
                    self._add(gpa + sig - start, descsz, bytes(buf[sig:min(end, sig + DESC_OFFSET + descsz)]))
            pos = find(buf, SEARCH_KEY, pos + 1, end)

    def _add(self, gpa: int, descsz: int, data: bytes) -> None:
        aligned = gpa % PAGE_SIZE == 0
        if len(self.candidates) >= self._max_candidates:
            # Past the cap, page-aligned candidates (the kernel allocates its note with
            # alloc_pages_exact) push out unaligned ones, so look-alikes cannot hide the live note.
            self.dropped += 1
            if not aligned or not self._unaligned_kept:
                return
            self._evict_unaligned()
        candidate = NoteCandidate(gpa, descsz, data)
        self.candidates.append(candidate)
        if not aligned:
            self._unaligned_kept += 1
        if not candidate.complete:
            self._pending.append(candidate)
        elif aligned:
            self._aligned_ready.append(candidate)

    def _evict_unaligned(self) -> None:
        """Drop the most recently found unaligned candidate (at most max_candidates evictions in all)."""
        for i in range(len(self.candidates) - 1, -1, -1):
            victim = self.candidates[i]
            if victim.gpa % PAGE_SIZE:
                del self.candidates[i]
                self._unaligned_kept -= 1
                if victim in self._pending:
                    self._pending.remove(victim)
                return


def scan(chunks: Iterable[tuple[int, bytes | bytearray | memoryview]]) -> VmcoreinfoScanner:
    """Run a scanner over ``(gpa, data)`` chunks (a convenience for tests and tools)."""
    scanner = VmcoreinfoScanner()
    for gpa, data in chunks:
        scanner.feed(gpa, data)
    return scanner


# ---------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------

def parse_vmcoreinfo(text: bytes) -> dict[str, str]:
    """``KEY=VALUE`` lines of a VMCOREINFO desc; like drgn, only ``\\n``-terminated lines count."""
    info: dict[str, str] = {}
    end = text.rfind(b"\n")
    if end < 0:
        return info
    for line in text[:end].split(b"\n"):
        key, sep, value = line.partition(b"=")
        if sep and key:
            info[key.decode("ascii", "replace")] = value.decode("ascii", "replace")
    return info


class BadValue(ValueError):
    """A VMCOREINFO value that does not have its key's printf format."""


def _parse(info: Mapping[str, str], key: str, pattern: re.Pattern[str], base: int) -> int | None:
    value = info.get(key)
    if value is None:
        return None
    if not pattern.fullmatch(value):
        raise BadValue(f"malformed {key}={value[:40]!r}")
    return int(value, base)


def hex_value(info: Mapping[str, str], key: str) -> int | None:
    """SYMBOL()/KERNELOFFSET: ``%lx``, hex without 0x."""
    return _parse(info, key, _HEX, 16)


def signed_value(info: Mapping[str, str], key: str) -> int | None:
    """NUMBER(): ``%ld``, signed decimal (phys_base may be negative)."""
    return _parse(info, key, _SIGNED_DECIMAL, 10)


def _unsigned(info: Mapping[str, str], key: str) -> int | None:
    """PAGESIZE/OFFSET()/SIZE()/LENGTH(): unsigned decimal."""
    return _parse(info, key, _DECIMAL, 10)


# ---------------------------------------------------------------------------------------------------------
# Selection and validation
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GuestKernel:
    """The running kernel as described by its validated VMCOREINFO note."""

    osrelease: str
    kernel_offset: int | None      # KERNELOFFSET; None when the note lacks it (pre-KASLR kernel)
    phys_base: int | None          # NUMBER(phys_base), else derived from the page tables, else None
    pagesize: int
    note_gpa: int
    note: bytes                    # the complete ELF note, ready for a PT_NOTE (4-byte padded)
    vmcoreinfo: dict[str, str] = field(default_factory=dict, hash=False)   # every KEY=VALUE line
    caveats: tuple[str, ...] = ()  # what could not be checked or had to be derived, and why
    copies: int = 1                # identical copies of the note found in RAM


@dataclass
class Selection:
    """The chosen kernel (if any) and why every other candidate was refused."""

    kernel: GuestKernel | None
    reasons: list[str] = field(default_factory=list)


class _Rejected(Exception):
    pass


@dataclass
class _Verdict:
    kernel: GuestKernel
    checks_passed: int


MAX_CHECKS = 2    # (a) the kernel image mapping, (b) init_uts_ns holds OSRELEASE: see _evaluate


class KernelSelector:
    """One selection rule for every output form (elf-vmcore.md section 5).

    Ranking: most checks passed, then page aligned, then lowest GPA.  Each distinct note is
    evaluated once and its verdict kept, so a pipe pre-scan can ask after every block whether it
    may stop (:meth:`unbeatable`) and still choose exactly as one selection over all candidates
    at the end would: it stops only at a page-aligned note that passed every check, which no
    note found later (higher GPA) can outrank.
    """

    def __init__(self, memory: PhysicalMemory, vps: Sequence[VpState]) -> None:
        self._memory = memory
        self._spaces = _address_spaces(memory, vps)
        self._verdicts: dict[bytes, _Verdict | str] = {}    # note bytes -> verdict or refusal reason
        self.evaluations = 0

    def _verdict(self, note: bytes) -> _Verdict | str:
        verdict = self._verdicts.get(note)
        if verdict is None:
            self.evaluations += 1
            try:
                verdict = _evaluate(0, note, 1, self._memory, self._spaces)
            except _Rejected as rejection:
                verdict = str(rejection)
            self._verdicts[note] = verdict
        return verdict

    def unbeatable(self, candidate: NoteCandidate) -> bool:
        """A complete, page-aligned candidate that passed every check: nothing above it can win."""
        if not candidate.complete or candidate.gpa % PAGE_SIZE:
            return False
        verdict = self._verdict(bytes(candidate.data[:candidate.size]))
        return isinstance(verdict, _Verdict) and verdict.checks_passed == MAX_CHECKS

    def select(self, candidates: Sequence[NoteCandidate], *, scanned_bytes: int | None = None,
               dropped: int = 0) -> Selection:
        """Pick the note of the live kernel among ``candidates``.

        A candidate is refused when it lacks required keys, contains CRASHTIME, or contradicts the
        snapshot: its ``SYMBOL(_stext)`` must translate through some vCPU's page tables to
        ``_stext - __START_KERNEL_map + phys_base``, and ``init_uts_ns`` must hold its OSRELEASE.
        ``scanned_bytes`` and ``dropped`` (from the scanner) enrich the reasons.
        """
        reasons: list[str] = []
        if dropped:
            reasons.append(f"{dropped} further VMCOREINFO-like notes were not examined "
                           f"(more than {len(candidates)} in guest RAM)")
        if not candidates:
            where = f"{scanned_bytes} bytes of " if scanned_bytes is not None else ""
            return Selection(None, [f"no VMCOREINFO note found in {where}guest RAM", *reasons])
        verdicts: list[_Verdict] = []
        for gpa, note, copies in _unique_notes(candidates, self._memory, reasons):
            verdict = self._verdict(note)
            if isinstance(verdict, _Verdict):
                kernel = replace(verdict.kernel, note_gpa=gpa, copies=copies)
                verdicts.append(_Verdict(kernel, verdict.checks_passed))
                continue
            label = f"VMCOREINFO note at {gpa:#x}"
            if copies > 1:
                label += f" (and {copies - 1} identical copies)"
            reasons.append(f"{label}: {verdict}")
        if not verdicts:
            return Selection(None, reasons)
        best = max(v.checks_passed for v in verdicts)
        winners = [v for v in verdicts if v.checks_passed == best]
        chosen = min(winners, key=lambda v: _placement_rank(v.kernel.note_gpa))
        for other in winners:
            if other is not chosen:
                reasons.append(f"VMCOREINFO note at {other.kernel.note_gpa:#x} also passed validation; "
                               f"kept the one at {chosen.kernel.note_gpa:#x}")
        for other in verdicts:
            if other.checks_passed < best:
                reasons.append(f"VMCOREINFO note at {other.kernel.note_gpa:#x}: passed fewer checks "
                               f"({other.checks_passed}) than the one at {chosen.kernel.note_gpa:#x} ({best})")
        return Selection(chosen.kernel, reasons)


def select_kernel(candidates: Sequence[NoteCandidate], memory: PhysicalMemory, vps: Sequence[VpState],
                  *, scanned_bytes: int | None = None, dropped: int = 0) -> Selection:
    """:meth:`KernelSelector.select` in one call."""
    return KernelSelector(memory, vps).select(candidates, scanned_bytes=scanned_bytes, dropped=dropped)


def _placement_rank(gpa: int) -> tuple[bool, int]:
    """Page-aligned first (the kernel's own note comes from alloc_pages_exact), then lowest GPA."""
    return (gpa % PAGE_SIZE != 0, gpa)


def _address_spaces(memory: PhysicalMemory, vps: Sequence[VpState]) -> list[tuple[int, AddressSpace]]:
    """One address space per distinct (table root, paging depth) among vCPUs with paging on."""
    seen: set[tuple[int, int]] = set()
    spaces = []
    for vp in vps:
        space = AddressSpace.of_vp(memory, vp)
        if space.root and (space.root, space.levels) not in seen:
            seen.add((space.root, space.levels))
            spaces.append((vp.index, space))
    return spaces


def _unique_notes(candidates: Sequence[NoteCandidate], memory: PhysicalMemory,
                  reasons: list[str]) -> list[tuple[int, bytes, int]]:
    """(representative gpa, complete note bytes, copy count) per distinct note, in GPA order."""
    by_bytes: dict[bytes, list[int]] = {}
    for candidate in sorted(candidates, key=lambda c: c.gpa):
        data = candidate.data[:candidate.size]
        if not candidate.complete:
            try:
                data = memory.read_physical(candidate.gpa, candidate.size)
            except NotInMemory:
                reasons.append(f"VMCOREINFO note at {candidate.gpa:#x}: its {candidate.descsz}-byte text "
                               "runs past the end of guest RAM")
                continue
        by_bytes.setdefault(bytes(data), []).append(candidate.gpa)
    # Report identical copies under the page-aligned one: that is where the kernel allocates its note.
    notes = [(min(gpas, key=_placement_rank), data, len(gpas))
             for data, gpas in by_bytes.items()]
    return sorted(notes)


def _evaluate(gpa: int, data: bytes, copies: int, memory: PhysicalMemory,
              spaces: list[tuple[int, AddressSpace]]) -> _Verdict:
    """Validate one note; raises :class:`_Rejected` with the reason."""
    descsz = NOTE_HEADER.unpack_from(data)[1]
    desc = data[DESC_OFFSET:DESC_OFFSET + descsz]
    info = parse_vmcoreinfo(desc)
    missing = [key for key in REQUIRED_KEYS if key not in info]
    if missing:
        raise _Rejected(f"missing {', '.join(missing)} (truncated or not a kernel note)")
    if "CRASHTIME" in info:
        raise _Rejected("contains CRASHTIME (rewritten by a panicking kernel; crash and drgn would "
                        "treat the snapshot as a kdump)")
    try:
        pagesize = _unsigned(info, "PAGESIZE") or 0
        stext = hex_value(info, "SYMBOL(_stext)")
        swapper = hex_value(info, "SYMBOL(swapper_pg_dir)")
        kernel_offset = hex_value(info, "KERNELOFFSET")
        phys_base = signed_value(info, "NUMBER(phys_base)")
        init_uts_ns = hex_value(info, "SYMBOL(init_uts_ns)")
        uts_name_offset = _unsigned(info, "OFFSET(uts_namespace.name)")
    except BadValue as bad:
        raise _Rejected(str(bad)) from None
    if pagesize <= 0 or pagesize & (pagesize - 1):
        raise _Rejected(f"PAGESIZE={info['PAGESIZE']} is not a power of two")
    osrelease = info["OSRELEASE"]
    caveats: list[str] = []
    if kernel_offset is None:
        caveats.append("no KERNELOFFSET in VMCOREINFO (kernel older than 3.14): assuming no KASLR")
    anchor_name, anchor = "SYMBOL(_stext)", stext
    if anchor is None:
        anchor_name, anchor = "SYMBOL(swapper_pg_dir)", swapper
        caveats.append("no SYMBOL(_stext) in VMCOREINFO: checked SYMBOL(swapper_pg_dir) instead")
    assert anchor is not None  # swapper_pg_dir is a required key
    checks = 0

    # (a) the kernel image is mapped where the note says.
    if not spaces:
        caveats.append("page tables not checked: no vCPU has paging enabled (CR3 = 0)")
    else:
        if phys_base is None:
            caveats.append("no NUMBER(phys_base) in VMCOREINFO (kernel older than 4.10): "
                           "derived from the page tables")
        phys_base = _check_image_mapping(anchor_name, anchor, phys_base, spaces)
        checks += 1

    # (b) the live kernel's utsname holds the note's release.
    if phys_base is None:
        caveats.append("OSRELEASE not checked: phys_base unknown")
    elif init_uts_ns is None:
        caveats.append("OSRELEASE not checked: no SYMBOL(init_uts_ns) in VMCOREINFO")
    else:
        offsets = (uts_name_offset,) if uts_name_offset is not None else UTS_NAME_OFFSET_GUESSES
        if uts_name_offset is None:
            caveats.append("no OFFSET(uts_namespace.name) in VMCOREINFO: tried offsets 0 and 4")
        _check_release(osrelease, init_uts_ns - KERNEL_MAP_BASE + phys_base, offsets, memory)
        checks += 1

    note = data[:DESC_OFFSET + descsz] + bytes(pad4(descsz) - descsz)
    kernel = GuestKernel(osrelease=osrelease, kernel_offset=kernel_offset, phys_base=phys_base,
                         pagesize=pagesize, note_gpa=gpa, note=note, vmcoreinfo=info,
                         caveats=tuple(caveats), copies=copies)
    return _Verdict(kernel, checks)


def _check_image_mapping(anchor_name: str, anchor: int, phys_base: int | None,
                         spaces: list[tuple[int, AddressSpace]]) -> int:
    """phys_base confirmed (or derived) by translating a kernel-image symbol; raises :class:`_Rejected`."""
    found: list[str] = []
    for vp_index, space in spaces:
        try:
            pa = space.translate(anchor)
        except TranslationError:
            continue
        derived = pa - (anchor - KERNEL_MAP_BASE)
        if phys_base is None or derived == phys_base:
            return derived
        found.append(f"vCPU {vp_index} maps it to {pa:#x}")
    if not found:
        raise _Rejected(f"{anchor_name}={anchor:x} is not mapped by any vCPU's page tables "
                        "(note from a previous kernel?)")
    assert phys_base is not None
    expected = anchor - KERNEL_MAP_BASE + phys_base
    raise _Rejected(f"{anchor_name}={anchor:x} should be at physical {expected:#x} "
                    f"but {'; '.join(found)} (note from a previous kernel?)")


def _check_release(osrelease: str, uts_ns_pa: int, name_offsets: Sequence[int],
                   memory: PhysicalMemory) -> None:
    """The release field of init_uts_ns equals OSRELEASE; raises :class:`_Rejected`."""
    seen = []
    for name_offset in name_offsets:
        field_pa = uts_ns_pa + name_offset + UTS_RELEASE_INDEX * UTS_FIELD_LENGTH
        try:
            raw = memory.read_physical(field_pa, UTS_FIELD_LENGTH)
        except NotInMemory:
            seen.append(f"{field_pa:#x} is outside guest RAM")
            continue
        release, nul, _ = raw.partition(b"\0")
        if nul and release.decode("ascii", "replace") == osrelease:
            return
        seen.append(f"{field_pa:#x} holds {release[:UTS_FIELD_LENGTH]!r}")
    raise _Rejected(f"OSRELEASE={osrelease!r} does not match init_uts_ns: {'; '.join(seen)}")
