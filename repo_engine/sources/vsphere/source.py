"""The VmSnapshot builder: a VM frozen by our snapshot, its disks as the pipeline reads them."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.client import HTTPException
from typing import Any

import vddk_ext

from ...backup.source import BlockDevice, ChangeReport, Parent, SourceDisk, VmSnapshot
from ...errors import SourceError
from ...repository.crypto.null import Sealer
from ...repository.store import Store
from . import cbt, marks, snapshots, vmconfig
from .connection import Connection
from .errors import ConnectionLost, VSphereError, connection_broke
from .inventory import INDEPENDENT, DiskInfo, disks_of


log = logging.getLogger("repo_engine.vsphere")


@dataclass(frozen=True)
class DataPlane:
    """How disks are opened: VDDK's library dir and transports."""

    transports: str | None = None
    libdir: str | None = None

    def connection(self, conn: Connection, vm_moref: str, snapshot: str | None) -> Any:
        from ..vddk_disk import VddkConnection

        s = conn.settings
        return VddkConnection(server=s.server, user=s.user, vmx_spec=f"moref={vm_moref}",
                              thumbprint=conn.thumbprint, password=conn.password, port=s.port,
                              snapshot=snapshot, transports=self.transports, libdir=self.libdir)


class _Disk:
    """One disk of the snapshot: decides between CBT extents and a full read."""

    def __init__(self, vm: Any, snap: Any, info: DiskInfo, full_reason: str, vddk: Any,
                 stats: dict) -> None:
        self.vm, self.snap, self.info = vm, snap, info
        self.full_reason, self.vddk = full_reason, vddk
        self.stats = stats   # this disk's entry in the point's config: CBT replies counted

    def open(self) -> BlockDevice:
        try:
            device = self.vddk.open(self.info.file)
        except OSError as exc:
            raise VSphereError(f"VDDK cannot open disk {self.info.key} ({self.info.file}): "
                               f"{exc.strerror or exc}") from None
        if device.capacity < self.info.capacity:
            device.close()
            raise VSphereError(f"VDDK reports {device.capacity} bytes for disk {self.info.key}, "
                               f"vSphere {self.info.capacity}")
        return device

    def _query(self, change_id: str) -> ChangeReport:
        changes, reason = cbt.query_or_reason(self.vm, self.snap, self.info.key,
                                              self.info.capacity, change_id)
        if changes is None:
            return ChangeReport(None, f"{reason}: full read")
        self.stats["cbt_replies"] = self.stats.get("cbt_replies", 0) + changes.replies
        return ChangeReport(changes.extents)

    def allocated(self) -> ChangeReport:
        if not self.info.change_id:
            return ChangeReport(None, "CBT gave this disk no changeId: full read")
        return self._query(cbt.ALL)

    def changes(self, parent: Parent) -> ChangeReport:
        reason = self.full_reason or self._distrust(parent)
        if reason:
            return ChangeReport(None, f"{reason}: full read")
        assert parent.cursor is not None
        return self._query(parent.cursor)

    def _distrust(self, parent: Parent) -> str:
        """Why the stored changeId cannot be used, or ''."""
        cursor = parent.cursor
        if not self.info.change_id:
            return "CBT gave this disk no changeId"
        if not cursor:
            return "the previous point holds no changeId"
        if cbt.change_uuid(cursor) != cbt.change_uuid(self.info.change_id):
            return (f"the changeId's UUID differs from the previous point's ({cursor} -> "
                    f"{self.info.change_id}): CBT was reset")
        before = _saved_disk(parent.load_config(), self.info.key)
        if before is not None:
            if before.get("file") != self.info.file or before.get("uuid") != self.info.uuid:
                return (f"the disk was replaced ({before.get('file')} -> {self.info.file})")
            if before.get("capacity") != self.info.capacity:
                return (f"the disk was resized from {before.get('capacity')} to "
                        f"{self.info.capacity} bytes")
        return ""

    def source_disk(self) -> SourceDisk:
        return SourceDisk(str(self.info.key), self.info.capacity, self.open, self.allocated,
                          self.changes, cursor=self.info.change_id or None,
                          description=f"{self.info.file} ({self.info.label})")


def _saved_disk(config: dict, key: int) -> dict | None:
    """This disk as the parent point's saved configuration describes it."""
    return config.get("vsphere", {}).get("disks", {}).get(str(key))


def _split(disks: list[DiskInfo]) -> tuple[list[DiskInfo], list[dict]]:
    kept, skipped = [], []
    for d in disks:
        if d.mode in INDEPENDENT:
            skipped.append({"key": d.key, "file": d.file, "mode": d.mode,
                            "why": "independent disks are not part of snapshots"})
        else:
            kept.append(d)
    return kept, skipped


