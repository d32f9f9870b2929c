"""Measured runs for ``scripts/bench``: wall time, CPU time and peak RSS of one command.

Linux-only developer tooling: ``/usr/bin/time -v`` gives the peak RSS, and the page cache is dropped
before every run (``/proc/sys/vm/drop_caches``, needs root) so that every run reads from disk
("cold"), as the converter does on a host that just saved a VM.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Run:
    wall: float          # seconds
    user: float
    system: float
    max_rss_kb: int
    cold: bool


def drop_caches() -> bool:
    """Write back dirty pages and drop the page cache; False when not allowed (then runs are warm)."""
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def run(shell_command: str, *, cold: bool = True, include_sync: bool = False) -> Run:
    """Run ``shell_command`` (its first word timed by /usr/bin/time -v; pipes allowed after it).

    ``include_sync``: count writing the dirty output back to disk in the wall time (``sync``).
    """
    was_cold = drop_caches() if cold else False
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        cmd = f"/usr/bin/time -v -o {tf.name} {shell_command}"
        start = time.perf_counter()
        proc = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True)
        if include_sync:
            subprocess.run(["sync"], check=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{shell_command!r} failed ({proc.returncode}): {proc.stderr[-2000:]}")
        report = Path(tf.name).read_text()
    return Run(wall, _field(report, "User time (seconds)"), _field(report, "System time (seconds)"),
               int(_field(report, "Maximum resident set size (kbytes)")), was_cold)


def _field(report: str, name: str) -> float:
    m = re.search(re.escape(name) + r":\s*([0-9.]+)", report)
    if not m:
        raise RuntimeError(f"/usr/bin/time -v printed no {name!r}")
    return float(m.group(1))


def disk_usage(path: Path) -> int:
    """Bytes actually allocated (holes excluded)."""
    return os.stat(path).st_blocks * 512
