"""--format kdump on a real kernel: crash and drgn open vm2core's kdump-compressed cores of the lab capture.

The same .vmrs as test_real_kernel (the capture, record-encoded) is converted to an ELF core (the
reference), a kdump file (zlib, and zstd) and the flattened stream; crash runs with no flags on the file
and on the flattened stream, drgn (PyPI wheel, libkdumpfile inside) on the files, and makedumpfile -R
must rebuild the file byte for byte from the stream.  Pages read back through drgn and crash equal the
ELF core's.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from scripts.lab import capture, config, readers
from tests.e2e.helpers import BASELINE_CRASH_COMMANDS, Capture, parse_ps, up_to_user
from tests.e2e.test_real_kernel import _run_cli, real_vmrs  # noqa: F401 - the shared .vmrs fixture

pytestmark = pytest.mark.e2e

PAGE = 4096
DRGN_PAGES = Path(readers.__file__).with_name("drgn_pages.py")
CRASH_RD_PAGES = 6                      # pages read back through crash's rd -p (each 512 lines of output)


@pytest.fixture(scope="session")
def kdump_files(real_vmrs: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:  # noqa: F811
    work = tmp_path_factory.mktemp("kdump")
    files = {"elf": work / "guest.core", "zlib": work / "guest.kdump", "zstd": work / "guest-zstd.kdump",
             "flat": work / "guest.flat"}
    _run_cli([str(real_vmrs), str(files["elf"])])
    _run_cli([str(real_vmrs), str(files["zlib"])])
    _run_cli([str(real_vmrs), str(files["zstd"]), "--compress", "zstd"])
    if importlib.util.find_spec("cramjam") is not None:       # the optional snappy codec (test extra)
        files["snappy"] = work / "guest-snappy.kdump"
        _run_cli([str(real_vmrs), str(files["snappy"]), "--compress", "snappy"])
    _run_cli([str(real_vmrs), "-", "--format", "kdump"], stdout_path=files["flat"])
    return files


def _pages(guest: Capture) -> list[int]:
    """Sample addresses: spread over the RAM ranges (first, last, every 4099th page), zero pages
    inside zero runs, pages stored once for several PFNs, and the first PFN past the RAM."""
    ranges, _ = capture.load_capture(guest.directory)
    picks: set[int] = set()
    zero, seen, repeated = [], set(), []
    for r in ranges:
        picks.update({r.gpa_start, r.gpa_start + r.size - PAGE})
        picks.update(range(r.gpa_start, r.gpa_start + r.size, 4099 * PAGE))
        with r.file.open("rb") as f:
            f.seek(r.file_offset)
            for gpa in range(r.gpa_start, r.gpa_start + r.size, PAGE):
                data = f.read(PAGE)
                if data == bytes(PAGE):
                    zero.append(gpa)
                elif data in seen:
                    repeated.append(gpa)
                elif len(seen) < 20000:
                    seen.add(data)
    assert zero and repeated
    picks.update(zero[:: max(1, len(zero) // 40)])
    picks.update(repeated[:: max(1, len(repeated) // 40)])
    return sorted(picks)


def _ram_end(guest: Capture) -> int:
    return max(r.gpa_start + r.size for r in capture.load_capture(guest.directory)[0])


def _elf_page(core: Path, gpa: int) -> bytes:
    from elftools.elf.elffile import ELFFile

    with core.open("rb") as f:
        for seg in ELFFile(f).iter_segments():
            if seg["p_type"] == "PT_LOAD" and seg["p_paddr"] <= gpa < seg["p_paddr"] + seg["p_memsz"]:
                inside = gpa - seg["p_paddr"]
                if inside >= seg["p_filesz"]:
                    return bytes(PAGE)
                f.seek(seg["p_offset"] + inside)
                return f.read(PAGE)
    raise AssertionError(f"{gpa:#x} is not in the ELF core")


def _drgn_pages(lab: config.LabConfig, core: Path, addresses: list[int]) -> dict[int, str]:
    proc = subprocess.run([str(lab.python), str(DRGN_PAGES), str(core), str(lab.vmlinux),
                           *(hex(a) for a in addresses)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {int(k, 16): v for k, v in json.loads(proc.stdout).items()}


# ---------------------------------------------------------------------------------------------- crash

@pytest.fixture(scope="session")
def crash_runs(lab: config.LabConfig, guest: Capture, kdump_files: dict[str, Path]) -> dict[str, dict[str, str]]:
    """crash (no flags) on the ELF core, the kdump file and the flattened stream: the baseline commands,
    and on the kdump forms rd -p of a few sample pages."""
    sample = _pages(guest)
    step = max(1, len(sample) // CRASH_RD_PAGES)
    rd = [f"rd -p -64 {gpa:x} {PAGE // 8}" for gpa in sample[::step][:CRASH_RD_PAGES]]
    runs = {}
    for name in ("elf", "zlib", "flat"):
        commands = BASELINE_CRASH_COMMANDS + ([] if name == "elf" else rd)
        outputs = readers.run_crash_each(kdump_files[name], commands, lab)
        runs[name] = dict(zip(commands, outputs, strict=True))
    return runs


@pytest.mark.parametrize("form", ["zlib", "flat"])
def test_crash_opens_kdump(crash_runs: dict[str, dict[str, str]], guest: Capture, form: str) -> None:
    ours, elf = crash_runs[form], crash_runs["elf"]
    assert f"RELEASE: {guest.release}" in ours["sys"], ours["sys"]
    assert f"CPUS: {len(guest.vcpus)}" in ours["sys"]
    assert guest.marker in ours["log"]

    def rows(text: str) -> list[tuple[Any, ...]]:
        return sorted(tuple(r.values()) for r in parse_ps(text))

    assert rows(ours["ps"]) and rows(ours["ps"]) == rows(elf["ps"])
    bt = {cpu: b.key() for cpu, b in readers.normalise_bt(ours["bt -a"]).items()}
    assert bt and bt == {cpu: b.key() for cpu, b in readers.normalise_bt(elf["bt -a"]).items()}, ours["bt -a"]


@pytest.mark.parametrize("form", ["zlib", "flat"])
def test_crash_rd_pages_match_the_elf_core(crash_runs: dict[str, dict[str, str]], kdump_files: dict[str, Path],
                                           form: str) -> None:
    checked = 0
    for command, text in crash_runs[form].items():
        if not command.startswith("rd -p"):
            continue
        gpa = int(command.split()[3], 16)
        words = [int(w, 16) for line in text.splitlines()
                 for w in re.findall(r"\b[0-9a-f]{16}\b", line.partition(":")[2])]
        got = b"".join(w.to_bytes(8, "little") for w in words)
        assert got == _elf_page(kdump_files["elf"], gpa), f"{command}:\n{text[:400]}"
        checked += 1
    assert checked == CRASH_RD_PAGES


# ---------------------------------------------------------------------------------------------- drgn

@pytest.mark.parametrize("codec", ["zlib", "zstd", "snappy"])
def test_drgn_opens_kdump(lab: config.LabConfig, guest: Capture, kdump_files: dict[str, Path], codec: str) -> None:
    if codec not in kdump_files:
        pytest.skip("cramjam (the snappy codec) is not installed")
    ours = readers.run_drgn_checks(kdump_files[codec], guest.marker, None, lab)
    elf = readers.run_drgn_checks(kdump_files["elf"], guest.marker, None, lab)
    assert ours["release"] == guest.release
    assert ours["marker_found"], ours["log_tail"]
    assert ours["tasks"] and ours["tasks"] == elf["tasks"]
    assert sorted(ours["cpus"]) == sorted(str(v["index"]) for v in guest.vcpus)
    for vcpu in guest.vcpus:
        entry, reference = ours["cpus"][str(vcpu["index"])], elf["cpus"][str(vcpu["index"])]
        assert "error" not in entry, entry
        assert (entry["pid"], entry["comm"]) == (reference["pid"], reference["comm"])
        # Kernel frames, and the first user-space frame after them, are identical.  Beyond it drgn stops
        # on the ELF core (its own page-table walk does not read the user stack) but, through
        # libkdumpfile, keeps unwinding over a user stack it reads as zeros: a reader difference, not a
        # content one (every sampled page equals the ELF core's: test_drgn_pages_match_the_elf_core).
        assert up_to_user(entry["frames"]) == up_to_user(reference["frames"]), (entry, reference)
        assert entry["frames"][0]["pc"] == vcpu["regs"]["rip"]


@pytest.mark.parametrize("codec", ["zlib", "zstd", "snappy"])
def test_drgn_pages_match_the_elf_core(lab: config.LabConfig, guest: Capture, kdump_files: dict[str, Path],
                                       codec: str) -> None:
    if codec not in kdump_files:
        pytest.skip("cramjam (the snappy codec) is not installed")
    sample = _pages(guest)
    beyond = _ram_end(guest)                      # first PFN past guest RAM: not in the dump
    got = _drgn_pages(lab, kdump_files[codec], [*sample, beyond])
    for gpa in sample:
        assert got[gpa] == hashlib.sha256(_elf_page(kdump_files["elf"], gpa)).hexdigest(), hex(gpa)
    assert got[beyond].startswith("fault"), got[beyond]


# ---------------------------------------------------------------------------------------------- makedumpfile -R

def test_makedumpfile_rearranges_the_stream_into_the_file(kdump_files: dict[str, Path], tmp_path: Path) -> None:
    tool = shutil.which("makedumpfile")
    if tool is None:
        pytest.fail("makedumpfile is not installed (scripts/lab/setup.sh installs it)")
    rebuilt = tmp_path / "rebuilt.kdump"
    with kdump_files["flat"].open("rb") as stream:
        proc = subprocess.run([tool, "-R", str(rebuilt)], stdin=stream, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    cmp = subprocess.run(["cmp", str(rebuilt), str(kdump_files["zlib"])], capture_output=True, text=True)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


def test_kdump_is_smaller_than_elf_zstd(real_vmrs: Path, kdump_files: dict[str, Path],  # noqa: F811
                                        tmp_path: Path) -> None:
    """Not a timing test: the sizes of one run (the benchmark script compares speed)."""
    zst = tmp_path / "guest.core.zst"
    _run_cli([str(real_vmrs), str(zst)])
    assert kdump_files["zstd"].stat().st_size <= 1.10 * zst.stat().st_size, (
        kdump_files["zstd"].stat().st_size, zst.stat().st_size)
    print(f"sizes: elf {kdump_files['elf'].stat().st_size} elf.zst {zst.stat().st_size} "
          f"kdump-zlib {kdump_files['zlib'].stat().st_size} kdump-zstd {kdump_files['zstd'].stat().st_size}",
          file=sys.stderr)
