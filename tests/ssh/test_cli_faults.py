"""The CLI's --ssh upload when things break on the way: the connection dropped mid-upload (its sshd
processes killed), Ctrl-C mid-upload. Each ends with the documented exit code and one line, leaves nothing
locally, and never leaves a file under the final remote name.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import small_guest
from tests.ssh.conftest import ClientHome, SshServer
from tests.vmrs_writer import RangeSpec, WriterOptions, write_vmrs

MIB = 1 << 20
EXIT_OUTPUT, EXIT_INTERRUPTED = 1, 130


@pytest.fixture(scope="module")
def busy_vmrs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """512 MiB of raw, non-zero RAM (no holes to skip): an upload that lasts a while even over loopback."""
    pattern = bytes(range(256)) * (MIB // 256)

    def read(offset: int, length: int) -> bytes:
        return pattern * (length // MIB) + pattern[:length % MIB]

    guest = small_guest()
    path = tmp_path_factory.mktemp("busy") / "busy.vmrs"
    write_vmrs(path, [RangeSpec(0, 512 * MIB // 4096, read)], guest.vps, WriterOptions(policy="raw-blocks"))
    return path


def _start(home: ClientHome, workdir: Path, *args: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, HOME=str(home.home))
    env.pop("SSH_AUTH_SOCK", None)
    env.pop("VM2CORE_DEBUG", None)
    return subprocess.Popen([sys.executable, "-m", "vm2core", *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=workdir,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _partials(remote_dir: Path, name: str) -> list[Path]:
    """The upload's partial files: ``NAME.<hex>.partial`` (a unique name per upload)."""
    return [p for p in remote_dir.iterdir() if re.fullmatch(re.escape(name) + r"\.[0-9a-f]+\.partial", p.name)]


def _wait_for_partial(remote_dir: Path, name: str, proc: subprocess.Popen[bytes], size: int) -> Path:
    deadline = time.monotonic() + 60
    while True:
        found = [p for p in _partials(remote_dir, name) if p.stat().st_size >= size]
        if found:
            return found[0]
        assert proc.poll() is None, "vm2core ended before the upload was under way"
        assert time.monotonic() < deadline, "the upload never got under way"
        time.sleep(0.002)


def _finish(proc: subprocess.Popen[bytes]) -> str:
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return err.decode()


def test_connection_killed_mid_upload(sshd: SshServer, client_home: ClientHome, remote_dir: Path,
                                      tmp_path: Path, busy_vmrs: Path) -> None:
    target = remote_dir / "x.core"
    local = tmp_path / "cwd"
    local.mkdir()
    proc = _start(client_home, local, str(busy_vmrs), "--ssh", f"testbox:{target}")
    partial = _wait_for_partial(remote_dir, "x.core", proc, 8 * MIB)
    pids = sshd.connection_pids()
    assert pids, "the connection's sshd processes should be visible"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    err = _finish(proc)
    assert "Traceback" not in err, err
    assert proc.returncode == EXIT_OUTPUT, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vm2core: "), err
    assert partial.name in lines[0], err              # the user is told which remote partial file remains
    assert not target.exists()                         # never a file under the final name
    assert list(local.iterdir()) == []                 # nothing staged locally
    # With the server gone, nobody can remove the partial file; it never took the final name.
    assert [p.name for p in remote_dir.iterdir()] in ([], [partial.name])


def test_ctrl_c_mid_upload(sshd: SshServer, client_home: ClientHome, remote_dir: Path, tmp_path: Path,
                           busy_vmrs: Path) -> None:
    target = remote_dir / "x.core"
    local = tmp_path / "cwd"
    local.mkdir()
    proc = _start(client_home, local, str(busy_vmrs), "--ssh", f"testbox:{target}")
    _wait_for_partial(remote_dir, "x.core", proc, 8 * MIB)
    os.kill(proc.pid, signal.SIGINT)
    err = _finish(proc)
    assert "Traceback" not in err, err
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert err.splitlines()[-1] == "vm2core: interrupted", err
    assert list(remote_dir.iterdir()) == []            # the connection was alive: the partial is removed
    assert list(local.iterdir()) == []
