"""The few Windows calls vm2core needs on the Hyper-V host, through ctypes (no pywin32).

Every function returns False (or does nothing) where the call is unavailable or fails, so callers
keep one portable behaviour and only gain from these.  Sources: Microsoft Learn, "FSCTL_SET_SPARSE
IOCTL" (winioctl.h), "DeviceIoControl", "GetConsoleMode", "SetConsoleMode" (consoleapi.h).
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any

# winioctl.h: CTL_CODE(DeviceType, Function, Method, Access) = DeviceType << 16 | Access << 14 |
# Function << 2 | Method.  FSCTL_SET_SPARSE = CTL_CODE(FILE_DEVICE_FILE_SYSTEM (9), 49,
# METHOD_BUFFERED (0), FILE_SPECIAL_ACCESS (0)).
FSCTL_SET_SPARSE = (9 << 16) | (0 << 14) | (49 << 2) | 0
#: consoleapi.h / wincon.h console output mode flag.
ENABLE_VIRTUAL_TERMINAL_PROCESSING = 0x0004


def _kernel32() -> Any:
    if sys.platform != "win32":
        return None
    try:
        return ctypes.WinDLL("kernel32", use_last_error=True)
    except (OSError, AttributeError):
        return None


def _handle(fd: int) -> int | None:
    try:
        import msvcrt
        return int(msvcrt.get_osfhandle(fd))  # type: ignore[attr-defined]
    except (ImportError, OSError, AttributeError, ValueError):
        return None


def set_sparse(fd: int, kernel32: Any = None) -> bool:
    """Mark the open file sparse (NTFS, ReFS), so regions never written stay unallocated.

    Without it NTFS fills a seek past the end of the data with real zeros on disk."""
    kernel32 = kernel32 or _kernel32()
    handle = _handle(fd) if kernel32 is not None else None
    if handle is None:
        return False
    returned = ctypes.c_ulong(0)
    ok = kernel32.DeviceIoControl(ctypes.c_void_p(handle), FSCTL_SET_SPARSE, None, 0, None, 0,
                                  ctypes.byref(returned), None)
    return bool(ok)


def console_mode(fd: int, kernel32: Any = None) -> int | None:
    """The console mode of ``fd``'s handle, or None when it is not a console (a file, a pipe, NUL)."""
    kernel32 = kernel32 or _kernel32()
    handle = _handle(fd) if kernel32 is not None else None
    if handle is None:
        return None
    mode = ctypes.c_ulong(0)
    if not kernel32.GetConsoleMode(ctypes.c_void_p(handle), ctypes.byref(mode)):
        return None
    return int(mode.value)


def enable_vt(fd: int, kernel32: Any = None) -> bool:
    """Let the console interpret ANSI escapes (Windows 10+); False on a legacy console."""
    kernel32 = kernel32 or _kernel32()
    mode = console_mode(fd, kernel32)
    if mode is None:
        return False
    if mode & ENABLE_VIRTUAL_TERMINAL_PROCESSING:
        return True
    handle = _handle(fd)
    return bool(kernel32.SetConsoleMode(ctypes.c_void_p(handle), mode | ENABLE_VIRTUAL_TERMINAL_PROCESSING))
