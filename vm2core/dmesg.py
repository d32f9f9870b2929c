"""`vm2core dmesg`: the guest kernel log from a saved state or from an ELF core, with no vmlinux.

A saved state is searched for the VMCOREINFO note only until a note validates that no later note
could beat (:func:`find_log_kernel`, the same rule as ``convert``), then only the ring and the page
tables that lead to it are read: no full pass over guest memory.  An ELF core carries the note in its PT_NOTE.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vm2core.core.convert import Progress, find_kernel
from vm2core.core.elfcore import ElfCore, is_elf
from vm2core.core.pipeline import worker_count
from vm2core.errors import FormatError, UnsupportedError
from vm2core.guest.kernelmem import CountingMemory, KernelMemory, MissingKey
from vm2core.guest.printk import KernelLog, LogError, read_log
from vm2core.guest.vmcoreinfo import GuestKernel, Selection
from vm2core.reader.backend import Backend, open_saved_state
from vm2core.reader.backend import SavedStateFace as SavedState  # any backend: native or DLL
from vm2core.reader.memory import PhysicalMemory


@dataclass
class LogSource:
    log: KernelLog
    osrelease: str
    search_bytes: int = 0          # guest memory read while searching for VMCOREINFO
    log_bytes: int = 0             # guest memory read for the page tables and the log
    notes: list[str] = field(default_factory=list)


def read_guest_log(memory: PhysicalMemory, info: dict[str, str], phys_base: int | None,
                   path: Path | str) -> tuple[KernelLog, int]:
    """The log and the bytes of guest memory read for it; errors are one-line :class:`FormatError`s."""
    counting = CountingMemory(memory)
    try:
        log = read_log(KernelMemory(counting, info, phys_base))
    except MissingKey as e:
        raise FormatError(f"cannot read the kernel log: {e}", path=path, structure="VMCOREINFO") from None
    except LogError as e:
        raise FormatError(str(e), path=path, structure="kernel log") from None
    return log, counting.bytes_read


def kernel_log_of(state: SavedState, kernel: GuestKernel) -> tuple[KernelLog, int]:
    return read_guest_log(state, kernel.vmcoreinfo, kernel.phys_base, state.path)


def read_kernel_log(inputs: Path | Sequence[Path], progress: Progress | None = None, *,
                    backend: Backend = "auto", dll: Path | None = None,
                    warn: Callable[[str], None] = lambda _msg: None) -> LogSource:
    """The kernel log of an ELF core, or of any saved state ``convert`` accepts (a .vmrs, a legacy pair)."""
    progress = progress or Progress()
    paths = [inputs] if isinstance(inputs, Path) else list(inputs)
    path = paths[0]
    if len(paths) == 1 and is_elf(path):
        with ElfCore(path) as core:
            info = core.vmcoreinfo()
            if info is None:
                raise FormatError("the core has no VMCOREINFO note: the kernel log cannot be found",
                                  path=path, structure="PT_NOTE")
            log, used = read_guest_log(core, info, None, path)
            return LogSource(log, info.get("OSRELEASE", "?"), 0, used)
    with open_saved_state(paths, backend=backend, dll=dll, warn=warn) as state:
        if state.architecture != "x86_64":
            raise UnsupportedError(f"{state.architecture} guests: the kernel log is read for x86_64 only",
                                   path=state.path, structure="partition_state")
        selection, scanned = find_log_kernel(state, progress)
        kernel = selection.kernel
        if kernel is None:
            raise FormatError("no valid VMCOREINFO note in guest memory, so the kernel log cannot be found ("
                              + "; ".join(selection.reasons) + ")", path=state.path, structure="guest memory")
        log, used = kernel_log_of(state, kernel)
        return LogSource(log, kernel.osrelease, scanned, used, list(kernel.caveats))


def find_log_kernel(state: SavedState, progress: Progress) -> tuple[Selection, int]:
    """The selection a full search would make, reading guest memory (in GPA order) only until it is
    certain (``find_kernel``'s early stop). Returns the selection and the bytes of guest memory searched."""
    search = find_kernel(state, progress, stop_early=True, workers=min(2, worker_count()))
    return search.selection, search.scanned_bytes


def log_report(state: SavedState, kernel: GuestKernel, lines: int) -> dict[str, object]:
    """For `info`: the log's format and size, its last ``lines`` lines, and a problem summary."""
    from vm2core.guest.oops import summary
    from vm2core.guest.printk import format_log

    try:
        log, _ = kernel_log_of(state, kernel)
    except FormatError as e:
        return {"error": e.message}
    text = format_log(log).decode("ascii", "replace").splitlines()
    return {"format": log.kind, "records": len(log.records), "summary": summary(log.records),
            "warnings": log.warnings, "last_lines": text[max(0, len(text) - lines):] if lines else []}
