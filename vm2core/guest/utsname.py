"""The guest's ``struct new_utsname`` (``init_uts_ns.name``), for the kdump header.

libkdumpfile (so drgn) trusts a kdump header's utsname only when all of it looks sane: sysname
"Linux", release, version and machine non-empty, every field NUL-terminated; it takes the
architecture from ``machine`` alone (``kdump-compressed.md`` §2, §8.4).  So the whole structure is
copied from the running kernel, at the place the validated VMCOREINFO note names, and accepted
only if its release is the note's OSRELEASE (reading 4 bytes off was makedumpfile's old bug).
"""

from __future__ import annotations

from vm2core.guest.kernelmem import MissingKey, number, symbol
from vm2core.guest.vmcoreinfo import (
    KERNEL_MAP_BASE,
    UTS_FIELD_LENGTH,
    UTS_NAME_OFFSET_GUESSES,
    UTS_RELEASE_INDEX,
    GuestKernel,
)
from vm2core.reader.memory import NotInMemory, PhysicalMemory

UTS_FIELDS = 6            # sysname, nodename, release, version, machine, domainname (linux: utsname.h)
UTSNAME_SIZE = UTS_FIELDS * UTS_FIELD_LENGTH


def _field(value: str) -> bytes:
    return value.encode("ascii", "replace")[:UTS_FIELD_LENGTH - 1].ljust(UTS_FIELD_LENGTH, b"\0")


def fallback_utsname(osrelease: str | None) -> bytes:
    """What is known without the guest's structure: still enough for libkdumpfile's check
    (§8.4: version must be non-empty; machine gives the architecture)."""
    return b"".join(_field(v) for v in ("Linux", "", osrelease or "unknown", "unknown", "x86_64", "(none)"))


def _sane(raw: bytes, osrelease: str) -> bool:
    fields = [raw[i * UTS_FIELD_LENGTH:(i + 1) * UTS_FIELD_LENGTH] for i in range(UTS_FIELDS)]
    if any(b"\0" not in f for f in fields):
        return False
    text = [f.partition(b"\0")[0] for f in fields]
    return (text[0] == b"Linux" and text[UTS_RELEASE_INDEX].decode("ascii", "replace") == osrelease
            and bool(text[3]) and bool(text[4]))


def guest_utsname(kernel: GuestKernel | None, memory: PhysicalMemory) -> tuple[bytes, bool]:
    """(390 bytes of ``new_utsname``, True if read from the guest) — else the fallback."""
    if kernel is None:
        return fallback_utsname(None), False
    info = kernel.vmcoreinfo
    try:
        uts_ns = symbol(info, "init_uts_ns")
        offsets: tuple[int, ...] = ((number(info, "OFFSET(uts_namespace.name)"),)
                                    if "OFFSET(uts_namespace.name)" in info else UTS_NAME_OFFSET_GUESSES)
    except MissingKey:
        return fallback_utsname(kernel.osrelease), False
    if kernel.phys_base is None:
        return fallback_utsname(kernel.osrelease), False
    base = uts_ns - KERNEL_MAP_BASE + kernel.phys_base
    for offset in offsets:
        try:
            raw = memory.read_physical(base + offset, UTSNAME_SIZE)
        except NotInMemory:
            continue
        if _sane(raw, kernel.osrelease):
            # Bytes after each field's NUL are whatever the kernel left there: keep them zero.
            return b"".join(raw[i * UTS_FIELD_LENGTH:(i + 1) * UTS_FIELD_LENGTH].partition(b"\0")[0]
                            .ljust(UTS_FIELD_LENGTH, b"\0") for i in range(UTS_FIELDS)), True
    return fallback_utsname(kernel.osrelease), False
