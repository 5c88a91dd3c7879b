"""The repository: config, packs, maps, points, index and locks tied together.

Objects (config, packs, maps, points) live in a store (store/): `config`, `packs/xx/<name>.pack`,
`maps/xx/<name>.map`, `points/<id>.point`; nothing above this package names them or knows where
their bytes are. The LMDB index (`index/`), the lock files (`locks/`) and the spool of packs being
written (`tmp/`) are local files under the local store's root. Write order and concurrency:
docs/FORMAT.md.

A shared repository (config `shared`: several hosts write it) keeps its index and catalog in the
store as a journal (journal.py); the LMDB index under `local` is this host's cache of it, brought
up to date by `refresh()` (checkpoint.catch_up), which every command runs after taking its lock.
Each change (a pack, a ref range, a point, a forget) is a journal commit (`commit_journal`),
applied to the cache right after (docs/FORMAT.md, "Journal").

The index is opened on first use, so a command that locks before it reads opens the index in
place under its lock. One that read it earlier (an index `rebuild-index` may have replaced before
the lock) gets it reopened by `lock()`: nothing is ever written into a replaced index.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lmdb
import numpy as np

from ..errors import (ChainBroken, CommitStalled, DamageError, LockedError, NotARepository,
                      PointNotFound, RepoError, UsageError)
from ..pause import pause_point
from .blockmap import (BlockMap, MapBatch, MapStream, map_object, map_refs, open_map,
                       read_map, resolve_windows, unique_nonzero, write_map)
from .chunks import ChunkCodec
from .config import RepoConfig, read_config, write_config
from .crypto.null import NullSealer, PartOpener, Sealer
from .index import Index, MapMissing, ParentGone
from .journal import (Entry, ForgetOp, NothingToCommit, Op, PackOp, PointOp, RefsOp,
                      append, entry_object, manifest_key)
from .locks import EXCLUSIVE, SHARED, RepoLock, is_stale, list_locks
from .packs import FinishedPack, PackKeys, PackWriter, pack_object, read_trailer
from .points import (DiskRecord, PointRecord, encoded_point, point_object, read_point,
                     write_point)
from .safefile import DIR_MODE, check_dir, is_regular, kind_of, make_dir
from .store import ObjectInfo, RangeReader, Store
from .store.local import LocalStore

if TYPE_CHECKING:  # leases and checkpoints serve shared repositories only: imported there
    from .leases import SharedLock

SHARED_REFS = 1 << 32  # a shared repository's ref range per claim: one claim per backup
SUBDIRS = ("packs", "maps", "points", "index", "locks", "tmp")
INDEX_FILES = ("data.mdb", "lock.mdb")
REWRITE_THREADS = 8  # manifests `rewrite_points` reads at once from object storage
MAP_OPENS = 8  # maps of a chain opened at once (a request each on object storage)
CHAIN_POINTS = 1 << 16  # records `chain` keeps made (then it starts again)
# the stored bytes of a chunk of one pack, checked: (offset, chunk id, blob, codec, raw length,
# ref); DamageError when it is damaged (Repository.chunk_checker)
ChunkCheck = Callable[[int, bytes, bytes | memoryview, int, int, int], bytes | memoryview]


class Repository:
    def __init__(self, store: Store, config: RepoConfig, local: Path,
                 index: Index | None = None, *, sealer: Sealer = NullSealer(),
                 chunk_key: bytes | None = None) -> None:
        """`local`: the directory of this host's local files (`index/`, `locks/`): the local
        store's own root, or a per-host cache directory for a repository in a remote store.
        `index`: an index the caller opened (kept as it is); else `local/index`, opened on
        first use. `sealer` and `chunk_key`: an encrypted repository's (crypto/access.py),
        through which every object is written and read; else the config's chunk key."""
        assert bool(config.encryption) == sealer.encrypted, "open an encrypted repository " \
            "through location.open_repository, with its passphrase"
        self.store = store
        self.sealer = sealer
        self.location = store.location  # what messages call the repository
        self.path = local
        self.config = config
        self._index = index
        self._opened: FileId | None = None  # the index file we opened ourselves
        self._opening = threading.Lock()  # threads of one process share one environment
        self._map_opener: ThreadPoolExecutor | None = None  # one pool for every chain opened
        self._chain_points: dict[int, tuple[dict, PointRecord]] = {}  # `_chain_record`
        self._scans = False  # the index opened for reading whole tables (scanning)
        self.codec = ChunkCodec(chunk_key or config.key_bytes, config.compression_level)
        self.pack_keys = PackKeys(store, sealer)
        self.locks_dir = self.path / "locks"
        # a shared repository's locks also hold leases in the store (leases.py)
        self.lease_seconds = 0.0
        if config.shared:
            from .leases import lease_seconds
            self.lease_seconds = lease_seconds()
        self.held: list[SharedLock] = []
        self._locks: list[RepoLock] = []  # taken by `lock` on an unshared repository

    # -- life cycle -----------------------------------------------------------------------
    @classmethod
    def init(cls, path: Path, *, parents: bool = False, **settings: int) -> "Repository":
        """Create a repository in `path` (see `new_directory`)."""
        config = RepoConfig.new(**settings)
        new_directory(path, parents)
        for sub in SUBDIRS:
            make_dir(path / sub)
        index = Index(path / "index", create=True)
        store = LocalStore(path)
        write_config(store, config)  # last: its presence marks a finished init
        return cls(store, config, path, index)

    @classmethod
    def open(cls, path: Path) -> "Repository":
        check_repository_directory(path)
        store = LocalStore(path)
        return cls.attach(store, path, read_config(store))

    @classmethod
    def create(cls, store: Store, local: Path, config: RepoConfig,
               **keys: Any) -> "Repository":
        """Create a repository with `config` in `store` (ObjectExists when it holds a config
        already), this host's local files in `local` (created owner-only: `index/`, `locks/`);
        `keys`: the sealer and chunk key of an encrypted one (`__init__`)."""
        make_local(local)
        if config.shared:
            _claim_cache(local / "index", config.repo_id, store.location)
        index = Index(local / "index", create=True)
        try:
            write_config(store, config)  # last: its presence marks a finished init
        except BaseException:
            index.close()
            raise
        return cls(store, config, local, index, **keys)

    @classmethod
    def attach(cls, store: Store, local: Path, config: RepoConfig, *,
               claim: bool = True, **keys: Any) -> "Repository":
        """Open the repository in `store` whose config the caller read; `local` holds this
        host's files. A shared repository's are created when missing (its cache starts empty
        and is filled from the journal by `refresh`) and, with `claim`, the cache is checked to
        be this repository's (rebuild-index, which replaces a cache it never opens, claims
        nothing); an unshared one's are its store's own directory, checked as `open` checks it."""
        if not config.shared:
            check_layout(local)
        else:
            make_local(local)
            if claim:
                _claim_cache(local / "index", config.repo_id, store.location)
        return cls(store, config, local, **keys)

    @property
    def index(self) -> Index:
        with self._opening:
            if self._index is None:
                self._index, self._opened = _open_index(self.path / "index", self.locks_dir,
                                                        self._scans)
            return self._index

    @contextmanager
    def scanning(self) -> Iterator[None]:
        """Meanwhile the index is mapped with the kernel's read-ahead on, for a command that
        reads whole tables (verify). An index over half the available memory is otherwise mapped
        without it, so that a random look-up reads one page (lmdbfile.readahead_pays); a scan in
        key order would then fault a page at a time: a tenth of `refs` at 100 M chunks read in
        12.8 s against 3.2 s with read-ahead, of `ids` 19.8 s against 4.5 s. The index is
        opened again on entry and on exit when it is open (opening maps no page)."""
        with self._opening:
            self._scans = True
        self.close_index()
        try:
            yield
        finally:
            with self._opening:
                self._scans = False
            self.close_index()

    def close(self) -> None:
        self.close_index()
        if self._map_opener is not None:
            self._map_opener.shutdown()
            self._map_opener = None
        self.store.close()

    def close_index(self) -> None:
        if self._index is not None:
            self._index.close()
            self._index, self._opened = None, None

    def __enter__(self) -> "Repository":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def lock(self, kind: str, command: str) -> RepoLock | SharedLock | AbstractContextManager:
        """Take a lock; then make sure the index we read from now on is the one in place (an
        index opened before the lock may have been replaced by `rebuild-index`, which held the
        exclusive lock, and can no longer be replaced while we hold ours). On a shared
        repository the lock also writes this session's lease, and a maintenance lock takes the
        store's maintenance lock (leases.py), before anything is read.

        A shared lock asked for while this object holds a lock of an unshared repository (the
        engine's inside the CLI's) is that lock: gc waits for it and rebuild-index is excluded
        until it is released, so a second lock file would add only its fsync and a listing. On a
        shared repository it is the shared lock held already too, whose session lease was
        written before any refresh of this command (what gc's waits rely on): a second lease
        would cost a PUT, a GET before every journal commit and two requests at its release.
        The cache is refreshed all the same (a backup's VM lock, taken in between, must be
        followed by a refresh that sees the VM's last point)."""
        pause_point("repository.before_lock")
        self._locks = [held for held in self._locks if held.holding]
        if kind == SHARED and self._locks:
            return nullcontext()
        lock = _Held() if kind == SHARED and self._session_held() else self._take(kind, command)
        if self._opened is not None and _file_id(self.path / "index") != self._opened:
            self.close_index()  # reopened on next use
        try:
            self.refresh(check=True)
            if self.sealer.encrypted:  # what it seals from now on, committed or not (a
                # manifest a repair rewrites), under an epoch `key retire` did not retire
                self.sealer.avoid(self.index.retired_epochs())
        except BaseException:
            lock.release()
            raise
        return lock

    def _take(self, kind: str, command: str) -> RepoLock | SharedLock:
        """A new local lock, with its leases on a shared repository."""
        lock: RepoLock | SharedLock = RepoLock(self.locks_dir, kind, command)
        if self.config.shared and not lock.note:
            from .leases import with_leases
            lock = with_leases(self.store, self.index, lock, command, self.lease_seconds,
                               self.held)
        elif not self.config.shared:
            self._locks.append(lock)
        return lock

    def _session_held(self) -> bool:
        """Whether this object holds a shared lock with its session lease."""
        if not self.held:  # nothing to look for: a repository that is not shared never loads
            return False   # the leases module
        from .leases import SESSION
        return any(held.kind == SHARED and any(lease.info.kind == SESSION for lease in held.leases)
                   for held in self.held)

    def check_locks(self) -> None:
        """LockedError when a lock this object holds was taken from it (RepoLock.check);
        LeaseLost when a lease was lost: called before each commit."""
        for lock in self._locks:
            lock.check()
        self.check_leases()

    def check_leases(self) -> None:
        """LeaseLost when a lease of a lock this process holds was lost: called before every
        attempt at a journal commit and every batch of deletes on a shared repository."""
        for held in self.held:
            held.check()

    def refresh(self, check: bool = False) -> int:
        """Bring this host's cache up to the journal's head; returns the head's seq (0 for a
        repository that is not shared: its index is the truth). `check`: also make sure the
        journal still holds what the cache holds (checkpoint.catch_up), as `lock` does."""
        if not self.config.shared:
            return 0
        from .checkpoint import catch_up
        return catch_up(self.store, self.index, check=check, sealer=self.sealer)

    def commit_journal(self, build: Callable[[int], list[Op]]) -> Entry:
        """Commit the ops `build(seq)` returns as journal entry `seq` (see journal.append:
        `build` runs with the cache caught up to seq - 1, and again after a lost race; raising
        gives up), then apply the entry to the cache, so this host's next lookups see it.
        Maintenance commits its own ops this way, e.g.
        `repo.commit_journal(lambda seq: [PlanOp(new_plan_id(), now, refs, packs, maps, objs)])`."""
        entry = append(self.store, self._head, partial(self._attempt, build), self.sealer)
        self.index.apply_entry(entry)
        return entry

    def _head(self) -> int:
        """`refresh()` for a commit, with the entry it stopped at checked to be still in the
        store (one HEAD): entries are compacted past a cache only once their checkpoint is an
        hour old, which the cache's own age tells (checkpoint.catch_up), but not to a writer
        whose clocks stood still meanwhile (a VM paused for hours). Without the check it would
        take the compacted gap for the head and commit where no other host reads; with it, it
        loads the checkpoint (`refresh(check=True)`) and commits at the head."""
        head = self.refresh()
        if head and not self.store.exists(entry_object(head)):
            head = self.refresh(check=True)
        return head

    def _attempt(self, build: Callable[[int], list[Op]], seq: int) -> list[Op]:
        """`build(seq)` for one attempt at `seq`, each after checking this process's leases
        (an attempt that lost the race for its seq may have waited out its lease meanwhile: a
        stall between attempts is caught as before the first), unless this process sealed
        something under a key epoch `key retire` retired meanwhile (it opened the repository
        before the rotation): what it wrote would become unreadable once the epoch's key is
        dropped, so none of it may be committed. The entry itself is sealed under an epoch that
        is not retired (`Sealer.avoid`)."""
        self.check_leases()
        retired = self.index.retired_epochs()
        self.sealer.avoid(retired)
        retired &= self.sealer.sealed_epochs
        if retired:
            raise RepoError(f"{self.store.location}: 'key retire' retired key epoch "
                            f"{min(retired)}, which this command sealed its data with (it "
                            "started before 'key rotate'); nothing more was committed: run it "
                            "again")
        return build(seq)

    def vm_lock(self, vm: str, command: str) -> RepoLock | SharedLock:
        """Held by a backup of `vm` for its whole run: a second backup of it is refused (on a
        shared repository also by the store's VM lock: other hosts cannot see ours)."""
        local = RepoLock.for_vm(self.locks_dir, vm, command)
        if not self.config.shared:
            return local
        from .leases import with_vm_lease
        return with_vm_lease(self.store, self.index, local, vm, command, self.lease_seconds,
                             self.held)

    def require_writable(self, command: str) -> None:
        """RepoError when the repository can only be read (read-only media or snapshot)."""
        if self.index.read_only:
            raise RepoError(f"the repository at {self.location} is read-only; {command!r} needs to "
                            "write to it")

    # -- packs and maps -------------------------------------------------------------------
    def pack_writer(self) -> PackWriter:
        return PackWriter(self.store, self.sealer)

    def commit_pack(self, writer: PackWriter) -> FinishedPack:
        """Publish a pack durably, then record it in the index (write order step 1 -> 2)."""
        finished = writer.finish()
        self.index_packs([finished])
        return finished

    def index_packs(self, packs: list[FinishedPack]) -> None:
        """Record published packs (only `SealedPack.publish` makes a FinishedPack: each is
        durable in the store) in the index; in a shared repository as one journal entry, so
        that packs published together cost one commit."""
        if self.config.shared:
            self.commit_journal(partial(self.pack_ops, packs))
            return
        for pack in packs:
            self.index.commit_pack(pack)

    def pack_ops(self, packs: list[FinishedPack], _seq: int) -> list[Op]:
        """The `pack` ops of `packs`, with the cache caught up: CommitStalled when a sweep
        deleted one (the writer stalled past its lease after publishing it, and gc found it in
        no cache). Indexed all the same, it would place chunks that are gone, and other hosts
        would deduplicate against them."""
        swept = self.index.swept([pack.name for pack in packs])
        if swept:
            raise CommitStalled(f"gc deleted pack {min(swept)}, uploaded and not yet "
                                "indexed")
        return [PackOp.of(pack) for pack in packs]

    def reserve_refs(self, count: int) -> range:
        """Fresh refs for new chunks, never handed out before: `count` of them from the index's
        counter; in a shared repository a range of SHARED_REFS claimed through the journal, so
        that no two hosts ever use the same ref."""
        if not self.config.shared:
            first = self.index.reserve_refs(count)
            return range(first, first + count)
        claim = self.commit_journal(
            lambda _seq: [RefsOp(max(self.index.meta_u64("next_ref"), 1), SHARED_REFS)]).ops[0]
        assert isinstance(claim, RefsOp)
        return range(claim.first, claim.first + claim.count)

    def write_map(self, bmap: BlockMap) -> str:
        """Store a map durably; returns its name. In a shared repository a name that gc doomed
        (a pending plan or a sweep lists it) is avoided: the map is written salted."""
        return write_map(self.store, bmap, doomed=self._doomed(), sealer=self.sealer)

    def map_batch(self) -> MapBatch:
        """Maps to store together, named as `write_map` names them (blockmap.MapBatch)."""
        return MapBatch(self.store, self.sealer, self._doomed())

    def _doomed(self) -> Callable[[str], bool] | None:
        if not self.config.shared:
            return None
        return lambda name: bool(self.index.doomed_maps({name}))

    def read_map(self, name: str) -> BlockMap:
        return read_map(self.store, name, self.sealer)

    def map_refs(self, name: str) -> np.ndarray:
        """The distinct non-ZERO refs of map `name`, streamed."""
        return map_refs(self.store, name, self.sealer)

    def read_trailer(self, name: str) -> np.ndarray:
        """The checked trailer of pack `name` (packs.py)."""
        return read_trailer(self.store, pack_object(name), self.sealer)

    def read_pack(self, name: str, size: int) -> bytes:
        """All bytes of pack `name`, which the index says is `size` bytes long (a larger object
        is not that pack: damage)."""
        return self.store.get(pack_object(name), limit=size)

    def read_chunk_range(self, name: str, offset: int, length: int) -> bytes:
        """`length` bytes at `offset` of pack `name` (one chunk, or a run of them)."""
        return self.store.get_range(pack_object(name), offset, length)

    def open_chunk(self, name: str, offset: int, chunk_id: bytes, blob: bytes | memoryview,
                   what: str) -> bytes | memoryview:
        """The stored bytes (`codec.decode` takes them) of chunk `chunk_id`, whose blob `blob`
        was read at `offset` of pack `name`; TamperedError naming `what` when it is not that
        chunk's blob of that place (packs.PackKeys)."""
        return self.pack_keys.open(name, offset, chunk_id, blob, what)

    def checked_chunk(self, name: str, offset: int, chunk_id: bytes, blob: bytes | memoryview,
                      codec: int, raw: int, what: str) -> bytes | memoryview:
        """The stored bytes of chunk `chunk_id` (what a pack writer takes to copy it), whose blob
        `blob` was read at `offset` of pack `name`, once opened (`open_chunk`), decompressed and
        hashed to its id (`codec.decode`); DamageError naming `what` saying which failed."""
        stored = self.open_chunk(name, offset, chunk_id, blob, what)
        self.codec.decode(stored, codec, raw, chunk_id, what)
        return stored

    def chunk_opener(self, name: str) -> PartOpener:
        """`open_chunk` of pack `name`'s chunks as one call each (offset, chunk id, blob): the
        stored bytes, or None when the blob fails authentication (`open_chunk` says why). When
        the pack's key header is damaged, one that refuses every chunk: `open_chunk` reports
        the header for each."""
        try:
            return self.pack_keys.chunk_opener(name)
        except DamageError:
            return _refused

    def chunk_checker(self, name: str) -> ChunkCheck:
        """`checked_chunk` of pack `name`'s chunks as one call each (offset, chunk id, blob,
        codec, raw length, ref), with the pack's opener and the calling thread's decoder bound
        once (so it is for that thread alone): a scrub checks every chunk, and most are small.
        Only a chunk that fails goes the careful way, `checked_chunk`, which says why, naming
        the pack and the ref."""
        open_blob, decode = self.chunk_opener(name), self.codec.decoder()
        careful = self.checked_chunk

        def check(offset: int, chunk_id: bytes, blob: bytes | memoryview, codec: int, raw: int,
                  ref: int) -> bytes | memoryview:
            stored = open_blob(offset, chunk_id, blob)
            if stored is None or decode(stored, codec, raw, chunk_id, None) is None:
                return careful(name, offset, chunk_id, blob, codec, raw,
                               f"pack {name} chunk ref {ref}")
            return stored
        return check

    def read_chunk_stream(self, name: str, offset: int, length: int) -> RangeReader:
        """Bytes [offset, offset + length) of pack `name`, to be read front to back in pieces
        (with the pack's key header, when it is needed and near: PackKeys.open_stream)."""
        return self.pack_keys.open_stream(name, offset, length)

    def objects(self, kind: str, skipped: list[str] | None = None) -> Iterator[ObjectInfo]:
        """Every object of `kind` ("packs", "maps", "points") in the store."""
        return self.store.list(f"{kind}/", skipped)

    # -- points ---------------------------------------------------------------------------
    def commit_point(self, point: PointRecord, maps: dict[str, BlockMap] | None = None) -> None:
        """Manifest durable first, then the catalog entry that makes the point visible (both
        inside the catalog transaction, which assigns the point's commit sequence).

        Also used to rewrite a catalogued point (chain consolidation, protect, damage marks): the
        catalog transaction moves map use and chunk reference counts from the old record's maps
        to the new one's. Raises ParentGone when a disk's parent left the catalog meanwhile (the
        caller rewrites that disk as a full map); rewrites a map file gc removed meanwhile.
        `maps`: block maps, by name, that the caller still holds (not read back from disk).
        In a shared repository the commit is a journal entry (`_point_ops` says what it checks)."""
        maps = self._maps_of(point, maps or {})
        if self.config.shared:
            self.commit_journal(partial(self._point_ops, point, maps, _Written()))
            return
        self._commit_records([(point, maps)], _seal)

    def _commit_records(self, points: list[tuple[PointRecord, dict[str, BlockMap]]],
                        seal: Callable[..., dict]) -> None:
        """The catalog commit of each (point, its maps by name), in one transaction; a map file
        gc removed meanwhile is written again and the commit tried again."""
        commits = [(point.id, point.vm, partial(seal, self.store, point, sealer=self.sealer),
                    {name: unique_refs(bmap) for name, bmap in maps.items()})
                   for point, maps in points]
        for _attempt in range(10):
            self.check_locks()
            try:
                self.index.commit_points(commits, self.map_exists)
                return
            except MapMissing as gone:
                missing = gone
                bmap = next(maps[gone.name] for _, maps in points if gone.name in maps)
                write_map(self.store, bmap, sealer=self.sealer)
        raise missing

    def rewrite_points(self, rewrites: list[tuple[PointRecord, list[DiskRecord]]],
                       maps: dict[str, BlockMap]) -> list[PointRecord]:
        """`rewrite_point(point, disks=disks)` of each pair, oldest first, the catalog records in
        ONE transaction (all or none; a forget of most points rewrites hundreds). The next
        generations' manifests (each read first, by a few threads at once where reads wait:
        `Store.reads_wait`) are made durable together before the transaction (Store.put_many),
        with the commit sequence each point keeps (`_sealed_before`). `maps`: block maps, by
        name, that the caller still holds. A shared repository commits each point in turn."""
        if self.config.shared:
            return [self.rewrite_point(point, disks=disks) for point, disks in rewrites]
        updated = self._next_generations(rewrites)
        self.store.put_many([(point_object(p.id), encoded_point(p, self.sealer))
                             for p in updated])
        # a kept disk's map (the old record names it, forget wrote it for no disk) keeps its
        # use: the commit moves no count of it, so it is not read (each rewrite's kept maps,
        # full maps of huge disks too, would all be held until the one commit)
        self._commit_records([(new, self._maps_of(new, maps, {d.map for d in old.disks}))
                              for (old, _), new in zip(rewrites, updated)], _sealed_before)
        return updated

    def _next_generations(self, rewrites: list[tuple[PointRecord, list[DiskRecord]]]
                          ) -> list[PointRecord]:
        """`next_generation(point, disks=disks)` of each pair. A local manifest is read in turn:
        threads only took turns at the interpreter (the read, its JSON and its checks hold it)."""
        def nxt(pair: tuple[PointRecord, list[DiskRecord]]) -> PointRecord:
            return self.next_generation(pair[0], disks=pair[1])

        if len(rewrites) < 2 or not self.store.reads_wait:
            return list(map(nxt, rewrites))
        with ThreadPoolExecutor(min(REWRITE_THREADS, len(rewrites))) as pool:
            return list(pool.map(nxt, rewrites))

    def _maps_of(self, point: PointRecord, known: dict[str, BlockMap],
                 kept: frozenset[str] | set[str] = frozenset()) -> dict[str, BlockMap]:
        """The block maps `point` names, by name: those in `known`, the others read (but
        those of `kept`, left out)."""
        return {name: known[name] if name in known else self.read_map(name)
                for name in {d.map for d in point.disks} if name in known or name not in kept}

    def _point_ops(self, point: PointRecord, maps: dict[str, BlockMap], written: "_Written",
                   seq: int) -> list[Op]:
        """The journal commit of `point` at `seq`, with the cache caught up to seq - 1: every
        parent still catalogued (else ParentGone), no map gc doomed or deleted (such a map is
        written again, salted when doomed), no ref swept and no manifest of the point swept
        (else CommitStalled: the writer stalled past its lease); then the manifest, with the
        point's commit sequence, durable before the entry. A sweep that took a seq before
        `seq` may still be deleting what it swept: only what it noted tells (journal
        `sweep`); one after it is built caught up to this entry, and keeps what it names."""
        with self.index.env.begin() as txn:  # the records it needs, not the whole catalog
            gone = {d.parent for d in point.disks
                    if d.parent and self.index.get_record(txn, d.parent) is None}
            old = self.index.get_record(txn, point.id)
        if gone:
            raise ParentGone(gone)
        if self.index.swept([manifest_key(point.id)]):
            raise CommitStalled(f"gc deleted the manifest of point {point.id}, not "
                                "catalogued yet")
        renewed = self._renew_maps(point, maps)
        refs = np.unique(np.concatenate([unique_refs(b) for b in maps.values()] or
                                        [np.zeros(0, np.uint64)]))
        swept = self.index.missing_refs(refs)
        if len(swept):
            raise CommitStalled(f"gc removed {len(swept)} chunks point {point.id} uses "
                                f"(ref {int(swept[0])}, ...)")
        newest = "" if old else max((r["time"] for r in self.index.points_records(point.vm)),
                                    default="")
        if renewed or written.seq != (old["seq"] if old else seq):
            _seal(self.store, point, old["seq"] if old else seq, newest, sealer=self.sealer)
            written.seq = point.seq
        pause_point("repository.point_built")  # the manifest durable, the entry not written
        return [PointOp(point.summary())]

    def _renew_maps(self, point: PointRecord, maps: dict[str, BlockMap]) -> bool:
        """Write again each map of `point` that gc doomed (salted: a new name) or deleted;
        returns whether any was."""
        doomed = self.index.doomed_maps(set(maps))
        renewed = False
        for name in list(maps):
            if name not in doomed and self.map_exists(name):
                continue
            renewed = True
            bmap = maps.pop(name)
            new = write_map(self.store, bmap, salted=name in doomed, sealer=self.sealer)
            maps[new] = bmap
            for disk in point.disks:
                if disk.map == name:
                    disk.map = new
        return renewed

    def remove_point(self, point_id: str) -> bool:
        """Remove a point from the catalog (its manifest is the caller's to delete) unless a
        catalogued point still names it as a parent: then False (the caller consolidates that
        child first). A point gone already counts as removed."""
        if not self.config.shared:
            self.check_locks()
            return point_id in self.index.remove_childless({point_id})
        try:
            self.commit_journal(partial(self._forget_ops, point_id))
        except NothingToCommit as done:
            return done.result
        return True

    def _forget_ops(self, point_id: str, _seq: int) -> list[Op]:
        records = self.index.points_records()
        if not any(r["id"] == point_id for r in records):
            raise NothingToCommit(True)
        if any(d.get("parent") == point_id for r in records for d in r["disks"]):
            raise NothingToCommit(False)
        return [ForgetOp(point_id)]

    def rewrite_point(self, point: PointRecord, **changes: object) -> PointRecord:
        """Commit the next generation of a catalogued point with `changes` applied."""
        updated = self.next_generation(point, **changes)
        self.commit_point(updated)
        return updated

    def next_generation(self, point: PointRecord, **changes: object) -> PointRecord:
        """The next generation of a catalogued point with `changes` applied. The VM
        configuration (which the catalog record lacks) comes from the manifest; a damaged or
        missing manifest is rewritten from the catalog record."""
        try:
            config = self.load_point(point.id).config
        except (RepoError, OSError):
            config = point.config
        return replace(point, config=config, generation=point.generation + 1, **changes)

    def commit_forget(self, rewrites: list[PointRecord], forgets: list[str],
                      check: Callable[[list[dict]], None],
                      maps: dict[str, BlockMap] | None = None) -> Entry:
        """A shared repository's forget as one journal entry: the rewritten points (children
        consolidated onto new maps, written already; `maps` by name, those the caller holds),
        then the removal of `forgets`. `check(records)` sees the caught-up catalog before each
        attempt and raises to give up (a backup committed a child of a forgotten point)."""
        held = [self._maps_of(point, maps or {}) for point in rewrites]
        written = [_Written() for _ in rewrites]

        def build(seq: int) -> list[Op]:
            check(self.index.points_records())
            ops: list[Op] = []
            for point, point_maps, done in zip(rewrites, held, written):
                ops += self._point_ops(point, point_maps, done, seq)
            return ops + [ForgetOp(point_id) for point_id in forgets]

        return self.commit_journal(build)

    def map_exists(self, name: str) -> bool:
        return self.store.exists(map_object(name))

    def points(self, vm: str | None = None) -> list[PointRecord]:
        """Catalogued points in commit order (the sequence the catalog commit assigned, never
        wall-clock time; points from before sequences existed have 0 and come first, by time)."""
        records = [PointRecord.from_dict(r) for r in self.index.points_records(vm)]
        return sorted(records, key=commit_order)

    def catalogued(self, point_id: str) -> PointRecord | None:
        """The catalog record of one point (None when it is not catalogued)."""
        with self.index.env.begin() as txn:
            return self._record_in(txn, point_id)

    def _record_in(self, txn: lmdb.Transaction, point_id: str) -> PointRecord | None:
        record = self.index.get_record(txn, point_id) if point_id else None
        return None if record is None else PointRecord.from_dict(record)

    def load_point(self, point_id: str) -> PointRecord:
        """The full manifest, configuration included, read and checked from disk."""
        return read_point(self.store, point_object(point_id), self.sealer)

    def write_manifest(self, point: PointRecord) -> None:
        """Write a point's manifest without touching the catalog (repairs)."""
        write_point(self.store, point, self.sealer)

    def delete_manifest(self, point_id: str) -> None:
        self.store.delete([point_object(point_id)])

    def load_catalogued(self, point_id: str) -> PointRecord:
        """`load_point` for a point the caller found in the catalog: when a forget removed it
        since (and deleted its manifest), that is PointNotFound, not damage."""
        try:
            return self.load_point(point_id)
        except DamageError:
            with self.index.env.begin() as txn:
                if txn.get(point_id.encode(), db=self.index.points) is not None:
                    raise
            raise PointNotFound(f"point {point_id[:8]} was forgotten meanwhile") from None

    def find_point(self, ref: str) -> PointRecord:
        """Resolve a short id, `VM@latest` or `VM@<time prefix>` to one catalogued point,
        reading only the records of that id prefix or that VM."""
        if "@" in ref:
            vm, when = ref.rsplit("@", 1)
            matches = self.points(vm)
            if when != "latest":
                matches = [p for p in matches if p.time.startswith(when)]
            elif matches:
                matches = matches[-1:]
        else:
            matches = sorted((PointRecord.from_dict(r) for r in
                              self.index.records_by_prefix(ref.lower())), key=commit_order) \
                if ref else []
        if not matches:
            self.points()  # every record read: a damaged one is reported as damage, not as this
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
        """The full block map (one ref per block) of disk `key` at `point`, across its chain:
        8 bytes a block, for small disks and checks; commands use `resolve_windows`."""
        chain = self.chain(point, key)
        refs = np.zeros(chain[-1][1], np.uint64)
        for first, window in self.resolve_windows(point, key, chain=chain):
            refs[first:first + len(window)] = window
        return refs

    def resolve_windows(self, point: PointRecord, key: str, near: np.ndarray | None = None, *,
                        chain: list[tuple[str, int]] | None = None
                        ) -> Iterator[tuple[int, np.ndarray]]:
        """The resolved map of disk `key` at `point` as (first block, refs) windows of one
        map segment's range, in block order (blockmap.resolve_windows): a window not yielded
        is all ZERO; with `near` (sorted block numbers) only the windows holding them. Memory:
        one window and one segment of each map of the chain, whatever the disk's size."""
        chain = chain or self.chain(point, key)
        with self._ancestors_named(point, key, chain):
            streams = self._open_maps([name for name, _ in chain])
            for (name, nblocks), stream in zip(chain, streams):
                if stream.nblocks != nblocks:  # never size an array from an unchecked number
                    raise DamageError(f"block map {name} holds {stream.nblocks} blocks; its "
                                      f"disk record says {nblocks}: the metadata is damaged")
        return self._windows_named(point, key, chain, resolve_windows(streams, near))

    def _windows_named(self, point: PointRecord, key: str, chain: list[tuple[str, int]],
                       windows: Iterator[tuple[int, np.ndarray]]
                       ) -> Iterator[tuple[int, np.ndarray]]:
        """`windows`, damage of an ancestor's map met while streaming them named (a large
        map's segments are checked as they are read)."""
        with self._ancestors_named(point, key, chain):
            yield from windows

    @contextmanager
    def _ancestors_named(self, point: PointRecord, key: str,
                         chain: list[tuple[str, int]]) -> Iterator[None]:
        """Damage of a map of `chain` other than the point's own is ChainBroken, naming the
        ancestor: every map's error names its object, so the map is found in the message."""
        try:
            yield
        except ChainBroken:
            raise
        except DamageError as exc:
            text = str(exc)
            bad = next((name for name, _ in chain[:-1] if name in text), None)
            if bad is None:
                raise
            raise ChainBroken(point.id, key, self._owner_of(point, key, bad),
                              f"has a block map that cannot be read ({text})") from None

    def _owner_of(self, point: PointRecord, key: str, name: str) -> str:
        """The point of `point`'s chain whose disk `key` has map `name` ("?" when the chain
        changed since)."""
        try:
            links = self.chain_links(point, key)
        except RepoError:
            return "?"
        return next((owner for owner, mapped, _ in links if mapped == name), "?")

    def _open_maps(self, names: list[str]) -> list[MapStream]:
        """`open_map` of each map, together where reads wait (`Store.reads_wait`): on object
        storage each is a request (and a decryption), which a restore or a backup waited for one
        after the other before its first pack request or read. A local file is opened in turn:
        handing each open to a thread cost more than the open (a forget of most points of a long
        history opens thousands of maps)."""
        if len(names) < 2 or not self.store.reads_wait:
            return [open_map(self.store, name, self.sealer) for name in names]
        with self._opening:  # a pool made once: a forget resolves thousands of chains
            if self._map_opener is None:
                self._map_opener = ThreadPoolExecutor(MAP_OPENS, thread_name_prefix="maps")
        return list(self._map_opener.map(lambda name: open_map(self.store, name, self.sealer),
                                         names))

    def refs_at(self, point: PointRecord, key: str, blocks: np.ndarray, *,
                chain: list[tuple[str, int]] | None = None) -> np.ndarray:
        """The resolved refs of sorted `blocks` of disk `key` at `point` (ZERO past its end):
        only the windows those blocks fall in are decompressed."""
        out = np.zeros(len(blocks), np.uint64)
        for first, window in self.resolve_windows(point, key, blocks, chain=chain):
            lo, hi = np.searchsorted(blocks, [first, first + len(window)])
            out[lo:hi] = window[(blocks[lo:hi] - np.uint64(first)).astype(np.int64)]
        return out

    def chain(self, point: PointRecord, key: str) -> list[tuple[str, int]]:
        """(map name, nblocks) of the chain of disk `key` at `point`, its FULL base first (to
        resolve it later through these maps: a forget may remove `point` meanwhile)."""
        return [(name, nblocks) for _, name, nblocks in self.chain_links(point, key)]

    def chain_links(self, point: PointRecord, key: str) -> list[tuple[str, str, int]]:
        """(point id, map name, nblocks) of each link of `chain`, its FULL base first.
        ChainBroken when an ancestor is not catalogued or lacks the disk."""
        links: list[tuple[str, str, int]] = []
        # a forget may have consolidated this point's chain since the caller read its record: the
        # current record resolves to the same content through maps that still exist
        with self.index.env.begin() as txn:  # one view of the catalog: the chain's records only
            catalogued = self._chain_record(txn, point.id)
            current: PointRecord | None = catalogued or point
            while current is not None:
                disk = current.disk(key)
                if disk is None and current.id != point.id:
                    raise ChainBroken(point.id, key, current.id, f"has no disk {key!r}")
                if disk is None:
                    raise PointNotFound(f"point {current.id[:8]} has no disk {key!r}")
                links.append((current.id, disk.map, disk.nblocks))
                if disk.kind == "full":
                    break
                current = self._chain_record(txn, disk.parent or "")
                if current is None and catalogued is None:
                    raise PointNotFound(f"no restore point matches {point.id[:8]} any more: a "
                                        "forget removed it while this command ran")
                if current is None:
                    self.points()  # a damaged record (its key flipped?) is reported as damage
                    raise ChainBroken(point.id, key, disk.parent or "?", "is not in the catalog "
                                      "(its manifest is missing or damaged)")
        return links[::-1]

    def _chain_record(self, txn: lmdb.Transaction, point_id: str) -> PointRecord | None:
        """`_record_in` for `chain`, which only reads the record: a catalog record the index
        hands out again (Index.record: the same bytes, the same dict) is made a PointRecord
        once, not at each chain through it (a forget resolves the chain of each point it
        rewrites, most through the same ancestors)."""
        record = self.index.get_record(txn, point_id) if point_id else None
        if record is None:
            return None
        known = self._chain_points.get(id(record))
        if known is None or known[0] is not record:  # the dict held: its id is not reused
            if len(self._chain_points) >= CHAIN_POINTS:
                self._chain_points.clear()
            known = self._chain_points[id(record)] = (record, PointRecord.from_dict(record))
        return known[1]

    def disk_usage(self) -> int:
        return sum(info.size for info in self.objects("packs"))


