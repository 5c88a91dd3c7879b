"""Repository statistics: what the points hold against what the packs store."""

from __future__ import annotations

from dataclasses import dataclass

from ..repository.repo import Repository
from ..units import ratio


@dataclass
class RepoStats:
    points: int
    vms: int
    logical_bytes: int
    unique_raw_bytes: int
    stored_bytes: int
    pack_bytes: int
    chunks: int
    packs: int
    # None when there is nothing stored to compare with
    dedup_ratio: float | None
    compression_ratio: float | None
    total_ratio: float | None
    # counters damage made wrong (shown as 0 when they went below it): rebuild-index recounts
    damaged_counters: list[str]


def repo_stats(repo: Repository) -> RepoStats:
    points = repo.points()
    logical = sum(d.logical_bytes for p in points for d in p.disks)
    c = repo.index.counters()
    return RepoStats(
        points=len(points), vms=len({p.vm for p in points}), logical_bytes=logical,
        unique_raw_bytes=c["raw_bytes"], stored_bytes=c["stored_bytes"],
        pack_bytes=c["pack_bytes"], chunks=c["chunks"], packs=c["packs"],
        dedup_ratio=ratio(logical, c["raw_bytes"]),
        compression_ratio=ratio(c["raw_bytes"], c["stored_bytes"]),
        total_ratio=ratio(logical, c["pack_bytes"]),
        damaged_counters=repo.index.damaged_counters(),
    )
