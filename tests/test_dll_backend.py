"""The DLL backend and legacy .vsv + .bin pairs, through a C test double of vmsavedstatedumpprovider.dll.

The double (tests/dll_provider/fake_provider.c) is built here with cc and loaded through the very
same ctypes binding the real DLL goes through on Windows.  It serves the synthetic guest that the
.vmrs writer also stores, so a core made through the DLL must equal the native reader's core of the
equivalent .vmrs byte for byte.

What the DLL cannot report, and so may differ (nothing of it reaches a plain core):
- zero-page metadata (fill records, missing blocks): ``--exclude-zero`` leaves nothing out;
- the VM version, saved-state type, replay-log state, NUMA nodes and VTLs other than the active one;
- the CPL (derived from SS.DPL) and virtual MSRs.
"""

from __future__ import annotations

import ctypes.util
import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import zstandard

from tests.conftest import CliResult, assert_one_line_error, run_cli, write_storage
from tests.dll_provider import build_library, read_log, write_fixture
from tests.fixtures.synthetic_guest import SyntheticGuest, build_guest
from tests.vmrs_writer import WriterOptions, write_vmrs

MIB = 1 << 20
GIB = 1 << 30
PAGE = 4096
# Guest RAM below an MMIO hole and above 4 GiB, the high range not a whole MiB.
RANGES = [(0, 64 * MIB), (4 * GIB, 6 * MIB + 3 * PAGE)]


@pytest.fixture(scope="module")
def fake_dll(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_library(tmp_path_factory.mktemp("fakedll"))


@pytest.fixture(scope="module")
def dll_guest() -> SyntheticGuest:
    return build_guest(ranges=RANGES, kernel_offset=0x800000, phys_base=-0x800000, n_vcpus=3)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, dll_guest: SyntheticGuest) -> dict[str, Path]:
    """The guest as .vmrs (with the DLL fixture beside it) and as a legacy pair, in a non-ASCII folder
    (the double opens what the binding names, so a path sent as anything but UTF-16 fails)."""
    d = tmp_path_factory.mktemp("dll") / "Gäste 日本 \U0001F600"
    d.mkdir()
    g = dll_guest
    vmrs = d / "guest.vmrs"
    write_vmrs(vmrs, g.range_specs(), g.vps, WriterOptions(policy="mixed", xpress_fraction=0.05))
    write_fixture(Path(f"{vmrs}.fixture"), Path(f"{vmrs}.mem"), g.ram.ranges, g.ram.read, g.vps)
    vsv, bin_ = d / "GUEST.vsv", d / "GUEST.bin"
    write_storage(vsv, {"/savedVM/partition_state": bytes(64)})
    write_fixture(Path(f"{vsv}.fixture"), bin_, g.ram.ranges, g.ram.read, g.vps)
    # A .vmrs the native reader refuses as an unknown variant (VM version 1.0); the DLL reads it.
    odd = d / "odd.vmrs"
    write_vmrs(odd, g.range_specs(), g.vps, WriterOptions(policy="raw-blocks", vm_version=0x0100))
    write_fixture(Path(f"{odd}.fixture"), Path(f"{odd}.mem"), g.ram.ranges, g.ram.read, g.vps)
    return {"dir": d, "vmrs": vmrs, "vsv": vsv, "bin": bin_, "odd": odd}


@pytest.fixture(scope="module")
def native_core(inputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory,
                dll_guest: SyntheticGuest) -> bytes:
    out = tmp_path_factory.mktemp("native") / "native.core"
    r = run_cli(inputs["vmrs"], out, "--backend", "native", "-q")
    assert r.returncode == 0, r.stderr
    data = out.read_bytes()
    assert dll_guest.truth.note in data
    return data


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_dll_core_of_a_vmrs_equals_the_native_core(fake_dll: Path, inputs: dict[str, Path], native_core: bytes,
                                                   workdir: Path) -> None:
    out = workdir / "dll.core"
    r = run_cli(inputs["vmrs"], out, "--backend", "dll", "--dll", fake_dll)
    assert r.returncode == 0, r.stderr
    assert sha(out.read_bytes()) == sha(native_core)
    assert "VMCOREINFO from guest memory" in r.stderr and "3 CPUs" in r.stderr


