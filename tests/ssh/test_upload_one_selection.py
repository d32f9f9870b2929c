"""The --ssh output embeds the same VMCOREINFO note as the file output when several notes validate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.ssh.conftest import ClientHome
from tests.ssh.test_cli_upload import vm2core
from tests.test_one_selection import multi_kernel_guest
from tests.vmrs_writer import WriterOptions, write_vmrs


@pytest.mark.parametrize("scenario", ["aligned-wins", "full-scan"])
def test_upload_is_the_file_core(client_home: ClientHome, remote_dir: Path, tmp_path: Path, scenario: str) -> None:
    g, expected = multi_kernel_guest(scenario)
    vmrs = tmp_path / "multi.vmrs"
    write_vmrs(vmrs, g.range_specs(), g.vps, WriterOptions(policy="mixed", seed=3, xpress_fraction=0.2))
    local = tmp_path / "multi.core"
    subprocess.run([sys.executable, "-m", "vm2core", "-q", str(vmrs), str(local)], check=True)
    core = local.read_bytes()
    assert expected in core                     # the note the rule chooses, byte for byte

    target = remote_dir / "multi.core"
    r = vm2core(client_home, str(vmrs), "--ssh", f"testbox:{target}")
    assert r.returncode == 0, r.stderr
    assert target.read_bytes() == core
