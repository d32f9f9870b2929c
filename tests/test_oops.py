"""One-line problem summaries from kernel log records (the kernel's own report prefixes)."""

from __future__ import annotations

import pytest

from vm2core.guest.oops import summary
from vm2core.guest.printk import Record


def records(*texts: bytes) -> list[Record]:
    return [Record(seq=n, ts_nsec=(n + 1) * 10**9, text=t) for n, t in enumerate(texts)]


@pytest.mark.parametrize(("text", "kind"), [
    (b"watchdog: BUG: soft lockup - CPU#1 stuck for 22s! [dd:91]", "soft lockup"),
    (b"NMI watchdog: Watchdog detected hard LOCKUP on cpu 3", "hard lockup"),
    (b"INFO: task kworker/0:1:17 blocked for more than 120 seconds.", "hung task"),
    (b"kernel BUG at mm/slub.c:412!", "BUG"),
    (b"BUG: Bad page state in process dd  pfn:1a2b3", "BUG"),
    (b"general protection fault, probably for non-canonical address 0xdead: 0000 [#1] SMP", "oops"),
    (b"Kernel panic - not syncing: VFS: Unable to mount root fs", "panic"),
])
def test_each_kind_is_named(text, kind):
    line = summary(records(b"Linux version 6.1.0", text, b"later"))
    assert line == f"{kind} at [    2.000000]: {text.decode()}"


def test_quiet_log_has_no_summary():
    assert summary(records(b"Linux version 6.1.0", b"BUGS are fine in prose", b"eth0: link up")) is None


def test_first_report_then_the_panic_it_led_to():
    line = summary(records(b"BUG: kernel NULL pointer dereference, address: 0000000000000008",
                           b"Oops: 0000 [#1] PREEMPT SMP NOPTI", b"RIP: 0010:foo+0x1/0x2",
                           b"Kernel panic - not syncing: Fatal exception\nsecond line"))
    assert line == ("oops at [    1.000000]: BUG: kernel NULL pointer dereference, address: 0000000000000008; "
                    "then panic at [    4.000000]: Kernel panic - not syncing: Fatal exception (1 more report)")
