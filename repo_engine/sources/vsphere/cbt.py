"""Changed Block Tracking: enabling it, and QueryChangedDiskAreas paged across a disk."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ...backup.extents import as_extents
from .errors import VSphereError, fault_text
from .snapshots import create, remove, wait

ALL = "*"


def change_uuid(change_id: str | None) -> str | None:
    """The UUID part of a changeId ("52 1a ... 9f/17" -> "52 1a ... 9f"), None if malformed."""
    if not change_id or "/" not in change_id:
        return None
    uuid, _, seq = change_id.rpartition("/")
    return uuid if uuid and seq.isdigit() else None


def ensure_enabled(vm: Any) -> str | None:
    """Turn CBT on if it is off (and cycle a snapshot so it takes effect); returns a note."""
    from pyVmomi import vim

    if not vm.capability.changeTrackingSupported:
        raise VSphereError(
            f"VM {vm.name} does not support Changed Block Tracking (it needs virtual hardware "
            "version 7 or later and no physical-mode RDM disks): upgrade its hardware version")
    if vm.config.changeTrackingEnabled:
        return None
    try:
        wait(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=True)))
    except vim.fault.VimFault as exc:
        raise VSphereError(f"cannot enable Changed Block Tracking on {vm.name}: "
                           f"{fault_text(exc)}") from None
    cycle = create(vm, "cbt-enable", quiesce=False)   # the stun/unstun makes it take effect
    remove(vm, cycle.snap)
    return "Changed Block Tracking was off: enabled it (this backup reads all allocated data)"


@dataclass
class Changes:
    """Changed byte extents of one disk, and how many replies it took."""

    extents: np.ndarray
    replies: int


def query(vm: Any, snap: Any, key: int, capacity: int, change_id: str) -> Changes:
    """Every extent changed since `change_id` ("*": allocated), paging until the capacity is
    covered. Raises the vim fault as is (the caller decides on a fallback)."""
    found: list[tuple[int, int]] = []
    offset, replies = 0, 0
    while offset < capacity:
        reply = vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=key, startOffset=offset,
                                         changeId=change_id)
        replies += 1
        found.extend((int(e.start), int(e.length)) for e in reply.changedArea or [])
        if reply.length <= 0:
            break
        following = int(reply.startOffset) + int(reply.length)
        if following <= offset:   # a server that does not advance: stop, do not loop forever
            raise VSphereError(f"QueryChangedDiskAreas on disk {key} of {vm.name} did not "
                               f"advance past offset {offset}")
        offset = following
    extents = as_extents(found)
    if len(extents):   # clip to the disk (replies may over-report, never under-report)
        ends = np.minimum(extents[:, 0] + extents[:, 1], capacity)
        extents = np.stack([extents[:, 0], ends - extents[:, 0]], axis=1)
        extents = extents[extents[:, 1] > 0]
    return Changes(extents, replies)


def query_or_reason(vm: Any, snap: Any, key: int, capacity: int,
                    change_id: str) -> tuple[Changes | None, str]:
    """query(), or None and why CBT cannot be used (its faults mean: read everything)."""
    from pyVmomi import vim, vmodl

    try:
        return query(vm, snap, key, capacity, change_id), ""
    except vim.fault.FileFault as exc:
        return None, f"CBT data not usable ({fault_text(exc)})"
    except vmodl.fault.InvalidArgument as exc:
        what = exc.invalidProperty or "argument"
        return None, f"vSphere rejected the stored changeId ({what}: {exc.msg or 'invalid'})"
    except vim.fault.NotFound as exc:
        return None, f"CBT data not found ({fault_text(exc)})"