@pytest.mark.parametrize("order", ["vsv-bin", "bin-vsv"])
def test_pair_in_either_order_gives_the_native_core(fake_dll: Path, inputs: dict[str, Path], native_core: bytes,
                                                    workdir: Path, order: str) -> None:
    pair = [inputs["vsv"], inputs["bin"]] if order == "vsv-bin" else [inputs["bin"], inputs["vsv"]]
    out = workdir / "pair.core"
    r = run_cli(*pair, out, "--dll", fake_dll, "-q")         # auto: a pair goes through the DLL
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert sha(out.read_bytes()) == sha(native_core)


def test_pair_to_stdout_and_zstd(fake_dll: Path, inputs: dict[str, Path], native_core: bytes,
                                 workdir: Path) -> None:
    piped = run_cli(inputs["bin"], inputs["vsv"], "-", "--dll", fake_dll, "-q")
    assert piped.returncode == 0, piped.stderr
    assert sha(piped.stdout) == sha(native_core)
    out = workdir / "pair.core.zst"
    r = run_cli(inputs["vsv"], inputs["bin"], out, "--dll", fake_dll, "-q")
    assert r.returncode == 0, r.stderr
    plain = zstandard.ZstdDecompressor().decompressobj().decompress(out.read_bytes())
    assert sha(plain) == sha(native_core)


def test_pair_exclude_zero_leaves_nothing_out(fake_dll: Path, inputs: dict[str, Path], native_core: bytes,
                                             workdir: Path) -> None:
    """The DLL reports no zero-page metadata (listed above): the core is the plain one, and it is said."""
    out = workdir / "ez.core"
    r = run_cli(inputs["vsv"], inputs["bin"], out, "--dll", fake_dll, "--exclude-zero")
    assert r.returncode == 0, r.stderr
    assert "--exclude-zero" in r.stderr and "nothing is left out" in r.stderr
    assert sha(out.read_bytes()) == sha(native_core)


