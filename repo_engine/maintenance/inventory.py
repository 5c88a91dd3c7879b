"""What maintenance reads in bulk: the index's ref table as numpy arrays, the objects in the
store (and the temporary files killed writers left there), the maps in use, the sessions (lock
holders) a deletion must outlast, and which points a set of bad refs or maps affects."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import lmdb
import numpy as np

from ..backup.extents import blocks_to_extents
from ..errors import DamageError, LockedError, RepoError
from ..pause import pause_point
from ..repository.atomic import alive, of_this_host, spool_owner, temp_owner, writer_gone
from ..repository.index import Index
from ..repository.index_records import SEALED_DBS
from ..repository.locks import list_locks, remove_if_stale
from ..repository.points import PointRecord
from ..repository.repo import Repository
from ..repository.store import ObjectInfo, TempFile
from ..repository.seals import KEY, PAYLOAD
from .tally import REF_ROW, batches, listed_batches, ref_rows, sealed_batches

# the refs table: key ref u64 big endian, value REF_ROW (id, pack, offset, stored, raw, codec)
REF_TABLE = np.dtype([("ref", "<u8"), ("id", "V32"), ("pack", "<u4"), ("offset", "<u8"),
                      ("stored", "<u4"), ("raw", "<u4"), ("codec", "u1")])


def _scan(txn: lmdb.Transaction, db: object, *, values: bool = True) -> tuple[bytes, bytes]:
    """All keys and values of a database concatenated (no per-row Python objects kept)."""
    parts = list(batches(txn, db, values=values))
    return b"".join(k for k, _ in parts), b"".join(v for _, v in parts)


def scan_refs(index: Index, txn: lmdb.Transaction) -> np.ndarray:
    """Every row of the refs table, sorted by ref, as a REF_TABLE array, filled a batch at a
    time (the table's bytes are never held whole beside it)."""
    out = np.zeros(txn.stat(index.refs)["entries"], dtype=REF_TABLE)  # the rows `txn` sees
    at = 0
    for refs, rows in ref_rows(txn, index):
        _fill(out[at:at + len(refs)], refs, rows)
        at += len(refs)
    return out


def _fill(table: np.ndarray, refs: np.ndarray, rows: np.ndarray) -> None:
    """Set the REF_TABLE rows `table` from a batch of the refs table (keys, REF_ROW rows)."""
    table["ref"] = refs
    for name in REF_ROW.names:
        table[name] = rows[name]


def refs_in_packs(index: Index, txn: lmdb.Transaction, numbers: Iterable[int]) -> np.ndarray:
    """The rows (REF_TABLE, by ref) of the refs the index places in the packs `numbers`: the
    table read a batch at a time and only these rows kept, so that a damaged pack found in a
    repository of any size costs memory for its own chunks only."""
    wanted = np.array(sorted(set(numbers)), dtype=np.uint32)
    parts = []
    for refs, rows in ref_rows(txn, index):
        hit = np.isin(rows["pack"], wanted)
        if hit.any():
            part = np.zeros(int(np.count_nonzero(hit)), dtype=REF_TABLE)
            _fill(part, refs[hit], rows[hit])
            parts.append(part)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=REF_TABLE)


def scan_u64_keys(txn: lmdb.Transaction, db: object) -> np.ndarray:
    """Big-endian u64 keys of a database (refcount, gcq, quarantine) as sorted u64."""
    keys, _ = _scan(txn, db, values=False)
    return np.frombuffer(keys, dtype=">u8").astype(np.uint64)


@dataclass
class SealedRows:
    """A count table read whole: keys (n, key size) and payloads (n, payload size) as uint8,
    and which rows pass their check (seals.py)."""

    keys: np.ndarray
    payloads: np.ndarray
    ok: np.ndarray


def scan_sealed(index: Index, txn: lmdb.Transaction, table: str) -> SealedRows:
    """Every row of a (small) count table with its check verified (tally.sealed_batches)."""
    parts = list(sealed_batches(index, txn, table))
    if not parts:
        key_size, size = KEY[table], PAYLOAD[table]
        return SealedRows(np.zeros((0, key_size), np.uint8), np.zeros((0, size), np.uint8),
                          np.zeros(0, bool))
    return SealedRows(*(np.concatenate([p[i] for p in parts]) for i in range(3)))


