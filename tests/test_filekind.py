"""Files that hold no memory get one plain sentence (exit 2), decided from their keys, never their size.

Fixtures: the host-file writer (tests/vmrs_writer/hyperv_host.py), built from the key paths in
hyperv-host-files.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import assert_one_line_error, leftovers, run_cli
from tests.vmrs_writer import write_hvs
from tests.vmrs_writer.hyperv_host import (
    HYPERV_LOG_SHAPE,
    registry,
    runtime_keys,
    vm_config,
    write_saved_state,
)
from vm2core.reader.container import HyperVStorage
from vm2core.reader.filekind import (
    CHECKPOINT_NO_MEMORY,
    HOST_REGISTRY,
    NO_SAVED_STATE,
    SAVED_STATE,
    VM_CONFIGURATION,
    classify,
)

GUID = "993F7B33-6057-4E8C-9C1B-2A0B5E3C4D11"
NAME = "Café Ünïcode web 01"


def _both_commands(path: Path, tmp_path: Path, expected: str) -> None:
    for args in (["convert", path, tmp_path / "out.core"], ["info", path], ["info", "--json", "--no-scan", path]):
        result = run_cli(*args)
        line = assert_one_line_error(result, 2, str(path))
        assert line == f"vm2core: {path} {expected}", line
        assert result.stdout == b""
    assert leftovers(tmp_path, "out.core") == []


def test_runtime_vmrs_of_running_or_off_vm(tmp_path: Path) -> None:
    path = tmp_path / "Virtual Machines" / f"{GUID}.vmrs"
    path.parent.mkdir()
    write_hvs(path, runtime_keys(), HYPERV_LOG_SHAPE)
    with HyperVStorage.open(path) as c:
        assert classify(c).kind == NO_SAVED_STATE
    _both_commands(path, tmp_path, "holds no saved state: the VM was running or off when this file was "
                                   "written; Save the VM or take a standard checkpoint")


def test_runtime_vmrs_as_large_as_ram_still_holds_nothing(tmp_path: Path) -> None:
    """KB4056669: a running VM's .vmrs is as large as its RAM; size says nothing."""
    path = tmp_path / f"{GUID}.vmrs"
    write_hvs(path, {**runtime_keys(), "/configuration/reserved/space": bytes(8 << 20)})
    assert path.stat().st_size > 8 << 20
    with HyperVStorage.open(path) as c:
        assert classify(c).kind == NO_SAVED_STATE


def test_vm_configuration_names_the_vm(tmp_path: Path) -> None:
    path = tmp_path / f"{GUID}.vmcx"
    write_hvs(path, vm_config(NAME, GUID))
    with HyperVStorage.open(path) as c:
        kind = classify(c)
        assert (kind.kind, kind.name, kind.guid) == (VM_CONFIGURATION, NAME, GUID)
    _both_commands(path, tmp_path, f"is a VM configuration (VM '{NAME}'), not a saved state; "
                                   f"its saved state is {GUID}.vmrs beside it")


def test_vm_configuration_with_another_file_name_uses_global_id(tmp_path: Path) -> None:
    path = tmp_path / "exported.vmcx"
    write_hvs(path, vm_config("web", GUID))
    _both_commands(path, tmp_path, f"is a VM configuration (VM 'web'), not a saved state; "
                                   f"its saved state is {GUID}.vmrs beside it")


def test_host_registry(tmp_path: Path) -> None:
    path = tmp_path / "data.vmcx"
    write_hvs(path, registry({GUID: rf"C:\VM\web\Virtual Machines\{GUID}.vmcx"}), HYPERV_LOG_SHAPE)
    with HyperVStorage.open(path) as c:
        assert classify(c).kind == HOST_REGISTRY
    _both_commands(path, tmp_path, "is the host's VM registry; `vm2core list` shows the VMs")


def test_checkpoint_without_memory(tmp_path: Path) -> None:
    path = tmp_path / "Snapshots" / f"{GUID}.vmrs"
    path.parent.mkdir()
    write_hvs(path, runtime_keys(), HYPERV_LOG_SHAPE)
    with HyperVStorage.open(path) as c:
        assert classify(c).kind == CHECKPOINT_NO_MEMORY
    _both_commands(path, tmp_path, "is a checkpoint without memory (a production checkpoint, or one taken while "
                                   "the VM was off); take a standard checkpoint of the running VM or Save the VM")


@pytest.mark.parametrize("folder", ["Virtual Machines", "Snapshots"])
def test_saved_state_is_classified_from_keys(tmp_path: Path, folder: str) -> None:
    path = tmp_path / folder / f"{GUID}.vmrs"
    path.parent.mkdir()
    ram = write_saved_state(path)
    with HyperVStorage.open(path) as c:
        kind = classify(c)
    assert kind.kind == SAVED_STATE and kind.holds_memory
    assert (kind.memory_bytes, kind.ranges, kind.saved_state_type) == (ram, 2, "Normal")
    result = run_cli("info", "--no-scan", path)
    assert result.returncode == 0, result.stderr
