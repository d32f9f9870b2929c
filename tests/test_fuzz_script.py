"""scripts/fuzz: its targets run on real inputs (reproduce mode), and a short atheris run works."""

from __future__ import annotations

import importlib.util
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, cli_env

SCRIPT = REPO / "scripts" / "fuzz"


def _fuzz(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=cli_env(), cwd=REPO)


@pytest.mark.parametrize("target", ["container", "savedstate", "partition-state", "ramblock"])
def test_targets_accept_their_inputs(tiny_vmrs: Path, tmp_path: Path, target: str) -> None:
    if target in ("container", "savedstate"):
        sample = tiny_vmrs
    else:
        sample = tmp_path / "input.bin"
        if target == "ramblock":      # vmrs-format.md §4: 256 pages of one fill record, then the end tag
            sample.write_bytes(struct.pack("<IQI", 0xFFFFFFFD, 0, 256) + struct.pack("<I", 0xFFFFFFFF))
        else:
            sample.write_bytes(b"\0" * 40)      # a too-short chunk stream: a FormatError, not a find
    result = _fuzz("--target", target, "--reproduce", str(sample), "--crashes", str(tmp_path / "crashes"))
    assert result.returncode == 0 and "no crash" in result.stderr, result.stderr


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None,
                    reason="atheris not installed (pip install -e '.[fuzz]')")
def test_short_atheris_run(tmp_path: Path) -> None:
    crashes = tmp_path / "crashes"
    result = _fuzz("--target", "partition-state", "--time", "5", "--crashes", str(crashes))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "stat::number_of_executed_units" in result.stderr
    assert list(crashes.iterdir()) == []
