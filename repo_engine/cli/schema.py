"""The documents `--json` prints: one versioned schema per kind of object (docs/JSON.md).

Every document is a JSON object whose `version` is JSON_VERSION; a listing is such an object
holding a list (`{"version": 1, "points": [...]}`), never a bare list. A restore point has the
same fields wherever it appears (`backup`, `points`, `show`). Adding a field keeps the version;
renaming, removing or retyping one bumps it.
"""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..repository.points import DiskRecord, PointRecord

JSON_VERSION = 1


def document(body: Any = None, **fields: Any) -> dict[str, Any]:
    """A versioned document: a dataclass report's fields (or a dict's), plus `fields`."""
    if is_dataclass(body) and not isinstance(body, type):
        body = asdict(body)
    return {"version": JSON_VERSION, **(body or {}), **fields}


def disk_doc(d: DiskRecord) -> dict[str, Any]:
    """One disk of a point (the block map's file name is internal and left out)."""
    return {"key": d.key, "capacity": d.capacity, "block_size": d.block_size, "kind": d.kind,
            "parent": d.parent, "links": d.links, "cursor": d.cursor, "read_mode": d.read_mode,
            "note": d.note, "logical_bytes": d.logical_bytes, "counters": dict(d.counters)}


def point_doc(p: PointRecord) -> dict[str, Any]:
    """One restore point, the same in every command (its VM configuration only in `show`)."""
    return {"id": p.id, "vm": p.vm, "time": p.time, "source": p.source,
            "consistency": p.consistency, "tags": list(p.tags), "protected": p.protected,
            "notes": list(p.notes), "damage": list(p.damage), "counters": dict(p.counters),
            "disks": [disk_doc(d) for d in p.disks]}
