"""Faults while writing that test_cli_hygiene does not reach: a real full filesystem (ENOSPC from a small
tmpfs, not the EFBIG of a file-size limit), and an input that grows while it is converted.

Exit codes as documented (README "Exit codes"): 1 the core could not be written; 0 for a growing input, whose
added bytes lie outside every structure the conversion planned from (the core is the same as without them).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    MIB,
    assert_one_line_error,
    cli_command,
    cli_env,
    default_signals,
    file_sha256,
    leftovers,
    run_cli,
)
from tests.test_cli_hygiene import big_vmrs  # noqa: F401 - shared module fixture: 256 MiB of raw, non-zero RAM

EXIT_OK, EXIT_OUTPUT = 0, 1


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs (needs root and mount; the suite runs as root in CI)."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mountpoint)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False)


@pytest.fixture(scope="module")
def big_core(big_vmrs: Path, tmp_path_factory: pytest.TempPathFactory) -> str:  # noqa: F811
    """SHA-256 of the core of big_vmrs, converted undisturbed."""
    out = tmp_path_factory.mktemp("bigcore") / "big.core"
    assert run_cli(big_vmrs, out, "-q").returncode == 0
    digest = file_sha256(out)
    out.unlink()
    return digest


@pytest.mark.parametrize("options", [[], ["--sha256"], ["--exclude-zero"]], ids=lambda o: " ".join(o) or "plain")
def test_full_filesystem_leaves_nothing(big_vmrs: Path, small_fs: Path, options: list[str]) -> None:  # noqa: F811
    """ENOSPC after 8 MiB of a 256 MiB core: exit 1, one line naming the output, the filesystem empty again."""
    out = small_fs / "out.core"
    result = run_cli(big_vmrs, out, *options)
    line = assert_one_line_error(result, EXIT_OUTPUT, "out.core")
    assert "No space left on device" in line, line
    assert list(small_fs.iterdir()) == []                 # no core, no temporary, no .sha256


def test_full_filesystem_keeps_the_old_core(big_vmrs: Path, small_fs: Path) -> None:  # noqa: F811
    """-f onto a full filesystem: the previous file under the final name stays as it was."""
    out = small_fs / "out.core"
    out.write_bytes(b"previous core")
    result = run_cli(big_vmrs, out, "-f")
    assert_one_line_error(result, EXIT_OUTPUT, "out.core")
    assert out.read_bytes() == b"previous core"
    assert [p.name for p in small_fs.iterdir()] == ["out.core"]


def _wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():     # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def _drain_to(stream: object, path: Path) -> None:
    with path.open("wb") as f:
        shutil.copyfileobj(stream, f)     # type: ignore[arg-type]


@pytest.mark.parametrize("output", ["file", "pipe"])
def test_input_growing_during_conversion(big_vmrs: Path, big_core: str, tmp_path: Path,  # noqa: F811
                                         output: str) -> None:
    """Another process appends 64 MiB to the .vmrs mid-conversion: the core is unchanged, exit 0."""
    victim = tmp_path / "growing.vmrs"
    shutil.copyfile(big_vmrs, victim)
    out = tmp_path / "out.core"
    piped = tmp_path / "piped.core"
    proc = subprocess.Popen(cli_command(victim, out if output == "file" else "-", "-q"),
                            stdout=subprocess.DEVNULL if output == "file" else subprocess.PIPE,
                            stderr=subprocess.PIPE, env=cli_env(), preexec_fn=default_signals)
    drain = None
    try:
        if output == "file":
            _wait_for(lambda: bool(leftovers(tmp_path, out.name)) or proc.poll() is not None, 30, "the output")
        else:
            assert proc.stdout is not None and proc.stdout.read(MIB), "no output"
        os.kill(proc.pid, signal.SIGSTOP)
        assert proc.poll() is None and not out.exists(), "conversion finished too early"
        with victim.open("ab") as f:
            f.write(os.urandom(MIB) * 64)
        os.kill(proc.pid, signal.SIGCONT)
        if proc.stdout is not None:
            # The first MiB was read above: keep it out of the comparison by reading the rest to a file.
            drain = threading.Thread(target=_drain_to, args=(proc.stdout, piped), daemon=True)
            drain.start()
        assert proc.stderr is not None
        err = proc.stderr.read().decode()
        proc.wait(timeout=120)
        if drain is not None:
            drain.join(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in err, err
    assert proc.returncode == EXIT_OK, err
    if output == "file":
        assert file_sha256(out) == big_core
    else:
        # Same bytes after the first MiB: compare against the reference, skipping what was read already.
        reference = tmp_path / "ref.core"
        assert run_cli(big_vmrs, reference, "-q").returncode == 0
        with reference.open("rb") as ref, piped.open("rb") as got:
            ref.seek(MIB)
            while True:
                a, b = ref.read(MIB), got.read(MIB)
                assert a == b, "the piped core differs from the undisturbed one"
                if not a:
                    break
