"""`vm2core info --no-scan` reads no guest memory: metadata only, whatever the guest size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_reader import two_ranges
from tests.vmrs_writer import WriterOptions, write_vmrs
from tests.vmrs_writer.samples import sample_vps
from vm2core.info import describe
from vm2core.reader.savedstate import SavedState


@pytest.fixture(scope="module")
def vmrs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    specs, _truth = two_ranges()
    path = tmp_path_factory.mktemp("noscan") / "x.vmrs"
    write_vmrs(path, specs, sample_vps(2), WriterOptions(policy="mixed"))
    return path


def test_no_scan_reads_no_ram_data(vmrs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("guest memory was read")

    for name in ("read_block_bytes", "decode_block", "read_physical"):
        monkeypatch.setattr(SavedState, name, forbidden)
    with SavedState.open(vmrs) as state:
        report = describe(state, scan=False)
    assert report["zero_pages"] is None and "guest_kernel" not in report
    assert report["blocks"]["raw"] + report["blocks"]["records"] + report["blocks"]["missing"] > 0
    assert report["stored_bytes"] > 0


def test_no_scan_cli(vmrs: Path) -> None:
    text = subprocess.run([sys.executable, "-m", "vm2core", "info", "--no-scan", str(vmrs)],
                          capture_output=True, text=True)
    assert text.returncode == 0, text.stderr
    assert "zero pages:        not counted" in text.stdout
    full = subprocess.run([sys.executable, "-m", "vm2core", "info", "--json", str(vmrs)],
                          capture_output=True, text=True)
    fast = subprocess.run([sys.executable, "-m", "vm2core", "info", "--json", "--no-scan", str(vmrs)],
                          capture_output=True, text=True)
    a, b = json.loads(full.stdout), json.loads(fast.stdout)
    assert (a["stored_bytes"], a["blocks"]) == (b["stored_bytes"], b["blocks"])
    assert isinstance(a["zero_pages"], int) and b["zero_pages"] is None
