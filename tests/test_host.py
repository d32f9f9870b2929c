"""Host discovery (`vm2core list`) and `--vm/--checkpoint` on a fake Hyper-V host tree written to disk.

The tree (tests/vmrs_writer/hyperv_host.py, key paths from hyperv-host-files.md) is a copy of a host's
``C:\\ProgramData\\Microsoft\\Windows\\Hyper-V`` with a data.vmcx registry whose absolute Windows paths must
be remapped, VMs in per-VM folders, Snapshots, cache folders, a planned VM and a VM name with spaces and
non-ASCII characters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest

from tests.conftest import assert_one_line_error, file_sha256, run_cli
from tests.vmrs_writer import write_hvs
from tests.vmrs_writer.hyperv_host import (
    PROGRAMDATA,
    FakeCheckpoint,
    FakeVm,
    vm_config,
    write_registry,
    write_vm,
)
from vm2core.reader import host as host_module
from vm2core.reader.container import HyperVStorage
from vm2core.reader.filekind import NoMemoryError
from vm2core.reader.host import HostLookupError, discover, remap, resolve_saved_state

A, B, C, D = ("A1A1A1A1-0000-4000-8000-00000000000A", "B2B2B2B2-0000-4000-8000-00000000000B",
              "C3C3C3C3-0000-4000-8000-00000000000C", "D4D4D4D4-0000-4000-8000-00000000000D")
S1, S2, S3, ORPHAN = ("51515151-0000-4000-8000-000000000001", "52525252-0000-4000-8000-000000000002",
                      "53535353-0000-4000-8000-000000000003", "0F0F0F0F-0000-4000-8000-0000000000FF")
PLANNED, CACHED_SNAPSHOT = "9A9A9A9A-0000-4000-8000-000000000099", "9C9C9C9C-0000-4000-8000-00000000009C"
CAFE = "Café Ünïcode web 01"
T1, T2, T3 = (datetime(2024, 5, 1, 10, 0, 0, tzinfo=timezone.utc), datetime(2024, 5, 2, 11, 0, 0, tzinfo=timezone.utc),
              datetime(2024, 6, 3, 12, 30, 0, tzinfo=timezone.utc))


@dataclass
class Host:
    root: Path
    vms: dict[str, FakeVm]


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Host:
    root = tmp_path_factory.mktemp("host") / "Hyper-V"
    vms = {
        A: FakeVm("db-server", A, root, "runtime", registered_as=str(PROGRAMDATA / "Virtual Machines" / f"{A}.vmcx"),
                  checkpoints=[FakeCheckpoint("std-run", S1, True, T1),
                               FakeCheckpoint("prod run", S2, False, T2, link_by_logical_id=False)]),
        B: FakeVm(CAFE, B, root / "VMs" / CAFE, "saved", vmrs_suffix=".VMRS",
                  registered_as=rf"D:\VMs\{CAFE}\Virtual Machines\{B}.vmcx",
                  checkpoints=[FakeCheckpoint("before upgrade", S3, True, T3)]),
        D: FakeVm("db-server-2", D, root / "VMs" / "other", "none"),
    }
    for vm in vms.values():
        write_vm(vm)
    # C is registered, its configuration is gone; the registry cache still has its name.
    cache = root / "Virtual Machines Cache"
    cache.mkdir()
    write_hvs(cache / f"{C}.vmcx", vm_config("gone vm", C))
    write_hvs(cache / f"{A}.vmcx", vm_config("db-server (stale cache copy)", A))
    caches = {A: str(PROGRAMDATA / "Virtual Machines Cache" / f"{A}.vmcx"),
              C: str(PROGRAMDATA / "Virtual Machines Cache" / f"{C}.vmcx")}
    registered = [*vms.values(), FakeVm("gone vm", C, root / "gone", "none",
                                         registered_as=rf"E:\gone\Virtual Machines\{C}.vmcx")]
    (root / "Resource Types").mkdir()
    write_hvs(root / "Resource Types" / "5B5B5B5B-0000-4000-8000-00000000005B.vmcx", {"/x/y": b"1"})
    write_registry(root, registered, caches,
                   {"5B5B5B5B-0000-4000-8000-00000000005B": str(PROGRAMDATA / "Resource Types" / "5B.vmcx")})
    # Folders the scan must skip although they hold VM-shaped trees.
    planned = root / "Planned Virtual Machines" / PLANNED / "Virtual Machines"
    planned.mkdir(parents=True)
    write_hvs(planned / f"{PLANNED}.vmcx", vm_config("planned import", PLANNED))
    (root / "Snapshots Cache" / "Snapshots").mkdir(parents=True)
    write_hvs(root / "Snapshots Cache" / "Snapshots" / f"{CACHED_SNAPSHOT}.vmcx",
              vm_config("cached snapshot", CACHED_SNAPSHOT, logical_id=A))
    # A checkpoint whose VM is nowhere to be found.
    lonely = root / "VMs" / "lonely" / "Snapshots"
    lonely.mkdir(parents=True)
    write_hvs(lonely / f"{ORPHAN}.vmcx",
              vm_config("orphan ckpt", ORPHAN, logical_id="EEEEEEEE-0000-4000-8000-0000000000EE"))
    return Host(root, vms)


# --- list ------------------------------------------------------------------------------------------

def test_list_json(host: Host) -> None:
    result = run_cli("list", "--json", host.root)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.decode("utf-8"))
    vms = {v["guid"]: v for v in report["vms"]}
    assert set(vms) == {A, B, C, D}, "one entry per GUID; planned VMs and caches are not VMs"
    a, b, c, d = vms[A], vms[B], vms[C], vms[D]
    assert (a["name"], a["generation"], a["configuration_version"], a["memory_mib"]) == ("db-server", 2, "9.0", 1024)
    assert a["source"] == "registry" and Path(a["config"]) == host.vms[A].vmcx
    assert a["holds_memory"] is False and a["saved_state"]["kind"] == "no saved state"
    assert b["name"] == CAFE and b["source"] == "registry" and b["holds_memory"] is True
    assert Path(b["saved_state"]["path"]) == host.vms[B].vmrs            # upper-case .VMRS found
    assert b["saved_state"]["memory_bytes"] == 2 * (1 << 20) - 3 * 4096
    assert c["config"] is None and c["name"] == "gone vm" and c["name_from_cache"] is True
    assert c["problem"] == "configuration not found"
    assert d["source"] == "scan" and d["holds_memory"] is False and d["saved_state"]["kind"] == "missing"

    ckpts = {k["guid"]: k for k in a["checkpoints"]}
    assert list(ckpts) == [S1, S2], "oldest first"
    assert ckpts[S1]["name"] == "std-run" and ckpts[S1]["holds_memory"] is True
    assert ckpts[S1]["vm_match"] == "logical_id" and ckpts[S1]["created"] == "2024-05-01T10:00:00Z"
    assert ckpts[S2]["name"] == "prod run" and ckpts[S2]["holds_memory"] is False
    assert ckpts[S2]["vm_match"] == "folder"
    assert ckpts[S1]["parent"] is None and ckpts[S1]["checkpoint_type"] is None     # no public key: unknown
    assert Path(ckpts[S1]["saved_state"]["path"]) == host.vms[A].folder / "Snapshots" / f"{S1}.vmrs"
    assert [k["name"] for k in b["checkpoints"]] == ["before upgrade"]
    assert [k["guid"] for k in report["unmatched_checkpoints"]] == [ORPHAN]
    text = json.dumps(report)
    assert PLANNED not in text and CACHED_SNAPSHOT not in text and "stale cache copy" not in text
    assert "5B5B5B5B" not in text, "registry ResourceTypes entries are not VMs"


def test_list_text(host: Host) -> None:
    result = run_cli("list", host.root)
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode("utf-8")
    assert f"VM '{CAFE}'  {{{B}}}  generation 2, configuration version 9.0, memory 1024 MiB" in out
    assert "VM 'db-server'  {" + A in out and "saved state with memory: no" in out
    assert "checkpoint 'std-run'  {" + S1 + "}  2024-05-01 10:00:00 UTC  memory: yes (2.0 MiB)" in out
    assert "checkpoint 'prod run'  {" + S2 + "}  2024-05-02 11:00:00 UTC  memory: no, VM matched by folder" in out
    assert "'gone vm' (from the registry cache)" in out and "configuration not found" in out
    assert "checkpoints not matched to a VM:" in out and ORPHAN in out
    assert PLANNED not in out and CACHED_SNAPSHOT not in out


def test_list_of_a_single_vm_folder(host: Host) -> None:
    """A copied per-VM folder (no registry): the scan alone finds the VM and its checkpoint."""
    result = run_cli("list", "--json", host.vms[B].folder)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [(v["name"], v["source"], len(v["checkpoints"])) for v in report["vms"]] == [(CAFE, "scan", 1)]


def test_list_of_a_virtual_machines_folder(host: Host) -> None:
    """DIR may be the "Virtual Machines" folder itself; checkpoints come from the Snapshots folder beside it."""
    inv = discover([host.vms[B].folder / "Virtual Machines"])
    assert [(v.name, [c.name for c in v.checkpoints]) for v in inv.vms] == [(CAFE, ["before upgrade"])]


def test_list_needs_a_dir_outside_windows(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("list"), 2, "give DIR")


def test_unreadable_registry_falls_back_to_the_scan(host: Host, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    vm = FakeVm("solo", A, root, "saved")
    write_vm(vm)
    (root / "data.vmcx").write_bytes(b"\0" * 20000)
    inv = discover([root])
    assert [v.name for v in inv.vms] == ["solo"]
    assert any("host registry not readable" in n for n in inv.notes)


def test_discovery_never_reads_guest_memory(host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory is decided from keys: no read touches a RamBlock's bytes."""
    ram: list[tuple[Path, int, int]] = []
    for path in host.root.rglob("*"):
        if path.suffix.lower() == ".vmrs":
            with HyperVStorage.open(path) as c:
                ram += [(path, k.data_offset, k.data_offset + k.data_size) for k in c.keys.values()
                        if "/RamBlock" in k.path]
    assert len(ram) >= 6        # 3 saved states x 2 RAM blocks
    reads: list[tuple[Path, int, int]] = []
    original = HyperVStorage.read_at

    def spy(self: HyperVStorage, offset: int, size: int, structure: str) -> bytes:
        reads.append((self.path, offset, offset + size))
        return original(self, offset, size, structure)

    monkeypatch.setattr(HyperVStorage, "read_at", spy)
    inv = discover([host.root])
    assert any(v.runtime.holds_memory for v in inv.vms)
    touched = [(p, s, e) for p, s, e in reads for rp, rs, re_ in ram if p == rp and s < re_ and rs < e]
    assert touched == []


