"""The repository: one directory tying config, packs, maps, points, index and locks together.

Layout: `config`, `packs/xx/<name>.pack`, `maps/xx/<name>.map`, `points/<id>.point`, `index/`
(LMDB), `locks/`, `tmp/` (packs being written). Write order: docs/FORMAT.md.
"""

from __future__ import annotations

import os
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np

from ..errors import NotARepository, PointNotFound, RepoError, UsageError
from .blockmap import BlockMap, map_path, read_map, write_map
from .chunks import ChunkCodec
from .config import RepoConfig, read_config, write_config
from .index import Index, MapMissing
from .locks import RepoLock
from .packs import FinishedPack, PackWriter
from .points import PointRecord, point_path, read_point, write_point

SUBDIRS = ("packs", "maps", "points", "index", "locks", "tmp")


class Repository:
    def __init__(self, path: Path, config: RepoConfig, index: Index) -> None:
        self.path = path
        self.config = config
        self.index = index
        self.codec = ChunkCodec(config.key_bytes, config.compression_level)
        self.packs_dir = path / "packs"
        self.maps_dir = path / "maps"
        self.points_dir = path / "points"
        self.locks_dir = path / "locks"
        self.tmp_dir = path / "tmp"

    # -- life cycle -----------------------------------------------------------------------
    @classmethod
    def init(cls, path: Path, **settings: int) -> "Repository":
        config = RepoConfig.new(**settings)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise UsageError(f"{path} already exists and is not an empty directory")
        path.mkdir(parents=True, exist_ok=True)
        for sub in SUBDIRS:
            (path / sub).mkdir(exist_ok=True)
        index = Index(path / "index", create=True)
        write_config(path / "config", config)  # last: its presence marks a finished init
        return cls(path, config, index)

    @classmethod
    def open(cls, path: Path) -> "Repository":
        if not path.is_dir():
            raise NotARepository(f"{path} is not a repo-engine repository (no such directory)")
        config = read_config(path / "config")
        return cls(path, config, Index(path / "index"))

    def close(self) -> None:
        self.index.close()

    def __enter__(self) -> "Repository":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def lock(self, kind: str, command: str) -> RepoLock:
        return RepoLock(self.locks_dir, kind, command)

    def require_writable(self, command: str) -> None:
        """RepoError when the repository can only be read (read-only media or snapshot)."""
        if self.index.read_only:
            raise RepoError(f"the repository at {self.path} is read-only; {command!r} needs to "
                            "write to it")

    # -- packs and maps -------------------------------------------------------------------
    def pack_writer(self) -> PackWriter:
        return PackWriter(self.tmp_dir, self.packs_dir)

    def commit_pack(self, writer: PackWriter) -> FinishedPack:
        """Publish a pack durably, then record it in the index (write order step 1 -> 2)."""
        finished = writer.finish()
        self.index.commit_pack(finished)
        return finished

    def write_map(self, bmap: BlockMap) -> str:
        return write_map(self.maps_dir, bmap)

    def read_map(self, name: str) -> BlockMap:
        return read_map(self.maps_dir, name)

    # -- points ---------------------------------------------------------------------------
    def commit_point(self, point: PointRecord, maps: dict[str, BlockMap] | None = None) -> None:
        """Manifest durable first, then the catalog entry that makes the point visible (both
        inside the catalog transaction, which assigns the point's commit sequence).

        Also used to rewrite a catalogued point (chain consolidation, protect, damage marks): the
        catalog transaction moves map use and chunk reference counts from the old record's maps
        to the new one's. Raises ParentGone when a disk's parent left the catalog meanwhile (the
        caller rewrites that disk as a full map); rewrites a map file gc removed meanwhile.
        `maps`: block maps, by name, that the caller still holds (not read back from disk)."""
        known = maps or {}
        maps = {name: known[name] if name in known else self.read_map(name)
                for name in {d.map for d in point.disks}}
        refs = {name: unique_refs(bmap) for name, bmap in maps.items()}
        for _attempt in range(10):
            try:
                self.index.commit_point(point.id, point.vm, partial(_seal, self.points_dir, point),
                                        refs, self.map_exists)
                return
            except MapMissing as gone:
                missing = gone
                write_map(self.maps_dir, maps[gone.name])
        raise missing

    def rewrite_point(self, point: PointRecord, **changes: object) -> PointRecord:
        """Commit the next generation of a catalogued point with `changes` applied. The VM
        configuration (which the catalog record lacks) comes from the manifest; a damaged or
        missing manifest is rewritten from the catalog record."""
        try:
            config = self.load_point(point.id).config
        except (RepoError, OSError):
            config = point.config
        updated = replace(point, config=config, generation=point.generation + 1, **changes)
        self.commit_point(updated)
        return updated

    def map_exists(self, name: str) -> bool:
        return map_path(self.maps_dir, name).exists()

    def points(self, vm: str | None = None) -> list[PointRecord]:
        """Catalogued points in commit order (the sequence the catalog commit assigned, never
        wall-clock time; points from before sequences existed have 0 and come first, by time)."""
        records = [PointRecord.from_dict(r) for r in self.index.points_records()]
        return sorted((p for p in records if vm is None or p.vm == vm), key=commit_order)

    def load_point(self, point_id: str) -> PointRecord:
        """The full manifest, configuration included, read and checked from disk."""
        return read_point(point_path(self.points_dir, point_id))

    def find_point(self, ref: str) -> PointRecord:
        """Resolve a short id, `VM@latest` or `VM@<time prefix>` to one catalogued point."""
        points = self.points()
        if "@" in ref:
            vm, when = ref.rsplit("@", 1)
            matches = [p for p in points if p.vm == vm]
            if when != "latest":
                matches = [p for p in matches if p.time.startswith(when)]
            elif matches:
                matches = matches[-1:]
        else:
            matches = [p for p in points if p.id.startswith(ref.lower())] if ref else []
        if not matches:
            raise PointNotFound(f"no restore point matches {ref!r} (see 'repo-engine points')")
        if len(matches) > 1:
            names = ", ".join(f"{p.id[:8]} ({p.vm}@{p.time})" for p in matches[:5])
            raise UsageError(f"{ref!r} matches {len(matches)} points: {names}; be more specific")
        return matches[0]

    def latest_with_disk(self, vm: str, key: str) -> PointRecord | None:
        for point in reversed(self.points(vm)):
            if point.disk(key) is not None:
                return point
        return None

    def resolve(self, point: PointRecord, key: str) -> np.ndarray:
        """The full block map (one ref per block) of disk `key` at `point`, across its chain."""
        chain: list[str] = []
        catalog = {p.id: p for p in self.points()}
        # a forget may have consolidated this point's chain since the caller read its record: the
        # current record resolves to the same content through maps that still exist
        current: PointRecord | None = catalog.get(point.id, point)
        while current is not None:
            disk = current.disk(key)
            if disk is None:
                raise PointNotFound(f"point {current.id[:8]} has no disk {key!r}")
            chain.append(disk.map)
            if disk.kind == "full":
                break
            current = catalog.get(disk.parent or "")
            if current is None:
                raise PointNotFound(f"the chain of disk {key!r} at point {point.id[:8]} is broken: "
                                    f"parent {disk.parent} is not in the catalog")
        refs: np.ndarray | None = None
        for name in reversed(chain):
            refs = self.read_map(name).apply(refs, consume=True)  # each step's array is ours
        assert refs is not None
        return refs

    def disk_usage(self) -> int:
        total = 0
        for root, _dirs, files in os.walk(self.packs_dir):
            total += sum(os.stat(os.path.join(root, f)).st_size for f in files)
        return total


def commit_order(point: PointRecord) -> tuple[int, str, str]:
    return point.seq, point.time, point.id


def _seal(points_dir: Path, point: PointRecord, seq: int, newest: str) -> dict:
    """Inside the catalog transaction: give a point its commit sequence, note a clock that went
    backwards, make its manifest durable; returns its catalog record."""
    point.seq = seq
    if newest and point.time < newest:
        note = (f"the clock went backwards: this point's time is before {newest}, the time of "
                f"an earlier point of {point.vm}; points are ordered by commit, not by time")
        if note not in point.notes:
            point.notes.append(note)
    write_point(points_dir, point)
    return point.summary()


def unique_refs(bmap: BlockMap) -> np.ndarray:
    """The distinct non-ZERO refs a map file names (what the reference counts count)."""
    return np.unique(bmap.refs[bmap.refs != 0])  # zeros out first: a sparse disk sorts little
