"""Microsoft's ``vmsavedstatedumpprovider.dll`` as a backend, through ctypes.

The safety net for what the native reader cannot read: legacy ``.vsv`` + ``.bin`` pairs (Windows
Server 2012 R2) and ``.vmrs`` variants nobody here has seen.  It offers the same saved-state face
as the native reader (:mod:`vm2core.reader.backend`): ranges from ``GetGuestPhysicalMemoryChunks``,
registers from ``GetRegisterValue``, and memory as 1 MiB blocks read with
``ReadGuestPhysicalAddress`` in GPA order, so everything downstream streams exactly as it does for
a natively read file.  No ctypes type leaves this module.

Signatures: ``VmSavedStateDump.h`` and ``VmSavedStateDumpDefs.h`` of the Windows SDK, and
MicrosoftDocs/Virtualization-Documentation ``virtualization/api/vm-dump-provider/``
(``vmrs-format.md`` section 7).  Every function is ``HRESULT WINAPI`` (``__stdcall``, which on x64
is the one Windows x64 convention); strings are ``LPCWSTR``, NUL-terminated UTF-16 code units on
every platform: the binding always encodes UTF-16LE itself (never ``c_wchar``, which is 32 bits
on Linux), so the test library built on Linux exercises the very same code path.
"""

from __future__ import annotations

import ctypes
import os
import re
import struct
import sys
import threading
from bisect import bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any, BinaryIO

from vm2core.errors import FormatError, UnsupportedError
from vm2core.reader.cpu import (
    CONTROL_REGISTER_NAMES,
    DEBUG_REGISTER_NAMES,
    GP_REGISTER_NAMES,
    SEGMENT_NAMES,
    Segment,
    TableRegister,
    VpState,
)
from vm2core.reader.memory import PAGE_SIZE, Data, MemoryRange, NotInMemory, Piece, Zeros
from vm2core.reader.ramblock import BLOCK_SIZE
from vm2core.reader.salvage import SalvageReport
from vm2core.reader.savedstate import BlockInfo

DLL_NAME = "vmsavedstatedumpprovider.dll"
PAGES_PER_BLOCK = BLOCK_SIZE // PAGE_SIZE

# --- REGISTER_ID (pinned) -------------------------------------------------------------------------
# The numbering of VmSavedStateDumpDefs.h as shipped in current Windows SDKs: one REGISTER_ID enum
# for x64 and ARM64, XMM registers as single 128-bit entries, so X64_RegisterCr3 = 46.  The older
# vm-dump-provider documentation (reference/DataTypes.md, 2018-2022) describes another numbering
# (REGISTER_ID_X64 with low/high XMM halves: Cr3 = 56) and a GetRegisterValue that takes an
# in/out {architecture, value, id} struct; DLLs of that generation are not supported.
REG_GP_FIRST = 0           # X64_RegisterRax .. X64_RegisterRFlags, in GP_REGISTER_NAMES order
REG_CONTROL_FIRST = 44     # X64_RegisterCr0, Cr2, Cr3, Cr4, Cr8, Efer (CONTROL_REGISTER_NAMES order)
REG_DEBUG_FIRST = 50       # X64_RegisterDr0, Dr1, Dr2, Dr3, Dr6, Dr7 (DEBUG_REGISTER_NAMES order)
REG_SEGMENT_FIRST = 56     # X64_RegisterEs, Cs, Ss, Ds, Fs, Gs, Ldtr, Tr (SEGMENT_NAMES order)
REG_IDTR = 64              # X64_RegisterIdtr
REG_GDTR = 65              # X64_RegisterGdtr
EFER_LMA = 1 << 10         # long mode active (Intel SDM vol. 3, 2.2.1): set in every VP of a running 64-bit guest