def count_damage(index: Index, txn: lmdb.Transaction) -> list[str]:
    """What fails its check in the count tables gc trusts (empty: the counts are as written),
    the tables read a batch at a time."""
    messages = []
    for table in SEALED_DBS:
        bad, first = 0, ""
        for keys, _payloads, ok in sealed_batches(index, txn, table):
            wrong = np.flatnonzero(~ok)
            if len(wrong) and not bad:
                first = keys[wrong[0]].tobytes().hex()
            bad += len(wrong)
        if bad:
            messages.append(f"{bad} {table} entries of the index fail their check (first: "
                            f"{first})")
    return messages


def unfindable_refs(index: Index, txn: lmdb.Transaction) -> tuple[np.ndarray, str]:
    """The refs `unfindable` lists, sorted (none without the table: a read-only index of
    version 3), and what fails its check ("" when nothing; entries of a version 4 index carry
    no check and are taken as written)."""
    if index.unfindable is None:
        return np.zeros(0, np.uint64), ""
    if not index.listed:
        return scan_u64_keys(txn, index.unfindable), ""
    parts, bad, first = [np.zeros(0, np.uint64)], 0, ""
    for keys, ok in listed_batches(index, txn, "unfindable"):
        parts.append(keys.copy().view(">u8")[:, 0].astype(np.uint64))
        if not ok.all() and not bad:
            first = keys[np.flatnonzero(~ok)[0]].tobytes().hex()
        bad += int((~ok).sum())
    damage = (f"{bad} entries of the index's unfindable table fail their check (first: "
              f"{first}): a backup could deduplicate against a chunk taken out of "
              "deduplication; run 'repo-engine rebuild-index'") if bad else ""
    return np.unique(np.concatenate(parts)), damage


def trusted_unfindable(index: Index, txn: lmdb.Transaction) -> np.ndarray:
    """`unfindable_refs`, refused (DamageError) when an entry fails its check."""
    refs, damage = unfindable_refs(index, txn)
    if damage:
        raise DamageError(damage)
    return refs


def sealed_u64(index: Index, txn: lmdb.Transaction, table: str) -> dict[str, int]:
    """A count table of u64 values by hex key, as read (mapuse, deadmaps)."""
    rows = scan_sealed(index, txn, table)
    return dict(zip((k.tobytes().hex() for k in rows.keys),
                    rows.payloads.copy().view("<u8")[:, 0].tolist()))


KINDS = {"packs": (".pack", 64), "maps": (".map", 64), "points": (".point", 16)}
# an object's name of each kind: its last part is its stem (lowercase hex of the kind's length)
# and the kind's suffix, matched in one call (a gc lists tens of thousands of objects)
_NAMES = {kind: re.compile(rf"(?s:.*/)?([0-9a-f]{{{length}}}){re.escape(suffix)}")
          for kind, (suffix, length) in KINDS.items()}


def objects_under(repo: Repository, kind: str,
                  skipped: list[str] | None = None) -> dict[str, ObjectInfo]:
    """{name: object} of the objects of `kind` ("packs", "maps", "points") whose names are
    ones the repository gives (KINDS: suffix and hex length). Anything else (in a directory
    store: a symlink, FIFO, device, never followed; anywhere: a stray name) is left alone and
    described in `skipped`: maintenance never reads or deletes through it."""
    infos = {info.name: info for info in repo.objects(kind, skipped)}
    return {stem: infos[name] for stem, name in _stems(repo, kind, infos, skipped)}


@dataclass
class StoreListing:
    """The store listed for maintenance (`list_store`): its packs by name with their sizes,
    the names of its maps and manifests (their sizes unread: a local store reads no file's
    metadata for them), each kind as `objects_under` takes it, and the temporary files of
    writes met (a local store's)."""

    packs: dict[str, ObjectInfo]
    maps: list[str]
    points: list[str]
    temps: list[TempFile]


# the directories a repository writes objects to (docs/FORMAT.md, "Repository layout"); a local
# store's are walked for the temporary files of killed writes too
OBJECT_DIRS = ("journal/", "keys/", "leases/", "sources/")


