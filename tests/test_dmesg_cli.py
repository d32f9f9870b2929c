"""`vm2core dmesg` and the kernel-log part of `vm2core info`, end to end through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import MIB, assert_one_line_error, run_cli
from tests.fixtures.printk_writer import LocklessRing, vmcore_dmesg_line
from tests.fixtures.synthetic_guest import LINK_TEXT, build_guest
from tests.test_printk import _fixture_printk_keys
from tests.vmrs_writer import WriterOptions, write_vmrs

KERNEL_OFFSET, PHYS_BASE = 0x800000, -0x800000          # 64 MiB guest: the image sits at 16..48 MiB
ARRAYS_PA = 0x3100000
OOPS = [b"BUG: kernel NULL pointer dereference, address: 0000000000000008",
        b"#PF: supervisor read access in kernel mode",
        b"Oops: 0000 [#1] PREEMPT SMP NOPTI",
        b"Kernel panic - not syncing: Fatal exception"]


def small_guest(extra: str, **options):
    return build_guest(ram_size=64 * MIB, kernel_offset=KERNEL_OFFSET, phys_base=PHYS_BASE,
                       page_offset=0xFFFF_A1B2_C000_0000, extra_vmcoreinfo=extra,
                       omit_keys=_fixture_printk_keys(), **options)


def write(path: Path, guest) -> Path:
    write_vmrs(path, guest.range_specs(), guest.vps, WriterOptions(policy="mixed", xpress_fraction=0.05))
    return path


@pytest.fixture(scope="module")
def ring_vmrs(tmp_path_factory):
    ring = LocklessRing(count_bits=5, size_bits=10)
    for n in range(60):
        ring.log(b"boot message %d \x01" % n, ts=n * 1_250_000_000)
    for n, text in enumerate(OOPS):
        ring.log(text, ts=(100 + n) * 10**9, level=0 if n == 3 else 1)
    guest = small_guest(ring.vmcoreinfo(LINK_TEXT + KERNEL_OFFSET))
    ring.place(guest, ARRAYS_PA, clear_seq=62)
    return write(tmp_path_factory.mktemp("ring") / "ring.vmrs", guest), ring


def expected(ring, records=None) -> bytes:
    return b"".join(vmcore_dmesg_line(w.ts, w.text) for w in (records or ring.expected()))


def test_dmesg_prints_the_log_like_vmcore_dmesg(ring_vmrs):
    vmrs, ring = ring_vmrs
    result = run_cli("dmesg", vmrs)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected(ring)
    assert result.stderr == ""
    assert b"[  103.000000] Kernel panic - not syncing: Fatal exception\n" in result.stdout


def test_tail_json_and_since_clear(ring_vmrs):
    vmrs, ring = ring_vmrs
    tail = run_cli("dmesg", "--tail", "3", vmrs)
    assert tail.stdout == expected(ring, ring.expected()[-3:])
    since = run_cli("dmesg", "--since-clear", vmrs)
    assert since.stdout == expected(ring, [w for w in ring.expected() if w.seq >= 62])
    as_json = run_cli("dmesg", "--json", "--tail", "1", vmrs)
    (obj,) = [json.loads(line) for line in as_json.stdout.splitlines()]
    last = ring.expected()[-1]
    assert obj == {"seq": last.seq, "ts_nsec": last.ts, "level": 0, "caller": "T1", "text": last.text.decode(),
                   "dictionary": {}}


def test_verbose_reports_guest_memory_read(ring_vmrs):
    vmrs, _ = ring_vmrs
    result = run_cli("dmesg", "-v", vmrs)
    assert result.returncode == 0
    assert "lockless log of Linux" in result.stderr and "of guest memory" in result.stderr


def test_dmesg_reads_the_core_vm2core_wrote(ring_vmrs, tmp_path):
    vmrs, ring = ring_vmrs
    core = tmp_path / "ring.core"
    assert run_cli(vmrs, core, "-q").returncode == 0
    result = run_cli("dmesg", core)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected(ring)


def test_info_shows_the_last_lines_and_a_problem_summary(ring_vmrs):
    vmrs, ring = ring_vmrs
    result = run_cli("info", "--log-lines", "2", vmrs)
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode()
    first = text.splitlines()[0]
    assert first.startswith("PROBLEM in kernel log: oops at [  100.000000]: BUG: kernel NULL pointer")
    assert "then panic at [  103.000000]: Kernel panic - not syncing: Fatal exception" in first
    assert text.rstrip().endswith("  [  102.000000] Oops: 0000 [#1] PREEMPT SMP NOPTI\n"
                                  "  [  103.000000] Kernel panic - not syncing: Fatal exception")
    report = json.loads(run_cli("info", "--json", vmrs).stdout)
    assert report["kernel_log"]["format"] == "lockless"
    assert len(report["kernel_log"]["last_lines"]) == 10


def test_no_printk_buffer_is_exit_2(tmp_path):
    vmrs = write(tmp_path / "noprintk.vmrs", small_guest(""))
    result = run_cli("dmesg", vmrs)
    assert_one_line_error(result, 2, "CONFIG_PRINTK=n")
    info = run_cli("info", vmrs)
    assert info.returncode == 0 and "kernel log:        not readable" in info.stdout.decode()


def test_no_vmcoreinfo_is_exit_2(tmp_path):
    guest = build_guest(ram_size=64 * MIB, kernel_offset=KERNEL_OFFSET, phys_base=PHYS_BASE, live_note=False,
                        decoys=frozenset())
    vmrs = write(tmp_path / "nonote.vmrs", guest)
    assert_one_line_error(run_cli("dmesg", vmrs), 2, "no valid VMCOREINFO note")


def test_core_without_vmcoreinfo_is_exit_2(tmp_path):
    guest = build_guest(ram_size=64 * MIB, kernel_offset=KERNEL_OFFSET, phys_base=PHYS_BASE, live_note=False,
                        decoys=frozenset())
    core = tmp_path / "nonote.core"
    assert run_cli(write(tmp_path / "nonote.vmrs", guest), core, "-q").returncode == 0
    assert_one_line_error(run_cli("dmesg", core), 2, "no VMCOREINFO note")


def test_missing_key_is_exit_2(tmp_path):
    ring = LocklessRing(count_bits=3, size_bits=8)
    ring.log(b"x", ts=1)
    extra = "".join(line + "\n" for line in ring.vmcoreinfo(LINK_TEXT + KERNEL_OFFSET).splitlines()
                    if not line.startswith("OFFSET(prb_desc.state_var)"))
    guest = small_guest(extra)
    ring.place(guest, ARRAYS_PA)
    assert_one_line_error(run_cli("dmesg", write(tmp_path / "k.vmrs", guest)), 2, "OFFSET(prb_desc.state_var)")


@pytest.mark.parametrize("decoys", [frozenset(), frozenset({"duplicate", "stale", "crashtime"})])
def test_search_stops_once_no_later_note_can_win(tmp_path, decoys):
    """The same note a full search selects, read only up to it (an unaligned copy below does not stop it)."""
    from tests.fixtures.synthetic_guest import LIVE_NOTE_GPA
    from vm2core.core.convert import Progress, find_kernel
    from vm2core.dmesg import find_log_kernel
    from vm2core.reader.savedstate import SavedState

    guest = build_guest(ram_size=64 * MIB, kernel_offset=KERNEL_OFFSET, phys_base=PHYS_BASE, decoys=decoys)
    vmrs = write(tmp_path / "g.vmrs", guest)
    with SavedState.open(vmrs) as state:
        selection, scanned = find_log_kernel(state, Progress())
        search = find_kernel(state, Progress(), stop_early=False)
        full, everything = search.selection, search.scanned_bytes
    assert selection.kernel is not None and full.kernel is not None
    assert selection.kernel.note_gpa == full.kernel.note_gpa == LIVE_NOTE_GPA
    assert everything == 64 * MIB
    assert LIVE_NOTE_GPA < scanned <= LIVE_NOTE_GPA + 8 * MIB


def test_legacy_log_is_printed_raw_and_tailed_by_line(tmp_path):
    from tests.fixtures.printk_writer import LegacyLog

    legacy = LegacyLog(length=4096)
    for n in range(200):
        legacy.emit(b"<4>old kernel line %d\n" % n)
    guest = small_guest(legacy.vmcoreinfo(LINK_TEXT + KERNEL_OFFSET))
    legacy.place(guest, ARRAYS_PA)
    vmrs = write(tmp_path / "legacy.vmrs", guest)
    assert run_cli("dmesg", vmrs).stdout == bytes(legacy.text[-4096:])
    assert run_cli("dmesg", "--tail", "2", vmrs).stdout == b"<4>old kernel line 198\n<4>old kernel line 199\n"


def test_dmesg_reads_an_exclude_zero_core(ring_vmrs, tmp_path):
    vmrs, ring = ring_vmrs
    core = tmp_path / "ez.core"
    assert run_cli(vmrs, core, "-q", "--exclude-zero").returncode == 0
    assert run_cli("dmesg", core).stdout == expected(ring)


def test_broken_cores_and_rings_are_one_line_errors(ring_vmrs, tmp_path):
    vmrs, _ = ring_vmrs
    core = tmp_path / "ring.core"
    assert run_cli(vmrs, core, "-q").returncode == 0
    data = core.read_bytes()
    truncated = tmp_path / "truncated.core"
    truncated.write_bytes(data[:len(data) // 2])
    assert_one_line_error(run_cli("dmesg", truncated), 2, "truncated.core", "past the end of the file")
    not_core = tmp_path / "not-a-core.core"
    not_core.write_bytes(b"\x7fELF" + bytes(60))
    assert_one_line_error(run_cli("dmesg", not_core), 2, "not-a-core.core", "ELF64")
    # count_bits of the ring (first field of printk_ringbuffer at printk_rb_static) set to 60.
    from tests.fixtures.printk_writer import RB_DYNAMIC_OFFSET
    from tests.fixtures.synthetic_guest import KERNEL_MAP_BASE

    rb_pa = LINK_TEXT + KERNEL_OFFSET + RB_DYNAMIC_OFFSET - KERNEL_MAP_BASE + PHYS_BASE
    with core.open("r+b") as f:
        from elftools.elf.elffile import ELFFile

        ram = next(s for s in ELFFile(f).iter_segments() if s["p_type"] == "PT_LOAD" and s["p_paddr"] == 0)
        f.seek(ram["p_offset"] + rb_pa)
        f.write((60).to_bytes(4, "little"))
    assert_one_line_error(run_cli("dmesg", core), 2, "implausible ring sizes")
