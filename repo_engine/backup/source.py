"""The narrow interfaces a source fulfils for the pipeline (sources import only this module)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


class Batch(Protocol):
    """A run of blocks read in one go (vddk_ext.Batch)."""

    count: int
    blocks: memoryview
    zero: memoryview

    def block(self, k: int) -> memoryview: ...


class BlockDevice(Protocol):
    """An open disk the pipeline reads blocks from (vddk_ext.Disk)."""

    capacity: int
    kind: str   # "file", "blockdev" or "vddk"

    def reader(self, block_size: int, blocks: np.ndarray, *, batch_bytes: int = ...,
               max_request: int = ...) -> Iterator[Batch]: ...

    def allocated_extents(self) -> list[tuple[int, int]]: ...

    def close(self) -> None: ...


@dataclass
class ChangeReport:
    """What changed since a cursor: byte extents, or None when unknown (read everything)."""

    extents: np.ndarray | None
    note: str = ""


@dataclass(frozen=True)
class Parent:
    """The point a new backup of a disk builds on, as far as its source needs to know it."""

    cursor: str | None          # the source's change cursor stored with it (a changeId, ...)
    capacity: int
    load_config: Callable[[], dict]  # the source configuration saved with it, read on demand


@dataclass
class SourceDisk:
    """One disk of a VM as its source presents it for one backup."""

    key: str
    capacity: int
    open: Callable[[], BlockDevice]
    # first backup of the disk: the extents that hold data (VMware: changeId "*")
    allocated: Callable[[], ChangeReport]
    # later backups: what changed since the parent point
    changes: Callable[[Parent], ChangeReport]
    cursor: str | None = None
    description: str = ""
    # called once every disk of the VM was read, before the point is committed: raises a
    # SourceError if the disk changed under the backup (a live image file grew or was replaced)
    check: Callable[[], None] | None = None


@dataclass
class VmSnapshot:
    """A VM frozen for one backup: what the pipeline stores as a restore point."""

    vm: str
    source: str
    disks: list[SourceDisk]
    config: dict = field(default_factory=dict)
    consistency: str = "crash"
    notes: list[str] = field(default_factory=list)
