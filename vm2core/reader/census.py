"""A page census of a file that is not HyperVStorage (the ``.bin`` of a legacy pair, or anything unknown).

For characterising samples whose layout is not publicly known (``vmrs-format.md`` section 6)
without sharing their contents: size, zero pages, how many distinct non-zero pages, the longest run
of zero pages.  One pass, read in 1 MiB pieces; the distinct-page count keeps at most
:data:`DISTINCT_CAP` page digests, so memory stays flat whatever the file size (beyond the cap
the count is a lower bound: "at least N").
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vm2core.errors import FormatError
from vm2core.reader.memory import PAGE_SIZE

READ_SIZE = 1 << 20
DISTINCT_CAP = 1 << 18          # 262,144 digests of 8 bytes: a few tens of MiB at most
ZERO_PAGE = bytes(PAGE_SIZE)


@dataclass
class PageCensus:
    file: str
    size: int
    pages: int                   # whole 4 KiB pages
    tail_bytes: int              # bytes after the last whole page
    zero_pages: int
    distinct_nonzero_pages: int  # exact unless distinct_capped (then a lower bound)
    distinct_capped: bool
    longest_zero_run_pages: int
    longest_zero_run_offset: int | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def page_census(path: Path) -> PageCensus:
    """Stream ``path`` once and count its pages."""
    try:
        f = path.open("rb")
    except OSError as e:
        raise FormatError(f"cannot open: {e.strerror or e}", path=path) from None
    seen: set[bytes] = set()
    capped = False
    size = zero = run = best_run = 0
    run_start = best_start = 0
    page_no = 0
    carry = b""
    with f:
        while True:
            chunk = f.read(READ_SIZE)
            if not chunk:
                break
            size += len(chunk)
            data = carry + chunk if carry else chunk
            whole = len(data) // PAGE_SIZE * PAGE_SIZE
            view = memoryview(data)
            for off in range(0, whole, PAGE_SIZE):
                page = view[off:off + PAGE_SIZE]
                if page == ZERO_PAGE:
                    zero += 1
                    if run == 0:
                        run_start = page_no
                    run += 1
                    if run > best_run:
                        best_run, best_start = run, run_start
                else:
                    run = 0
                    if not capped:
                        seen.add(hashlib.blake2b(page, digest_size=8).digest())
                        capped = len(seen) >= DISTINCT_CAP
                page_no += 1
            carry = bytes(view[whole:])
    return PageCensus(str(path), size, page_no, len(carry), zero, len(seen), capped, best_run,
                      best_start * PAGE_SIZE if best_run else None)


def render_census(c: PageCensus) -> str:
    distinct = f"at least {c.distinct_nonzero_pages}" if c.distinct_capped else str(c.distinct_nonzero_pages)
    lines = [
        f"# {c.file}: not a HyperVStorage file; page census (4 KiB pages)",
        f"size:                 {c.size} bytes ({c.pages} pages" + (f" + {c.tail_bytes} bytes" if c.tail_bytes
                                                                     else "") + ")",
        f"zero pages:           {c.zero_pages}" + (f" ({100 * c.zero_pages / c.pages:.1f}%)" if c.pages else ""),
        f"distinct non-zero:    {distinct}",
        f"longest zero run:     {c.longest_zero_run_pages} pages"
        + (f" at offset {c.longest_zero_run_offset:#x}" if c.longest_zero_run_offset is not None else ""),
    ]
    return "\n".join(lines)
