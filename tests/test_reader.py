"""The reader against files from the independent test writer, in every format variant it knows."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.vmrs_writer import RangeSpec, WriterOptions, ram_from_bytes, write_vmrs
from vm2core.errors import FormatError, UnsupportedError
from vm2core.reader.container import HyperVStorage
from vm2core.reader.cpu import Segment, TableRegister, VpState
from vm2core.reader.memory import NotInMemory
from vm2core.reader.savedstate import SavedState

PAGE = 4096
MIB = 1 << 20


def guest_pages(n_pages: int, seed: int) -> bytes:
    """RAM with the page kinds a real guest has: zeros, constant fills, text, random."""
    rnd = random.Random(seed)
    out = bytearray()
    for i in range(n_pages):
        k = rnd.random()
        if k < 0.45:
            out += bytes(PAGE)
        elif k < 0.55:
            out += (rnd.getrandbits(64).to_bytes(8, "little")) * (PAGE // 8)
        elif k < 0.85:
            line = f"page {i} of a guest: the quick brown fox {rnd.random()}\n".encode()
            out += (line * (PAGE // len(line) + 1))[:PAGE]
        else:
            out += rnd.randbytes(PAGE)
    return bytes(out)


def make_vp(index: int, vtl: int = 0) -> VpState:
    rnd = random.Random(index * 10 + vtl)
    names = ["rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13",
             "r14", "r15", "rip", "rflags"]
    return VpState(
        index=index, vtl=vtl,
        gp={n: rnd.getrandbits(64) for n in names},
        control={"cr0": 0x80050033, "cr2": rnd.getrandbits(48), "cr3": 0x1000 * (index + 1) + vtl,
                 "cr4": 0x3506F0, "cr8": 0, "efer": 0xD01},
        debug={"dr0": 0, "dr1": 0, "dr2": 0, "dr3": 0, "dr6": 0xFFFF0FF0, "dr7": 0x400},
        segments={name: Segment(rnd.getrandbits(48), 0xFFFFFFFF, 0x10 + i * 8, 0xA09B)
                  for i, name in enumerate(["es", "cs", "ss", "ds", "fs", "gs", "ldtr", "tr"])},
        idtr=TableRegister(0xFFFFFE0000000000 + index * 0x1000, 0xFFF),
        gdtr=TableRegister(0xFFFFFE0000001000 + index * 0x1000, 0x7F),
    )


def two_ranges(seed: int = 0) -> tuple[list[RangeSpec], list[tuple[int, bytes]]]:
    """Two ranges around an MMIO hole; neither is a whole number of MiB."""
    low = guest_pages(3 * 256 + 17, seed)
    high = guest_pages(2 * 256 + 101, seed + 1)
    specs = [RangeSpec(0, len(low) // PAGE, ram_from_bytes(low)),
             RangeSpec(0x1_0000_0000, len(high) // PAGE, ram_from_bytes(high))]
    return specs, [(0, low), (0x1_0000_0000, high)]


def check_memory(state: SavedState, truth: list[tuple[int, bytes]]) -> None:
    assert [(r.gpa_start, r.size) for r in state.ranges] == [(g, len(d)) for g, d in truth]
    for gpa, data in truth:
        assert state.read_physical(gpa, len(data)) == data


def check_vps(state: SavedState, vps: list[VpState]) -> None:
    want = sorted((v for v in vps if v.vtl == 0), key=lambda v: v.index)
    got = state.vps
    assert [v.index for v in got] == [v.index for v in want]
    for g, w in zip(got, want, strict=True):
        assert g.vtl == 0
        assert g.gp == w.gp
        assert g.control == w.control
        assert g.debug == w.debug
        assert g.segments == w.segments
        assert g.idtr == w.idtr and g.gdtr == w.gdtr


@pytest.mark.parametrize("policy", ["raw-blocks", "records", "mixed"])
def test_block_encodings(tmp_path: Path, policy: str) -> None:
    specs, truth = two_ranges()
    vps = [make_vp(0), make_vp(1)]
    path = tmp_path / "g.vmrs"
    write_vmrs(path, specs, vps, WriterOptions(policy=policy, seed=3))  # type: ignore[arg-type]
    with SavedState.open(path) as state:
        check_memory(state, truth)
        check_vps(state, vps)
        with pytest.raises(NotInMemory):
            state.read_physical(0x8000_0000, 16)


@pytest.mark.parametrize("options", [
    WriterOptions(flag_style="keytables-only"),
    WriterOptions(object_table_entries=4),                     # chained object tables
    WriterOptions(duplicate_stale_keytable=True),
    WriterOptions(corrupt_first_header=True),
    WriterOptions(newer_second_header=True),
    WriterOptions(partition_state_inline=True),
    WriterOptions(extra_unknown_chunks=True, vp_indices_style="openvmm"),
    WriterOptions(format_version=0x0300),
    WriterOptions(format_version=0x0301),
    WriterOptions(format_version=0x0200),
    WriterOptions(format_version=0x0100),                      # UTF-16 key names
    WriterOptions(saved_state_type=None),
    WriterOptions(vendor=0),
], ids=lambda o: ",".join(f"{k}={v}" for k, v in vars(o).items() if v != getattr(WriterOptions(), k)))
def test_container_variants(tmp_path: Path, options: WriterOptions) -> None:
    specs, truth = two_ranges(seed=5)
    vps = [make_vp(i) for i in range(3)]
    path = tmp_path / "v.vmrs"
    write_vmrs(path, specs, vps, options)
    with SavedState.open(path) as state:
        check_memory(state, truth)
        check_vps(state, vps)
        assert state.saved_state_type == options.saved_state_type
        assert state.dirty is False
        if options.object_table_entries == 4:
            assert len(state.container.objects) > 4
        if options.corrupt_first_header:
            assert state.container.header.copy == 1
            assert state.container.header_problems


def test_dirty_replay_log_is_reported(tmp_path: Path) -> None:
    specs, truth = two_ranges()
    path = tmp_path / "d.vmrs"
    write_vmrs(path, specs, [make_vp(0)], WriterOptions(dirty_replay_log=True))
    with SavedState.open(path) as state:
        assert state.dirty is True
        check_memory(state, truth)


def test_vtl0_chosen_among_several_vtls(tmp_path: Path) -> None:
    specs, _ = two_ranges()
    vps = [make_vp(0, vtl=0), make_vp(0, vtl=2), make_vp(1, vtl=0), make_vp(1, vtl=2)]
    # Put a VTL2 set first for VP 1: the reader must still pick VTL 0.
    vps[2], vps[3] = vps[3], vps[2]
    path = tmp_path / "vtl.vmrs"
    write_vmrs(path, specs, vps, WriterOptions())
    with SavedState.open(path) as state:
        check_vps(state, vps)
        assert sorted({s.vtl for s in state.partition.states}) == [0, 2]


@pytest.mark.parametrize("n_vps", [1, 2, 4])
def test_vp_counts(tmp_path: Path, n_vps: int) -> None:
    specs, _ = two_ranges()
    vps = [make_vp(i) for i in range(n_vps)]
    path = tmp_path / "n.vmrs"
    write_vmrs(path, specs, vps, WriterOptions())
    with SavedState.open(path) as state:
        check_vps(state, vps)


def test_missing_blocks_and_explicit_data_numbering(tmp_path: Path) -> None:
    zero_mib = bytes(MIB)
    low = guest_pages(256, 1) + zero_mib + guest_pages(40, 2)
    high = zero_mib + guest_pages(300, 3)
    specs = [
        # Data numbering not packed: the second range starts at data page 5000 (block 19, page 136).
        RangeSpec(0, len(low) // PAGE, ram_from_bytes(low), omit_zero_blocks=True, numa_node=0),
        RangeSpec(0x2_0000_0000, len(high) // PAGE, ram_from_bytes(high), mbp_index_start=5000,
                  omit_zero_blocks=True, numa_node=1),
    ]
    path = tmp_path / "m.vmrs"
    write_vmrs(path, specs, [make_vp(0)], WriterOptions(policy="mixed"))
    with SavedState.open(path) as state:
        assert state.container.get("/savedstate/RamBlock1") is None   # all-zero block left out
        assert [r.numa_node for r in state.ranges] == [0, 1]
        assert state.ranges[1].mbp_index_start == 5000
        check_memory(state, [(0, low), (0x2_0000_0000, high)])


def test_not_a_saved_state(tmp_path: Path) -> None:
    p = tmp_path / "x.vmrs"
    p.write_bytes(b"MZ" + bytes(20000))
    with pytest.raises(FormatError, match="not a Hyper-V saved-state"):
        HyperVStorage.open(p)


def test_legacy_vm_version_is_refused_clearly(tmp_path: Path) -> None:
    specs, _ = two_ranges()
    path = tmp_path / "old.vmrs"
    write_vmrs(path, specs, [make_vp(0)], WriterOptions(vm_version=0x0400))
    # The new key paths exist, so a 4.0 VM written with them still reads; only a missing schema is refused.
    with SavedState.open(path) as state:
        assert state.vm_version == 0x0400
    with pytest.raises(UnsupportedError):
        write_vmrs(path, specs, [make_vp(0)], WriterOptions(vm_version=0x0100))
        SavedState.open(path)