def test_remap_windows_paths_into_a_copy(tmp_path: Path) -> None:
    target = tmp_path / "VMs" / "web 01" / "Virtual Machines" / f"{A}.vmcx"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"x")
    assert remap(rf"D:\Hyper-V\VMs\web 01\Virtual Machines\{A}.vmcx", [tmp_path]) == target
    assert remap(rf"C:\elsewhere\Virtual Machines\{A}.vmcx", [tmp_path / "VMs" / "web 01"]) == target
    assert remap(rf"C:\elsewhere\Virtual Machines\{B}.vmcx", [tmp_path]) is None


# --- --vm / --checkpoint -----------------------------------------------------------------------------

@pytest.mark.parametrize("query", [B, "{" + B.lower() + "}", CAFE, CAFE.upper(), "café", "Café Ünï"])
def test_resolve_vm_by_guid_name_and_prefix(host: Host, query: str) -> None:
    assert resolve_saved_state(query, None, [host.root]) == host.vms[B].vmrs


def test_resolve_vm_by_path(host: Host) -> None:
    vm = host.vms[B]
    assert resolve_saved_state(str(vm.vmcx), None, []) == vm.vmrs
    assert resolve_saved_state(str(vm.folder), None, []) == vm.vmrs
    assert resolve_saved_state(str(vm.vmrs), None, []) == vm.vmrs