@contextmanager
def no_migration(plane: DataPlane, conn: Connection, vm: Any, notes: list[str],
                 purpose: str) -> Iterator[None]:
    """VDDK's PrepareForAccess before the snapshot, EndAccess after it is gone (also on failure):
    meanwhile vCenter does not migrate the VM (vMotion, Storage vMotion) under the `purpose`
    ("backup", "restore")."""
    vm_name = vm.name
    access = plane.connection(conn, vm._moId, None)
    try:
        prepared = access.prepare_for_access()
    except vddk_ext.VixError as exc:
        # advisory only (a user without the privilege to disable migration can still go on)
        prepared = False
        notes.append(f"PrepareForAccess failed ({exc.strerror or exc}): vCenter was not asked "
                     f"to keep the VM from migrating during the {purpose}")
    except OSError as exc:   # VDDK not loadable: no disk could be opened either
        raise VSphereError(f"VDDK cannot prepare {vm_name} for access (PrepareForAccess): "
                           f"{exc.strerror or exc}; the {purpose} did not start") from None
    else:
        if not prepared:
            notes.append("this VDDK has no PrepareForAccess: vCenter was not asked to keep the "
                         f"VM from migrating during the {purpose}")
    try:
        yield
    finally:
        if prepared:
            try:
                access.end_access()
            except OSError as exc:
                log.warning("VDDK EndAccess for %s failed (%s): vCenter may still keep it from "
                            "migrating", vm_name, exc.strerror or exc)


@dataclass
class Frozen:
    """What `frozen_vm` yields: the snapshot for the pipeline, and the VM's identity."""

    snapshot: VmSnapshot
    vm: Any
    vm_uuid: str
    full_read: bool


@contextmanager
def frozen_vm(conn: Connection, vm: Any, repo: Any, *, name: str | None = None,
              quiesce: bool = True, plane: DataPlane = DataPlane()) -> Iterator[Frozen]:
    """Snapshot `vm` and yield it as a VmSnapshot; the snapshot is removed whatever happens.
    Of `repo` only its store and sealer are used: where and how this source keeps its per-VM
    marks.

    A VDDK error inside the block becomes a VSphereError saying that no point was stored."""
    notes = [f"removed leftover snapshot {n}" for n in snapshots.remove_leftovers(vm)]
    enabled = cbt.ensure_enabled(vm)
    notes += [enabled] if enabled else []
    vm_name = name or vm.name
    vm_uuid = vm.config.instanceUuid
    mark = marks.load(repo.store, repo.sealer, vm_uuid)
    full_reason = (f"a restore wrote to the VM at {mark.last_write}"
                   if mark is not None and mark.full_next else "")
    with no_migration(plane, conn, vm, notes, "backup"), snapshots.held(vm, "backup", quiesce) as held:
        config = held.snap.config
        disks, skipped = _split(disks_of(config.hardware.device))
        if not disks:
            raise VSphereError(f"VM {vm.name} has no disk a snapshot covers")
        vddk = plane.connection(conn, vm._moId, held.moref)
        notes += held.notes + [f"skipped disk {s['key']} ({s['file']}): {s['mode']}, {s['why']}"
                               for s in skipped]
        record = {
            "format": vmconfig.FORMAT, "server": conn.settings.server,
            "api_version": conn.version, "about": conn.about, "moref": vm._moId,
            "snapshot": {"name": held.name, "moref": held.moref,
                         "quiesced": held.consistency != "crash"},
            "summary": vmconfig.summary(config),
            "disks": {str(d.key): d.public() for d in disks},
            "skipped_disks": skipped,
            "config_xml": vmconfig.serialize(config, conn.version),
        }
        steps = [_Disk(vm, held.snap, d, full_reason, vddk, record["disks"][str(d.key)])
                 for d in disks]
        snapshot = VmSnapshot(vm=vm_name, source="vsphere", disks=[s.source_disk() for s in steps],
                              config={"vsphere": record}, consistency=held.consistency,
                              notes=notes)
        try:
            yield Frozen(snapshot, vm, vm_uuid, bool(full_reason))
        except VSphereError:
            raise
        except (OSError, SourceError, HTTPException) as exc:   # a VDDK read, mostly
            text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            kind = ConnectionLost if connection_broke(exc) else VSphereError
            raise kind(f"backup of {vm_name} failed: {text or type(exc).__name__}; no restore "
                       "point was stored") from None


def after_backup(store: Store, sealer: Sealer, frozen: Frozen) -> None:
    """A stored point read everything a restore asked for: CBT can be trusted again."""
    if frozen.full_read:
        marks.clear_full_next(store, sealer, frozen.vm_uuid)
