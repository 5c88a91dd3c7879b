"""Restore points: one backup of one VM at one time, stored as `points/<id>.point`.

A point file is an envelope (envelope.py, magic POINT) holding a JSON document:

| field      | meaning                                                                       |
|------------|-------------------------------------------------------------------------------|
| id         | 16 hex digits, fixed at creation                                              |
| generation | bumped each time maintenance rewrites the point (chain consolidation)         |
| seq        | commit sequence, assigned in the catalog commit (0: written before sequences)  |
| vm, time   | VM name, UTC ISO-8601 time with microseconds (`VM@time` addresses it)         |
| source     | "image", "vsphere", "nbd"; `config`: the VM's configuration as the source saved it |
| tags       | list of strings; `consistency`: "crash" or "application" or "file"            |
| protected  | no retention policy removes the point; `damage`: what scrub found unrestorable |
| disks      | list of DiskRecord (below)                                                    |

A DiskRecord holds the disk `key`, `capacity` (bytes), `block_size`, `map` (block-map name),
`kind` ("full"/"delta"), `parent` (point id the delta applies to, or null), `links` (maps to read
to resolve, 1 for a full), `cursor` (source change cursor, e.g. a VMware changeId), `read_mode`,
`note` (why a full read happened, skipped disks) and `counters`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import blake3

from .envelope import read_sealed, write_sealed
from .formats import POINT


@dataclass
class DiskRecord:
    key: str
    capacity: int
    block_size: int
    map: str
    kind: str
    parent: str | None
    links: int
    cursor: str | None = None
    read_mode: str = ""
    note: str = ""
    logical_bytes: int = 0
    counters: dict[str, int] = field(default_factory=dict)

    @property
    def nblocks(self) -> int:
        return -(-self.capacity // self.block_size)


@dataclass
class PointRecord:
    id: str
    vm: str
    time: str
    source: str
    disks: list[DiskRecord]
    tags: list[str] = field(default_factory=list)
    consistency: str = "crash"
    config: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    counters: dict[str, float] = field(default_factory=dict)
    generation: int = 1
    # commit sequence: assigned by the catalog commit, kept by rewrites; orders a VM's points
    seq: int = 0
    protected: bool = False
    # set by `scrub --repair`: what of this point cannot be restored (disks and byte ranges)
    damage: list[str] = field(default_factory=list)

    def disk(self, key: str) -> DiskRecord | None:
        return next((d for d in self.disks if d.key == key), None)

    def summary(self) -> dict:
        """The catalog record: everything but the VM configuration."""
        doc = asdict(self)
        doc.pop("config")
        return doc

    @classmethod
    def from_dict(cls, doc: dict) -> "PointRecord":
        doc = dict(doc)
        doc["disks"] = [DiskRecord(**d) for d in doc["disks"]]
        known = {k: v for k, v in doc.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def new_point_id(vm: str, when: str) -> str:
    return blake3.blake3(f"{vm}\0{when}\0".encode() + os.urandom(16)).hexdigest()[:16]


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def point_path(points_dir: Path, point_id: str) -> Path:
    return points_dir / f"{point_id}.point"


def write_point(points_dir: Path, point: PointRecord) -> None:
    payload = json.dumps(asdict(point), sort_keys=True).encode()
    write_sealed(point_path(points_dir, point.id), POINT, payload)


def read_point(path: Path) -> PointRecord:
    return PointRecord.from_dict(json.loads(read_sealed(path, POINT)))