def test_resolve_checkpoint(host: Host) -> None:
    a = host.vms[A]
    assert resolve_saved_state("db-server", "std-run", [host.root]) == a.folder / "Snapshots" / f"{S1}.vmrs"
    assert resolve_saved_state(A, S1.lower(), [host.root]) == a.folder / "Snapshots" / f"{S1}.vmrs"
    assert resolve_saved_state(CAFE, "BEFORE", [host.root]) == host.vms[B].folder / "Snapshots" / f"{S3}.vmrs"
    # A path to the VM's .vmcx or runtime .vmrs: its checkpoints are in the Snapshots folder beside it.
    assert resolve_saved_state(str(a.vmcx), "std-run", []) == a.folder / "Snapshots" / f"{S1}.vmrs"
    with pytest.raises(NoMemoryError, match="checkpoint 'prod run'"):
        resolve_saved_state(str(a.vmrs), "prod run", [])


def test_ambiguous_prefix_lists_the_candidates(host: Host) -> None:
    with pytest.raises(HostLookupError) as info:
        resolve_saved_state("db", None, [host.root])
    message = str(info.value)
    assert "matches 2 VMs" in message and A in message and D in message and "give the GUID" in message


def test_same_exact_name_twice_is_ambiguous(tmp_path: Path) -> None:
    for guid, folder in ((A, "one"), (B, "two")):
        write_vm(FakeVm("twin", guid, tmp_path / folder, "saved"))
    result = run_cli("convert", "--vm", "TWIN", "--dir", tmp_path, tmp_path / "out.core")
    line = assert_one_line_error(result, 2, "--vm 'TWIN' matches 2 VMs", A, B)
    assert "one" in line and "two" in line
    assert not (tmp_path / "out.core").exists()


def test_convert_by_name_equals_convert_by_file(host: Host, tmp_path: Path) -> None:
    by_name, by_file = tmp_path / "by-name.core", tmp_path / "by-file.core"
    result = run_cli("--vm", CAFE, "--dir", host.root, by_name, "-q")
    assert result.returncode == 0, result.stderr
    assert run_cli(host.vms[B].vmrs, by_file, "-q").returncode == 0
    assert file_sha256(by_name) == file_sha256(by_file)
    result = run_cli("convert", "--vm", "db-server", "--checkpoint", "std", "--dir", host.root, tmp_path / "c.core")
    assert result.returncode == 0, result.stderr
    assert f"using {host.vms[A].folder / 'Snapshots' / (S1 + '.vmrs')}" in result.stderr


