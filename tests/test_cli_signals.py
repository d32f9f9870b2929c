"""SIGTERM and SIGHUP clean up like Ctrl-C (README exit codes: 128 + the signal number), through
the real CLI; a signal ignored at start (nohup) stays ignored.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import MIB, PAGE, cli_command, cli_env, default_signals, leftovers
from tests.fixtures.synthetic_guest import SyntheticGuest
from tests.vmrs_writer import RangeSpec, WriterOptions, write_vmrs

pytestmark = pytest.mark.posix      # SIGSTOP/SIGHUP; Windows has SIGBREAK instead, not sent by tests


@pytest.fixture(scope="module")
def long_vmrs(tmp_path_factory: pytest.TempPathFactory, guest: SyntheticGuest) -> Path:
    """256 MiB of raw, non-zero 1 MiB blocks: a conversion that runs long enough to be signalled."""
    pattern = bytes(range(256)) * (MIB // 256)

    def read(offset: int, length: int) -> bytes:
        start = offset % MIB
        return (pattern[start:] + pattern[:start]) * (length // MIB) + (pattern[start:] + pattern)[:length % MIB]

    path = tmp_path_factory.mktemp("long") / "long.vmrs"
    write_vmrs(path, [RangeSpec(0, 256 * MIB // PAGE, read)], guest.vps, WriterOptions(policy="raw-blocks"))
    return path


def _signal_mid_conversion(vmrs: Path, workdir: Path, signum: int, options: list[str],
                           preexec: object = default_signals) -> tuple[int, str]:
    out = workdir / "long.core"
    proc = subprocess.Popen(cli_command(vmrs, out, *options), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=cli_env(), preexec_fn=preexec)  # type: ignore[arg-type]
    try:
        deadline = time.monotonic() + 30
        while not leftovers(workdir, out.name):
            assert proc.poll() is None and time.monotonic() < deadline, "no temporary output appeared"
            time.sleep(0.001)
        time.sleep(0.05)
        proc.send_signal(signal.SIGSTOP)         # freeze, check it is mid-conversion, then signal it
        assert not out.exists(), "conversion finished before the signal (input too small?)"
        proc.send_signal(signum)
        proc.send_signal(signal.SIGCONT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err.decode()


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
@pytest.mark.parametrize("options", [[], ["--zstd=1", "--sha256"]], ids=" ".join)
def test_termination_signal_removes_the_partial_output(long_vmrs: Path, workdir: Path, name: str,
                                                       options: list[str]) -> None:
    signum = getattr(signal, name)
    returncode, err = _signal_mid_conversion(long_vmrs, workdir, signum, options)
    assert "Traceback" not in err, err
    assert returncode == 128 + signum, err
    assert err.splitlines() == [f"vm2core: terminated ({name})"], err
    assert leftovers(workdir, "long.core") == []


def test_ignored_sigterm_stays_ignored(long_vmrs: Path, workdir: Path) -> None:
    """Started with SIGTERM ignored (like nohup does for SIGHUP): vm2core must not start catching it."""
    def ignore_term() -> None:
        default_signals()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    returncode, err = _signal_mid_conversion(long_vmrs, workdir, signal.SIGTERM, ["-q"], preexec=ignore_term)
    assert returncode == 0 and err == "", err
    assert leftovers(workdir, "long.core") == ["long.core"]
