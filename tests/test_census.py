"""`vm2core inspect` on files that are not HyperVStorage: size and a page census, streamed, flat memory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import run_cli, write_storage

PAGE = 4096
MIB = 1 << 20


def page(fill: int) -> bytes:
    return bytes([fill]) * PAGE


def crafted(path: Path) -> None:
    """3 zero pages, A, B, A, 5 zero pages, C, then 100 bytes: 8 zero, 3 distinct, longest run 5 at page 6."""
    path.write_bytes(bytes(3 * PAGE) + page(1) + page(2) + page(1) + bytes(5 * PAGE) + page(3) + b"x" * 100)


def test_census_text_and_json(tmp_path: Path) -> None:
    path = tmp_path / "GUEST.bin"
    crafted(path)
    text = run_cli("inspect", path)
    assert text.returncode == 0, text.stderr
    out = text.stdout.decode()
    assert "not a HyperVStorage file" in out
    assert f"{12 * PAGE + 100} bytes (12 pages + 100 bytes)" in out
    assert "zero pages:           8 (66.7%)" in out
    assert "distinct non-zero:    3" in out
    assert f"longest zero run:     5 pages at offset {6 * PAGE:#x}" in out
    r = run_cli("inspect", path, "--json")
    report = json.loads(r.stdout)
    assert report["kind"] == "page census"
    assert (report["size"], report["pages"], report["tail_bytes"]) == (12 * PAGE + 100, 12, 100)
    assert (report["zero_pages"], report["distinct_nonzero_pages"], report["distinct_capped"]) == (8, 3, False)
    assert (report["longest_zero_run_pages"], report["longest_zero_run_offset"]) == (5, 6 * PAGE)


def test_pair_shows_key_tree_and_census(tmp_path: Path) -> None:
    vsv, bin_ = tmp_path / "g.vsv", tmp_path / "g.bin"
    write_storage(vsv, {"/savedVM/partition_state": bytes(64)})
    crafted(bin_)
    r = run_cli("inspect", bin_, vsv)
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert "page census" in out and "/savedVM/partition_state" in out and "# HyperVStorage 4.0" in out


def test_distinct_count_is_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vm2core.reader import census

    path = tmp_path / "many.bin"
    path.write_bytes(b"".join(i.to_bytes(4, "little") * (PAGE // 4) for i in range(1, 101)))
    monkeypatch.setattr(census, "DISTINCT_CAP", 10)
    c = census.page_census(path)
    assert (c.distinct_nonzero_pages, c.distinct_capped, c.zero_pages) == (10, True, 0)
    assert "at least 10" in census.render_census(c)


def test_census_streams_with_flat_memory(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    with path.open("wb") as f:
        for _ in range(384):
            f.write(os.urandom(MIB))
    r = run_cli("inspect", path, "--json", measure_rss=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["distinct_nonzero_pages"] == 384 * MIB // PAGE and not report["distinct_capped"]
    assert r.peak_rss_kib < 120 * 1024, f"peak RSS {r.peak_rss_kib} KiB for a 384 MiB file"
