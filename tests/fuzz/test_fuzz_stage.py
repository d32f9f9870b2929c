"""The fuzz stage (issue 9, item 1): >= 10,000 structure-aware damaged inputs per run, plus a
sweep that cuts every base file one byte before, at and after each of its structure boundaries.

    pytest -m fuzz tests/fuzz                          (scripts/test runs it as its own step)
    VM2CORE_FUZZ_SEED=123 VM2CORE_FUZZ_CASES=20000     another seed / more cases (default: DEFAULT_SEED)
    VM2CORE_FUZZ_SEED=random                           a fresh seed, printed (for exploring, not for CI)
    VM2CORE_FUZZ_CASE=4711                             only that case of the seed (with its traceback)

Every case is one base variant (tests/fuzz/bases.py) damaged by tests/fuzz/mutate.py, run in a
fresh worker process (open, inspect, info, convert to a file-like and a pipe-like sink); then a
sample of the cases goes through the real CLI in subprocesses, each limited to 10 s and checked
for its peak RSS.  A failure names the seed and case number; its input is kept in the stage's
temporary folder.  Turn it into a named regression test in tests/fuzz/test_regressions.py.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import assert_one_line_error, run_cli
from tests.fuzz.bases import build_bases
from tests.fuzz.runner import CASE_SECONDS, Share, case_input, load_bases, run_case, sweep_cuts, worker

pytestmark = pytest.mark.fuzz

RSS_LIMIT_KIB = 200 * 1024          # issue 9: never more than 200 MB
DEFAULT_CASES = 10_000
# CI runs the same 10,000 cases every time (a red CI always means a change broke something); new
# ground is explored with VM2CORE_FUZZ_SEED=random and scripts/fuzz (coverage-guided).
DEFAULT_SEED = 20261129
CLI_SAMPLE = 24                     # cases through the CLI, four commands each
MAX_SIZE = "16G"                    # what a careful script would pass (claims up to 240 TiB are legal)


_CAPTURE: list[pytest.CaptureFixture[str]] = []


def _say(message: str) -> None:
    """Straight to the terminal, even under output capture: the seed must always be visible."""
    with _CAPTURE[0].disabled():
        sys.stderr.write(f"\n[fuzz] {message}\n")
        sys.stderr.flush()


@pytest.fixture(scope="module")
def stage_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path_factory.mktemp("fuzz")
        return
    # tmpfs: thousands of small writes stay cheap; removed afterwards unless it keeps a failing input
    directory = Path(tempfile.mkdtemp(prefix="vm2core-fuzz-", dir=shm))
    yield directory
    if not any(directory.glob("failed-*")):
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return {name: str(p) for name, p in build_bases(tmp_path_factory.mktemp("fuzz-bases")).items()}


def _settings() -> tuple[int, int, int | None]:
    seed_text = os.environ.get("VM2CORE_FUZZ_SEED")
    if seed_text == "random":
        seed = random.SystemRandom().randrange(1 << 32)
    else:
        seed = int(seed_text) if seed_text else DEFAULT_SEED
    cases = int(os.environ.get("VM2CORE_FUZZ_CASES", DEFAULT_CASES))
    one = os.environ.get("VM2CORE_FUZZ_CASE")
    return seed, cases, int(one) if one else None


def test_fuzz_stage(bases: dict[str, str], stage_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _CAPTURE[:] = [capsys]
    seed, cases, one = _settings()
    _say(f"seed {seed}, {cases} cases (reproduce: VM2CORE_FUZZ_SEED={seed} VM2CORE_FUZZ_CASES={cases}); "
         f"failing inputs are kept in {stage_dir}")
    data_bases, layouts = load_bases(bases)
    total = cases + len(sweep_cuts(layouts))          # random cases, then the truncation sweep
    if one is not None:                     # one case, in this process, with its full traceback
        variant, data, what = case_input(seed, one, data_bases, layouts, cases)
        _say(f"case {one}: {variant}: {what}")
        target = stage_dir / f"case-{one}.vmrs"
        target.write_bytes(data)
        run_case(target)
        return
    started = time.monotonic()
    jobs = 2
    shares: list[Share] = []
    context = multiprocessing.get_context("spawn")     # fresh processes: VmHWM is the cases' own
    with context.Pool(jobs) as pool:
        parts = [list(range(i, total, jobs)) for i in range(jobs)]
        shares = pool.starmap(worker, [(seed, part, bases, str(stage_dir), cases) for part in parts])
    elapsed = time.monotonic() - started
    counts = {k: sum(s.counts[k] for s in shares) for k in shares[0].counts}
    slowest = max(s.slowest for s in shares)
    peak = max(s.peak_rss_kib for s in shares)
    _say(f"{cases} random cases + {total - cases} truncation-sweep cases in {elapsed:.1f} s "
         f"({total / elapsed:.0f}/s): {counts}; slowest case "
         f"{slowest[1]} {slowest[0]:.2f} s ({slowest[2]}); worker peak RSS {peak // 1024} MiB")
    failures = [f for s in shares for f in s.failures]
    assert not failures, f"seed {seed}: {len(failures)} failing cases:\n" + "\n".join(failures[:40])
    assert counts["converted"] + counts["rejected"] == total
    assert counts["converted"] > cases // 20 and counts["rejected"] > cases // 5, counts   # both sides reached
    assert peak < RSS_LIMIT_KIB, f"a worker peaked at {peak} KiB"
    assert slowest[0] < CASE_SECONDS

    # The same inputs through the CLI: exit 0 or one line + exit 2; memory and time bounded.
    sample = [k * total // CLI_SAMPLE for k in range(CLI_SAMPLE)]
    problems: list[str] = []

    def through_cli(index: int) -> None:
        variant, data, what = case_input(seed, index, data_bases, layouts, cases)
        path = stage_dir / f"cli-{index}.vmrs"
        path.write_bytes(data)
        out = stage_dir / f"cli-{index}.core"
        runs = [("convert", [path, out, "-q", "--max-size", MAX_SIZE], None),
                ("pipe", [path, "-", "-q", "--max-size", MAX_SIZE], subprocess.DEVNULL),
                ("info", ["info", path], None), ("inspect", ["inspect", path], None)]
        for name, args, stdout in runs:
            t0 = time.monotonic()
            result = run_cli(*args, stdout=stdout, measure_rss=True, timeout=CASE_SECONDS + 20)
            took = time.monotonic() - t0
            label = f"case {index} ({variant}: {what}) {name}"
            try:
                if result.returncode != 0:
                    assert_one_line_error(result, 2, str(path))
                assert 0 < result.peak_rss_kib < RSS_LIMIT_KIB, f"peak RSS {result.peak_rss_kib} KiB"
                assert took < CASE_SECONDS, f"{took:.1f} s"
                if name == "convert":
                    assert out.exists() == (result.returncode == 0)
            except AssertionError as e:
                problems.append(f"{label}: {e}")
            out.unlink(missing_ok=True)
        path.unlink()

    cli_started = time.monotonic()
    with ThreadPoolExecutor(jobs) as ex:
        list(ex.map(through_cli, sample))
    _say(f"CLI sample: {len(sample)} cases x 4 commands in {time.monotonic() - cli_started:.1f} s")
    assert not problems, f"seed {seed}:\n" + "\n".join(problems)
