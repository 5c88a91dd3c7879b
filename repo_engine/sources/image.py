"""The image source: raw disk image files and block devices, read through vddk_ext.

An image is not frozen while it is read: each open checks that the path still names the file
first probed (device and inode) at the capacity first read, and so does a last check after every
disk was read, so a file that grows, shrinks or is replaced during a backup fails it (a short
read fails it too, in vddk_ext) instead of storing bytes the disk never held.

Change lists come from a JSON file of `[offset, length]` extents per disk; without one, a first
backup reads the file's allocated extents (SEEK_DATA/SEEK_HOLE) and a later one reads everything
and stores only new chunks.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, replace
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


@dataclass(frozen=True)
class _Identity:
    """What must not change while a disk is backed up: which file it is, and its size."""

    device: int
    inode: int
    rdev: int
    capacity: int


_KINDS = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
          (stat.S_ISDIR, "directory"))


def _stat(disk: ImageDisk) -> os.stat_result:
    """The image's status; only regular files and block devices are disks (a FIFO would hang a
    reader, a directory or a character device has no capacity)."""
    try:
        st = os.stat(disk.path)
    except OSError as exc:
        raise SourceError(f"disk {disk.key}: cannot open {disk.path}: {exc.strerror}") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "special file")
        raise SourceError(f"disk {disk.key}: {disk.path} is a {kind}; only regular files and "
                          "block devices can be backed up")
    return st


def _identify(disk: ImageDisk, device: BlockDevice) -> _Identity:
    st = _stat(disk)
    return _Identity(st.st_dev, st.st_ino, st.st_rdev, device.capacity)


def _open(disk: ImageDisk) -> BlockDevice:
    try:
        return vddk_ext.open_local(str(disk.path))
    except OSError as exc:
        # vddk_ext's message already names the path and the reason
        raise SourceError(f"disk {disk.key}: {exc.strerror or exc}") from None


def _probe(disk: ImageDisk) -> _Identity:
    """The image's identity and capacity, checking up front that it can be opened for reading."""
    _stat(disk)   # refuses a FIFO before opening it
    device = _open(disk)
    try:
        return _identify(disk, device)
    finally:
        device.close()


def _changed(disk: ImageDisk, was: _Identity, now: _Identity) -> SourceError:
    if (now.device, now.inode, now.rdev) != (was.device, was.inode, was.rdev):
        what = "was replaced by another file"
    else:
        verb = "grew" if now.capacity > was.capacity else "shrank"
        what = f"{verb} from {was.capacity} to {now.capacity} bytes"
    return SourceError(f"disk {disk.key}: {disk.path} {what} during the backup; no restore point "
                       "was stored (back up a snapshot of an image that is in use)")


def _check(disk: ImageDisk, was: _Identity, device: BlockDevice) -> None:
    now = _identify(disk, device)
    if now != was:
        raise _changed(disk, was, now)


def _open_checked(disk: ImageDisk, was: _Identity) -> BlockDevice:
    """Open the image, refusing it if it is no longer the file (and size) first probed."""
    device = _open(disk)
    try:
        _check(disk, was, device)
    except BaseException:
        device.close()
        raise
    return device


def _check_unchanged(disk: ImageDisk, was: _Identity) -> None:
    """After the disk was read: still the same file, of the same size."""
    _open_checked(disk, was).close()


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
    identity = _probe(disk)
    # validated now, before anything is written, so bad input leaves the repository untouched
    extents = load_extents(disk.changed, identity.capacity) if disk.changed else None
    source = listed_disk(disk.key, identity.capacity, lambda: _open_checked(disk, identity),
                         extents, str(disk.path))
    return replace(source, check=lambda: _check_unchanged(disk, identity))


def image_snapshot(vm: str, disks: list[ImageDisk]) -> VmSnapshot:
    check_disks(vm, [d.key for d in disks], "--disk KEY=PATH")
    return VmSnapshot(vm=vm, source="image", disks=[_source_disk(d) for d in disks],
                      config={"disks": {d.key: str(d.path) for d in disks}})