def _refused(position: int, name: bytes, sealed: bytes | memoryview) -> None:
    return None


def new_directory(path: Path, parents: bool) -> None:
    """Make `path`, a new or empty directory, the owner-only home of a new repository; its parent
    directory must exist unless `parents` (a mistyped path must not silently become a directory
    tree)."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(f"{path} already exists and is not an empty directory")
    parent = path.absolute().parent
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"cannot create {path}: {parent} is {kind_of(parent.stat().st_mode)}, "
                         "not a directory; check the path")
    if not parents and not parent.is_dir():
        raise UsageError(f"cannot create {path}: the directory {parent} does "
                         "not exist (check the path, or give --parents to create it)")
    path.mkdir(mode=DIR_MODE, parents=parents, exist_ok=True)
    os.chmod(path, DIR_MODE)  # owner-only, like everything below it (safefile.py)


def check_repository_directory(path: Path) -> None:
    """Refuse a local repository path that is no directory, naming what it is: a missing one
    can be created by init, a file or a FIFO cannot (init would refuse it too)."""
    if path.is_dir():
        return
    if path.exists():
        raise NotARepository(f"{path} is not a repo-engine repository: it is "
                             f"{kind_of(path.stat().st_mode)}, not a directory; check the path")
    raise NotARepository(f"{path} is not a repo-engine repository (no such directory); "
                         f"to create one: repo-engine init {path}")


def check_layout(path: Path) -> None:
    """Refuse (as damage) a repository whose own directories are not real directories: a
    symlinked `points/` or `packs/` would make reads, writes and deletions land elsewhere.
    (The repository path itself may be a symlink: the user chose it.)"""
    for sub in SUBDIRS:
        if os.path.lexists(path / sub):  # a missing one is reported by whoever needs it
            check_dir(path / sub)
    for name in INDEX_FILES:  # LMDB follows symlinks and blocks on FIFOs
        if os.path.lexists(path / "index" / name) and not is_regular(path / "index" / name):
            raise DamageError(f"{path / 'index' / name} is not a regular file: the index is "
                              "damaged; run 'repo-engine rebuild-index'")


FileId = tuple[int, int] | None


def _file_id(index_dir: Path) -> FileId:
    """Identity of the index's data file (device, inode); None when it is missing. The file an
    open environment maps stays allocated, so its inode cannot name another file meanwhile."""
    try:
        st = os.stat(index_dir / "data.mdb")
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _open_index(index_dir: Path, locks_dir: Path, scans: bool) -> tuple[Index, FileId]:
    """Open the index in place and say which file that is (it must not change while opening)."""
    for _attempt in range(3):
        before = _file_id(index_dir)
        try:
            index = Index(index_dir, scans=scans, upgrade=not _others_hold(locks_dir))
        except DamageError:
            if _rebuild_running(locks_dir):
                break
            raise
        if _file_id(index_dir) == before:
            return index, before
        index.close()
    raise LockedError("rebuild-index is replacing the index; run the command again when it ends")


def _others_hold(locks_dir: Path) -> bool:
    """Whether a live lock of another process is held: it may be an earlier repo-engine's, which
    opened the index at version 3 and keeps writing it so, so the index is not upgraded
    meanwhile (Index `upgrade`; docs/FORMAT.md, Older indexes)."""
    me = (socket.gethostname(), os.getpid())
    return any((info.host, info.pid) != me and not is_stale(path, info)
               for path, info in list_locks(locks_dir))


def _rebuild_running(locks_dir: Path) -> bool:
    """Whether a live exclusive lock is held (rebuild-index swaps the index directory under one:
    a missing index is then no damage)."""
    return any(info.kind == EXCLUSIVE and not is_stale(path, info)
               for path, info in list_locks(locks_dir))


class _Held(nullcontext):
    """A shared lock asked for while this repository holds one with its session lease
    (`Repository.lock`): nothing more is taken, so nothing is released."""

    def release(self) -> None:
        pass


@dataclass
class _Written:
    """The commit sequence a point's manifest was last written with (0: not yet)."""

    seq: int = 0