# VIRTUAL_PROCESSOR_REGISTER: a 16-byte union (Reg128 {u64 low, u64 high} is its widest member).
VP_REGISTER_SIZE = 16
REG64 = struct.Struct("<Q")               # Reg64
REG_SEGMENT = struct.Struct("<QIHH")      # X64.Segment {u64 Base, u32 Limit, u16 Selector, u16 Attributes}
REG_TABLE = struct.Struct("<H6xQ")        # X64.Table {u16 Limit, (pad), u64 Base}

# VIRTUAL_PROCESSOR_ARCH
ARCHITECTURES = {0: "unknown", 1: "x86_64", 2: "x86_64", 3: "aarch64"}   # Arch_x86 / Arch_x64 / Arch_Armv8

MAX_VPS = 4096
MAX_CHUNKS = 4096
MAX_GPA = 1 << 52

# Common HRESULTs, for a readable message where the system cannot format one (winerror.h).
HRESULT_NAMES = {
    0x80004001: "E_NOTIMPL",
    0x80004003: "E_POINTER",
    0x80004005: "E_FAIL",
    0x8000FFFF: "E_UNEXPECTED",
    0x80070002: "file not found",
    0x80070003: "path not found",
    0x80070005: "access denied",
    0x8007000E: "E_OUTOFMEMORY",
    0x80070020: "sharing violation (file in use)",
    0x80070032: "not supported",
    0x80070057: "E_INVALIDARG",
    0x8007007A: "insufficient buffer",
    0x8007000D: "invalid data",
}


class _VpRegister(ctypes.Structure):
    _fields_ = [("raw", ctypes.c_uint64 * 2)]


class _GpaMemoryChunk(ctypes.Structure):
    _fields_ = [("GuestPhysicalStartPageIndex", ctypes.c_uint64), ("PageCount", ctypes.c_uint64)]


_HANDLE = ctypes.c_void_p
_HANDLE_P = ctypes.POINTER(ctypes.c_void_p)
_WSTR = ctypes.POINTER(ctypes.c_uint16)
_U32_P = ctypes.POINTER(ctypes.c_uint32)
_U64_P = ctypes.POINTER(ctypes.c_uint64)

# name -> argtypes; every function returns an HRESULT (a 32-bit LONG on Windows, so c_int32 here).
SIGNATURES: dict[str, list[Any]] = {
    "LoadSavedStateFile": [_WSTR, _HANDLE_P],
    "LoadSavedStateFiles": [_WSTR, _WSTR, _HANDLE_P],
    "ReleaseSavedStateFiles": [_HANDLE],
    "GetVpCount": [_HANDLE, _U32_P],
    "GetArchitecture": [_HANDLE, ctypes.c_uint32, ctypes.POINTER(ctypes.c_int32)],
    "GetRegisterValue": [_HANDLE, ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(_VpRegister)],
    "GetGuestPhysicalMemoryChunks": [_HANDLE, _U64_P, ctypes.POINTER(_GpaMemoryChunk), _U64_P],
    "ReadGuestPhysicalAddress": [_HANDLE, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint32, _U32_P],
}


def hresult_text(hr: int) -> str:
    hr &= 0xFFFFFFFF
    name = HRESULT_NAMES.get(hr)
    if name is None and sys.platform == "win32":
        name = ctypes.FormatError(hr).strip() or None
    return f"HRESULT {hr:#010x}" + (f" ({name})" if name else "")


