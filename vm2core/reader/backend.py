"""The saved-state face every backend offers, and the choice of backend for the given inputs.

``core/`` and ``guest/`` talk to a saved state only through :class:`SavedStateFace`: memory ranges,
virtual processors, random guest-physical reads, and memory as numbered 1 MiB blocks in GPA
order.  The native reader (:class:`~vm2core.reader.savedstate.SavedState`) and Microsoft's DLL
(:class:`~vm2core.reader.dll.DllSavedState`) both implement it, so the planner, the VMCOREINFO
search, the notes and the sinks are the same whichever one read the input.

Inputs are told apart by content, never by name: a HyperVStorage file (``.vmrs``, ``.vsv``) starts
with the container signature in one of its two header copies (``vmrs-format.md`` section 1); the
``.bin`` of a legacy pair does not.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Literal, Protocol

from vm2core.errors import FormatError, UnsupportedError
from vm2core.reader.container import HEADER_OFFSETS, HEADER_SIGNATURE, require_regular
from vm2core.reader.cpu import VpState
from vm2core.reader.memory import MemoryRange, Piece
from vm2core.reader.salvage import SalvageReport

if TYPE_CHECKING:
    from vm2core.reader.savedstate import BlockInfo

Backend = Literal["auto", "native", "dll"]
BACKENDS: tuple[Backend, ...] = ("auto", "native", "dll")
U32 = struct.Struct("<I")


class InputFile(Protocol):
    """The input file raw RAM spans (:class:`~vm2core.reader.memory.FileSpan`) refer to."""

    @property
    def file(self) -> BinaryIO: ...

    @property
    def path(self) -> Path: ...


class SavedStateFace(Protocol):
    """What ``core/`` and ``guest/`` may ask of a saved state, whichever backend read it."""

    @property
    def path(self) -> Path: ...

    @property
    def container(self) -> InputFile: ...

    @property
    def backend(self) -> str: ...

    @property
    def dirty(self) -> bool: ...

    @property
    def architecture(self) -> str: ...

    @property
    def vps(self) -> list[VpState]: ...

    @property
    def ranges(self) -> list[MemoryRange]: ...

    @property
    def total_ram(self) -> int: ...

    def missing_run(self, number: int) -> int: ...

    def block_info(self, number: int) -> BlockInfo: ...

    def blocks_of(self, r: MemoryRange) -> Iterator[tuple[BlockInfo, int, int]]: ...

    def read_block_bytes(self, info: BlockInfo) -> bytes: ...

    def decode_block(self, info: BlockInfo, stored: bytes | None = None) -> list[Piece]: ...

    def read_physical(self, gpa: int, length: int) -> bytes: ...

    # --salvage: a backend that cannot salvage has salvage False and an empty report.
    @property
    def salvage(self) -> bool: ...

    def lose_block(self, number: int, error: FormatError) -> None: ...

    def salvage_report(self) -> SalvageReport: ...

    def close(self) -> None: ...

    def __enter__(self) -> SavedStateFace: ...

    def __exit__(self, *exc: object) -> None: ...


def is_hyperv_storage(path: Path) -> bool:
    """True if either header copy carries the HyperVStorage signature (a .vmrs, .vsv or .vmcx)."""
    with contextlib.suppress(OSError):   # before opening: opening a FIFO would wait for a writer
        require_regular(path.stat().st_mode, path)
    try:
        with path.open("rb") as f:
            for offset in HEADER_OFFSETS:
                f.seek(offset)
                raw = f.read(U32.size)
                if len(raw) == U32.size and U32.unpack(raw)[0] == HEADER_SIGNATURE:
                    return True
    except IsADirectoryError:
        raise FormatError("is a directory, not a saved-state file", path=path) from None
    except OSError as e:
        raise FormatError(f"cannot open: {e.strerror or e}", path=path) from None
    return False


def classify_inputs(inputs: Sequence[Path]) -> tuple[Path, Path | None]:
    """``(saved_state, None)`` for one HyperVStorage file, ``(vsv, bin)`` for a legacy pair in any order."""
    if len(inputs) == 1:          # the container reader says precisely what is wrong with a single file
        return inputs[0], None
    if len(inputs) != 2:
        raise FormatError(f"{len(inputs)} input files: give one .vmrs, or a .vsv and its .bin")
    kinds = [is_hyperv_storage(p) for p in inputs]
    if kinds == [True, True]:
        raise FormatError(f"{inputs[0]} and {inputs[1]} are both HyperVStorage files; a legacy pair is one "
                          ".vsv (HyperVStorage) and one .bin (raw memory)")
    if kinds == [False, False]:
        raise FormatError(f"neither {inputs[0]} nor {inputs[1]} is a HyperVStorage file; a legacy pair needs "
                          "its .vsv")
    return (inputs[0], inputs[1]) if kinds[0] else (inputs[1], inputs[0])


def open_saved_state(inputs: Sequence[Path], *, backend: Backend = "auto", dll: Path | None = None,
                     warn: Callable[[str], None] = lambda _msg: None, salvage: bool = False) -> SavedStateFace:
    """Open ``inputs`` (one .vmrs, or a .vsv and a .bin in any order) with the chosen backend.

    ``auto``: a .vmrs natively, and through the DLL if the native reader refuses it as an unknown
    variant and the DLL is there (said through ``warn``); a .vsv + .bin pair through the DLL.
    """
    from vm2core.reader import dll as dll_backend
    from vm2core.reader.savedstate import SavedState

    state_path, bin_path = classify_inputs(inputs)
    if salvage and (backend == "dll" or bin_path is not None):
        raise UnsupportedError("--salvage works with the native reader only (the DLL reports no losses)",
                               path=state_path)
    if backend == "dll":
        return dll_backend.DllSavedState.open(state_path, bin_path, dll_backend.require_dll(dll), warn)
    if bin_path is not None:
        if backend == "native":
            raise UnsupportedError(
                "the .bin memory layout of a legacy pair is not publicly documented, so the native reader "
                "cannot read it; use --backend dll (or auto) with Microsoft's vmsavedstatedumpprovider.dll",
                path=bin_path, structure="legacy .bin")
        return dll_backend.DllSavedState.open(state_path, bin_path, dll_backend.require_dll(dll, legacy=True),
                                              warn)
    if backend == "native":
        return SavedState.open(state_path, salvage=salvage)
    try:
        return SavedState.open(state_path, salvage=salvage)
    except UnsupportedError as e:
        found = dll_backend.find_dll(dll)
        if found is None:
            raise
        warn(f"the native reader cannot read this saved state ({e}); retrying through {found}")
        return dll_backend.DllSavedState.open(state_path, None, found, warn)
