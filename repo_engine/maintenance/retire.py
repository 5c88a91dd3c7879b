"""`key retire`: rewrite what the key epochs older than the current one seal, then drop their
keys, so that no key the repository holds opens anything written before the rotation.

Under the maintenance lock, each step durable before the next, and each finding its work by
reading the store, so that a run that stops anywhere is finished by the next one:

1. a `retire` journal entry naming the old epochs: from it on no commit of a command that
   sealed anything under them is accepted (one that opened the repository before the rotation
   and sealed data fails and stores nothing), and a command whose current epoch is among them
   reads the newest keyring before it commits or locks (repo.py, `Sealer.avoid`);
2. every catalogued point whose manifest or block maps an old epoch seals: its maps written
   again under the current epoch (new names), then the point rewritten (its next generation,
   the manifest sealed anew), per journal entry at most REWRITE_BATCH points and about
   REWRITE_BYTES of the block maps they name (all of them are held until it is committed);
3. every pack an old epoch seals: its used chunks copied into new packs (gc's repack, the same
   refs, so block maps stay valid);
4. the caller's other sealed objects (`reseal`: the vSphere marks);
5. a checkpoint of the journal, sealed under the current epoch;
6. gc, with the caller's grace period: the old maps and packs no point uses any more and the
   entries and checkpoints the new checkpoint covers are deleted once it allows;
7. a scan of the key header of every object: when none names an old epoch, a keyring
   generation without their keys. Until then they stay, and `key retire` is run again once
   the grace period has passed (the report names what still waits).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from ..errors import RepoError
from ..repository.blockmap import BlockMap, map_object
from ..repository.checkpoint import write_checkpoint
from ..repository.crypto.access import RepositorySealer
from ..repository.crypto.epochs import stored_epoch
from ..repository.crypto.keystore import empty_older
from ..repository.journal import RetireOp
from ..repository.locks import MAINTENANCE
from ..repository.points import PointRecord, point_object
from ..repository.repo import Repository
from ..repository.store import Store
from .shared_gc import SharedGcReport, collect, repack_packs

REWRITE_BATCH = 64  # points per journal entry at most
REWRITE_BYTES = 256 << 20  # and about this many bytes of the block maps they name (a full map
# of a 2 TiB disk at 64 KiB blocks takes up to 512 MiB: 64 of them must not be held at once)
READERS = 8  # key headers read at once (one small range GET each on object storage)
SCANNED = ("packs/", "maps/", "points/", "journal/", "sources/")  # keys/, leases/: no epoch

Stale = Callable[[str], bool]  # object name -> sealed under an epoch being retired
Resealer = Callable[[Store, RepositorySealer, Stale], int]


@dataclass
class RetireReport:
    retiring: list[int] = field(default_factory=list)
    current: int = 0
    points_rewritten: int = 0
    maps_rewritten: int = 0
    packs_repacked: int = 0
    objects_resealed: int = 0
    checkpoint: int = 0
    remaining: dict[str, int] = field(default_factory=dict)  # prefix -> objects still sealed
    dropped: list[int] = field(default_factory=list)  # epochs whose keys left the keyring
    epochs: list[int] = field(default_factory=list)  # the epochs the keyring holds now
    gc: SharedGcReport = field(default_factory=SharedGcReport)
    seconds: float = 0.0


def retire(repo: Repository, *, grace: float, reseal: Iterable[Resealer] = (),
           tick: Callable[[str], None] | None = None) -> RetireReport:
    """Retire every key epoch but the current one (module doc)."""
    started = time.monotonic()
    sealer = repo.sealer
    if not isinstance(sealer, RepositorySealer):
        raise RepoError(f"{repo.store.location} is not encrypted: it has no key to retire")
    with repo.lock(MAINTENANCE, "key retire"):
        keyring = sealer.keyring
        empty_older(repo.store, keyring.generation)  # left by a run that stopped at its end
        old = frozenset(keyring.epochs) - {keyring.current}
        report = RetireReport(sorted(old), keyring.current,
                              gc=SharedGcReport(grace_seconds=grace))
        if not old:
            raise RepoError(f"{repo.store.location}: nothing to retire, every key epoch but "
                            f"the current one ({keyring.current}) is retired already; run "
                            "'repo-engine key rotate' first to retire the current one")
        headers = _Headers(repo.store, old, tick)
        repo.commit_journal(lambda _seq: [RetireOp(sorted(old))])
        _rewrite_points(repo, headers, report, tick)
        _repack(repo, headers, report, tick)
        report.objects_resealed = sum(r(repo.store, sealer, headers.stale) for r in reseal)
        repo.refresh()
        report.checkpoint = write_checkpoint(repo.store, repo.index, sealer)
        collect(repo, report.gc, grace, tick)
        report.remaining = headers.remaining()
        if not report.remaining:
            report.dropped = sorted(old)
            sealer.drop_epochs(old)
        report.epochs = sorted(sealer.keyring.epochs)
    report.seconds = round(time.monotonic() - started, 3)
    return report


class _Headers:
    """Which objects the epochs being retired seal, read from their key headers."""

    def __init__(self, store: Store, old: frozenset[int],
                 tick: Callable[[str], None] | None) -> None:
        self.store, self.old, self.tick = store, old, tick

    def stale(self, name: str) -> bool:
        return stored_epoch(self.store, name) in self.old

    def which(self, names: Iterable[str]) -> set[str]:
        """Those of `names` sealed under an old epoch."""
        names = list(names)
        if self.tick:
            self.tick(f"reading the key headers of {len(names)} objects")
        with ThreadPoolExecutor(READERS, thread_name_prefix="retire-scan") as pool:
            return {n for n, stale in zip(names, pool.map(self.stale, names)) if stale}

    def remaining(self) -> dict[str, int]:
        """Per prefix, how many objects an old epoch still seals."""
        found: dict[str, int] = {}
        for prefix in SCANNED:
            count = len(self.which(info.name for info in self.store.list(prefix)))
            if count:
                found[prefix.rstrip("/")] = count
        return found


def _rewrite_points(repo: Repository, headers: _Headers, report: RetireReport,
                    tick: Callable[[str], None] | None) -> None:
    points = repo.points()
    names = {map_object(d.map): d.map for p in points for d in p.disks}
    stale_maps = {names[n] for n in headers.which(names)}
    stale_points = headers.which(point_object(p.id) for p in points)
    todo = [p for p in points
            if point_object(p.id) in stale_points or any(d.map in stale_maps for d in p.disks)]
    renamed: dict[str, str] = {}
    rewrites: list[PointRecord] = []
    maps: dict[str, BlockMap] = {}  # every map the batch names: the commit needs them all
    for done, point in enumerate(todo, 1):
        rewrites.append(_resealed(repo, point, stale_maps, renamed, maps))
        if (len(rewrites) < REWRITE_BATCH and _held(maps) < REWRITE_BYTES
                and done < len(todo)):
            continue
        if tick:
            tick(f"rewriting points {done}/{len(todo)}")
        repo.commit_forget(rewrites, [], lambda _records: None, maps)
        report.points_rewritten += len(rewrites)
        rewrites, maps = [], {}
    report.maps_rewritten = len(renamed)


def _resealed(repo: Repository, point: PointRecord, stale_maps: set[str],
              renamed: dict[str, str], maps: dict[str, BlockMap]) -> PointRecord:
    """The next generation of `point`, its stale maps written again under the current epoch;
    every map it names is added to `maps`."""
    disks = []
    for disk in point.disks:
        name = renamed.get(disk.map, disk.map)
        if name not in maps:
            bmap = repo.read_map(name)
            if disk.map in stale_maps and disk.map not in renamed:
                name = renamed[disk.map] = repo.write_map(bmap)
            maps[name] = bmap
        disks.append(replace(disk, map=name))
    return repo.next_generation(point, disks=disks)


def _held(maps: dict[str, BlockMap]) -> int:
    """The bytes `maps` take in memory."""
    return sum(m.refs.nbytes + (0 if m.blocks is None else m.blocks.nbytes)
               for m in maps.values())


def _repack(repo: Repository, headers: _Headers, report: RetireReport,
            tick: Callable[[str], None] | None) -> None:
    names = {info.name for info in repo.objects("packs")}
    stale = {name.rsplit("/", 1)[1].removesuffix(".pack") for name in headers.which(names)}
    if stale:
        repack_packs(repo, report.gc, stale, tick)
    report.packs_repacked = report.gc.packs_repacked
