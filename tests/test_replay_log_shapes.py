"""Files shaped as Hyper-V itself writes them: a replay-log region that runs past the end of the file.

Issue 7: a host's data.vmcx and a running VM's .vmrs name a log region past EOF (0x4000 bytes at 0x8000 in
a 0xB024-byte file; 0x5000 bytes at 0x9000 in a 0xC05E-byte file) around a present log header with 0
entries. Such files must open in ``inspect``, ``info`` and ``convert``; a log whose header is missing
counts as empty and ``inspect --json`` says so.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.vmrs_writer import WriterOptions, write_hvs, write_vmrs
from tests.vmrs_writer.keystore import KeyValue, int_value, string_value
from tests.vmrs_writer.samples import sample_ranges, sample_vps
from vm2core.reader.container import HyperVStorage

# The two shapes seen in real files (issue 7): (log offset, region size, file size).
SHAPES = {"data.vmcx": (0x8000, 0x4000, 0xB024), "runtime.vmrs": (0x9000, 0x5000, 0xC05E)}
FILE_HEADER = struct.Struct("<IIHIIIIQQI")   # vmrs-format.md §1: replay log offset and size at 26 and 34


def shaped(offset: int, region: int, file_size: int) -> WriterOptions:
    return WriterOptions(replay_log_offset=offset, replay_log_region_size=region,
                         replay_log_bytes_in_file=file_size - offset)


def config_keys() -> dict[str, KeyValue | bytes]:
    return {"/configuration/properties/version": int_value(0x900),
            "/configuration/properties/name": string_value("shape test")}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_writer_reproduces_the_shape(tmp_path: Path, name: str) -> None:
    offset, region, size = SHAPES[name]
    path = tmp_path / name
    write_hvs(path, config_keys(), shaped(offset, region, size))
    data = path.read_bytes()
    assert len(data) == size
    for copy in (0, 4096):
        fields = FILE_HEADER.unpack_from(data, copy)
        assert fields[7:9] == (offset, region)
    signature, _crc, count = struct.unpack_from("<III", data, offset)
    assert (signature, count) == (0x01110003, 0)
    assert offset + region > size


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_region_past_end_of_file_opens(tmp_path: Path, name: str) -> None:
    offset, region, size = SHAPES[name]
    path = tmp_path / name
    write_hvs(path, config_keys(), shaped(offset, region, size))
    with HyperVStorage.open(path) as c:
        assert c.read_string("/configuration/properties/name") == "shape test"
        log = c.replay_log
        assert log is not None and (log.offset, log.size) == (offset, region)
        assert log.header_present and log.signature_ok and log.crc_ok and log.entry_count == 0
        assert log.region_past_eof and not log.dirty
    result = run_cli("inspect", path)
    assert result.returncode == 0, result.stderr
    assert b"/configuration/properties/name" in result.stdout and b"replay log: clean" in result.stdout
    result = run_cli("inspect", "--json", path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["replay_log"]["region_past_end_of_file"] is True
    assert report["replay_log"]["header_present"] is True and report["replay_log"]["entries"] == 0
    assert report["dirty_replay_log"] is False


@pytest.mark.parametrize("bytes_in_file", [0, 20])
def test_log_header_missing_past_eof_counts_as_empty(tmp_path: Path, bytes_in_file: int) -> None:
    path = tmp_path / "nolog.vmrs"
    write_hvs(path, config_keys(), WriterOptions(replay_log_offset=0x8000, replay_log_region_size=0x4000,
                                                 replay_log_bytes_in_file=bytes_in_file))
    assert path.stat().st_size == 0x8000 + bytes_in_file
    result = run_cli("inspect", "--json", path)
    assert result.returncode == 0, result.stderr
    log = json.loads(result.stdout)["replay_log"]
    assert log["header_present"] is False and log["entries"] == 0
    assert "absent" in log["state"] and "empty" in log["state"]


def test_saved_state_with_hyperv_log_shape_converts(tmp_path: Path) -> None:
    """A saved state whose log region runs past EOF: info and convert work as for any other file."""
    path = tmp_path / "saved.vmrs"
    write_vmrs(path, sample_ranges(2), sample_vps(1), WriterOptions(
        replay_log_region_size=0x5000, replay_log_bytes_in_file=0x105E))
    with HyperVStorage.open(path) as c:
        assert c.replay_log is not None and c.replay_log.region_past_eof and c.replay_log.header_present
    info = run_cli("info", "--json", "--no-scan", path)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["dirty_replay_log"] is False
    out = tmp_path / "saved.core"
    result = run_cli(path, out, "-q")
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:4] == b"\x7fELF"


def test_pending_entries_must_fit_the_region(tmp_path: Path) -> None:
    path = tmp_path / "small-region.vmcx"
    write_hvs(path, config_keys(), WriterOptions(dirty_replay_log=True, replay_log_region_size=40,
                                                 replay_log_bytes_in_file=0x2000))
    result = run_cli("inspect", path)
    assert result.returncode == 2 and "1 pending entries do not fit the 40-byte log region" in result.stderr


def test_dirty_log_with_region_past_eof_is_reported(tmp_path: Path) -> None:
    """Entries inside the file, region past it: opens, and the log is dirty."""
    path = tmp_path / "dirty.vmcx"
    write_hvs(path, config_keys(), WriterOptions(dirty_replay_log=True, replay_log_region_size=0x8000))
    report = json.loads(run_cli("inspect", "--json", path).stdout)
    assert report["dirty_replay_log"] is True
    assert report["replay_log"]["entries"] == 1 and report["replay_log"]["state"] == "dirty"
    assert report["replay_log"]["region_past_end_of_file"] is True


def test_log_header_crc_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "crc.vmcx"
    write_hvs(path, config_keys(), shaped(0x8000, 0x4000, 0xB024))
    data = bytearray(path.read_bytes())
    data[0x8000 + 20] ^= 0xFF                 # a byte the reader does not otherwise use
    path.write_bytes(bytes(data))
    log = json.loads(run_cli("inspect", "--json", path).stdout)["replay_log"]
    assert log["header_crc_ok"] is False and log["state"] == "clean"
