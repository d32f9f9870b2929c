"""Shared fixtures: small synthetic saved states, a minimal HyperVStorage builder and a CLI runner.

The CLI runner starts the real program (``python -m vm2core``) in a subprocess and reports its
exit code, output, stderr and peak RSS, so the tests see exactly what a user sees.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

from tests.fixtures.synthetic_guest import SyntheticGuest, build_guest
from tests.vmrs_writer import RangeSpec, WriterOptions, ram_from_bytes, write_vmrs
from tests.vmrs_writer.keystore import KeyStore, KeyValue, array_value, file_object_value
from tests.vmrs_writer.structs import (
    OBJ_EMPTY,
    OBJ_FILE_OBJECT,
    OBJ_FLAG_REQUIRED,
    OBJ_KEY_TABLE,
    OBJECT_ENTRY,
    OBJECT_TABLE_HEADER,
    OBJECT_TABLE_SIGNATURE,
    ROOT_OBJECT_TABLE_OFFSET,
    HeaderFields,
    align_up,
    pack_file_header,
    pack_object_entry,
)
from vm2core.sinks.base import Sink

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20
PAGE = 4096


# --------------------------------------------------------------------------------------------------
# Platform markers: a test that needs POSIX (signals, FIFOs, ptys, rlimits) or Linux (/proc) says so
# with @pytest.mark.posix / @pytest.mark.linux and is skipped elsewhere, instead of failing to import.
# --------------------------------------------------------------------------------------------------

PLATFORM_MARKERS = {
    "posix": (os.name == "posix", "needs POSIX (signals, FIFOs, ptys, rlimits)"),
    "linux": (sys.platform.startswith("linux"), "needs Linux (/proc)"),
    "root": (getattr(os, "geteuid", lambda: -1)() == 0, "needs root"),
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for name, (available, reason) in PLATFORM_MARKERS.items():
            if not available and item.get_closest_marker(name) is not None:
                item.add_marker(pytest.mark.skip(reason=reason))


# --------------------------------------------------------------------------------------------------
# Running the CLI
# --------------------------------------------------------------------------------------------------

@dataclass
class CliResult:
    args: list[str]
    returncode: int
    stdout: bytes
    stderr: str
    peak_rss_kib: int        # the program's peak RSS (VmHWM) when run with measure_rss, else -1

    @property
    def stderr_lines(self) -> list[str]:
        return self.stderr.splitlines()


def cli_env() -> dict[str, str]:
    """The child's environment: no debug tracebacks, no coloured or width-dependent output."""
    env = {k: v for k, v in os.environ.items() if k != "VM2CORE_DEBUG"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["COLUMNS"] = "200"
    return env


def default_signals() -> None:
    """preexec_fn: a child started from a background job may inherit SIGINT ignored; undo that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli_command(*args: str | os.PathLike[str]) -> list[str]:
    return [sys.executable, "-m", "vm2core", *map(str, args)]


# `python -m vm2core` that writes its peak RSS on exit.  The kernel's ru_maxrss of a child also
# counts the forking parent's memory (pytest, large after many tests), so the child reports the
# high-water mark of its own post-exec address space instead (VmHWM, Linux).
_RSS_WRAPPER = """
import atexit, os, runpy
def _report():
    with open("/proc/self/status") as f:
        peak = next(line for line in f if line.startswith("VmHWM:")).split()[1]
    with open(os.environ["VM2CORE_TEST_RSS_FILE"], "w") as out:
        out.write(peak)
atexit.register(_report)
runpy.run_module("vm2core", run_name="__main__", alter_sys=True)
"""


def run_cli(*args: str | os.PathLike[str], stdout: int | IO[Any] | None = None, stdin: int | IO[Any] | None = None,
            preexec_fn: Callable[[], None] | None = None, timeout: float = 60.0,
            cwd: Path | None = None, measure_rss: bool = False, env: Mapping[str, str] | None = None) -> CliResult:
    """Run ``vm2core ARGS``; stdout is captured unless a file/descriptor is given; ``env`` adds variables."""
    cmd = cli_command(*args)
    child_env = {**cli_env(), **(env or {})}
    rss_file = None
    if measure_rss:
        fd, rss_file = tempfile.mkstemp(prefix="vm2core-rss-")
        os.close(fd)
        child_env["VM2CORE_TEST_RSS_FILE"] = rss_file
        cmd = [sys.executable, "-c", _RSS_WRAPPER, *cmd[3:]]

    def pre() -> None:
        default_signals()
        if preexec_fn is not None:
            preexec_fn()

    with tempfile.TemporaryFile() as out_capture, tempfile.TemporaryFile() as err_capture:
        proc = subprocess.Popen(cmd, stdout=out_capture if stdout is None else stdout,
                                stderr=err_capture, stdin=subprocess.DEVNULL if stdin is None else stdin,
                                preexec_fn=pre if os.name == "posix" else None, env=child_env, cwd=cwd or REPO)
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        try:
            if os.name == "posix":
                _, status = os.waitpid(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(status)
            else:
                proc.wait()
        finally:
            killer.cancel()
        out_capture.seek(0)
        err_capture.seek(0)
        peak = -1
        if rss_file is not None:
            peak = int(Path(rss_file).read_text() or -1)
            os.unlink(rss_file)
        result = CliResult(cmd, proc.returncode, out_capture.read(),
                           err_capture.read().decode("utf-8", "replace"), peak)
    assert result.returncode != -getattr(signal, "SIGKILL", 9), f"{cmd} did not finish within {timeout} s"
    return result


def assert_one_line_error(result: CliResult, exit_code: int, *fragments: str) -> str:
    """The error contract: exit code, exactly one stderr line "vm2core: ...", no traceback."""
    detail = f"{result.args[3:]}: rc={result.returncode}, stderr={result.stderr!r}"
    assert "Traceback" not in result.stderr, detail
    assert result.returncode == exit_code, detail
    lines = result.stderr_lines
    assert len(lines) == 1, detail
    line = lines[0]
    assert line.startswith("vm2core: "), detail
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} missing: {detail}"
    return line


def leftovers(directory: Path, name: str) -> list[str]:
    """Files in ``directory`` that belong to output ``name``: itself, or anything that looks like a
    temporary beside it (whatever the naming scheme: ``.name.*``, ``name.*``, ``*.part``, ``*tmp*``)."""
    def related(entry: str) -> bool:
        return (entry.startswith((name, f".{name}")) or entry.endswith(".part")
                or "tmp" in entry.lower())
    return sorted(p.name for p in directory.iterdir() if related(p.name))


class TookTooLong(Exception):
    """Raised by the alarm when a single in-process case runs away (a loop on a hostile size)."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def on_alarm(_signum: int, _frame: Any) -> None:
        raise TookTooLong(f"more than {seconds} s")

    if not hasattr(signal, "SIGALRM"):      # Windows: no alarm to interrupt a runaway case; check afterwards
        start = time.monotonic()
        yield
        if time.monotonic() - start > seconds:
            raise TookTooLong(f"more than {seconds} s")
        return
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def interrupt_mid_conversion(cmd: Sequence[str], out: Path, ready: Callable[[], bool], *, settle: float = 0.0,
                             timeout: float = 30.0) -> tuple[int, str]:
    """Run ``cmd``, wait until ``ready()``, freeze the child, check it is mid-conversion (``out`` not yet
    in place), Ctrl-C it; return its exit code and stderr.  POSIX (SIGSTOP/SIGCONT)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=cli_env(),
                            preexec_fn=default_signals)
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert time.monotonic() < deadline, "timed out waiting for the conversion to get under way"
            time.sleep(0.001)
        time.sleep(settle)
        os.kill(proc.pid, signal.SIGSTOP)
        assert not out.exists(), "conversion finished before the interrupt (input too small?)"
        os.kill(proc.pid, signal.SIGINT)
        os.kill(proc.pid, signal.SIGCONT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err.decode()


# --------------------------------------------------------------------------------------------------
# In-process conversion
# --------------------------------------------------------------------------------------------------

class NullSink(Sink):
    """Counts bytes and drops them; ``seekable`` picks the converter's one-pass or two-pass path."""

    def __init__(self, seekable: bool = False) -> None:
        super().__init__()
        self.seekable = seekable

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.position += len(data)

    def write_zeros(self, length: int) -> None:
        self.position += length

    def patch(self, offset: int, data: bytes) -> None:
        assert self.seekable and offset + len(data) <= self.position

    def commit(self) -> None:
        pass

    def abort(self) -> None:
        pass


def convert_in_process(path: Path, *, seekable: bool = False) -> int:
    """Open and convert ``path`` the way the CLI does, into a NullSink; returns the core size."""
    from vm2core.core.convert import convert
    from vm2core.reader.savedstate import SavedState

    with SavedState.open(path) as state:
        sink = NullSink(seekable)
        return convert(state, sink).bytes_written


# --------------------------------------------------------------------------------------------------
# Building inputs
# --------------------------------------------------------------------------------------------------

def small_guest() -> SyntheticGuest:
    """64 MiB Linux guest, KASLR on, negative phys_base: the kernel image just fits."""
    return build_guest(ram_size=64 * MIB, kernel_offset=0x800000, phys_base=-0x800000, n_vcpus=2)


def page_mix(size: int, seed: int) -> bytes:
    """Pages of every kind a record encoder distinguishes: zero, constant, compressible, random."""
    rng = random.Random(seed)
    out = bytearray()
    for i in range(size // PAGE):
        kind = i % 5
        if kind == 0:
            out += bytes(PAGE)
        elif kind == 1:
            out += struct.pack("<Q", rng.getrandbits(64)) * (PAGE // 8)
        elif kind == 2:
            out += ((b"linux kernel text %08d " % i) * (PAGE // 16))[:PAGE]
        else:
            out += rng.randbytes(PAGE)
    assert len(out) == size
    return bytes(out)


def write_tiny_vmrs(path: Path, vps: Sequence[Any], *, policy: Any = "mixed", seed: int = 3,
                    **options: Any) -> None:
    """Two ranges (1 MiB, and 1.5 MiB ending in a partial block), chained object tables of 4 slots."""
    first, second = page_mix(MIB, seed), page_mix(MIB + MIB // 2, seed + 1)
    ranges = [RangeSpec(0, len(first) // PAGE, ram_from_bytes(first)),
              RangeSpec(4 * MIB, len(second) // PAGE, ram_from_bytes(second))]
    opts = WriterOptions(policy=policy, seed=seed, object_table_entries=4, xpress_fraction=0.25, **options)
    write_vmrs(path, ranges, list(vps), opts)


def write_storage(path: Path, keys: Mapping[str, KeyValue | bytes], *, key_table_size: int = 4096,
                  format_version: int = 0x0400) -> None:
    """A minimal HyperVStorage file holding exactly ``keys`` (bytes values become arrays).

    Array values of 2048 bytes or more go to file objects, as Hyper-V stores them.
    Layout: header copies, root object table at 8192, file objects, key tables.
    """
    store = KeyStore(utf16_names=format_version == 0x0100)
    slots = 64
    data_start = ROOT_OBJECT_TABLE_OFFSET + align_up(OBJECT_TABLE_HEADER.size + slots * OBJECT_ENTRY.size)
    objects: list[tuple[int, int, int]] = []
    with open(path, "w+b") as f:
        end = data_start
        for key, value in keys.items():
            if isinstance(value, (bytes, bytearray)):
                if len(value) >= 2048:
                    f.seek(end)
                    f.write(value)
                    objects.append((OBJ_FILE_OBJECT, end, align_up(len(value))))
                    value = file_object_value(len(value), end)
                    end += objects[-1][2]
                else:
                    value = array_value(bytes(value))
            store.put(key, value)
        for table in store.build_tables(key_table_size, 1):
            f.seek(end)
            f.write(table)
            objects.append((OBJ_KEY_TABLE, end, key_table_size))
            end += align_up(len(table))
        assert len(objects) < slots
        entries = [pack_object_entry(t, off, size, OBJ_FLAG_REQUIRED) for t, off, size in objects]
        entries += [pack_object_entry(OBJ_EMPTY, 0, 0, 0)] * (slots - len(entries))
        f.seek(ROOT_OBJECT_TABLE_OFFSET)
        f.write(OBJECT_TABLE_HEADER.pack(OBJECT_TABLE_SIGNATURE, slots) + b"".join(entries))
        header = HeaderFields(format_version, 0, 0, 0, 0)
        f.seek(0)
        f.write(pack_file_header(header, 1))
        f.write(pack_file_header(header, 1))
        f.truncate(max(end, data_start))


# --------------------------------------------------------------------------------------------------
# Session fixtures
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def guest() -> SyntheticGuest:
    return small_guest()


@pytest.fixture(scope="session")
def guest_vmrs(tmp_path_factory: pytest.TempPathFactory, guest: SyntheticGuest) -> Path:
    """The 64 MiB guest as a .vmrs mixing raw blocks and every record kind."""
    path = tmp_path_factory.mktemp("guest") / "guest.vmrs"
    write_vmrs(path, guest.range_specs(), guest.vps, WriterOptions(policy="mixed", xpress_fraction=0.05))
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class CoreFile:
    """A reference core on disk (kept out of the test process's memory)."""

    path: Path
    sha256: str
    size: int


@pytest.fixture(scope="session")
def guest_core(tmp_path_factory: pytest.TempPathFactory, guest_vmrs: Path, guest: SyntheticGuest) -> CoreFile:
    """The core the CLI writes for ``guest_vmrs`` to a regular file (the reference for other outputs)."""
    out = tmp_path_factory.mktemp("reference") / "guest.core"
    result = run_cli(guest_vmrs, out, "-q")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert guest.truth.note in out.read_bytes(), "reference core lacks the guest's VMCOREINFO note"
    return CoreFile(out, file_sha256(out), out.stat().st_size)


@pytest.fixture(scope="session")
def tiny_vmrs(tmp_path_factory: pytest.TempPathFactory, guest: SyntheticGuest) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny.vmrs"
    write_tiny_vmrs(path, guest.vps)
    return path


@pytest.fixture()
def workdir(tmp_path: Path) -> Iterator[Path]:
    """An empty output directory; the test fails if a temporary ``.*.part`` file is left in it."""
    yield tmp_path
    parts = [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")]
    assert not parts, f"temporary files left behind: {parts}"