def test_info_on_the_pair(fake_dll: Path, inputs: dict[str, Path], dll_guest: SyntheticGuest) -> None:
    r = run_cli("info", inputs["bin"], inputs["vsv"], "--dll", fake_dll, "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["vp_count"] == 3
    assert [(m["gpa_start"], m["gpa_end"] - m["gpa_start"]) for m in report["memory_ranges"]] == RANGES
    assert report["guest_kernel"]["osrelease"] == dll_guest.truth.osrelease
    assert report["vps"][0]["cr3"] == dll_guest.vps[0].control["cr3"]
    text = run_cli("info", inputs["vsv"], inputs["bin"], "--dll", fake_dll, "--no-scan")
    assert text.returncode == 0, text.stderr
    assert "Microsoft's DLL" in text.stdout.decode() and "3 x x86_64" in text.stdout.decode()


def test_auto_retries_an_unknown_vmrs_variant_through_the_dll(fake_dll: Path, inputs: dict[str, Path],
                                                             native_core: bytes, workdir: Path) -> None:
    refused = run_cli(inputs["odd"], workdir / "x.core")
    assert_one_line_error(refused, 2, "odd.vmrs", "VM version 1.0")
    out = workdir / "odd.core"
    r = run_cli(inputs["odd"], out, "--dll", fake_dll)
    assert r.returncode == 0, r.stderr
    assert "retrying through" in r.stderr and "libfakeprovider.so" in r.stderr and "VM version 1.0" in r.stderr
    assert sha(out.read_bytes()) == sha(native_core)


def test_memory_is_read_in_large_chunks_in_order(fake_dll: Path, inputs: dict[str, Path], workdir: Path,
                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "calls.log"
    monkeypatch.setenv("FAKE_PROVIDER_LOG", str(log))
    r = run_cli(inputs["vsv"], inputs["bin"], workdir / "c.core", "--dll", fake_dll, "-q")
    assert r.returncode == 0, r.stderr
    calls = read_log(log)
    reads = [tuple(int(x) for x in line.split()[1:]) for line in calls if line.startswith("Read ")]
    big = [(gpa, size) for gpa, size in reads if size >= MIB]
    small = [(gpa, size) for gpa, size in reads if size < MIB]
    total = sum(size for _, size in RANGES)
    # every byte of RAM once, as 1 MiB reads in GPA order (the last of a range may be shorter)
    streamed = [(gpa, size) for gpa, size in reads if size >= MIB or any(gpa + size == s + n for s, n in RANGES)]
    assert sum(size for _, size in streamed) == total
    assert streamed == sorted(streamed) and len(big) == total // MIB
    # page-table walks only (VMCOREINFO validation, the kernel map for p_vaddr): few bytes, never RAM data
    assert len(small) < 1000 and sum(size for _, size in small) < 64 * 1024
    assert calls[-1].startswith("Release")  # the handle is released


def fail(monkeypatch: pytest.MonkeyPatch, spec: str, *args: object) -> CliResult:
    """Run the CLI with the double's call ``Function:0xHRESULT`` failing."""
    monkeypatch.setenv("FAKE_PROVIDER_FAIL", spec)
    return run_cli(*args)  # type: ignore[arg-type]


@pytest.mark.parametrize("function", ["LoadSavedStateFiles", "GetVpCount", "GetArchitecture", "GetRegisterValue",
                                      "GetGuestPhysicalMemoryChunks", "ReadGuestPhysicalAddress"])
def test_every_failing_call_is_one_clear_line(fake_dll: Path, inputs: dict[str, Path], workdir: Path,
                                              function: str, monkeypatch: pytest.MonkeyPatch) -> None:
    out = workdir / "f.core"
    r = fail(monkeypatch, f"{function}:0x80004005", inputs["vsv"], inputs["bin"], out, "--dll", fake_dll)
    assert_one_line_error(r, 2, function, "HRESULT 0x80004005 (E_FAIL)", "GUEST.bin")
    assert not out.exists()


def test_load_of_a_single_vmrs_failing(fake_dll: Path, inputs: dict[str, Path], workdir: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    r = fail(monkeypatch, "LoadSavedStateFile:0x80070020", inputs["vmrs"], workdir / "f.core",
                     "--backend", "dll", "--dll", fake_dll)
    assert_one_line_error(r, 2, "LoadSavedStateFile", "0x80070020", "sharing violation",
                          "guest.vmrs")


def test_failing_release_is_a_warning_after_a_complete_core(fake_dll: Path, inputs: dict[str, Path],
                                                            native_core: bytes, workdir: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    out = workdir / "r.core"
    r = fail(monkeypatch, "ReleaseSavedStateFiles:0x8000FFFF", inputs["vsv"], inputs["bin"],
             out, "--dll", fake_dll)
    assert r.returncode == 0, r.stderr
    assert sha(out.read_bytes()) == sha(native_core)
    warnings = [line for line in r.stderr_lines if "warning" in line]
    assert len(warnings) == 1 and "ReleaseSavedStateFiles" in warnings[0] and "E_UNEXPECTED" in warnings[0]


def test_pair_without_the_dll_says_what_to_install(inputs: dict[str, Path], workdir: Path) -> None:
    r = run_cli(inputs["vsv"], inputs["bin"], workdir / "x.core")
    assert_one_line_error(r, 2, "vmsavedstatedumpprovider.dll", "Windows", "--dll PATH")
    native = run_cli(inputs["vsv"], inputs["bin"], workdir / "x.core", "--backend", "native")
    assert_one_line_error(native, 2, "GUEST.bin", "not publicly documented", "--backend dll")


def test_bad_pairs_and_bad_dlls(fake_dll: Path, inputs: dict[str, Path], workdir: Path, tmp_path: Path) -> None:
    both = run_cli(inputs["vmrs"], inputs["vsv"], workdir / "x.core")
    assert_one_line_error(both, 2, "both HyperVStorage files")
    neither = run_cli(inputs["bin"], inputs["bin"], workdir / "x.core")
    assert_one_line_error(neither, 2, "neither", "HyperVStorage")
    lone_bin = run_cli(inputs["bin"], workdir / "x.core")
    assert_one_line_error(lone_bin, 2, "GUEST.bin", "not a Hyper-V saved-state (HyperVStorage) file")
    missing = run_cli(inputs["vsv"], inputs["bin"], workdir / "x.core", "--dll", tmp_path / "nope.dll")
    assert_one_line_error(missing, 2, "nope.dll", "no such file")
    junk = tmp_path / "junk.dll"
    junk.write_bytes(b"MZ not really a library")
    bad = run_cli(inputs["vsv"], inputs["bin"], workdir / "x.core", "--dll", junk)
    assert_one_line_error(bad, 2, "junk.dll", "cannot load")
    onto_vsv = run_cli(inputs["bin"], inputs["vsv"], inputs["vsv"], "-f", "--dll", fake_dll)
    assert_one_line_error(onto_vsv, 1, "GUEST.vsv", "output is the input file")
    libc = ctypes.util.find_library("c")
    if libc is not None:
        resolved = subprocess.run(["sh", "-c", f"ldconfig -p | grep -m1 '{libc} ' | sed 's/.*=> //'"],
                                  capture_output=True, text=True).stdout.strip()
        if resolved:
            other = run_cli(inputs["vsv"], inputs["bin"], workdir / "x.core", "--dll", resolved)
            assert_one_line_error(other, 2, "does not export LoadSavedStateFile")


def test_wide_strings_are_utf16_code_units_on_every_platform() -> None:
    from vm2core.reader.dll import _wide

    units = list(_wide("C:\\Gä\U0001F600"))
    # 'C' ':' '\\' 'G' 'ä' + the surrogate pair of U+1F600 + NUL (UTF-16, whatever the size of wchar_t)
    assert units == [0x43, 0x3A, 0x5C, 0x47, 0xE4, 0xD83D, 0xDE00, 0]


def test_sdk_folders_newest_version_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vm2core.reader.dll import sdk_dirs

    for version in ("10.0.19041.0", "10.0.26100.0", "10.0.22621.0", "wdf"):
        (tmp_path / "Windows Kits" / "10" / "bin" / version / "x64").mkdir(parents=True)
    monkeypatch.setenv("ProgramFiles(x86)", str(tmp_path))
    monkeypatch.delenv("ProgramFiles", raising=False)
    found = [p.relative_to(tmp_path / "Windows Kits" / "10" / "bin").as_posix() for p in sdk_dirs()]
    assert found == ["10.0.26100.0/x64", "10.0.22621.0/x64", "10.0.19041.0/x64"]


def test_a_dll_with_another_register_numbering_is_noticed(fake_dll: Path, dll_guest: SyntheticGuest,
                                                         tmp_path: Path) -> None:
    """Registers from a DLL that numbers them differently look like no VP is in long mode: say so."""
    from dataclasses import replace

    shifted = [replace(vp, control={**vp.control, "efer": 0}) for vp in dll_guest.vps]
    vsv, bin_ = tmp_path / "s.vsv", tmp_path / "s.bin"
    write_storage(vsv, {"/savedVM/partition_state": bytes(64)})
    write_fixture(Path(f"{vsv}.fixture"), bin_, dll_guest.ram.ranges, dll_guest.ram.read, shifted)
    r = run_cli("info", vsv, bin_, "--dll", fake_dll, "--no-scan")
    assert r.returncode == 0, r.stderr
    assert "EFER.LMA clear" in r.stderr and "CR3 = 46" in r.stderr