def _claim_cache(index_dir: Path, repo_id: str, location: str) -> None:
    """Create a shared repository's cache when missing, and mark it with the repository's id
    (meta `repo_id`): a cache directory that holds another repository's cache is refused, since
    replaying this journal on top of that state would mix two catalogs and two chunk indexes."""
    index = Index(index_dir, create=not (index_dir / "data.mdb").exists(),
                  upgrade=not _others_hold(index_dir.parent / "locks"))
    try:
        with index.env.begin(write=not index.read_only) as txn:
            owner = txn.get(b"repo_id", db=index.meta)
            if owner is None and not index.read_only:
                txn.put(b"repo_id", repo_id.encode(), db=index.meta)
            elif owner not in (None, repo_id.encode()):
                raise RepoError(f"{index_dir.parent} holds the cache of another repository "
                                f"(id {owner.decode(errors='replace')[:12]}), not of {location} "
                                f"(id {repo_id[:12]}): give this repository its own cache "
                                "directory, or remove that one")
    finally:
        index.close()


def make_local(local: Path) -> None:
    """This host's directory of local files and its `index/` and `locks/`, owner-only."""
    local.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    for sub in ("index", "locks"):
        make_dir(local / sub)


def commit_order(point: PointRecord) -> tuple[int, str, str]:
    return point.seq, point.time, point.id


def _seal(store: Store, point: PointRecord, seq: int, newest: str, *, sealer: Sealer) -> dict:
    """Inside the catalog transaction: give a point its commit sequence, note a clock that went
    backwards, make its manifest durable; returns its catalog record."""
    point.seq = seq
    if newest and point.time < newest:
        note = (f"the clock went backwards: this point's time is before {newest}, the time of "
                f"an earlier point of {point.vm}; points are ordered by commit, not by time")
        if note not in point.notes:
            point.notes.append(note)
    write_point(store, point, sealer)
    return point.summary()


def _sealed_before(store: Store, point: PointRecord, seq: int, newest: str, *,
                   sealer: Sealer) -> dict:
    """`_seal` for a point whose manifest was made durable before the catalog transaction, with
    the commit sequence it had: written again only when the transaction gives it another (it
    is no longer catalogued) or a note."""
    if seq == point.seq and not newest:
        return point.summary()
    return _seal(store, point, seq, newest, sealer=sealer)


def unique_refs(bmap: BlockMap) -> np.ndarray:
    """The distinct non-ZERO refs a map file names (what the reference counts count)."""
    return unique_nonzero(bmap.refs)
