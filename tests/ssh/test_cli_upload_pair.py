"""A legacy .vsv + .bin pair uploaded with --ssh (through the DLL test double): the plain core arrives."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import write_storage
from tests.dll_provider import build_library, write_fixture
from tests.fixtures.synthetic_guest import build_guest
from tests.ssh.conftest import ClientHome
from tests.ssh.test_cli_upload import vm2core

MIB = 1 << 20


def test_pair_upload_is_the_plain_core(client_home: ClientHome, remote_dir: Path, tmp_path: Path) -> None:
    lib = build_library(tmp_path)
    guest = build_guest(ram_size=64 * MIB, kernel_offset=0x800000, phys_base=-0x800000)
    vsv, bin_ = tmp_path / "g.vsv", tmp_path / "g.bin"
    write_storage(vsv, {"/savedVM/partition_state": bytes(64)})
    write_fixture(Path(f"{vsv}.fixture"), bin_, guest.ram.ranges, guest.ram.read, guest.vps)
    local = tmp_path / "local.core"
    subprocess.run([sys.executable, "-m", "vm2core", "-q", str(vsv), str(bin_), str(local), "--dll", str(lib)],
                   check=True)
    target = remote_dir / "pair.core"
    r = vm2core(client_home, str(bin_), str(vsv), "--ssh", f"testbox:{target}", "--dll", str(lib), "--verify")
    assert r.returncode == 0, r.stderr
    assert target.read_bytes() == local.read_bytes()
    assert guest.truth.note in local.read_bytes()
