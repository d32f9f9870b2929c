"""`vm2core info`: what a saved state holds, as one plain dict (rendered as text or JSON by the CLI)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vm2core.core.convert import Progress, find_kernel
from vm2core.core.zeros import block_zero_runs
from vm2core.reader.backend import SavedStateFace
from vm2core.reader.memory import PAGE_SIZE
from vm2core.reader.ramblock import BlockError
from vm2core.reader.savedstate import RAM_BLOCK_KEY, SavedState


def memory_statistics(state: SavedState, progress: Progress, *, zero_pages: bool = True) -> dict[str, Any]:
    """Stored bytes, block encodings and pages known to be zero (fill records, missing blocks).

    Stored bytes and encodings come from the key table alone; counting zero pages reads every
    record-encoded block's headers (the whole block from disk), so ``zero_pages=False`` skips it
    and reports the zero statistics as None.
    """
    stored = 0
    encodings = {"raw": 0, "records": 0, "missing": 0}
    zero = 0
    if not zero_pages:
        for r in state.ranges:
            for info, _start, _length in state.blocks_of(r):
                encodings[info.encoding] += info.count
                stored += info.stored_size
        return {"stored_bytes": stored, "blocks": encodings, "zero_bytes": None, "zero_share": None,
                "zero_pages": None}
    progress.start("reading RAM block headers", state.total_ram)
    try:
        for r in state.ranges:
            for info, start, length in state.blocks_of(r):
                encodings[info.encoding] += info.count
                stored += info.stored_size
                if info.entry is None:
                    zero += length
                elif info.encoding == "records":
                    # Record headers only: pattern-0 fills are zero pages, nothing is decompressed.
                    try:
                        runs = block_zero_runs(state.read_block_bytes(info),
                                               name=RAM_BLOCK_KEY.format(info.number),
                                               file_offset=info.entry.data_offset, path=state.path)
                    except BlockError as e:
                        if not state.salvage:
                            raise
                        state.lose_block(info.number, e)
                        runs = []
                    zero += sum(max(0, min(s + n, start + length) - max(s, start)) for s, n in runs)
                progress.advance(length)
    finally:
        progress.finish()
    total = state.total_ram
    return {"stored_bytes": stored, "blocks": encodings, "zero_bytes": zero,
            "zero_share": zero / total if total else 0.0, "zero_pages": zero // PAGE_SIZE}


def describe(state: SavedStateFace, progress: Progress | None = None, *, scan: bool = True,
             log_lines: int = 10) -> dict[str, Any]:
    progress = progress or Progress()
    report = _describe_native(state, progress, scan) if isinstance(state, SavedState) else _describe_other(state)
    if scan:
        _describe_kernel(state, progress, report, log_lines)
    return report


def _describe_other(state: SavedStateFace) -> dict[str, Any]:
    """A saved state read through Microsoft's DLL: what the DLL reports, nothing about storage."""
    inputs: list[Path] = getattr(state, "inputs", [state.path])
    return {
        "file": str(state.path),
        "files": [{"path": str(p), "size": p.stat().st_size} for p in inputs],
        "dll": str(getattr(state, "dll_path", "")),
        "architecture": state.architecture,
        "vp_count": len(state.vps),
        "vps": _vps(state),
        "memory_ranges": _ranges(state),
        "total_ram": state.total_ram,
    }


def _vps(state: SavedStateFace) -> list[dict[str, Any]]:
    return [{"index": vp.index, "vtl": vp.vtl, "rip": vp.reg("rip"), "rsp": vp.reg("rsp"),
             "cr3": vp.reg("cr3"), "cr4": vp.reg("cr4"), "idtr_base": vp.idtr.base} for vp in state.vps]


def _ranges(state: SavedStateFace) -> list[dict[str, Any]]:
    return [{"index": r.index, "gpa_start": r.gpa_start, "gpa_end": r.gpa_end, "pages": r.page_count,
             "numa_node": r.numa_node, "first_data_page": r.mbp_index_start, "flags": r.flags}
            for r in state.ranges]


def _describe_native(state: SavedState, progress: Progress, scan: bool) -> dict[str, Any]:
    c = state.container
    h = c.header
    part = state.partition
    vtls = sorted({s.vtl for s in part.states})
    report: dict[str, Any] = {
        "file": str(state.path),
        "file_size": c.file_size,
        "container": {
            "format_version": f"{h.format_version >> 8}.{h.format_version & 0xff}",
            "header_copy": h.copy,
            "sequence": h.sequence,
            "header_problems": c.header_problems,
            "object_entries": len(c.objects),
            "key_tables": c.key_tables_used,
            "stale_key_tables": c.stale_key_tables,
            "keys": len(c.keys),
        },
        "vm_version": f"{state.vm_version >> 8}.{state.vm_version & 0xff}",
        "saved_state_type": state.saved_state_type,
        "dirty_replay_log": state.dirty,
        "architecture": state.architecture,
        "vendor": part.vendor_name,
        "vp_count": len(state.vps),
        "vtls": vtls,
        "vps": _vps(state),
        "memory_ranges": _ranges(state),
        "total_ram": state.total_ram,
    }
    report.update(memory_statistics(state, progress, zero_pages=scan))
    return report


def _describe_kernel(state: SavedStateFace, progress: Progress, report: dict[str, Any], log_lines: int) -> None:
    search = find_kernel(state, progress, stop_early=False)
    selection = search.selection
    k = selection.kernel
    report["guest_kernel"] = None if k is None else {
        "osrelease": k.osrelease,
        "kernel_offset": k.kernel_offset,
        "phys_base": k.phys_base,
        "pagesize": k.pagesize,
        "vmcoreinfo_gpa": k.note_gpa,
        "copies": k.copies,
        "caveats": list(k.caveats),
    }
    report["guest_kernel_reasons"] = selection.reasons
    report["scanned_bytes"] = search.scanned_bytes
    report["candidates_dropped"] = search.dropped
    if k is not None:
        from vm2core.dmesg import log_report

        report["kernel_log"] = log_report(state, k, log_lines)
