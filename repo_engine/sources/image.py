"""The image source: raw disk image files and block devices, read through vddk_ext.

Change lists come from a JSON file of `[offset, length]` extents per disk; without one, a first
backup reads the file's allocated extents (SEEK_DATA/SEEK_HOLE) and a later one reads everything
and stores only new chunks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import vddk_ext

from ..backup.extents import as_extents, load_extents
from ..backup.source import BlockDevice, ChangeReport, Parent, SourceDisk, VmSnapshot
from ..errors import SourceError, UsageError


@dataclass(frozen=True)
class ImageDisk:
    key: str
    path: Path
    changed: Path | None = None


def _open(path: Path) -> BlockDevice:
    return vddk_ext.open_local(str(path))


def _probe(disk: ImageDisk) -> int:
    """The capacity, checking up front that the image can be opened for reading."""
    try:
        with vddk_ext.open_local(str(disk.path)) as device:
            return device.capacity
    except OSError as exc:
        # vddk_ext's message already names the path and the reason
        raise SourceError(f"disk {disk.key}: {exc.strerror or exc}") from None


def listed_disk(key: str, capacity: int, open_device: Callable[[], BlockDevice],
                extents: np.ndarray | None, description: str) -> SourceDisk:
    """A disk whose change list is given up front: a first backup reads the allocated extents,
    a later one `extents` (None: everything, storing only new chunks). The VDDK source too."""

    def allocated() -> ChangeReport:
        with open_device() as device:
            if device.kind == "blockdev":
                # a block device has no holes to find: it is read whole, and the point says so
                return ChangeReport(None, "a block device has no allocation map")
            return ChangeReport(as_extents(device.allocated_extents()))

    def changes(_parent: Parent) -> ChangeReport:
        if extents is None:
            return ChangeReport(None, "no change list given: read everything, store only new")
        return ChangeReport(extents)

    return SourceDisk(key, capacity, open_device, allocated, changes, description=description)


def check_disks(vm: str, keys: list[str], disk_option: str) -> None:
    """A VM name and at least one disk, with unique keys; `disk_option` shows the --disk form."""
    if not vm:
        raise UsageError("a VM name is required (--vm NAME)")
    if not keys:
        raise UsageError(f"at least one disk is required ({disk_option})")
    if len(set(keys)) != len(keys):
        raise UsageError(f"disk keys must be unique, got {', '.join(keys)}")


def _source_disk(disk: ImageDisk) -> SourceDisk:
    capacity = _probe(disk)
    # validated now, before anything is written, so bad input leaves the repository untouched
    extents = load_extents(disk.changed, capacity) if disk.changed else None
    return listed_disk(disk.key, capacity, lambda: _open(disk.path), extents, str(disk.path))


def image_snapshot(vm: str, disks: list[ImageDisk]) -> VmSnapshot:
    check_disks(vm, [d.key for d in disks], "--disk KEY=PATH")
    return VmSnapshot(vm=vm, source="image", disks=[_source_disk(d) for d in disks],
                      config={"disks": {d.key: str(d.path) for d in disks}})
