"""--format kdump over --ssh: the file form through positional SFTP writes, the flattened form with --verify."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.synthetic_guest import build_guest
from tests.ssh.conftest import ClientHome
from tests.ssh.test_cli_upload import vm2core
from tests.test_kdump import unflatten
from tests.vmrs_writer import WriterOptions, write_vmrs

MIB = 1 << 20


@pytest.fixture(scope="module")
def vmrs_and_kdump(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """A 256 MiB guest (more descriptors than one table write) and its local kdump file."""
    d = tmp_path_factory.mktemp("kdupload")
    guest = build_guest(ram_size=256 * MIB)
    vmrs = d / "guest.vmrs"
    write_vmrs(vmrs, guest.range_specs(), guest.vps, WriterOptions(policy="mixed", xpress_fraction=0.05))
    local = d / "guest.kdump"
    subprocess.run([sys.executable, "-m", "vm2core", "-q", str(vmrs), str(local)], check=True)
    return vmrs, local.read_bytes()


def test_upload_is_the_file_form(client_home: ClientHome, remote_dir: Path,
                                 vmrs_and_kdump: tuple[Path, bytes]) -> None:
    vmrs, kdump = vmrs_and_kdump
    target = remote_dir / "x.kdump"
    r = vm2core(client_home, str(vmrs), "--ssh", f"testbox:{target}")
    assert r.returncode == 0, r.stderr
    assert target.read_bytes() == kdump
    assert not (remote_dir / "x.kdump.partial").exists()
    assert f"crash VMLINUX {target}" in r.stderr and "zstd -d" not in r.stderr


def test_verified_upload_is_the_flattened_form(client_home: ClientHome, remote_dir: Path,
                                               vmrs_and_kdump: tuple[Path, bytes]) -> None:
    vmrs, kdump = vmrs_and_kdump
    target = remote_dir / "x.kdump"
    r = vm2core(client_home, str(vmrs), "--ssh", f"testbox:{target}", "--verify", "--compress", "zlib")
    assert r.returncode == 0, r.stderr
    assert "remote SHA-256 matches" in r.stderr and "flattened" in r.stderr
    assert unflatten(target.read_bytes()) == kdump
