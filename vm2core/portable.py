"""Where vm2core uses an OS-specific fast path, and the switch that turns every one of them off.

The fast paths (Linux/BSD/macOS): ``os.copy_file_range`` and ``os.sendfile`` (kernel copies),
``os.splice`` from ``/dev/zero`` (zeros into a pipe), ``os.pread`` (positional reads from worker
threads), ``os.posix_fadvise`` (readahead hint) and libc ``memmem`` through ctypes (a scan without
the GIL).  Each caller asks :func:`os_call` (or :data:`PORTABLE`) instead of ``hasattr(os, ...)``,
and each has a portable fallback, which is what Windows, the Hyper-V host, always runs.

``VM2CORE_PORTABLE=1`` forces the portable path everywhere, so the code Windows runs is exercised on
every test run (``scripts/test`` runs the unit suite a second time in this mode).  Read once, here,
at start-up.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

ENV_VAR = "VM2CORE_PORTABLE"

#: True: take the portable path everywhere (tests; the variable is set to anything but "" or "0").
PORTABLE: bool = os.environ.get(ENV_VAR, "").strip() not in ("", "0")


def os_call(name: str) -> Callable[..., Any] | None:
    """``os.<name>`` if this platform has it and portable mode is off, else None."""
    return None if PORTABLE else getattr(os, name, None)
