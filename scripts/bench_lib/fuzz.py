"""The fuzz stage as a benchmark: cases per second, and the peak RSS of the worst case.

In-process cases run in two fresh worker processes (as in tests/fuzz), so each worker's VmHWM is
the peak of the worst case it ran; then a sample of cases runs through the CLI (`/usr/bin/time`),
whose largest peak RSS is the worst single case as a user would run it.
"""

from __future__ import annotations

import multiprocessing
import random
import shlex
import sys
import time
from pathlib import Path

from scripts.bench_lib.measure import run
from tests.fuzz.bases import build_bases
from tests.fuzz.runner import case_input, load_bases, worker

PY = shlex.quote(sys.executable)


def bench_fuzz(directory: Path, cases: int, cli_sample: int = 24, seed: int | None = None) -> list[str]:
    seed = random.SystemRandom().randrange(1 << 32) if seed is None else seed
    work = directory / "fuzz"
    work.mkdir(parents=True, exist_ok=True)
    bases = {name: str(p) for name, p in build_bases(work).items()}
    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        shares = pool.starmap(worker, [(seed, list(range(i, cases, 2)), bases, str(work)) for i in range(2)])
    wall = time.perf_counter() - started
    counts = {k: sum(s.counts[k] for s in shares) for k in shares[0].counts}
    slowest = max(s.slowest for s in shares)
    lines = [f"fuzz stage (seed {seed}): {cases} cases in {wall:.1f} s = {cases / wall:.0f} cases/s on 2 workers; "
             f"{counts}; worst in-process peak RSS {max(s.peak_rss_kib for s in shares) / 1024:.0f} MiB; "
             f"slowest case {slowest[0]:.2f} s (case {slowest[1]}: {slowest[2]})"]
    data, layouts = load_bases(bases)
    worst = (0, "")
    for k in range(cli_sample):
        index = k * cases // cli_sample
        variant, blob, what = case_input(seed, index, data, layouts)
        path = work / f"cli-{index}.vmrs"
        path.write_bytes(blob)
        for args in (f"{shlex.quote(str(path))} - -q --max-size 16G", f"info {shlex.quote(str(path))}",
                     f"inspect {shlex.quote(str(path))}"):
            r = run(f"{PY} -m vm2core {args} > /dev/null 2>&1 || true", cold=False)
            if r.max_rss_kb > worst[0]:
                worst = (r.max_rss_kb, f"case {index} ({variant}: {what}): vm2core {args.split()[0]}")
        path.unlink()
    lines.append(f"fuzz CLI sample: {cli_sample} cases x 3 commands; worst peak RSS {worst[0] / 1024:.1f} MB "
                 f"({worst[1]})")
    for leftover in work.glob("failed-*"):
        lines.append(f"fuzz: a failing input was kept: {leftover}")
    return lines
