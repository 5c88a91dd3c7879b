"""The image source: raw disk image files and block devices, read through vddk_ext.

Change lists come from a JSON file of `[offset, length]` extents per disk; without one, a first
backup reads the file's allocated extents (SEEK_DATA/SEEK_HOLE) and a later one reads everything
and stores only new chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import vddk_ext

from ..backup.extents import load_extents
from ..backup.source import BlockDevice, ChangeReport, SourceDisk, VmSnapshot
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


def _source_disk(disk: ImageDisk) -> SourceDisk:
    capacity = _probe(disk)
    # validated now, before anything is written, so bad input leaves the repository untouched
    extents = load_extents(disk.changed, capacity) if disk.changed else None

    def allocated() -> ChangeReport:
        with _open(disk.path) as device:
            return ChangeReport(_as_array(device.allocated_extents()))

    def changes(_cursor: str | None) -> ChangeReport:
        if extents is None:
            return ChangeReport(None, "no change list given: read everything, store only new")
        return ChangeReport(extents)

    return SourceDisk(disk.key, capacity, lambda: _open(disk.path), allocated, changes,
                      description=str(disk.path))


def _as_array(extents: list[tuple[int, int]]) -> np.ndarray:
    return np.array(extents, dtype=np.int64).reshape(-1, 2)


def image_snapshot(vm: str, disks: list[ImageDisk]) -> VmSnapshot:
    if not vm:
        raise UsageError("a VM name is required (--vm NAME)")
    if not disks:
        raise UsageError("at least one disk is required (--disk KEY=PATH)")
    keys = [d.key for d in disks]
    if len(set(keys)) != len(keys):
        raise UsageError(f"disk keys must be unique, got {', '.join(keys)}")
    return VmSnapshot(vm=vm, source="image", disks=[_source_disk(d) for d in disks],
                      config={"disks": {d.key: str(d.path) for d in disks}})