def test_info_by_name(host: Host) -> None:
    result = run_cli("info", "--vm", "café", "--checkpoint", "before upgrade", "--dir", host.root, "--json",
                     "--no-scan")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["file"] == str(host.vms[B].folder / "Snapshots" / f"{S3}.vmrs")


def test_vm_without_memory_gives_the_plain_answer(host: Host, tmp_path: Path) -> None:
    result = run_cli("--vm", "DB-SERVER", "--dir", host.root, tmp_path / "out.core")
    assert_one_line_error(result, 2, "VM 'db-server'", "holds no saved state: the VM was running or off when this "
                          "file was written; Save the VM or take a standard checkpoint")
    result = run_cli("info", "--vm", "db-server-2", "--dir", host.root)
    assert_one_line_error(result, 2, "VM 'db-server-2' has no runtime state file")


def test_checkpoint_without_memory_gives_the_plain_answer(host: Host, tmp_path: Path) -> None:
    result = run_cli("--vm", "db-server", "--checkpoint", "prod", "--dir", host.root, tmp_path / "out.core")
    assert_one_line_error(result, 2, "checkpoint 'prod run' of VM 'db-server'", "holds no memory (a production "
                          "checkpoint, or one taken while the VM was off)")
    assert not (tmp_path / "out.core").exists()


def test_lookup_errors(host: Host, tmp_path: Path) -> None:
    out = tmp_path / "out.core"
    assert_one_line_error(run_cli("--vm", "nope", "--dir", host.root, out), 2, "no VM of that GUID or name")
    assert_one_line_error(run_cli("--vm", "db-server", "--checkpoint", "x", "--dir", host.root, out), 2,
                          "no checkpoint 'x'", "'std-run', 'prod run'")
    assert_one_line_error(run_cli("convert", "--vm", "web", out), 2, "--dir DIR")
    # convert checks its positionals itself: one line, exit 2
    assert_one_line_error(run_cli("convert", "--checkpoint", "x", out), 2, "--checkpoint needs --vm")
    assert_one_line_error(run_cli("convert", "--vm", "web", "a.vmrs", out), 2, "only OUTPUT")
    for args, usage in ((["info", "--vm", "web", "a.vmrs"], "not both"),):
        result = run_cli(*args)         # usage errors: click's usage text, exit 2
        assert result.returncode == 2 and "Error: " in result.stderr and usage in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_resolver_module_is_importable_without_cli() -> None:
    """The lead wires resolve_saved_state into other commands (dmesg): it must not need click."""
    assert "click" not in host_module.__dict__


# --- the Windows default root ------------------------------------------------------------------------

class _FakeKey:
    def __enter__(self) -> _FakeKey:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _fake_winreg(value: str | None) -> object:
    """A stand-in for the winreg module: the Virtualization key, with or without DefaultExternalDataRoot."""
    import types

    module = types.ModuleType("winreg")
    opened: list[str] = []

    def open_key(hive: object, path: str) -> _FakeKey:
        opened.append(path)
        if value is None:
            raise FileNotFoundError(2, "The system cannot find the file specified")
        return _FakeKey()

    def query(key: object, name: str) -> tuple[str, int]:
        assert name == "DefaultExternalDataRoot"
        return value or "", 2

    module.HKEY_LOCAL_MACHINE = object()  # type: ignore[attr-defined]
    module.OpenKey = open_key  # type: ignore[attr-defined]
    module.QueryValueEx = query  # type: ignore[attr-defined]
    module.opened = opened  # type: ignore[attr-defined]
    return module


def test_default_root_on_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_module.sys, "platform", "win32")
    fake = _fake_winreg("%VMROOT%")
    monkeypatch.setitem(__import__("sys").modules, "winreg", fake)
    monkeypatch.setenv("VMROOT", "/srv/vms")
    assert host_module.default_roots() == [Path("/srv/vms")]
    assert fake.opened == [r"SOFTWARE\Microsoft\Windows NT\CurrentVersion\Virtualization"]  # type: ignore[attr-defined]
    # No registry value: %ProgramData%\Microsoft\Windows\Hyper-V.
    monkeypatch.setitem(__import__("sys").modules, "winreg", _fake_winreg(None))
    monkeypatch.setenv("PROGRAMDATA", "/pd")
    assert host_module.default_roots() == [Path("/pd") / "Microsoft" / "Windows" / "Hyper-V"]


def test_no_default_root_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_module.sys, "platform", "linux")
    assert host_module.default_roots() == []
