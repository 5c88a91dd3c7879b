"""Finding VMs and reading their disks."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ...errors import UsageError
from .errors import VSphereError

INDEPENDENT = ("independent_persistent", "independent_nonpersistent")


@dataclass(frozen=True)
class DiskInfo:
    """A virtual disk as a config (the VM's or a snapshot's) describes it."""

    key: int
    file: str
    capacity: int
    change_id: str
    mode: str
    thin: bool | None
    uuid: str | None
    controller_key: int
    unit_number: int | None
    label: str

    def public(self) -> dict:
        return asdict(self)


def disks_of(devices: list[Any]) -> list[DiskInfo]:
    from pyVmomi import vim

    out = []
    for d in devices or []:
        if not isinstance(d, vim.vm.device.VirtualDisk):
            continue
        backing = d.backing
        capacity = d.capacityInBytes or (d.capacityInKB or 0) * 1024
        out.append(DiskInfo(
            key=int(d.key), file=str(getattr(backing, "fileName", "") or ""), capacity=int(capacity),
            change_id=str(getattr(backing, "changeId", "") or ""),
            mode=str(getattr(backing, "diskMode", "") or ""),
            thin=getattr(backing, "thinProvisioned", None), uuid=getattr(backing, "uuid", None),
            controller_key=int(d.controllerKey or 0), unit_number=d.unitNumber,
            label=str(d.deviceInfo.label) if d.deviceInfo else ""))
    return out


def _all_vms(content: Any) -> list[Any]:
    from pyVmomi import vim

    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    try:
        return list(view.view)
    finally:
        view.Destroy()


def find_vm(content: Any, name: str | None = None, uuid: str | None = None) -> Any:
    """The VM with instance UUID (or BIOS UUID) `uuid`, else the one VM named `name`."""
    if uuid:
        index = content.searchIndex
        vm = (index.FindByUuid(None, uuid, True, True)
              or index.FindByUuid(None, uuid, True, False))
        if vm is None:
            raise VSphereError(f"no VM with UUID {uuid} on this server")
        return vm
    if not name:
        raise UsageError("say which VM: --vm NAME or --vm-uuid UUID")
    found = [vm for vm in _all_vms(content) if vm.name == name]
    if not found:
        raise VSphereError(f"no VM named {name!r} on this server "
                           "(`repo-engine vsphere vms` lists them)")
    if len(found) > 1:
        uuids = ", ".join(vm.config.instanceUuid for vm in found)
        raise VSphereError(f"{len(found)} VMs are named {name!r}; choose one with --vm-uuid "
                           f"({uuids})")
    return found[0]


def find_by_name(content: Any, kind: Any, name: str) -> Any | None:
    view = content.viewManager.CreateContainerView(content.rootFolder, [kind], True)
    try:
        return next((obj for obj in view.view if obj.name == name), None)
    finally:
        view.Destroy()


def describe(vm: Any) -> dict:
    """One VM for `vsphere vms`: identity, power, CBT state, disks."""
    config = vm.config
    disks = disks_of(config.hardware.device) if config else []
    return {
        "name": vm.name, "moref": vm._moId,
        "instance_uuid": config.instanceUuid if config else None,
        "bios_uuid": config.uuid if config else None,
        "power_state": str(vm.runtime.powerState),
        "cbt_supported": bool(vm.capability.changeTrackingSupported),
        "cbt_enabled": bool(config.changeTrackingEnabled) if config else False,
        "snapshots": vm.snapshot is not None,
        "disks": [d.public() for d in disks],
    }


def list_vms(content: Any) -> list[dict]:
    return sorted((describe(vm) for vm in _all_vms(content)), key=lambda d: d["name"])
