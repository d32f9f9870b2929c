"""Spot the reports a kernel prints when something went wrong, for a one-line summary in `info`.

The patterns are the kernel's own message prefixes: ``panic()`` ("Kernel panic - not syncing"),
``die()``/``__die`` ("Oops:", "general protection fault", "BUG: unable to handle", "BUG: kernel
NULL pointer dereference"), ``BUG()`` ("kernel BUG at"), the soft/hard lockup detectors
(kernel/watchdog.c: "BUG: soft lockup", "Watchdog detected hard LOCKUP") and the hung-task detector
(kernel/hung_task.c: "INFO: task ... blocked for more than").
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .printk import Record, escape, timestamp

# (kind, pattern), most severe first: a panic is the outcome, an oops usually its cause.
PATTERNS = (
    ("panic", re.compile(rb"Kernel panic - not syncing")),
    ("oops", re.compile(rb"^(Oops|general protection fault|BUG: unable to handle|BUG: kernel NULL pointer)",
                        re.M)),
    ("BUG", re.compile(rb"(kernel BUG at|^BUG: (?!soft lockup))", re.M)),
    ("soft lockup", re.compile(rb"BUG: soft lockup")),
    ("hard lockup", re.compile(rb"Watchdog detected hard LOCKUP")),
    ("hung task", re.compile(rb"INFO: task .* blocked for more than")),
)


def find_problems(records: Sequence[Record]) -> list[tuple[str, Record]]:
    """Every record that starts one of the reports above, in log order, with its kind."""
    found = []
    for record in records:
        for kind, pattern in PATTERNS:
            if pattern.search(record.text):
                found.append((kind, record))
                break
    return found


def summary(records: Sequence[Record]) -> str | None:
    """One line naming the first report (usually the cause) and, if later, the panic it led to."""
    problems = find_problems(records)
    if not problems:
        return None
    kind, first = problems[0]
    line = f"{kind} at {_where(first)}"
    panic = next((r for k, r in problems if k == "panic"), None)
    if panic is not None and panic is not first:
        line += f"; then panic at {_where(panic)}"
    others = len(problems) - 1 - (panic is not None and panic is not first)
    if others > 0:
        line += f" ({others} more report{'s' if others > 1 else ''})"
    return line


def _where(record: Record) -> str:
    text = escape(record.text.split(b"\n", 1)[0]).decode("ascii")
    return f"{timestamp(record.ts_nsec).decode('ascii')}: {text[:160]}"
