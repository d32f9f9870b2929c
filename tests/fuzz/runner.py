"""One fuzz case in-process (open, inspect, info, convert to a file-like and a pipe-like sink),
and the worker loop that runs a share of the cases in a fresh process.

A case passes when every step either succeeds or raises a :class:`FormatError` (exit code 2)
whose message names the file and a structure; and when a conversion succeeds, the seekable
(file) and streaming (pipe) paths give the same bytes, exactly as many as planned.  Anything
else (another exception, a case over the time limit) is a failure, reported with the seed and
case number that regenerate it.  The worker's own peak RSS (VmHWM, a fresh process) bounds the
memory of every case it ran.
"""

from __future__ import annotations

import hashlib
import random
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import time_limit
from tests.fuzz.layout import Layout, map_file
from tests.fuzz.mutate import mutate
from vm2core.errors import FormatError, Vm2coreError
from vm2core.sinks.base import Sink

CASE_SECONDS = 10.0                  # issue 9: never more than 10 s for an input under 16 MB


class CaseFailure(Exception):
    pass


class DigestSink(Sink):
    """Keeps the head (patched at the end on the seekable path) and a digest of the rest, with
    zero runs hashed as lengths: a 5 GiB sparse core costs nothing to compare."""

    HEAD = 1 << 20

    def __init__(self, seekable: bool) -> None:
        super().__init__()
        self.seekable = seekable
        self.head = bytearray()
        self.digest = hashlib.sha256()
        self.zeros = 0

    def _flush_zeros(self) -> None:
        if self.zeros:
            self.digest.update(b"\0Z%d\0" % self.zeros)
            self.zeros = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        n = len(view)
        room = max(0, self.HEAD - self.position)
        if room:
            self.head += view[:room]
            view = view[room:]
        if len(view):
            self._flush_zeros()
            self.digest.update(view)
        self.position += n

    def write_zeros(self, length: int) -> None:
        room = max(0, self.HEAD - self.position)
        if room:
            self.write(bytes(min(room, length)))
            length -= min(room, length)
        self.zeros += length
        self.position += length

    def patch(self, offset: int, data: bytes) -> None:
        if offset + len(data) > len(self.head):
            raise CaseFailure("patch beyond the kept head")
        self.head[offset:offset + len(data)] = data

    def commit(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def result(self) -> str:
        self._flush_zeros()
        return hashlib.sha256(bytes(self.head)).hexdigest() + self.digest.hexdigest()


def _check_error(err: Vm2coreError, path: Path, step: str) -> None:
    """The error contract: exit-code-2 class, names the file and the structure."""
    if not isinstance(err, FormatError):
        raise CaseFailure(f"{step}: {type(err).__name__} (exit {err.exit_code}), not a FormatError: {err}")
    if str(path) not in str(err) or not err.structure:
        raise CaseFailure(f"{step}: message lacks the file or the structure: {err}")


def run_case(path: Path) -> str:
    """'converted' or 'rejected' (CaseFailure, TookTooLong from time_limit, or any other exception: a failure)."""
    from vm2core.core.convert import convert
    from vm2core.core.sizing import planned_core_size
    from vm2core.info import describe
    from vm2core.reader.container import HyperVStorage
    from vm2core.reader.savedstate import SavedState

    with time_limit(CASE_SECONDS):
        try:                                            # `inspect`
            with HyperVStorage.open(path) as c:
                for key in c.keys.sorted_paths():
                    c.keys[key].type_name      # noqa: B018 - materialise every row, as inspect does
        except Vm2coreError as e:
            _check_error(e, path, "inspect")
        try:
            state = SavedState.open(path)
        except Vm2coreError as e:
            _check_error(e, path, "open")
            return "rejected"
        with state:
            try:                                        # `info`
                describe(state, scan=True)
            except Vm2coreError as e:
                _check_error(e, path, "info")
            try:                                        # `convert` to a file, then to a pipe
                planned = planned_core_size(state)[0] if state.architecture == "x86_64" else None
                digests = []
                for seekable in (True, False):
                    sink = DigestSink(seekable)
                    convert(state, sink, workers=1)     # (the CLI sample runs the thread pool)
                    if sink.position != planned:
                        raise CaseFailure(f"core of {sink.position} bytes, {planned} planned")
                    digests.append(sink.result())
                if digests[0] != digests[1]:
                    raise CaseFailure("file and pipe conversions differ")
            except Vm2coreError as e:
                _check_error(e, path, "convert")
                return "rejected"
    return "converted"


@dataclass
class Share:
    """What one worker process reports."""

    counts: dict[str, int] = field(default_factory=lambda: {"converted": 0, "rejected": 0, "failed": 0})
    failures: list[str] = field(default_factory=list)
    slowest: tuple[float, int, str] = (0.0, -1, "")
    peak_rss_kib: int = 0
    seconds: float = 0.0


SWEEP_DELTAS = (-1, 0, 1)


def sweep_cuts(layouts: dict[str, Layout]) -> list[tuple[str, int]]:
    """Every structure boundary of every base, cut one byte before, at and after it."""
    cuts = set()
    for name, lay in layouts.items():
        for boundary in lay.boundaries:
            for delta in SWEEP_DELTAS:
                if 0 <= boundary + delta < lay.size:
                    cuts.add((name, boundary + delta))
    return sorted(cuts)


def case_input(seed: int, index: int, bases: dict[str, bytes], layouts: dict[str, Layout],
               random_cases: int | None = None) -> tuple[str, bytes, str]:
    """Case ``index`` of run ``seed``: (base variant, damaged bytes, what was done) - deterministic.

    Indices from ``random_cases`` on are the truncation sweep (:func:`sweep_cuts`).
    """
    if random_cases is not None and index >= random_cases:
        variant, cut = sweep_cuts(layouts)[index - random_cases]
        return variant, bases[variant][:cut], f"truncation sweep: cut at {cut:#x}"
    rng = random.Random(f"{seed}:{index}")
    variant = rng.choice(sorted(bases))
    data, what = mutate(bases[variant], layouts[variant], rng)
    return variant, data, what


def load_bases(paths: dict[str, str]) -> tuple[dict[str, bytes], dict[str, Layout]]:
    bases = {name: Path(p).read_bytes() for name, p in paths.items()}
    return bases, {name: map_file(data) for name, data in bases.items()}


def worker(seed: int, indices: list[int], base_paths: dict[str, str], workdir: str,
           random_cases: int | None = None) -> Share:
    """Run the given cases (in a fresh process: its VmHWM is the worst case's peak RSS)."""
    bases, layouts = load_bases(base_paths)
    share = Share()
    target = Path(workdir) / f"case-{indices[0] if indices else 0}.vmrs"
    started = time.monotonic()
    for index in indices:
        variant, data, what = case_input(seed, index, bases, layouts, random_cases)
        target.write_bytes(data)
        t0 = time.monotonic()
        try:
            outcome = run_case(target)
        except Exception as e:            # noqa: BLE001 - exactly what the fuzzer hunts for
            outcome = "failed"
            kept = Path(workdir) / f"failed-{seed}-{index}.vmrs"
            kept.write_bytes(data)
            where = traceback.extract_tb(e.__traceback__)[-1]
            share.failures.append(f"case {index} ({variant}: {what}): {type(e).__name__}: {e} "
                                  f"[{Path(where.filename).name}:{where.lineno}] input kept as {kept}")
        elapsed = time.monotonic() - t0
        if elapsed > share.slowest[0]:
            share.slowest = (elapsed, index, f"{variant}: {what}")
        share.counts[outcome] += 1
    share.seconds = time.monotonic() - started
    with open("/proc/self/status") as f:
        share.peak_rss_kib = int(next(line for line in f if line.startswith("VmHWM:")).split()[1])
    return share
