"""Pre-2016 key layout (VM version <= 5.0): read natively where its structures are known, reported where not."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import assert_one_line_error, run_cli, write_storage
from tests.dll_provider import build_library, write_fixture
from tests.fixtures.synthetic_guest import SyntheticGuest, build_guest
from tests.vmrs_writer import WriterOptions, write_vmrs
from tests.vmrs_writer.partition_state import build_partition_state
from tests.vmrs_writer.ramdesc import pack_ram_memory_block

MIB = 1 << 20
GIB = 1 << 30


@pytest.fixture(scope="module")
def old_guest() -> SyntheticGuest:
    return build_guest(ranges=[(0, 64 * MIB), (4 * GIB, 2 * MIB + 8192)], kernel_offset=0x800000,
                       phys_base=-0x800000, n_vcpus=2)


def write(path: Path, guest: SyntheticGuest, **options: object) -> Path:
    write_vmrs(path, guest.range_specs(), guest.vps, WriterOptions(policy="mixed", xpress_fraction=0.05,
                                                                   **options))  # type: ignore[arg-type]
    return path


def test_pre_2016_layout_converts_like_the_current_one(tmp_path: Path, old_guest: SyntheticGuest) -> None:
    old = write(tmp_path / "old.vmrs", old_guest, key_layout="pre-2016", vm_version=0x0500)
    new = write(tmp_path / "new.vmrs", old_guest)
    keys = run_cli("inspect", old).stdout.decode()
    assert "/savedVM/partition_state" in keys and "/RamMemoryBlock/0" in keys and "/RamBlock/0" in keys
    assert "/savedstate/RamBlock" not in keys
    for name, src in (("old.core", old), ("new.core", new)):
        r = run_cli(src, tmp_path / name, "--backend", "native", "-q")
        assert r.returncode == 0, r.stderr
    core = (tmp_path / "old.core").read_bytes()
    assert core == (tmp_path / "new.core").read_bytes()
    assert old_guest.truth.note in core
    info = run_cli("info", old, "--no-scan")
    assert info.returncode == 0, info.stderr
    assert "VM version:        5.0" in info.stdout.decode()


def test_unknown_metadata_size_is_reported_not_guessed(tmp_path: Path, old_guest: SyntheticGuest) -> None:
    old = write(tmp_path / "old40.vmrs", old_guest, key_layout="pre-2016", vm_version=0x0400, memory_block_size=40)
    r = run_cli(old, tmp_path / "x.core")
    assert_one_line_error(r, 2, "old40.vmrs", "pre-2016", "/RamMemoryBlock/0", "holds 40 bytes", "expected 48",
                          "--backend dll")


def test_unknown_metadata_size_goes_to_the_dll_in_auto(tmp_path: Path, old_guest: SyntheticGuest) -> None:
    old = write(tmp_path / "old40.vmrs", old_guest, key_layout="pre-2016", vm_version=0x0400, memory_block_size=40)
    write_fixture(Path(f"{old}.fixture"), Path(f"{old}.mem"), old_guest.ram.ranges, old_guest.ram.read,
                  old_guest.vps)
    new = write(tmp_path / "new.vmrs", old_guest)
    assert run_cli(new, tmp_path / "new.core", "-q").returncode == 0
    r = run_cli(old, tmp_path / "old.core", "--dll", build_library(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "holds 40 bytes" in r.stderr and "retrying through" in r.stderr
    assert (tmp_path / "old.core").read_bytes() == (tmp_path / "new.core").read_bytes()


def test_vsv_without_ram_is_reported(tmp_path: Path, old_guest: SyntheticGuest) -> None:
    """A legacy .vsv keeps RAM in its .bin: registers and metadata are there, RamBlocks are not."""
    path = tmp_path / "GUEST.vsv"
    write_storage(path, {"/savedstate/VmVersion": build_int(0x0500),
                         "/savedVM/partition_state": build_partition_state(old_guest.vps),
                         "/RamMemoryBlock/0": pack_ram_memory_block(flags=0, page_count=256, mbp_index_start=0,
                                                                    gpa_page_start=0, numa_node=0)})
    r = run_cli(path, tmp_path / "x.core")
    assert_one_line_error(r, 2, "GUEST.vsv", "pre-2016", "/RamBlock/N", "not in this file", "--backend dll")


def test_partition_state_of_another_shape_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "odd.vmrs"
    write_storage(path, {"/savedVM/partition_state": b"\x10" * 64,
                         "/RamMemoryBlock/0": pack_ram_memory_block(flags=0, page_count=256, mbp_index_start=0,
                                                                    gpa_page_start=0, numa_node=0),
                         "/RamBlock/0": bytes(MIB)})
    r = run_cli(path, tmp_path / "x.core")
    assert_one_line_error(r, 2, "odd.vmrs", "pre-2016", "/savedVM/partition_state",
                          "not the partition-state chunk stream", "--backend dll")


def build_int(value: int) -> object:
    from tests.vmrs_writer.keystore import int_value

    return int_value(value)
