"""The size of the core, known before the first byte is written, and ``--max-size``.

Planning is cheap (headers only; with ``exclude_zero`` the record headers are walked once and
the map is handed to :func:`~vm2core.core.convert.convert`), so the CLI can print the size and
refuse an oversized core before it creates any output.
"""

from __future__ import annotations

import re

from vm2core.core.convert import memory_loads
from vm2core.core.layout import plan_core
from vm2core.core.zeros import ZeroMap, zero_map
from vm2core.reader.backend import SavedStateFace as SavedState  # any backend: native or DLL

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'64G', '512M', '1.5T', '4096' -> bytes (binary units, like `ls -h`); ValueError otherwise."""
    m = _SIZE.match(text)
    if m is None:
        raise ValueError(f"{text!r} is not a size (examples: 64G, 512M, 1T, 4096)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def planned_core_size(state: SavedState, *, exclude_zero: bool = False) -> tuple[int, ZeroMap | None]:
    """Bytes the core will have, and the zero map ``convert`` should reuse (with exclude_zero)."""
    zeros = zero_map(state) if exclude_zero else None
    loads = zeros.loads(state.ranges) if zeros is not None else memory_loads(state)
    layout = plan_core(loads, state.vps, vmcoreinfo_note=None, reserve_vmcoreinfo=True)
    return layout.total_size, zeros