def list_store(repo: Repository, skipped: list[str] | None = None) -> StoreListing:
    """The objects of each kind of KINDS, and the temporary files of writes: on a store whose
    writes leave such files (a local directory: `Store.leaves_temps`) those of the
    repository's other object directories (OBJECT_DIRS) come with them, at the cost of walking
    a few small directories more, never one that is none of the repository's (a filesystem
    root's lost+found, which only root may read). Object storage, which has none, is listed by
    the kinds' prefixes alone (a journal of thousands of entries would cost a LIST request per
    thousand)."""
    store = repo.store
    temps: list[TempFile] = []
    packs = {info.name: info for info in store.list("packs/", skipped, temps)}
    listing = StoreListing({stem: packs[name] for stem, name in _stems(repo, "packs", packs,
                                                                      skipped)}, [], [], temps)
    for kind, out in (("maps", listing.maps), ("points", listing.points)):
        out += [stem for stem, _ in _stems(repo, kind, store.names(f"{kind}/", skipped, temps),
                                           skipped)]
    for prefix in OBJECT_DIRS if store.leaves_temps else ():
        for _name in store.names(prefix, skipped, temps):
            pass  # walked for the temporary files only
    return listing


def _stems(repo: Repository, kind: str, names: Iterable[str],
           skipped: list[str] | None) -> Iterator[tuple[str, str]]:
    """(stem, name) of each of `names`, objects under `kind/`, that is a name of `kind`; one
    with the kind's suffix and another stem is described in `skipped`."""
    suffix, named = KINDS[kind][0], _NAMES[kind].fullmatch
    for name in names:
        found = named(name)
        if found is not None:
            yield found[1], name
        elif skipped is not None and name.endswith(suffix):
            skipped.append(f"{repo.store.location}/{name} does not have a repository object "
                           "name: left alone, never read (remove it)")


def dead_writes(temps: Iterable[TempFile], before: float | None,
                seen: Mapping[str, float] | None = None) -> list[TempFile]:
    """The temporary files of `temps` whose writer is gone: this host's whose pid is not alive
    here; another host's modified before `before` (seconds since the epoch; None: a repository
    of one writer, where they are left to their own host's gc) and, with `seen` (when this
    host first saw each: Index.first_seen), seen first before `before` too: a modification
    time is of the writer's or the file server's clock, which may run behind this one. A name
    of an earlier version gives no host: this host's when `before` is None (as a spool
    file's), else another's."""
    out = []
    for temp in temps:
        owner = temp_owner(temp.name.rpartition("/")[2])
        if owner is None:
            continue  # not a name the repository gives: left alone
        if of_this_host(owner, legacy_ours=before is None):
            gone = not alive(owner.pid)
        else:
            gone = (before is not None and temp.modified < before
                    and (seen is None or seen.get(temp.name, before) < before))
        if gone:
            out.append(temp)
    return out


# -- sessions --------------------------------------------------------------------------------
def sessions(repo: Repository, own: Path | None) -> list[Path]:
    """Lock files held now by others (backups, restores, scrubs): sessions that may hold refs,
    map names or pack places they read before our last index change."""
    return [path for path, _ in list_locks(repo.locks_dir) if path != own]


def wait_for(repo: Repository, held: list[Path], *, timeout: float | None,
             tick: Callable[[str], None] | None = None) -> float:
    """Wait until every lock in `held` is released (or its holder died); returns seconds."""
    started = time.monotonic()
    pending = list(held)
    while pending:
        still = []
        held_now = dict(list_locks(repo.locks_dir))
        for path in pending:
            info = held_now.get(path)
            if info is None:
                continue
            if remove_if_stale(path, info):
                continue
            still.append(path)
        pending = still
        if not pending:
            break
        waited = time.monotonic() - started
        if timeout is not None and waited > timeout:
            raise LockedError(f"gave up after {waited:.0f} s waiting for {len(pending)} sessions "
                              "(backups or restores) that started before this run; nothing "
                              "was lost: run the command again later")
        pause_point("gc.waiting")
        if tick:
            tick(f"waiting for {len(pending)} running backups/restores")
        time.sleep(0.05)
    return time.monotonic() - started


def dead_tmp_files(repo: Repository, *, shared: bool) -> list[Path]:
    """Spool files (packs, checkpoints being built) that dead processes of this host were
    writing. Another host's (a local store shared over the network) are its own gc's to judge;
    a name of an earlier version gives no host: this host's on a repository of one writer,
    left alone on a `shared` one (a host not yet upgraded may be writing it)."""
    return [path for path in repo.store.spool_dir().glob("*.tmp")
            if writer_gone(spool_owner(path.name), legacy_ours=not shared)]


