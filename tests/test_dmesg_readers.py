"""The real vmcore-dmesg (kexec-tools) on cores vm2core wrote from synthetic guests.

vmcore-dmesg reads only through the core's p_vaddr, so this also proves the kdump-style layout. It shares
the reference tools' old wrap test: on a block that ends exactly at the end of the data array (kernels with
"printk_ringbuffer: don't needlessly wrap data blocks around") it prints the array's first block instead.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.fixtures.printk_writer import LocklessRing, vmcore_dmesg_line
from tests.fixtures.synthetic_guest import LINK_TEXT
from tests.test_dmesg_cli import ARRAYS_PA, KERNEL_OFFSET, small_guest, write

pytestmark = pytest.mark.skipif(shutil.which("vmcore-dmesg") is None,
                                reason="vmcore-dmesg not installed (Debian kexec-tools; scripts/lab/setup.sh)")


def core_of(ring: LocklessRing, directory: Path) -> Path:
    guest = small_guest(ring.vmcoreinfo(LINK_TEXT + KERNEL_OFFSET))
    ring.place(guest, ARRAYS_PA)
    core = directory / "guest.core"
    result = run_cli(write(directory / "guest.vmrs", guest), core, "-q")
    assert result.returncode == 0, result.stderr
    return core


def vmcore_dmesg(core: Path) -> bytes:
    proc = subprocess.run(["vmcore-dmesg", str(core)], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_vmcore_dmesg_agrees_on_a_ring_that_wrapped_many_times(tmp_path):
    ring = LocklessRing(count_bits=4, size_bits=9, new_wrap_rule=False)
    rng = random.Random(21)
    for n in range(400):
        text = b"msg %d \x02 %s" % (n, bytes(rng.choice(b"xyz\xe9") for _ in range(rng.randrange(60))))
        ring.log(text, ts=n * 987_654_321)
    ring.log(b"", ts=10**12)                                         # an empty line: "[ts] " for both
    assert ring.wrapped_blocks > 20
    core = core_of(ring, tmp_path)
    ours = run_cli("dmesg", core).stdout
    assert ours == b"".join(vmcore_dmesg_line(w.ts, w.text) for w in ring.expected())
    assert vmcore_dmesg(core) == ours


def test_vmcore_dmesg_misreads_the_block_flush_with_the_array_end(tmp_path):
    ring = LocklessRing(count_bits=3, size_bits=8, new_wrap_rule=True)
    for n in range(40):
        ring.log(b"exact %02d, 23 bytes long" % n, ts=n * 10**9)   # 8 + 23 -> 32-byte blocks: every 8th ends at 256
    core = core_of(ring, tmp_path)
    ours = run_cli("dmesg", core).stdout.splitlines()
    theirs = vmcore_dmesg(core).splitlines()
    expected = ring.expected()
    assert ours == [vmcore_dmesg_line(w.ts, w.text).rstrip(b"\n") for w in expected]
    flush = [i for i, w in enumerate(expected) if ring.next[w.rid & 7] & 255 == 0]
    assert flush
    for i, (mine, its) in enumerate(zip(ours, theirs, strict=True)):
        if i in flush:
            first_block = bytes(ring.data[8:8 + len(expected[i].text)])     # the text at the array's start
            assert its == mine[:15] + first_block and its != mine
        else:
            assert its == mine


def test_vmcore_dmesg_on_a_structured_log_adds_a_line_per_wrap_marker(tmp_path):
    from tests.fixtures.printk_writer import StructuredLog

    log = StructuredLog(length=2048)
    for n in range(150):
        log.store(ts=n * 1_000_001_000, text=b"structured %d " % n + b"z" * (n % 50))
    guest = small_guest(log.vmcoreinfo(LINK_TEXT + KERNEL_OFFSET))
    log.place(guest, ARRAYS_PA)
    core = tmp_path / "structured.core"
    assert run_cli(write(tmp_path / "s.vmrs", guest), core, "-q").returncode == 0
    ours = run_cli("dmesg", core).stdout
    assert ours == b"".join(vmcore_dmesg_line(ts, text) for ts, text, _, _ in log.expected())
    theirs = vmcore_dmesg(core)
    spurious = b"[    0.000000] \n"
    assert theirs.replace(spurious, b"") == ours
    assert 0 < theirs.count(spurious) <= log.markers
