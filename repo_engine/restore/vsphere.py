"""Restoring a point into vSphere: in place (CBT rollback) or as a new VM.

In place, a restore is all or nothing as long as vSphere answers (docs/VSPHERE.md, "When a
restore fails", lists what each failure leaves):
1. Check the VM (powered off, the point's disks at their sizes); remove leftover snapshots of
   ours; PrepareForAccess, so vCenter does not migrate the VM meanwhile.
2. Snapshot the VM: it now runs on a delta of each disk, and the snapshot keeps the disks as
   they were before the restore.
3. Per disk, the blocks to write: those CBT reports changed since the point; when CBT cannot
   answer, those whose content differs from the point's (read and compared, so a zero block is
   written only where the disk does not read zero).
4. Nothing to write: remove the snapshot; the VM is left alone (not even marked).
5. Mark the VM (its next backup reads everything: CBT does not see VDDK's writes), then write the
   blocks into the deltas.
6. Done: remove the snapshot, which merges the deltas. Failed: revert to the snapshot (the
   half-written deltas are discarded) and remove it. When vSphere cannot be reached or refuses,
   the snapshot stays and the error says how to go back (revert to it) or finish (run again).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..backup.extents import extents_to_blocks
from ..backup.pipeline import BlockPipeline
from ..repository.locks import SHARED
from ..repository.points import DiskRecord, PointRecord
from ..repository.repo import Repository
from ..sources.vsphere import cbt, marks, snapshots, vmconfig
from ..sources.vsphere.connection import Connection
from ..sources.vsphere.errors import (ConnectionLost, VSphereError, asking, connection_broke,
                                       extended, fault_text)
from ..sources.vsphere.inventory import DiskInfo, disks_of, find_by_name
from ..sources.vsphere.source import DataPlane, no_migration
from .restorer import every_window, restore_to_device

log = logging.getLogger("repo_engine.vsphere")

@dataclass
class DiskResult:
    key: str
    file: str
    blocks_written: int
    bytes_written: int
    mode: str          # "changed" (CBT since the point), "compared" (read and compared), "all"
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
        if connection_broke(exc):
            raise
        raise VSphereError(fault_text(exc)) from None
    return task.info.result


def _vddkextended(key: str, file: str, exc: OSError) -> VSphereError:
    return VSphereError(f"writing disk {key} ({file}) through VDDK failed: {exc.strerror or exc}")


def _open(vddk: Any, point: PointRecord, key: str, file: str) -> Any:
    device = vddk.open(file, readonly=False)
    disk = point.disk(key)
    assert disk is not None
    if device.capacity < disk.capacity:
        device.close()
        raise VSphereError(f"disk {key} ({file}) holds {device.capacity} bytes, the "
                           f"point's {disk.capacity}")
    return device


def _write(repo: Repository, point: PointRecord, key: str, vddk: Any, file: str,
           blocks: np.ndarray | None, fresh: bool) -> tuple[int, int]:
    try:
        with _open(vddk, point, key, file) as device:
            summary = restore_to_device(repo, point, key, device, blocks=blocks, fresh=fresh,
                                        target=file)
    except OSError as exc:
        raise _vddkextended(key, file, exc) from None
    return summary.blocks_written + summary.zero_blocks, summary.bytes_written


# ---------------------------------------------------------------- in place


def _check_target(vm: Any, name: str, point: PointRecord) -> None:
    if str(vm.runtime.powerState) != "poweredOff":
        raise VSphereError(f"VM {name} is {vm.runtime.powerState}: power it off before an "
                           "in-place restore (or restore as a new VM with --as-new)")
    current = {str(d.key): d for d in disks_of(vm.config.hardware.device)}
    for disk in point.disks:
        now = current.get(disk.key)
        if now is None:
            raise VSphereError(f"VM {name} has no disk {disk.key} any more; restore as a new "
                               "VM with --as-new")
        if now.capacity != disk.capacity:
            raise VSphereError(f"disk {disk.key} of {name} is {now.capacity} bytes, the "
                               f"point's is {disk.capacity}: restore as a new VM with --as-new")


@dataclass
class _Todo:
    """One disk of an in-place restore: the delta to write and the blocks to write there."""

    disk: DiskRecord
    file: str
    blocks: np.ndarray
    mode: str
    note: str = ""


def _cbt_blocks(vm: Any, snap: Any, disk: DiskRecord, frozen: DiskInfo,
                distrust: str) -> tuple[np.ndarray | None, str]:
    """The blocks CBT reports changed since the point, or None and why CBT cannot say."""
    from pyVmomi import vmodl

    if distrust:
        return None, distrust
    if not disk.cursor or cbt.change_uuid(disk.cursor) != cbt.change_uuid(frozen.change_id):
        return None, "CBT was reset since the point"
    try:
        changes, reason = cbt.query_or_reason(vm, snap, int(disk.key), disk.capacity, disk.cursor)
    except vmodl.MethodFault as exc:   # any other answer: comparing is always right
        return None, f"QueryChangedDiskAreas failed ({fault_text(exc)})"
    if changes is None:
        return None, reason
    blocks = extents_to_blocks(changes.extents, disk.block_size)
    return blocks[blocks < disk.nblocks].astype(np.uint64), ""


def _differing(repo: Repository, point: PointRecord, disk: DiskRecord, device: Any) -> np.ndarray:
    """Blocks whose content on `device` is not the point's: every block read and hashed, its id
    compared with the id the point's chunk was stored under (not looked up in the ids table, a
    cache that may name another copy of the chunk); a block that reads zero matches ZERO. The
    point's map is streamed a window at a time: memory grows with the blocks that differ, not
    with the disk."""
    found: list[np.ndarray] = []
    pipeline = BlockPipeline(repo.codec, repo.index)
    with repo.lock(SHARED, f"restore {point.vm}"), repo.index.reader() as lookup:
        windows = every_window(disk.nblocks, repo.resolve_windows(point, disk.key))
        for first, refs, blocks in windows:
            for batch in pipeline.run(device, disk.block_size, blocks, encode=False,
                                      describe=f"disk {disk.key} ({device.path})"):
                wanted = refs[(batch.blocks - np.uint64(first)).astype(np.int64)]
                stored = wanted != 0
                wanted_ids = np.zeros(len(wanted), "V32")
                wanted_ids[stored] = lookup.locate(wanted[stored])["id"]
                read_ids = np.frombuffer(b"".join(i or bytes(32) for i in batch.ids), "V32")
                differs = np.where(stored, batch.zero | (read_ids != wanted_ids), ~batch.zero)
                found.append(batch.blocks[differs])
    return np.concatenate(found).astype(np.uint64) if found else np.zeros(0, np.uint64)


def _plan_disk(repo: Repository, point: PointRecord, vm: Any, snap: Any, vddk: Any,
               disk: DiskRecord, frozen: DiskInfo, file: str, distrust: str) -> _Todo:
    blocks, why = _cbt_blocks(vm, snap, disk, frozen, distrust)
    if blocks is not None:
        return _Todo(disk, file, blocks, "changed")
    try:
        with _open(vddk, point, disk.key, file) as device:
            blocks = _differing(repo, point, disk, device)
    except OSError as exc:
        raise VSphereError(f"reading disk {disk.key} ({file}) through VDDK to compare it "
                           f"failed: {exc.strerror or exc}") from None
    return _Todo(disk, file, blocks, "compared", f"{why}: compared every block")


def _distrust(repo: Repository, point: PointRecord, uuid: str) -> str:
    mark = marks.load(repo.store, repo.sealer, uuid)
    if mark is None or not mark.written_since(point.time):
        return ""
    if mark.last_write == marks.UNKNOWN:
        return "the VM's full-read mark cannot be read: a restore may have written to the VM"
    return f"a restore wrote to the VM at {mark.last_write}, after the point"


class _InPlace:
    """One in-place restore: the snapshot it holds and how to finish or undo it."""

    def __init__(self, repo: Repository, point: PointRecord, conn: Connection, vm: Any,
                 plane: DataPlane) -> None:
        self.repo, self.point, self.conn, self.vm, self.plane = repo, point, conn, vm, plane
        self.server = conn.settings.server
        with asking(self.server, "reading the VM's configuration"):
            self.name, self.uuid = vm.name, vm.config.instanceUuid
            _check_target(vm, self.name, point)
        self.result = VmRestoreResult(point.id, self.name, vm._moId, "in-place")
        self.held: snapshots.Held | None = None
        self.wrote = False

    def run(self) -> VmRestoreResult:
        with asking(self.server, f"removing leftover snapshots of {self.name}"):
            left = snapshots.remove_leftovers(self.vm)
        self.result.notes += [f"removed leftover snapshot {n}" for n in left]
        with no_migration(self.plane, self.conn, self.vm, self.result.notes, "restore"):
            try:
                with asking(self.server, f"snapshotting {self.name}"):
                    self.held = snapshots.create(self.vm, "restore", quiesce=False)
            except ConnectionLost as exc:
                raise ConnectionLost(f"{exc}; nothing was written; a snapshot vSphere may have "
                                     "made meanwhile is removed by the next backup or "
                                     "restore") from None
            try:
                self._restore()
            except Exception as exc:  # noqa: BLE001 - every failure is reported with the state
                raise self._undo(exc) from None
            except BaseException as exc:   # Ctrl-C: undo what can be undone, then stop
                log.error("%s", self._undo(exc))
                raise
            self._finish()
        return self.result

    def _restore(self) -> None:
        assert self.held is not None
        with asking(self.server, f"reading the disks of {self.name} and their changes"):
            todo = self._plan()
        if not any(len(t.blocks) for t in todo):
            for t in todo:
                self.result.disks.append(DiskResult(t.disk.key, t.file, 0, 0, t.mode, t.note))
            return
        marks.mark_written(self.repo.store, self.repo.sealer, self.uuid, self.name,
                           f"in-place restore of point {self.point.id[:16]}")
        vddk = self.plane.connection(self.conn, self.vm._moId, None)
        self.wrote = True   # from the first write on, only a revert restores the state before
        for t in todo:
            count, nbytes = _write(self.repo, self.point, t.disk.key, vddk, t.file, t.blocks,
                                   fresh=False)
            self.result.disks.append(DiskResult(t.disk.key, t.file, count, nbytes, t.mode, t.note))

    def _plan(self) -> list[_Todo]:
        """Per disk of the point: the VM's delta under our snapshot and what to write there."""
        assert self.held is not None
        frozen = {str(d.key): d for d in disks_of(self.held.snap.config.hardware.device)}
        deltas = {str(d.key): d.file for d in disks_of(self.vm.config.hardware.device)}
        distrust = _distrust(self.repo, self.point, self.uuid)
        vddk = self.plane.connection(self.conn, self.vm._moId, None)
        return [_plan_disk(self.repo, self.point, self.vm, self.held.snap, vddk, disk,
                           frozen[disk.key], deltas[disk.key], distrust)
                for disk in self.point.disks]

    def _finish(self) -> None:
        """Remove the snapshot: the deltas (the restored disks) merge into the base disks."""
        assert self.held is not None
        try:
            with asking(self.server, f"removing snapshot {self.held.name}"):
                snapshots.remove(self.vm, self.held.snap)
        except VSphereError as exc:
            if not self.wrote:
                raise VSphereError(f"{exc}; nothing needed writing: "
                                   f"{self._left(self.held.name)}") from None
            raise VSphereError(
                f"{exc}; the restore itself is complete (VM {self.name} runs on the restored "
                f"disks), but it keeps snapshot {self.held.name}: delete it in vSphere, which "
                "merges the restored disks (do not revert to it: that would undo the restore), "
                "or run the same restore again") from None

    def _undo(self, exc: BaseException) -> VSphereError:
        """After a failure: go back to the snapshot if anything was written, remove it, and
        say what the VM is left with."""
        assert self.held is not None
        snap = self.held.name
        if connection_broke(exc):   # the session is gone: ask it nothing more
            return extended(exc, self._left(snap))
        undone = "the restore was undone" if self.wrote else "nothing was written"
        try:
            if self.wrote:
                with asking(self.server, f"reverting {self.name} to snapshot {snap}"):
                    _wait(self.held.snap.RevertToSnapshot_Task())
                self.wrote = False   # from here the disks are as before the restore
            with asking(self.server, f"removing snapshot {snap}"):
                snapshots.remove(self.vm, self.held.snap)
        except VSphereError as again:
            return extended(exc, f"then {again}; {self._left(snap)}")
        again = "; run the same restore again" if isinstance(exc, VSphereError) else ""
        return extended(exc, f"{undone}: the disks of VM {self.name} are as before the restore "
                            f"and no snapshot is left{again}")

    def _left(self, snap: str) -> str:
        """What the VM is left with when vSphere can no longer be asked."""
        if not self.wrote:
            return (f"the disks of VM {self.name} are as before the restore, but it keeps "
                    f"snapshot {snap}: delete it in vSphere (the next backup or restore removes "
                    "it too)")
        return (f"the disks of VM {self.name} are partly restored and its snapshot {snap} holds "
                "them as they were before: revert to that snapshot in vSphere and delete it to "
                "go back, or run the same restore again to finish it")