def _wide(text: str) -> ctypes.Array[ctypes.c_uint16]:
    """A NUL-terminated LPCWSTR: UTF-16LE code units, the same on Windows and in the Linux tests."""
    data = text.encode("utf-16-le", "surrogatepass") + b"\0\0"
    return (ctypes.c_uint16 * (len(data) // 2)).from_buffer_copy(data)


# --- finding the DLL --------------------------------------------------------------------------------

def sdk_dirs() -> list[Path]:
    """``Windows Kits\\10\\bin\\<version>\\x64`` folders, newest SDK version first."""
    found: list[tuple[tuple[int, ...], Path]] = []
    for var in ("ProgramFiles(x86)", "ProgramFiles"):
        root = os.environ.get(var)
        if not root:
            continue
        bin_dir = Path(root) / "Windows Kits" / "10" / "bin"
        try:
            versions = list(bin_dir.iterdir())
        except OSError:
            continue
        for v in versions:
            if re.fullmatch(r"\d+(\.\d+)+", v.name):
                found.append((tuple(int(x) for x in v.name.split(".")), v / "x64"))
    return [p for _, p in sorted(found, reverse=True)]


def search_dirs() -> list[Path]:
    """Where ``auto`` looks on Windows: next to the tool, on PATH, then the Windows SDK."""
    if sys.platform != "win32":
        return []
    dirs = [Path(sys.argv[0]).resolve().parent, Path(sys.executable).resolve().parent]
    dirs += [Path(p) for p in os.environ.get("PATH", "").split(os.pathsep) if p]
    return dirs + sdk_dirs()


def find_dll(explicit: Path | None = None) -> Path | None:
    """``--dll PATH`` if given (it must exist), else the first DLL found by :func:`search_dirs`."""
    if explicit is not None:
        if not explicit.is_file():
            raise FormatError("--dll: no such file", path=explicit)
        return explicit
    for d in search_dirs():
        candidate = d / DLL_NAME
        if candidate.is_file():
            return candidate
    return None


def install_hint() -> str:
    if sys.platform == "win32":
        return (f"install the Windows SDK (it puts {DLL_NAME} in C:\\Program Files (x86)\\Windows Kits\\10\\bin\\"
                "<version>\\x64\\), or copy the DLL next to vm2core or into a folder on PATH, or pass --dll PATH")
    return (f"{DLL_NAME} runs on Windows only: convert on a Windows machine with the Windows SDK installed "
            "(README: 'Microsoft's DLL'), or pass --dll PATH to a library with the same API")


def require_dll(explicit: Path | None = None, *, legacy: bool = False) -> Path:
    found = find_dll(explicit)
    if found is None:
        what = "reading a legacy .vsv + .bin pair" if legacy else "--backend dll"
        raise UnsupportedError(f"{what} needs Microsoft's {DLL_NAME}, which was not found: {install_hint()}")
    return found


# --- the binding ------------------------------------------------------------------------------------

class Provider:
    """One loaded DLL: declared signatures, HRESULTs turned into one-line errors, one call at a time."""

    def __init__(self, path: Path, input_path: Path) -> None:
        self.path = path
        self.input_path = input_path
        self._lock = threading.Lock()
        try:
            if sys.platform == "win32":
                lib: Any = ctypes.WinDLL(str(path.resolve()))
            else:
                lib = ctypes.CDLL(str(path.resolve()))
        except OSError as e:
            raise UnsupportedError(f"cannot load the DLL: {e}", path=path) from None
        self._functions: dict[str, Any] = {}
        for name, argtypes in SIGNATURES.items():
            try:
                fn = getattr(lib, name)
            except AttributeError:
                raise UnsupportedError(f"does not export {name}: not a compatible {DLL_NAME}", path=path) from None
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int32
            self._functions[name] = fn
        self._lib = lib

    def call(self, name: str, *args: Any, what: str = "", ok_codes: tuple[int, ...] = ()) -> int:
        with self._lock:
            hr = int(self._functions[name](*args))
        if hr < 0 and (hr & 0xFFFFFFFF) not in ok_codes:
            raise FormatError(f"{self.path.name} {name}{what} failed: {hresult_text(hr)}", path=self.input_path,
                              structure=DLL_NAME)
        return hr


@dataclass(frozen=True)
class FetchedBlock(BlockInfo):
    """A 1 MiB block the backend reads itself (no stored bytes, no encoding known to vm2core)."""

    @property
    def encoding(self) -> str:
        return "fetched"


class _Input:
    """The input file (the .vmrs, or the .bin of a pair): what the face calls ``container``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.file: BinaryIO = path.open("rb")
        except OSError as e:
            raise FormatError(f"cannot open: {e.strerror or e}", path=path) from None

    def close(self) -> None:
        self.file.close()


class DllSavedState:
    """A saved state read through ``vmsavedstatedumpprovider.dll`` (see module docstring)."""

    backend = "dll"
    dirty = False                  # the DLL does not say; it applies no replay log either

    salvage = False     # the DLL reports no losses: --salvage is refused for this backend

    def __init__(self, provider: Provider, handle: ctypes.c_void_p, state_path: Path, bin_path: Path | None,
                 warn: Callable[[str], None] = lambda _msg: None) -> None:
        self._provider = provider
        self._warn = warn
        self._handle = handle
        self.state_path = state_path
        self.bin_path = bin_path
        self.inputs = [state_path] if bin_path is None else [state_path, bin_path]
        self.path = bin_path or state_path
        self.dll_path = provider.path
        self.container = _Input(self.path)
        try:
            self.architecture, self.vps = self._read_vps()
            self.page_size, self.ranges = self._read_ranges()
        except BaseException:
            self.close()
            raise
        self._by_data = sorted(self.ranges, key=lambda r: r.mbp_index_start)
        self._block_starts = [r.mbp_index_start // PAGES_PER_BLOCK for r in self._by_data]

    @classmethod
    def open(cls, state_path: Path, bin_path: Path | None, dll: Path,
             warn: Callable[[str], None] = lambda _msg: None) -> DllSavedState:
        """Load ``state_path`` (.vmrs), or the pair ``bin_path`` + ``state_path`` (.vsv)."""
        provider = Provider(dll, bin_path or state_path)
        handle = ctypes.c_void_p()
        if bin_path is None:
            provider.call("LoadSavedStateFile", _wide(os.path.abspath(state_path)), ctypes.byref(handle))
        else:
            provider.call("LoadSavedStateFiles", _wide(os.path.abspath(bin_path)), _wide(os.path.abspath(state_path)),
                          ctypes.byref(handle))
        if not handle.value:
            raise FormatError(f"{dll.name} returned no handle", path=state_path, structure=DLL_NAME)
        return cls(provider, handle, state_path, bin_path, warn)

    def lose_block(self, number: int, error: FormatError) -> None:
        raise error

    def salvage_report(self) -> SalvageReport:
        return SalvageReport(str(self.path), [], [], [])

    def close(self) -> None:
        """Release the handle (and the DLL's file locks); a failure then is only worth a warning."""
        if self._handle.value:
            handle, self._handle = self._handle, ctypes.c_void_p()
            try:
                self._provider.call("ReleaseSavedStateFiles", handle)
            except FormatError as e:
                self._warn(str(e))
            finally:
                if hasattr(self, "container"):
                    self.container.close()

    def __enter__(self) -> DllSavedState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- virtual processors ----------------------------------------------------------------------

    def _read_vps(self) -> tuple[str, list[VpState]]:
        count = ctypes.c_uint32()
        self._provider.call("GetVpCount", self._handle, ctypes.byref(count))
        if not 0 < count.value <= MAX_VPS:
            raise FormatError(f"the DLL reports {count.value} virtual processors (expected 1..{MAX_VPS})",
                              path=self.path, structure=DLL_NAME)
        archs = set()
        for vp in range(count.value):
            arch = ctypes.c_int32()
            self._provider.call("GetArchitecture", self._handle, vp, ctypes.byref(arch), what=f" (VP {vp})")
            archs.add(ARCHITECTURES.get(arch.value, "unknown"))
        architecture = "aarch64" if "aarch64" in archs else "x86_64" if "x86_64" in archs else "unknown"
        if architecture != "x86_64":
            return architecture, [VpState(index=vp) for vp in range(count.value)]
        vps = [self._read_vp(vp) for vp in range(count.value)]
        if not any(vp.reg("efer") & EFER_LMA for vp in vps):
            self._warn(f"{self.path}: no virtual processor is in 64-bit mode by the registers the DLL reports "
                       "(EFER.LMA clear): if the guest is a 64-bit Linux, this DLL numbers registers differently "
                       f"from the REGISTER_ID vm2core pins (CR3 = {REG_CONTROL_FIRST + 2}; README: 'Microsoft's DLL')")
        return architecture, vps

    def _register(self, vp: int, reg_id: int) -> bytes:
        value = _VpRegister()
        self._provider.call("GetRegisterValue", self._handle, vp, reg_id, ctypes.byref(value),
                            what=f" (VP {vp}, register {reg_id})")
        return bytes(value)

    def _read_vp(self, vp: int) -> VpState:
        def reg64(reg_id: int) -> int:
            return int(REG64.unpack_from(self._register(vp, reg_id))[0])

        def table(reg_id: int) -> TableRegister:
            limit, base = REG_TABLE.unpack_from(self._register(vp, reg_id))
            return TableRegister(base=base, limit=limit)

        segments = {}
        for i, name in enumerate(SEGMENT_NAMES):
            base, limit, selector, attributes = REG_SEGMENT.unpack_from(self._register(vp, REG_SEGMENT_FIRST + i))
            segments[name] = Segment(base=base, limit=limit, selector=selector, attributes=attributes)
        return VpState(
            index=vp, vtl=0,
            gp={name: reg64(REG_GP_FIRST + i) for i, name in enumerate(GP_REGISTER_NAMES)},
            control={name: reg64(REG_CONTROL_FIRST + i) for i, name in enumerate(CONTROL_REGISTER_NAMES)},
            debug={name: reg64(REG_DEBUG_FIRST + i) for i, name in enumerate(DEBUG_REGISTER_NAMES)},
            segments=segments,
            cpl=(segments["ss"].attributes >> 5) & 3,      # SS.DPL (the DLL has no CPL register)
            idtr=table(REG_IDTR), gdtr=table(REG_GDTR))

    # --- memory layout ---------------------------------------------------------------------------

    def _read_ranges(self) -> tuple[int, list[MemoryRange]]:
        page_size = ctypes.c_uint64()
        count = ctypes.c_uint64(0)
        # Size query: a NULL buffer of 0 entries; the DLL returns the count (an error HRESULT is allowed here).
        hr = self._provider.call("GetGuestPhysicalMemoryChunks", self._handle, ctypes.byref(page_size), None,
                                 ctypes.byref(count), what=" (count query)", ok_codes=(0x8007007A, 0x80070057,
                                                                                       0x800700EA))
        if hr < 0 and count.value == 0:
            raise FormatError(f"GetGuestPhysicalMemoryChunks count query failed: {hresult_text(hr)}",
                              path=self.path, structure=DLL_NAME)
        n = count.value
        if not 0 < n <= MAX_CHUNKS:
            raise FormatError(f"the DLL reports {n} memory chunks (expected 1..{MAX_CHUNKS})", path=self.path,
                              structure=DLL_NAME)
        chunks = (_GpaMemoryChunk * n)()
        self._provider.call("GetGuestPhysicalMemoryChunks", self._handle, ctypes.byref(page_size), chunks,
                            ctypes.byref(count))
        if count.value != n:
            raise FormatError(f"the DLL reported {n} memory chunks, then {count.value}", path=self.path,
                              structure=DLL_NAME)
        unit = page_size.value
        if unit == 0 or unit % PAGE_SIZE or unit > 1 << 30:
            raise UnsupportedError(f"memory chunk page size {unit} (expected a multiple of {PAGE_SIZE})",
                                   path=self.path, structure=DLL_NAME)
        scale = unit // PAGE_SIZE
        ranges: list[MemoryRange] = []
        next_page = 0                          # data pages numbered like RamBlocks: each range on a fresh block
        spans = sorted((c.GuestPhysicalStartPageIndex * scale, c.PageCount * scale) for c in chunks)
        for i, (first, pages) in enumerate(spans):
            if pages == 0:
                continue
            if (first + pages) * PAGE_SIZE > MAX_GPA:
                raise FormatError(f"memory chunk {i} ({pages} pages at page {first:#x}) is beyond any physical "
                                  "address", path=self.path, structure=DLL_NAME)
            ranges.append(MemoryRange(len(ranges), first * PAGE_SIZE, pages, next_page))
            next_page += -(-pages // PAGES_PER_BLOCK) * PAGES_PER_BLOCK
        if not ranges:
            raise FormatError("the DLL reports no guest memory", path=self.path, structure=DLL_NAME)
        for a, b in pairwise(ranges):
            if b.gpa_start < a.gpa_end:
                raise FormatError(f"memory chunks overlap at GPA {b.gpa_start:#x}", path=self.path,
                                  structure=DLL_NAME)
        return unit, ranges

    @property
    def total_ram(self) -> int:
        return sum(r.size for r in self.ranges)

    def range_of(self, gpa: int) -> MemoryRange | None:
        for r in self.ranges:
            if r.gpa_start <= gpa < r.gpa_end:
                return r
        return None

    # --- memory as blocks (the face the streaming pipeline reads) --------------------------------

    def _range_of_block(self, number: int) -> MemoryRange:
        i = bisect_right(self._block_starts, number) - 1
        r = self._by_data[i] if i >= 0 else None
        if r is None or number * PAGES_PER_BLOCK >= r.mbp_index_start + r.page_count:
            raise AssertionError(f"block {number} lies in no memory range")
        return r

    def missing_run(self, number: int) -> int:
        return 0

    def block_info(self, number: int) -> BlockInfo:
        return FetchedBlock(number, None)

    def blocks_of(self, r: MemoryRange) -> Iterator[tuple[BlockInfo, int, int]]:
        first = r.mbp_index_start // PAGES_PER_BLOCK
        for i in range(-(-r.page_count // PAGES_PER_BLOCK)):
            yield FetchedBlock(first + i, None), 0, min(BLOCK_SIZE, r.size - i * BLOCK_SIZE)

    def decode_block(self, info: BlockInfo, stored: bytes | None = None) -> list[Piece]:
        """The block's bytes read through the DLL in one call; past the range's end, zeros."""
        r = self._range_of_block(info.number)
        offset = (info.number * PAGES_PER_BLOCK - r.mbp_index_start) * PAGE_SIZE
        length = min(BLOCK_SIZE, r.size - offset)
        pieces: list[Piece] = [Data(self._read(r.gpa_start + offset, length))]
        if length < BLOCK_SIZE:
            pieces.append(Zeros(BLOCK_SIZE - length))
        return pieces

    def read_block_bytes(self, info: BlockInfo) -> bytes:
        r = self._range_of_block(info.number)
        offset = (info.number * PAGES_PER_BLOCK - r.mbp_index_start) * PAGE_SIZE
        return self._read(r.gpa_start + offset, min(BLOCK_SIZE, r.size - offset)).ljust(BLOCK_SIZE, b"\0")

    def _read(self, gpa: int, length: int) -> bytes:
        buf = ctypes.create_string_buffer(length)
        got = ctypes.c_uint32()
        self._provider.call("ReadGuestPhysicalAddress", self._handle, gpa, buf, length, ctypes.byref(got),
                            what=f" (GPA {gpa:#x}, {length} bytes)")
        if got.value != length:
            raise FormatError(f"ReadGuestPhysicalAddress returned {got.value} of {length} bytes at GPA {gpa:#x}",
                              path=self.path, structure=DLL_NAME)
        return buf.raw

    def read_physical(self, gpa: int, length: int) -> bytes:
        """Guest-physical read across ranges; NotInMemory outside RAM (as the native reader)."""
        out = bytearray()
        while length > 0:
            r = self.range_of(gpa)
            if r is None:
                raise NotInMemory(gpa)
            n = min(length, r.gpa_end - gpa, BLOCK_SIZE)
            out += self._read(gpa, n)
            gpa += n
            length -= n
        return bytes(out)
