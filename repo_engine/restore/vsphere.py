"""Restoring a point into vSphere: in place (CBT rollback) or as a new VM."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..backup.extents import extents_to_blocks
from ..repository.points import PointRecord
from ..repository.repo import Repository
from ..sources.vsphere import cbt, marks, snapshots, vmconfig
from ..sources.vsphere.connection import Connection
from ..sources.vsphere.errors import VSphereError, fault_text
from ..sources.vsphere.inventory import DiskInfo, disks_of, find_by_name
from ..sources.vsphere.source import DataPlane
from .restorer import restore_to_device


@dataclass
class DiskResult:
    key: str
    file: str
    blocks_written: int
    bytes_written: int
    mode: str          # "changed" (CBT since the point) or "all"
    note: str = ""


@dataclass
class VmRestoreResult:
    point: str
    vm: str
    moref: str
    mode: str          # "in-place" or "as-new"
    disks: list[DiskResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _saved(point: PointRecord) -> dict:
    saved = point.config.get("vsphere")
    if point.source != "vsphere" or not saved:
        raise VSphereError(f"point {point.id[:8]} was not made by `backup vsphere`; restore it "
                           "with `restore image`")
    return saved


def _wait(task: Any) -> Any:
    from pyVim.task import WaitForTask

    try:
        WaitForTask(task)
    except Exception as exc:  # noqa: BLE001 - vim faults
        raise VSphereError(fault_text(exc)) from None
    return task.info.result


def _write(repo: Repository, point: PointRecord, key: str, vddk: Any, file: str,
           blocks: np.ndarray | None, fresh: bool) -> tuple[int, int]:
    try:
        with vddk.open(file, readonly=False) as device:
            disk = point.disk(key)
            assert disk is not None
            if device.capacity < disk.capacity:
                raise VSphereError(f"disk {key} ({file}) holds {device.capacity} bytes, the "
                                   f"point's {disk.capacity}")
            summary = restore_to_device(repo, point, key, device, blocks=blocks, fresh=fresh,
                                        target=file)
    except OSError as exc:
        raise VSphereError(f"writing disk {key} ({file}) through VDDK failed: "
                           f"{exc.strerror or exc}") from None
    return summary.blocks_written + summary.zero_blocks, summary.bytes_written


# ---------------------------------------------------------------- in place


def _check_target(vm: Any, point: PointRecord) -> dict[str, DiskInfo]:
    if str(vm.runtime.powerState) != "poweredOff":
        raise VSphereError(f"VM {vm.name} is {vm.runtime.powerState}: power it off before an "
                           "in-place restore (or restore as a new VM with --as-new)")
    current = {str(d.key): d for d in disks_of(vm.config.hardware.device)}
    for disk in point.disks:
        now = current.get(disk.key)
        if now is None:
            raise VSphereError(f"VM {vm.name} has no disk {disk.key} any more; restore as a new "
                               "VM with --as-new")
        if now.capacity != disk.capacity:
            raise VSphereError(f"disk {disk.key} of {vm.name} is {now.capacity} bytes, the "
                               f"point's is {disk.capacity}: restore as a new VM with --as-new")
    return current


def _blocks_to_write(vm: Any, snap: Any, point: PointRecord, key: str, now: DiskInfo,
                     trusted: str) -> tuple[np.ndarray | None, str]:
    """The blocks changed since the point per CBT, or None (write all) and why."""
    disk = point.disk(key)
    assert disk is not None
    if trusted:
        return None, trusted
    if not disk.cursor or cbt.change_uuid(disk.cursor) != cbt.change_uuid(now.change_id):
        return None, "CBT was reset since the point"
    changes, reason = cbt.query_or_reason(vm, snap, int(key), disk.capacity, disk.cursor)
    if changes is None:
        return None, reason
    blocks = extents_to_blocks(changes.extents, disk.block_size)
    return blocks[blocks < disk.nblocks].astype(np.uint64), ""


def restore_in_place(repo: Repository, point: PointRecord, conn: Connection, vm: Any,
                     plane: DataPlane) -> VmRestoreResult:
    """Roll `vm` back to `point`: write only what changed since it, then revert our snapshot."""
    _saved(point)
    _check_target(vm, point)
    result = VmRestoreResult(point.id, vm.name, vm._moId, "in-place")
    result.notes += [f"removed leftover snapshot {n}" for n in snapshots.remove_leftovers(vm)]
    uuid = vm.config.instanceUuid
    mark = marks.load(repo.path, uuid)
    distrust = ""
    if mark is not None and mark.last_write and mark.last_write > point.time:
        distrust = f"a restore wrote to the VM at {mark.last_write}, after the point"
    marks.mark_written(repo.path, uuid, vm.name, f"in-place restore of point {point.id[:16]}")
    with snapshots.held(vm, "restore", quiesce=False) as held:
        current = {str(d.key): d for d in disks_of(held.snap.config.hardware.device)}
        vddk = plane.connection(conn, vm._moId, held.moref)
        for disk in point.disks:
            now = current[disk.key]
            blocks, why = _blocks_to_write(vm, held.snap, point, disk.key, now, distrust)
            count, nbytes = _write(repo, point, disk.key, vddk, now.file, blocks, fresh=False)
            result.disks.append(DiskResult(disk.key, now.file, count, nbytes,
                                           "all" if blocks is None else "changed",
                                           f"{why}: wrote every block" if why else ""))
        _wait(held.snap.RevertToSnapshot_Task())
    result.notes += held.notes
    return result


# ---------------------------------------------------------------- as a new VM


def _placement(content: Any, datastore: str, pool: str | None, folder: str | None) -> tuple:
    from pyVmomi import vim

    ds = find_by_name(content, vim.Datastore, datastore)
    if ds is None:
        raise VSphereError(f"no datastore named {datastore!r}")
    if pool:
        rp = find_by_name(content, vim.ResourcePool, pool)
        if rp is None:
            raise VSphereError(f"no resource pool named {pool!r}")
    else:
        if not ds.host:
            raise VSphereError(f"datastore {datastore} is mounted on no host")
        rp = ds.host[0].key.parent.resourcePool
    if folder:
        target = find_by_name(content, vim.Folder, folder)
        if target is None:
            raise VSphereError(f"no folder named {folder!r}")
    else:
        parent = ds.parent
        while parent is not None and not isinstance(parent, vim.Datacenter):
            parent = parent.parent
        if parent is None:
            raise VSphereError(f"datastore {datastore} is in no datacenter")
        target = parent.vmFolder
    return ds, rp, target


def _controller_spec(old: Any, new_key: int) -> Any:
    from pyVmomi import vim

    kind = type(old)
    device = kind(key=new_key, busNumber=old.busNumber)
    if isinstance(old, vim.vm.device.VirtualSCSIController):
        device.sharedBus = old.sharedBus or "noSharing"
    return vim.vm.device.VirtualDeviceSpec(operation="add", device=device)


def _disk_spec(saved: dict, capacity: int, controller_key: int, datastore: str) -> Any:
    from pyVmomi import vim

    backing = vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
        diskMode="persistent", thinProvisioned=bool(saved.get("thin", True)),
        fileName=f"[{datastore}]")
    disk = vim.vm.device.VirtualDisk(key=-int(saved["key"]) - 1, controllerKey=controller_key,
                                     unitNumber=saved.get("unit_number") or 0,
                                     capacityInKB=-(-capacity // 1024), capacityInBytes=capacity,
                                     backing=backing)
    return vim.vm.device.VirtualDeviceSpec(operation="add", fileOperation="create", device=disk)


def _new_vm_spec(point: PointRecord, name: str, datastore: str) -> tuple[Any, dict[str, tuple]]:
    """The ConfigSpec of the new VM, and per point disk its (controller class, bus, unit)."""
    from pyVmomi import vim

    saved = _saved(point)
    config = vmconfig.deserialize(saved["config_xml"])
    devices = {d.key: d for d in config.hardware.device or []}
    changes, where, controllers = [], {}, {}
    for disk in point.disks:
        info = saved["disks"][disk.key]
        old = devices.get(info["controller_key"])
        if old is None:
            raise VSphereError(f"the saved configuration lacks disk {disk.key}'s controller")
        if isinstance(old, vim.vm.device.VirtualIDEController):
            key = old.key      # a new VM has IDE controllers 200 and 201 already
        else:
            kinds = (vim.vm.device.VirtualSCSIController, vim.vm.device.VirtualSATAController,
                     vim.vm.device.VirtualNVMEController)
            if not isinstance(old, kinds):
                raise VSphereError(f"disk {disk.key} sits on an unsupported controller "
                                   f"{type(old).__name__}")
            if old.key not in controllers:
                controllers[old.key] = -100 - len(controllers)
                changes.append(_controller_spec(old, controllers[old.key]))
            key = controllers[old.key]
        changes.append(_disk_spec(info, disk.capacity, key, datastore))
        where[disk.key] = (type(old).__name__, old.busNumber, info.get("unit_number") or 0)
    hw = config.hardware
    spec = vim.vm.ConfigSpec(
        name=name, guestId=config.guestId, numCPUs=hw.numCPU,
        numCoresPerSocket=hw.numCoresPerSocket, memoryMB=hw.memoryMB, firmware=config.firmware,
        annotation=f"restored by repo-engine from point {point.id[:16]} of {point.vm}",
        files=vim.vm.FileInfo(vmPathName=f"[{datastore}]"), deviceChange=changes)
    return spec, where


def _new_disks(vm: Any) -> dict[tuple, DiskInfo]:
    devices = {d.key: d for d in vm.config.hardware.device}
    out = {}
    for d in disks_of(vm.config.hardware.device):
        ctl = devices.get(d.controller_key)
        out[(type(ctl).__name__, getattr(ctl, "busNumber", None), d.unit_number or 0)] = d
    return out


def restore_as_new(repo: Repository, point: PointRecord, conn: Connection, name: str,
                   datastore: str, plane: DataPlane, *, pool: str | None = None,
                   folder: str | None = None) -> VmRestoreResult:
    """Create VM `name` from the point's configuration and write its disks."""
    from pyVmomi import vim

    content = conn.content
    if find_by_name(content, vim.VirtualMachine, name) is not None:
        raise VSphereError(f"a VM named {name!r} exists already; choose another --as-new name")
    ds, rp, target = _placement(content, datastore, pool, folder)
    spec, where = _new_vm_spec(point, name, ds.name)
    try:
        vm = _wait(target.CreateVM_Task(config=spec, pool=rp))
    except VSphereError as exc:
        raise VSphereError(f"cannot create VM {name}: {exc}") from None
    result = VmRestoreResult(point.id, name, vm._moId, "as-new")
    try:
        created = _new_disks(vm)
        vddk = plane.connection(conn, vm._moId, None)
        for disk in point.disks:
            new = created.get(where[disk.key])
            if new is None:
                raise VSphereError(f"the new VM has no disk at {where[disk.key]}")
            count, nbytes = _write(repo, point, disk.key, vddk, new.file, None, fresh=True)
            result.disks.append(DiskResult(disk.key, new.file, count, nbytes, "all",
                                           f"new disk {new.key}"))
    except BaseException:
        try:   # a half-written VM is worse than none
            _wait(vm.Destroy_Task())
        except VSphereError:
            result.notes.append(f"could not delete the incomplete VM {name}")
        raise
    return result
