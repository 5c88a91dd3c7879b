"""Restore points: one backup of one VM at one time, stored as the object `points/<id>.point`.

A point file is an envelope (envelope.py, magic POINT) holding a JSON document (in an encrypted
repository sealed as kind "point" named by the point id):

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

Records read from disk (manifests and catalog records) are checked before use (`from_dict`): ids
and map names are hex of the right length, block size, capacity and links within the format's
bounds; a bad one is damage, never a path or an array size.
"""

from __future__ import annotations

import json
import os
from copy import copy, deepcopy
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone

import blake3

from ..errors import DamageError
from .config import MAX_BLOCK, MIN_BLOCK
from .crypto.null import NULL_SEALER, Sealer
from .envelope import Binding, read_sealed, seal
from .formats import POINT
from .safefile import MANIFEST_MAX, checked_name
from .store import Store

# the largest disk a record may describe (VMware's limit is 62 TiB): bounds every array sized
# from a capacity read from disk
MAX_CAPACITY = 1 << 50


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

    def check(self) -> None:
        """ValueError (DamageError for a bad name) unless the record is within bounds."""
        checked_name(self.map, 64, f"disk {self.key!r}: block map")
        if self.parent is not None:
            checked_name(self.parent, 16, f"disk {self.key!r}: parent point")
        if self.kind not in ("full", "delta") or (self.kind == "delta") != (self.parent is not None):
            raise ValueError(f"disk {self.key!r}: kind {self.kind!r} with parent {self.parent!r}")
        bs = self.block_size
        if not isinstance(bs, int) or bs & (bs - 1) or not MIN_BLOCK <= bs <= MAX_BLOCK:
            raise ValueError(f"disk {self.key!r}: block size {bs!r} is not a power of two "
                             f"from {MIN_BLOCK} to {MAX_BLOCK}")
        _in_range(self.capacity, f"disk {self.key!r}: capacity", 0, MAX_CAPACITY)
        _in_range(self.links, f"disk {self.key!r}: links", 1, 1 << 32)


def _in_range(value: object, what: str, low: int, high: int) -> None:
    if not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{what} {value!r} is out of range {low}..{high}")


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
        doc = self.as_dict()
        doc.pop("config")
        return doc

    def as_dict(self) -> dict:
        """`dataclasses.asdict` of the record for a format whose fields are JSON values: each
        list and dict copied one level deep (their items are strings and numbers; the VM
        configuration is copied whole), not walked item by item (a forget of most points
        writes hundreds of records)."""
        doc = {name: _copied(getattr(self, name)) for name in _POINT_FIELDS}
        doc["config"] = deepcopy(self.config)
        doc["disks"] = [{name: _copied(getattr(disk, name)) for name in _DISK_FIELDS}
                        for disk in self.disks]
        return doc

    @classmethod
    def from_dict(cls, doc: dict, what: str = "catalog record") -> "PointRecord":
        """A record read from disk (manifest or catalog), every name and number checked before
        anything uses it (DamageError naming `what` otherwise)."""
        try:
            doc = dict(doc)
            for name in _CONTAINERS & doc.keys():  # its own: `doc` may be shared (Index.record)
                doc[name] = copy(doc[name])
            doc["disks"] = [DiskRecord(**d) for d in doc["disks"]]
            point = cls(**{k: v for k, v in doc.items() if k in cls.__dataclass_fields__})
            point.check()
        except (KeyError, TypeError, ValueError) as exc:
            raise DamageError(f"{what}: restore point record is malformed ({exc})") from None
        return point

    def check(self) -> None:
        """ValueError unless ids, names and numbers are within the format's bounds."""
        checked_name(self.id, 16, "point id")
        _in_range(self.generation, "generation", 1, 1 << 62)
        for disk in self.disks:
            disk.check()


_CONTAINERS = {"tags", "config", "notes", "counters", "damage"}  # PointRecord's lists and dicts
_POINT_FIELDS = tuple(f.name for f in fields(PointRecord))
_DISK_FIELDS = tuple(f.name for f in fields(DiskRecord))


def _copied(value: object) -> object:
    return copy(value) if isinstance(value, (list, dict)) else value


def new_point_id(vm: str, when: str) -> str:
    return blake3.blake3(f"{vm}\0{when}\0".encode() + os.urandom(16)).hexdigest()[:16]


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def point_object(point_id: str) -> str:
    return f"points/{checked_name(point_id, 16, 'point id')}.point"


def _binding(sealer: Sealer, point_id: str) -> Binding:
    return Binding(sealer, "point", point_id.encode())


def write_point(store: Store, point: PointRecord, sealer: Sealer = NULL_SEALER) -> None:
    store.put(point_object(point.id), encoded_point(point, sealer))


def encoded_point(point: PointRecord, sealer: Sealer = NULL_SEALER) -> bytes:
    """The stored bytes of a point's manifest."""
    payload = json.dumps(point.as_dict(), sort_keys=True).encode()
    return seal(POINT, payload, _binding(sealer, point.id))


def read_point(store: Store, name: str, sealer: Sealer = NULL_SEALER) -> PointRecord:
    """The manifest stored as object `name` (a point's `point_object`, or one a walk found)."""
    what = f"{store.location}/{name}"
    point_id = name.rsplit("/", 1)[-1].removesuffix(".point")
    try:
        doc = json.loads(read_sealed(store, name, POINT, MANIFEST_MAX,
                                     _binding(sealer, point_id)))
    except (ValueError, RecursionError) as exc:
        raise DamageError(f"{what}: restore point manifest is not valid JSON ({exc})") from None
    return PointRecord.from_dict(doc, what)