def restore_in_place(repo: Repository, point: PointRecord, conn: Connection, vm: Any,
                     plane: DataPlane) -> VmRestoreResult:
    """Roll `vm` back to `point`, writing only what differs, all or nothing (see the module
    doc)."""
    _saved(point)
    return _InPlace(repo, point, conn, vm, plane).run()


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
    """Create VM `name` from the point's configuration and write its disks; on failure delete
    the half-made VM (a half-written VM is worse than none)."""
    from pyVmomi import vim

    server = conn.settings.server
    with asking(server, f"preparing VM {name}"):
        content = conn.content
        if find_by_name(content, vim.VirtualMachine, name) is not None:
            raise VSphereError(f"a VM named {name!r} exists already; choose another --as-new "
                               "name")
        ds, rp, target = _placement(content, datastore, pool, folder)
        spec, where = _new_vm_spec(point, name, ds.name)
    try:
        with asking(server, f"creating VM {name}"):
            vm = _wait(target.CreateVM_Task(config=spec, pool=rp))
    except ConnectionLost as exc:
        raise ConnectionLost(f"{exc}; if vSphere created VM {name} before that, delete it "
                             "there") from None
    except VSphereError as exc:
        raise VSphereError(f"cannot create VM {name}: {exc}") from None
    result = VmRestoreResult(point.id, name, vm._moId, "as-new")
    try:
        with asking(server, f"reading the disks of the new VM {name}"):
            created = _new_disks(vm)
        vddk = plane.connection(conn, vm._moId, None)
        for disk in point.disks:
            new = created.get(where[disk.key])
            if new is None:
                raise VSphereError(f"the new VM has no disk at {where[disk.key]}")
            count, nbytes = _write(repo, point, disk.key, vddk, new.file, None, fresh=True)
            result.disks.append(DiskResult(disk.key, new.file, count, nbytes, "all",
                                           f"new disk {new.key}"))
    except Exception as exc:  # noqa: BLE001 - reported with what became of the new VM
        raise extended(exc, _discard(vm, name, server, exc)) from None
    except BaseException as exc:   # Ctrl-C: delete the half-made VM, then stop
        log.error("%s", extended(exc, _discard(vm, name, server, exc)))
        raise
    return result


def _discard(vm: Any, name: str, server: str, exc: BaseException) -> str:
    """Delete the half-made VM; what became of it."""
    if connection_broke(exc):
        return f"the incomplete VM {name} is left: delete it in vSphere"
    try:
        with asking(server, f"deleting the incomplete VM {name}"):
            _wait(vm.Destroy_Task())
    except VSphereError as again:
        return f"then {again}: delete the incomplete VM {name} in vSphere"
    return f"the incomplete VM {name} was deleted"