def remove_files(paths: Iterable[Path]) -> int:
    """Unlink each of `paths` (one gone meanwhile counts too); how many."""
    count = 0
    for path in paths:
        path.unlink(missing_ok=True)
        count += 1
    return count


# -- damage attribution ----------------------------------------------------------------------
@dataclass
class Affected:
    point: str
    vm: str
    time: str
    disk: str
    blocks: int
    extents: list[list[int]]


def affected_by(repo: Repository, bad_refs: np.ndarray, bad_maps: set[str] = frozenset(),
                points: list[PointRecord] | None = None) -> list[Affected]:
    """Points, disks and byte extents whose content uses a bad ref or depends on a bad map.
    Each map is read once, and only whether it holds a bad ref is kept of it."""
    bad_refs = np.unique(np.asarray(bad_refs, dtype=np.uint64))
    points = repo.points() if points is None else points
    catalog = {p.id: p for p in points}
    uses = _MapUse(repo, bad_refs)
    out: list[Affected] = []
    for point in points:
        for disk in point.disks:
            chain = chain_maps(catalog, point, disk.key)
            if bad_maps & set(chain) or any(uses.unreadable(n) for n in chain) or chain == []:
                extents = [[0, disk.capacity]]
                out.append(Affected(point.id, point.vm, point.time, disk.key,
                                    disk.nblocks, extents))
                continue
            if not len(bad_refs) or not any(uses.holds_bad(n) for n in chain):
                continue
            try:
                blocks = _blocks_using(repo, point, disk.key, bad_refs)
            except RepoError:
                out.append(Affected(point.id, point.vm, point.time, disk.key, disk.nblocks,
                                    [[0, disk.capacity]]))
                continue
            if len(blocks):
                out.append(Affected(point.id, point.vm, point.time, disk.key, len(blocks),
                                    blocks_to_extents(blocks, disk.block_size, disk.capacity)))
    return out


class _MapUse:
    """Per map read: whether it holds one of `bad_refs` (None: it cannot be read)."""

    def __init__(self, repo: Repository, bad_refs: np.ndarray) -> None:
        self.repo, self.bad_refs = repo, bad_refs
        self.found: dict[str, bool | None] = {}

    def _get(self, name: str) -> bool | None:
        if name not in self.found:
            try:
                refs = self.repo.map_refs(name)
                self.found[name] = len(np.intersect1d(refs, self.bad_refs)) > 0
            except RepoError:
                self.found[name] = None
        return self.found[name]

    def unreadable(self, name: str) -> bool:
        """Whether `name` was read already and could not be."""
        return name in self.found and self.found[name] is None

    def holds_bad(self, name: str) -> bool:
        return bool(self._get(name))


def _blocks_using(repo: Repository, point: PointRecord, key: str,
                  bad_refs: np.ndarray) -> np.ndarray:
    """The blocks of disk `key` at `point` that hold one of `bad_refs` (sorted), its map
    streamed window by window."""
    return np.concatenate([np.zeros(0, np.uint64)] + [
        np.flatnonzero(np.isin(window, bad_refs)).astype(np.uint64) + np.uint64(first)
        for first, window in repo.resolve_windows(point, key)])


def chain_maps(catalog: dict[str, PointRecord], point: PointRecord, key: str) -> list[str]:
    """Map names of a disk's chain, newest first; [] when the chain is broken."""
    names, gap = _walk(catalog, point, key)
    return [] if gap is not None else names


def chain_gap(catalog: dict[str, PointRecord], point: PointRecord, key: str) -> str | None:
    """The id of the ancestor where the chain of `point`'s disk `key` breaks: one `catalog`
    lacks, or one without the disk ("?" for a chain that never ends); None when it is whole."""
    return _walk(catalog, point, key)[1]


def _walk(catalog: dict[str, PointRecord], point: PointRecord,
          key: str) -> tuple[list[str], str | None]:
    names: list[str] = []
    current: PointRecord | None = point
    current_id = point.id
    while current is not None:
        disk = current.disk(key)
        if disk is None or len(names) > 100000:
            return names, current_id if disk is None else "?"
        names.append(disk.map)
        if disk.kind == "full":
            return names, None
        current_id = disk.parent or "?"
        current = catalog.get(disk.parent or "")
    return names, current_id
