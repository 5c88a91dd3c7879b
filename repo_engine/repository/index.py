"""The LMDB index: chunk id -> ref, ref -> place in a pack, pack numbers, and the point catalog.

It is a cache over packs and point manifests: `rebuild-index` recreates it from them alone.
The layouts of its records and their readers and writers are in index_records.py; Index
inherits the upgrades of an index of an earlier version (below) from index_upgrade.py, the
bookkeeping of `unfindable` and `quarantine` from index_unfindable.py and the journal's replay
(below) from index_replay.py.

| database  | key                  | value                                                      |
|-----------|----------------------|------------------------------------------------------------|
| meta      | ascii name           | u64 counters: version, next_ref, next_pack, next_seq, chunks, raw, stored |
| ids       | chunk id [32]        | ref u64 (the first ref stored with this id wins)           |
| refs      | ref u64 big endian   | id [32], pack u32, offset u64, stored u32, raw u32, codec u8 |
| packs     | pack u32 big endian  | name [32], size u64, count u32                             |
| packnames | name [32]            | pack u32                                                   |
| points    | point id (ascii)     | catalog record (JSON, sealed with `check`)                 |

Reference counting and maintenance state (repo_engine/maintenance/ documents the protocols):

| database   | key                  | value                                                      |
|------------|----------------------|------------------------------------------------------------|
| mapuse     | map name [32]        | sealed u64: catalogued disk records naming this map        |
| refcount   | ref u64 big endian   | sealed u64: map files in use containing the ref (absent = 0) |
| deadmaps   | map name [32]        | sealed u64: decrements owed for maps whose use reached 0   |
| gcq        | ref u64 big endian   | empty: refs whose count reached 0 (gc candidates)          |
| packlive   | pack u32 big endian  | sealed: live count u64, live stored bytes u64              |
| deadpacks  | name [32]            | empty: packs out of the index, file deleted after a wait   |
| forgetting | point id (ascii)     | empty: points a forget has started to remove               |
| scrubbed   | name [32]            | u64: unix time the pack was last scrubbed                  |
| quarantine | ref u64 big endian   | reason (utf-8): chunk found damaged, not yet healed        |
| reread     | vm NUL disk key      | u64[]: blocks the next backup must read from the source    |
| unfindable | ref u64 big endian   | the key's check (u64): refs out of deduplication (doomed or damaged) |

meta `counts` = 1 when mapuse/refcount are complete (set at init, by `gc --full` and by
`rebuild-index`); `gc_mark` = the first pack number a later gc must check for uncounted refs.
A catalog commit (`commit_point`) updates mapuse and refcount in the same transaction, and
assigns a new point its commit sequence (`seq`), which orders a VM's points.
Version 2 (docs/FORMAT.md): catalog records carry `check` (BLAKE3 of the rest) and `seq`; a
writable version 1 index is converted on open, a read-only one read unchecked. The data file is
checked before LMDB maps it (lmdbfile.py).
Version 3: the values gc trusts to delete things (mapuse, refcount, deadmaps, packlive) are sealed
with a check over table, key and value (seals.py); a writer meeting a value that fails it, or a
decrement with no count to take from, stops trusting the counts (meta `counts` = 0), and gc
checks every seal before it deletes anything: either way it recounts from the catalog first.
A writable version 2 index is sealed on open; a read-only one is read unsealed.
Version 4: `unfindable` lists every ref a writer has taken out of deduplication (a local gc's
marked candidate, a ref a shared repository's plan dooms, a quarantined chunk), put in the
transaction that takes it out, so a backup may find duplicates by locality (locality.py): a
neighbour's place record read from `refs` is an answer only when `unfindable` lacks its ref, in
the same read transaction. A writable version 3 index gets the table on open (filled from
`gcq`, `quarantine` and the pending plans) unless its opener says an earlier repo-engine may
write it still (`upgrade=False`); a read-only one, or one not upgraded, is used without it (no
locality, nothing listed).
Version 5: each `unfindable` value is the check of its key (seals.py, `mark`), so a key moved
or a value changed by damage is found: a look-up by locality answers nothing from a window that
holds such an entry, and gc and verify refuse to trust the table. A writable version 4 index
gets its values sealed on open under the same rule as the upgrade from version 3; a read-only
one, or one not upgraded, is read unchecked (its entries trusted as written).

meta `ids_added` (u64) counts every insert into `ids`, in the transaction of the insert, and
`ids_epoch` (16 random bytes) names that counting: the id filter in front of `ids` (idfilter.py)
answers only for a reader whose view it covers.

A shared repository's index is a cache: the replay of its journal (journal.py) up to meta
`journal_seq`, one write transaction per entry (`apply_entry`), applied only on top of the entry
before it, so the processes of one host sharing the cache apply each entry once, in order. Its
counts are not kept (meta `counts` = 0: gc on a shared repository recounts). Tables of a cache:

| database  | key                  | value                                                      |
|-----------|----------------------|------------------------------------------------------------|
| plans     | plan id (16 hex)     | u32 JSON length, JSON {time, packs, maps, objects, leases}, refs u64[] |
| sweptmaps | name [32]: a map, a pack, or a manifest (point id [8], 24 zero bytes) | u64: the seq of the entry that swept it |
"""

from __future__ import annotations

import errno
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import lmdb
import numpy as np

from ..errors import DamageError, RepoError
from .formats import INDEX_VERSION
from .idfilter import FilterCache
from .index_records import (LIVE_REC, LOCATION_DTYPE, PACK_KEY, PACK_REC, REF_KEY, REF_REC,
                            REF_REC_DTYPE, decode_record, encode_record, pack_fields, ref_keys,
                            refs_found)
from .index_replay import Replay
from .index_unfindable import CHECKED_AROUND, Unfindable, marks_hold
from .index_upgrade import Upgrades
from .lmdbfile import U64, check_data_file, cover_last_page, get_u64, readahead_pays
from .packs import FinishedPack, PackEntry
from .safefile import FILE_MODE, make_dir
from . import sightings
from .seals import CHECK_SIZE, KEY, PAYLOAD, CountDamaged, seal, seal_rows, unseal, unsealed_rows

MAP_SIZE = 1 << 40  # address space only: LMDB grows the file as it fills
ABSENT, PRESENT, WRONG_SIZE, CHECK_FAILED = range(4)  # a sealed record's status (sealed_rows)
CACHE_ID_KEY = b"cache_id"  # meta: this cache's random name (Index.cache_id)
REFRESHED_KEY = b"refreshed_at"  # meta: when this cache last caught up (Index.note_refreshed)
# points a forget looks up one by one (and reads the records of their VMs); more: the whole
# catalog in one pass
FEW_POINTS = 64
_VM_PAIR = re.compile(rb'"vm": ("(?:[^"\\]|\\.)*")')  # a record's raw `"vm": NAME`, NAME as JSON

COUNTERS = ("chunks", "raw_bytes", "stored_bytes", "packs", "pack_bytes")
COUNTER_MAX = 1 << 63  # a counter at or past it went below 0 (as a signed number): damage
DAMAGED_COUNTER = b"damaged_counter:"  # meta key prefix: a counter `_add` took below 0
MAINT_DBS = ("mapuse", "refcount", "deadmaps", "gcq", "packlive", "deadpacks", "forgetting",
             "scrubbed", "quarantine", "reread")
JOURNAL_DBS = ("plans", "sweptmaps")
NEW_DBS = (*JOURNAL_DBS, "unfindable")  # added by later versions: absent from older read-only ones


class ParentGone(RepoError):
    """A point's parent left the catalog before the point was committed (a concurrent forget)."""

    def __init__(self, parents: set[str]) -> None:
        super().__init__(f"parent points {', '.join(sorted(parents))} are no longer catalogued")
        self.parents = parents


class MapMissing(RepoError):
    """A map file named by a point being committed is gone (gc deleted an unused copy)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"block map {name} is missing")
        self.name = name


@dataclass(frozen=True)
class PackInfo:
    number: int
    name: str
    size: int
    count: int


class Index(Replay, Unfindable, Upgrades):
    def __init__(self, path: Path, *, create: bool = False, scans: bool = False,
                 read_only: bool = False, upgrade: bool = True) -> None:
        """`scans`: the caller reads whole tables in key order (verify), so the kernel's
        read-ahead stays on whatever the index's size (lmdbfile.readahead_pays). `read_only`:
        open as if the directory could not be written (a bench that must not write).
        `upgrade=False`: a writable index of version 3 or 4 stays so and is written as the
        earlier repo-engine writes it (version 3: without `unfindable`; version 4: its entries
        read unchecked), since a process of that build may have it open: the caller knows, by
        the repository's locks."""
        if not create:
            if not (path / "data.mdb").exists():
                raise DamageError(f"{path}: index is missing; run 'repo-engine rebuild-index'")
            check_data_file(path / "data.mdb")
        if create:
            make_dir(path)  # owner-only; LMDB's files are created FILE_MODE
        # read-only media or snapshot: nobody can write there, so no lock file is needed
        self.read_only = not create and (read_only or not os.access(path, os.W_OK))
        self._upgrade = create or upgrade
        self.data_file = path / "data.mdb"
        try:
            # bytes: a path may hold bytes that are not UTF-8, which lmdb would refuse as text
            self.env = lmdb.open(os.fsencode(path), max_dbs=32, map_size=MAP_SIZE, subdir=True,
                                 create=create, readonly=self.read_only,
                                 lock=not self.read_only, mode=FILE_MODE,
                                 readahead=scans or readahead_pays(path / "data.mdb"))
            for name in ("meta", "ids", "refs", "packs", "packnames", "points", *MAINT_DBS):
                setattr(self, name, self.env.open_db(name.encode(), create=not self.read_only))
            for name in NEW_DBS:  # absent from a read-only index of an earlier version
                setattr(self, name, self._open_new_db(name))
            self.id_filter = FilterCache(path, self.env, self.meta, self.ids, self.write,
                                         usable=not self.read_only)
            self.damage_seen: list[str] = []  # count damage writers met (gc reports it)
            # the last whole pass over the catalog: point id -> (stored bytes, record)
            self._decoded: dict[bytes, tuple[bytes, dict]] = {}
            self.checked, self.sealed, self.listed = self._check_version(create)
        except (lmdb.ReadonlyError, lmdb.DiskError):
            raise  # permission denied, disk full: no damage (the CLI says what it is)
        except lmdb.Error as exc:
            raise DamageError(f"{path}: the index cannot be read ({exc}); run "
                              "'repo-engine rebuild-index'") from None

    def _open_new_db(self, name: str) -> object:
        """A database later versions added; None when a read-only index lacks it (a shared
        repository's cache, which alone uses them, is never read-only). `unfindable` is made
        by the upgrade to version 4 alone (`_check_version`)."""
        try:
            return self.env.open_db(name.encode(), create=not self.read_only and (
                name != "unfindable" or self._upgrade))
        except lmdb.NotFoundError:
            return None

    def _check_version(self, create: bool) -> tuple[bool, bool, bool]:
        """Set up or check the format version; returns whether catalog records carry checks,
        whether counts carry seals and whether `unfindable` entries carry checks (older
        versions do not: a writable index is converted in place, a read-only one read as it
        is)."""
        with self.env.begin(write=create) as txn:
            raw = txn.get(b"version", db=self.meta)
            if raw is None and create:
                txn.put(b"version", U64.pack(INDEX_VERSION), db=self.meta)
                txn.put(b"counts", U64.pack(1), db=self.meta)  # an empty index counts exactly
                return True, True, True
        version = U64.unpack(raw)[0] if raw is not None and len(raw) == U64.size else None
        if version not in range(1, INDEX_VERSION + 1):
            raise DamageError(f"index format version {version} is not one this repo-engine "
                              f"reads (1 to {INDEX_VERSION}): the index is damaged or from a "
                              "newer repo-engine; run 'repo-engine rebuild-index'")
        if version == INDEX_VERSION:
            return True, True, True
        if self.read_only:
            return version > 1, version > 2, False
        version = self._upgrade_to(version, INDEX_VERSION if self._upgrade else 3)
        if version == 3:
            self.unfindable = None  # as version 3 has it: no locality, nothing listed
        return True, True, version == INDEX_VERSION


    @contextmanager
    def write(self) -> Iterator[lmdb.Transaction]:
        """A write transaction. Once it commits, the data file is made to hold every page its meta
        page names: LMDB never writes a page allocated and freed in one transaction, so a large
        delete can leave the file short of its last page, which the next open would take for a
        truncation (`lmdbfile.cover_last_page`). The id filter learns of the transaction's
        id inserts once it commits (idfilter.py)."""
        try:
            with self.env.begin(write=True) as txn:
                yield txn
        except lmdb.DiskError as exc:  # a full filesystem: an OSError, as any other write's
            self.id_filter.aborted()
            raise OSError(errno.ENOSPC, f"repository index: {exc}") from None
        except BaseException:
            self.id_filter.aborted()
            raise
        self.id_filter.committed()
        with self.env.begin(write=True):
            cover_last_page(self.data_file)

    def close(self) -> None:
        self.id_filter.save()
        self.env.close()

    # -- counters -------------------------------------------------------------------------
    _get_u64 = staticmethod(get_u64)

    def _add(self, txn: lmdb.Transaction, key: str, delta: int) -> None:
        """Add `delta` to counter `key`. A sum below 0 (damage lowered the counter, and gc
        takes away more than it holds) is kept at 0 and the counter marked damaged
        (`damaged_counters`), rather than failing the transaction it belongs to."""
        value = self._get_u64(txn, key.encode(), self.meta) + delta
        if value < 0:
            txn.put(DAMAGED_COUNTER + key.encode(), b"", db=self.meta)
        txn.put(key.encode(), U64.pack(max(value, 0)), db=self.meta)

    def counters(self) -> dict[str, int]:
        """The COUNTERS; a damaged one (`damaged_counters`) as 0 when its value is past any a
        repository reaches (2^63: it went below 0)."""
        with self.env.begin() as txn:
            values = {k: self._get_u64(txn, k.encode(), self.meta) for k in COUNTERS}
        return {k: 0 if v >= COUNTER_MAX else v for k, v in values.items()}

    def damaged_counters(self) -> list[str]:
        """The COUNTERS damage left wrong: marked by `_add` (taken below 0, kept at 0), or
        holding a value past COUNTER_MAX. rebuild-index counts them anew."""
        with self.env.begin() as txn:
            return [k for k in COUNTERS
                    if txn.get(DAMAGED_COUNTER + k.encode(), db=self.meta) is not None
                    or self._get_u64(txn, k.encode(), self.meta) >= COUNTER_MAX]

    def reserve_refs(self, count: int) -> int:
        """Reserve `count` fresh refs; returns the first. Refs are never handed out twice."""
        with self.write() as txn:
            # never below a ref the index holds: a damaged counter must not hand one out again
            first = max(self._get_u64(txn, b"next_ref", self.meta),
                        _last_key(txn, self.refs) + 1, 1)
            txn.put(b"next_ref", U64.pack(first + count), db=self.meta)
        return first

    # -- chunks ---------------------------------------------------------------------------
    @contextmanager
    def reader(self) -> Iterator["IndexReader"]:
        with self.env.begin(buffers=False) as txn:
            yield IndexReader(self, txn)

    def commit_pack(self, pack: FinishedPack) -> int:
        """Record a published pack and its chunks in one transaction; returns its pack number."""
        with self.write() as txn:
            return self._record_pack(txn, pack)

    def _record_pack(self, txn: lmdb.Transaction, pack: FinishedPack) -> int:
        name = bytes.fromhex(pack.name)
        existing = txn.get(name, db=self.packnames)
        if existing is not None:
            return PACK_KEY.unpack(existing)[0]
        number = self.new_pack_number(txn)
        stored = self._put_chunks(txn, number, pack.entries)
        count = len(pack.entries)
        self.put_pack_record(txn, number, name, pack.size, count, count, stored)
        return number

    def new_pack_number(self, txn: lmdb.Transaction) -> int:
        """Hand out the next pack number (numbers are never reused)."""
        number = max(self._get_u64(txn, b"next_pack", self.meta), _last_key(txn, self.packs) + 1)
        if number >= 1 << 32:
            raise DamageError(f"the index's pack counter is damaged ({number}); run "
                              "'repo-engine rebuild-index'")
        txn.put(b"next_pack", U64.pack(number + 1), db=self.meta)
        return number

    def put_pack_record(self, txn: lmdb.Transaction, number: int, name: bytes, size: int,
                        count: int, live_count: int, live_stored: int) -> None:
        """List a published pack (packs, packnames, packlive) and add it to the pack counters;
        the refs that point into it are the caller's to write."""
        txn.put(PACK_KEY.pack(number), PACK_REC.pack(name, size, count), db=self.packs)
        txn.put(name, PACK_KEY.pack(number), db=self.packnames)
        self.put_sealed(txn, "packlive", PACK_KEY.pack(number),
                        LIVE_REC.pack(live_count, live_stored))
        self._add(txn, "packs", 1)
        self._add(txn, "pack_bytes", size)

    def _put_chunks(self, txn: lmdb.Transaction, number: int, entries: list[PackEntry]) -> int:
        """Index the chunks of pack `number`: ids, places and the chunk counters; returns their
        stored bytes. A ref placed already (a repacked or healed copy) moves to this pack and
        is counted once; `ids` never names one listed in `unfindable` (a heal or repack of a
        ref this host holds doomed or damaged: a dedup must not find it)."""
        raw = stored = new = total = 0
        added = []
        hidden, ids = self.unfindable, self.ids
        for e in entries:
            key = REF_KEY.pack(e.ref)
            if ((hidden is None or txn.get(key, db=hidden) is None)
                    and txn.put(e.chunk_id, U64.pack(e.ref), db=ids, overwrite=False)):
                added.append(e.chunk_id)
            old = txn.replace(key,
                              REF_REC.pack(e.chunk_id, number, e.offset, e.stored, e.raw, e.codec),
                              db=self.refs)
            was = (0, 0) if old is None else REF_REC.unpack(old)[3:5]
            new += old is None
            raw, stored = raw + e.raw - was[1], stored + e.stored - was[0]
            total += e.stored
        for key, delta in (("chunks", new), ("raw_bytes", raw), ("stored_bytes", stored)):
            self._add(txn, key, delta)
        self.id_filter.inserted(txn, added)
        if entries:
            # rebuild-index inserts refs that no reservation of this index handed out
            top = max(e.ref for e in entries)
            if self._get_u64(txn, b"next_ref", self.meta) <= top:
                txn.put(b"next_ref", U64.pack(top + 1), db=self.meta)
        return total

    def pack_info(self, number: int) -> PackInfo:
        with self.env.begin() as txn:
            raw = txn.get(PACK_KEY.pack(number), db=self.packs)
        if raw is None:
            raise DamageError(f"index names pack number {number}, which it does not list")
        return PackInfo(number, *pack_fields(raw))

    def all_packs(self) -> list[PackInfo]:
        with self.env.begin() as txn:
            return [PackInfo(PACK_KEY.unpack(k)[0], *pack_fields(v))
                    for k, v in txn.cursor(db=self.packs)]

    # -- catalog --------------------------------------------------------------------------
    def record(self, key: bytes, raw: bytes) -> dict:
        """A catalog record, checked (DamageError names the point and advises rebuild-index).
        Records are read-only, shared: one the last whole pass over the catalog (`_catalog`)
        decoded from the same bytes is that pass's (a forget of many points passes over the
        catalog for its policy, under its lock and to remove the points; the bytes compared,
        not the JSON decoded and checked again)."""
        known = self._decoded.get(key)
        if known is not None and known[0] == raw:
            return known[1]
        return decode_record(key, raw, checked=self.checked)

    def put_point(self, point_id: str, record: dict) -> None:
        """Catalog a record as it is (rebuild-index: from a manifest, sequence included)."""
        with self.write() as txn:
            txn.put(point_id.encode(), encode_record(record), db=self.points)
            self._seq_used(txn, record.get("seq", 0))

    def _seq_used(self, txn: lmdb.Transaction, seq: int) -> None:
        if seq >= self._get_u64(txn, b"next_seq", self.meta):
            txn.put(b"next_seq", U64.pack(seq + 1), db=self.meta)

    def _catalog(self, txn: lmdb.Transaction) -> dict[str, dict]:
        decoded = {key: (raw, self.record(key, raw)) for key, raw in txn.cursor(db=self.points)}
        self._decoded = decoded  # replaced whole: what it holds is one catalog's worth
        return {key.decode(): record for key, (_, record) in decoded.items()}

    def get_record(self, txn: lmdb.Transaction, point_id: str) -> dict | None:
        """One catalog record as `txn` sees it, checked; None when not catalogued."""
        raw = txn.get(point_id.encode(), db=self.points)
        return None if raw is None else self.record(point_id.encode(), raw)

    def _vm_records(self, txn: lmdb.Transaction, vm: str) -> list[dict]:
        """The records of one VM, checked."""
        return self._records_of_vms(txn, {vm})

    def _records_of_vms(self, txn: lmdb.Transaction, vms: Collection[str]) -> list[dict]:
        """The records of the VMs `vms`, checked, in one pass over the catalog. The others are
        skipped undecoded: a record is stored as `json.dumps(..., sort_keys=True)`
        (encode_record; version 1 too), so its raw JSON holds the pair `"vm": NAME` spelled
        exactly so (quotes inside strings are escaped, so no string can hold it); only the
        records holding one of those pairs are decoded and compared. A record the last whole
        pass decoded from the same bytes (`record`) is taken as decoded, without the search."""
        names = {json.dumps(vm).encode() for vm in vms}
        decoded = self._decoded
        found = []
        for key, raw in txn.cursor(db=self.points):
            known = decoded.get(key)
            if known is not None and known[0] == raw:
                found.append(known[1])
            elif not names.isdisjoint(_VM_PAIR.findall(raw)):
                found.append(self.record(key, raw))
        return [r for r in found if isinstance(vm := r.get("vm"), str) and vm in vms]

    def _next_seq(self, txn: lmdb.Transaction, vm_records: list[dict]) -> int:
        """The commit sequence of a new point: above the counter and above every catalogued
        point of its VM (so a damaged counter cannot reorder a VM's points)."""
        top = max((r.get("seq", 0) for r in vm_records), default=0)
        return max(self._get_u64(txn, b"next_seq", self.meta), top + 1)

    def commit_point(self, point_id: str, vm: str, seal: Callable[[int, str], dict],
                     map_refs: dict[str, np.ndarray],
                     map_exists: Callable[[str], bool]) -> None:
        """Put (or replace) a catalog record and, in the same transaction, check that every
        parent is catalogued (else ParentGone) and every map file exists (else MapMissing), and
        move the map use and chunk reference counts from the old record's maps to the new's.

        The commit sequence is assigned here: a new point gets the next one, a rewritten point
        keeps its own. `seal(seq, newest)` makes the point's manifest durable with that sequence
        and returns its catalog record; `newest` is the latest time of the VM's catalogued points
        ("" for a rewrite), so the caller can note a clock that went backwards.
        `map_refs`: for each map the record names, its unique non-ZERO refs. The existence check
        runs inside the write transaction because gc deletes unused map files inside one too."""
        self.commit_points([(point_id, vm, seal, map_refs)], map_exists)

    def commit_points(self, commits: list[tuple[str, str, Callable[[int, str], dict],
                                                dict[str, np.ndarray]]],
                      map_exists: Callable[[str], bool]) -> None:
        """`commit_point` of each (point id, vm, seal, map refs) of `commits`, in order, in one
        transaction: all or none (a forget rewriting hundreds of points commits once). The map
        use changes of all the records are summed and applied once, at the end of the
        transaction: what one record takes and another gives back within it moves no count."""
        use: Counter = Counter()
        refs: dict[str, np.ndarray] = {}
        with self.write() as txn:
            for point_id, vm, sealed, map_refs in commits:
                use.update(self._commit_one(txn, point_id, vm, sealed, map_refs, map_exists))
                refs.update(map_refs)
            self.change_map_use(txn, use, refs)

    def _commit_one(self, txn: lmdb.Transaction, point_id: str, vm: str,
                    seal: Callable[[int, str], dict], map_refs: dict[str, np.ndarray],
                    map_exists: Callable[[str], bool]) -> Counter:
        """Put one record (`commit_point`); returns its change of the map use."""
        for name in map_refs:
            if not map_exists(name):
                raise MapMissing(name)
        old = self.get_record(txn, point_id)
        if old is not None:
            seq, newest = old.get("seq", 0), ""
        else:
            mine = self._vm_records(txn, vm)
            seq = self._next_seq(txn, mine)
            newest = max((r["time"] for r in mine), default="")
        record = seal(seq, newest)
        parents = {d["parent"] for d in record["disks"] if d.get("parent")}
        gone = {p for p in parents if p == point_id or
                txn.get(p.encode(), db=self.points) is None}
        if gone:
            raise ParentGone(gone)
        use = Counter(d["map"] for d in record["disks"])
        if old is not None:
            use.subtract(d["map"] for d in old["disks"])
        txn.put(point_id.encode(), encode_record(record), db=self.points)
        self._seq_used(txn, seq)
        return use

    # -- meta values, places --------------------------------------------------------------
    def set_meta_u64(self, name: str, value: int) -> None:
        with self.write() as txn:
            txn.put(name.encode(), U64.pack(value), db=self.meta)

    def cache_id(self) -> str:
        """This cache's name in this boot and pid namespace (sightings.this_boot) of its random
        name, made on first use (meta CACHE_ID_KEY): the store's lease records written through
        this cache carry it (leases.py, "Clocks")."""
        with self.write() as txn:
            raw = txn.get(CACHE_ID_KEY, db=self.meta)
            if raw is None:
                raw = os.urandom(8).hex().encode()
                txn.put(CACHE_ID_KEY, raw, db=self.meta)
        return sightings.this_boot(raw.decode())

    def first_seen(self, key: bytes, names: Collection[str], at: float, scope: str = "",
                   listed: float | None = None) -> dict[str, float]:
        """When this host first saw each of `names` (those new now: `at`, seconds since the
        epoch on this host's clock, now), as noted in meta `key`, which keeps the ones given and
        those outside `scope` (a prefix: the names a partial listing could not have seen): a
        wait for something another host wrote is timed on this host, never by the writer's
        clock (hosts' clocks differ), and on a clock no setting of this host's moves
        (sightings.py): each time is `at` less the seconds seen by `listed`, the reading of
        sightings.monotonic taken before the listing that found the names (by default now: not
        by the end of a wait for the write transaction)."""
        listed = sightings.monotonic() if listed is None else listed
        with self.write() as txn:
            value, seen = sightings.note(txn.get(key, db=self.meta), names, scope, listed)
            txn.put(key, value, db=self.meta)
        return {name: at - seconds for name, seconds in seen.items()}

    def refreshed_ago(self) -> float | None:
        """Seconds since this cache was last caught up with the journal (`note_refreshed`), on
        a clock no setting of this host's moves; None when not known (not in this boot)."""
        with self.env.begin() as txn:
            return sightings.age(txn.get(REFRESHED_KEY, db=self.meta))

    def note_refreshed(self) -> None:
        """Note that the cache caught up now (before any wait for the write transaction)."""
        value = sightings.stamp()
        with self.write() as txn:
            txn.put(REFRESHED_KEY, value, db=self.meta)

    def missing_refs(self, refs: np.ndarray) -> np.ndarray:
        """Those of `refs` the index does not place (a sweep removed them)."""
        with self.env.begin() as txn:
            return refs[lacks(txn, self.refs, refs)]

    # -- sealed counts (seals.py) ----------------------------------------------------------
    def get_sealed(self, txn: lmdb.Transaction, table: str, key: bytes) -> bytes | None:
        """The payload of a count table's value (None when absent); CountDamaged when it fails
        its check."""
        raw = txn.get(key, db=getattr(self, table))
        if raw is None or not self.sealed:
            return raw
        return unseal(table, key, raw)

    def put_sealed(self, txn: lmdb.Transaction, table: str, key: bytes, payload: bytes) -> None:
        txn.put(key, seal(table, key, payload), db=getattr(self, table))

    def distrust_counts(self, txn: lmdb.Transaction, damage: CountDamaged) -> None:
        """A count met damaged: the next gc recounts from the catalog before deleting anything
        (the damaged value stays for gc and verify to report)."""
        txn.put(b"counts", U64.pack(0), db=self.meta)
        self.damage_seen.append(str(damage))

    def change_map_use(self, txn: lmdb.Transaction, delta: Counter,
                       map_refs: dict[str, np.ndarray]) -> None:
        """Apply map use changes: a map going from 0 to 1 use counts its refs once more; one going
        to 0 owes a decrement of its refs, queued in `deadmaps` for gc (which reads the map).
        A damaged or too low use count is left as it is, and the counts distrusted. The counts
        are checked and sealed together: a forget of thousands of points drops as many maps
        in one call."""
        changes = sorted(((name, change) for name, change in delta.items() if change),
                         key=lambda kv: -kv[1])
        keys = [bytes.fromhex(name) for name, _ in changes]
        uses, use_damage = self._counts(txn, "mapuse", keys)
        owes, owed_damage = self._counts(txn, "deadmaps", keys)
        used: list[tuple[bytes, int]] = []
        dead: list[tuple[bytes, int]] = []
        for i, ((name, change), key) in enumerate(zip(changes, keys)):
            before, after = uses[i], uses[i] + change
            damage = use_damage[i] or (CountDamaged("mapuse", key, "the use would go negative")
                                       if after < 0 else owed_damage[i])
            if damage is not None:
                self.distrust_counts(txn, damage)
                continue
            if after:
                used.append((key, after))
            else:
                txn.delete(key, db=self.mapuse)
            if before == 0 and after > 0:
                self.add_refs(txn, map_refs[name], 1)
            elif before > 0 and after == 0:
                dead.append((key, owes[i] + 1))
        self._put_counts(txn, "mapuse", used)
        self._put_counts(txn, "deadmaps", dead)

    def _counts(self, txn: lmdb.Transaction, table: str, keys: list[bytes]
                ) -> tuple[list[int], list[CountDamaged | None]]:
        """The u64 count of each key in a count table (0 when absent), and the damage of each
        (None: it passes its check; a key of another size is damage, present or not), the
        checks computed together (sealed_rows)."""
        size = KEY[table]
        counts: list[int] = [0] * len(keys)
        damage = [None if len(key) == size else CountDamaged(table, key) for key in keys]
        whole = [i for i, key in enumerate(keys) if len(key) == size]
        if whole:
            rows = np.frombuffer(b"".join(keys[i] for i in whole), np.uint8).reshape(-1, size)
            payloads, status = self.sealed_rows(txn, table, rows)
            numbers = payloads.copy().view("<u8")[:, 0].tolist()
            for i, number, state in zip(whole, numbers, status.tolist()):
                counts[i] = number
                if state >= WRONG_SIZE:
                    damage[i] = CountDamaged(table, keys[i])
        return counts, damage

    def _put_counts(self, txn: lmdb.Transaction, table: str,
                    rows: list[tuple[bytes, int]]) -> None:
        """Put u64 counts (key, count) in a count table, sealed together."""
        if not rows:
            return
        keys = np.frombuffer(b"".join(key for key, _ in rows), np.uint8).reshape(len(rows), -1)
        counts = np.array([count for _, count in rows], "<u8").view(np.uint8).reshape(-1, 8)
        db = getattr(self, table)
        for (key, _), value in zip(rows, seal_rows(table, keys, counts)):
            txn.put(key, value.tobytes(), db=db)

    def add_refs(self, txn: lmdb.Transaction, refs: np.ndarray,
                 delta: int | np.ndarray) -> list[int]:
        """Add `delta` (one for all, or one per ref) to the count of each of the distinct `refs`;
        returns the refs whose count reached 0 (those are queued in `gcq`). A count that fails
        its check, or a decrement below 0 (a count lost or lowered by damage), leaves that count
        as it is and distrusts the counts."""
        keys = np.ascontiguousarray(refs, dtype=">u8").view(np.uint8).reshape(-1, 8)
        counts, good = self._ref_counts(txn, keys)
        new = counts.astype(np.int64) + delta
        if not (good & (new >= 0)).all():
            bad = int(np.flatnonzero(~good | (new < 0))[0])
            why = "check mismatch" if not good[bad] else "a decrement found no count to take"
            self.distrust_counts(txn, CountDamaged("refcount", keys[bad].tobytes(), why))
        sealed = seal_rows("refcount", keys,
                           np.maximum(new, 0).astype("<u8").view(np.uint8).reshape(-1, 8))
        zeroed = []
        put, delete = txn.put, txn.delete
        for i in np.flatnonzero(good & (new >= 0)).tolist():
            key = keys[i].tobytes()
            if new[i] > 0:
                put(key, sealed[i].tobytes(), db=self.refcount)
                if counts[i] == 0:
                    delete(key, db=self.gcq)
            else:
                if counts[i]:
                    delete(key, db=self.refcount)
                put(key, b"", db=self.gcq)
                zeroed.append(int(refs[i]))
        return zeroed

    def _ref_counts(self, txn: lmdb.Transaction, keys: np.ndarray) -> tuple[np.ndarray,
                                                                           np.ndarray]:
        """(count, passes its check) of each ref key (an absent count is 0 and passes), the
        checks run over all keys at once."""
        payloads, status = self.sealed_rows(txn, "refcount", keys)
        return payloads.copy().view("<u8")[:, 0].astype(np.uint64), status <= PRESENT

    def sealed_rows(self, txn: lmdb.Transaction, table: str,
                    keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The records of `keys` ((n, KEY[table]) uint8 rows) in the sealed table `table`, their
        checks computed together: their payloads ((n, PAYLOAD[table]) uint8; zeros where absent
        or of the wrong size) and the status of each (ABSENT, PRESENT: passes its check,
        WRONG_SIZE, CHECK_FAILED)."""
        get, db = txn.get, getattr(self, table)
        raws = [get(key, db=db) for key in map(bytes, keys)]
        width = PAYLOAD[table] + CHECK_SIZE
        status = np.array([ABSENT if raw is None else PRESENT if len(raw) == width
                           else WRONG_SIZE for raw in raws], np.uint8)
        payloads = np.zeros((len(keys), PAYLOAD[table]), np.uint8)
        found = np.flatnonzero(status == PRESENT)
        if len(found):
            values = np.frombuffer(b"".join(raws[i] for i in found.tolist()), np.uint8)
            payloads[found], ok = unsealed_rows(table, keys[found], values.reshape(-1, width))
            status[found[~ok]] = CHECK_FAILED
        return payloads, status

    def counts_valid(self) -> bool:
        with self.env.begin() as txn:
            return self._get_u64(txn, b"counts", self.meta) == 1

    def meta_u64(self, name: str) -> int:
        with self.env.begin() as txn:
            return self.meta_u64_in(txn, name)

    def meta_u64_in(self, txn: lmdb.Transaction, name: str) -> int:
        """A u64 of `meta` as `txn` sees it (0 when absent)."""
        return self._get_u64(txn, name.encode(), self.meta)

    # -- repair hooks read by backups ------------------------------------------------------
    @staticmethod
    def reread_key(vm: str, disk: str) -> bytes:
        return f"{vm}\0{disk}".encode()

    def reread_blocks(self, vm: str, disk: str) -> np.ndarray:
        """Blocks `scrub --repair` asked the next backup of this disk to read from the source."""
        with self.env.begin() as txn:
            raw = txn.get(self.reread_key(vm, disk), db=self.reread)
        return np.frombuffer(raw, dtype="<u8").copy() if raw else np.zeros(0, np.uint64)

    def add_reread(self, vm: str, disk: str, blocks: np.ndarray) -> None:
        with self.write() as txn:
            key = self.reread_key(vm, disk)
            raw = txn.get(key, db=self.reread)
            old = np.frombuffer(raw, dtype="<u8") if raw else np.zeros(0, "<u8")
            merged = np.union1d(old, blocks.astype("<u8")).astype("<u8")
            txn.put(key, merged.tobytes(), db=self.reread)

    def clear_reread(self, vm: str, disk: str, done: np.ndarray) -> None:
        """Forget re-read requests a committed backup has fulfilled."""
        with self.write() as txn:
            key = self.reread_key(vm, disk)
            raw = txn.get(key, db=self.reread)
            if raw is None:
                return
            left = np.setdiff1d(np.frombuffer(raw, dtype="<u8"), done.astype("<u8"))
            if len(left):
                txn.put(key, left.astype("<u8").tobytes(), db=self.reread)
            else:
                txn.delete(key, db=self.reread)

    def remove_childless(self, ids: set[str]) -> set[str]:
        """In one transaction: delete the catalog records of the points of `ids` that no
        catalogued point outside `ids` names as a parent (one pass over the records of their
        VMs, whatever the number of ids), queue the decrements of their maps and clear their
        `forgetting` marks. Returns those removed, and those of `ids` gone already."""
        with self.write() as txn:
            catalog = self._catalog_of_vms(txn, ids)
            doomed = ids & set(catalog)
            while True:
                blocked = doomed & {d.get("parent") for r in catalog.values()
                                    if r["id"] not in doomed for d in r["disks"]}
                if not blocked:
                    break
                doomed -= blocked
            use: Counter = Counter()
            for point_id in doomed:
                use.subtract(d["map"] for d in catalog[point_id]["disks"])
                txn.delete(point_id.encode(), db=self.points)
            self.change_map_use(txn, use, {})
            removed = doomed | (ids - set(catalog))
            for point_id in removed:
                txn.delete(point_id.encode(), db=self.forgetting)
        return removed

    def catalog_of_vms(self, ids: set[str]) -> dict[str, dict]:
        with self.env.begin() as txn:
            return self._catalog_of_vms(txn, ids)

    def _catalog_of_vms(self, txn: lmdb.Transaction, ids: set[str]) -> dict[str, dict]:
        """The records of the VMs of `ids`, by id: a chain never leaves its VM, so the points
        that may name one of `ids` as a parent are among them. More than FEW_POINTS ids: the
        whole catalog, read once (cheaper than a look-up each)."""
        if len(ids) > FEW_POINTS:
            return self._catalog(txn)
        vms = {r["vm"] for i in ids if (r := self.get_record(txn, i)) is not None}
        return {r["id"]: r for r in self._records_of_vms(txn, vms)}

    def delete_point(self, point_id: str) -> None:
        with self.write() as txn:
            txn.delete(point_id.encode(), db=self.points)

    def points_records(self, vm: str | None = None) -> list[dict]:
        """Every catalog record (of `vm`), checked."""
        with self.env.begin() as txn:
            return list(self._catalog(txn).values()) if vm is None else self._vm_records(txn, vm)

    def records_by_prefix(self, prefix: str) -> list[dict]:
        """The records whose point id starts with `prefix` (keys are ids: a range, not a scan)."""
        start = prefix.encode()
        found = []
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self.points)
            if cursor.set_range(start):
                for key, value in cursor:
                    if not key.startswith(start):
                        break
                    found.append(self.record(key, value))
        return found



def _last_key(txn: lmdb.Transaction, db: object) -> int:
    """The largest big-endian integer key of `db` (-1 when empty)."""
    cursor = txn.cursor(db=db)
    if not cursor.last():
        return -1
    return int.from_bytes(cursor.key(), "big")


class IndexReader:
    """Lookups inside one read transaction (one per thread)."""

    def __init__(self, index: Index, txn: lmdb.Transaction) -> None:
        self._index = index
        self._txn = txn

    def ref_of(self, chunk_id: bytes) -> int | None:
        raw = self._txn.get(chunk_id, db=self._index.ids)
        return U64.unpack(raw)[0] if raw is not None else None

    def chunk_id_of(self, ref: int) -> bytes | None:
        raw = self._txn.get(REF_KEY.pack(ref), db=self._index.refs)
        return raw[:32] if raw is not None else None

    def dedup_ref(self, chunk_id: bytes) -> tuple[int | None, bool]:
        """(ref of a stored chunk with this id or None, whether the ids table named a ref whose
        place record holds another id). The index is a cache: a hit counts only when both of its
        tables agree, else the chunk is stored again."""
        ref = self.ref_of(chunk_id)
        if ref is None:
            return None, False
        if self.chunk_id_of(ref) != chunk_id:
            return None, True
        return ref, False

    def places_between(self, start: int, stop: int) -> dict[bytes, int] | None:
        """Chunk id -> ref of the refs in [start, stop) that `refs` places and `unfindable`
        lacks, as this transaction sees them: two range reads of keys in order (neighbouring
        records share pages). None when only `ids` may answer: the index has no `unfindable`
        table (a read-only index of an earlier version), or an entry fails its check within
        CHECKED_AROUND refs of the range (damage that moved the entry of a ref in the range by
        one of the low 10 bits of its key lands there; verify and gc, which read the whole
        table, find one moved further)."""
        hidden_db = self._index.unfindable
        if hidden_db is None or start >= stop:
            return None if hidden_db is None else {}
        first, end = REF_KEY.pack(start), REF_KEY.pack(stop)
        around = list(_items_between(self._txn.cursor(db=hidden_db),
                                     REF_KEY.pack(max(start - CHECKED_AROUND, 0)),
                                     REF_KEY.pack(min(stop + CHECKED_AROUND, 2**64 - 1))))
        if around and self._index.listed and not marks_hold(around):
            return None
        hidden = {key for key, _ in around if first <= key < end}
        found: dict[bytes, int] = {}
        for key, raw in _items_between(self._txn.cursor(db=self._index.refs), first, end):
            if key not in hidden and len(raw) == REF_REC.size:
                found.setdefault(raw[:32], REF_KEY.unpack(key)[0])
        return found

    def quarantined_ids(self) -> set[bytes]:
        """The chunk ids of the quarantined refs (a few): `ids` names such an id only with a
        good copy, else a backup reading the chunk stores it again and that copy heals the
        damaged ref (scrub.py), so they are looked up through `ids` alone."""
        txn = self._txn
        keys = list(txn.cursor(db=self._index.quarantine).iternext(keys=True, values=False))
        return {raw[:32] for _key, raw in txn.cursor(db=self._index.refs).getmulti(keys)}

    def surely_absent(self, chunk_ids: list[bytes]) -> np.ndarray | None:
        """Per id: True when the index surely lacks it, without reading the index (the id
        filter); None when the filter cannot say. Never trusted for "present"."""
        return self._index.id_filter.surely_absent(self._txn, chunk_ids)

    def locate(self, refs: np.ndarray) -> np.ndarray:
        """Places of the given refs (ZERO excluded) as a LOCATION_DTYPE array; DamageError if any is
        unknown. One batched LMDB look-up (`getmulti`) and one numpy parse of the records: a
        restore locates every chunk of a disk, so no per-chunk Python work here."""
        found = self._txn.cursor(db=self._index.refs).getmulti(ref_keys(refs))
        if len(found) != len(refs) or any(len(raw) != REF_REC.size for _, raw in found):
            raise DamageError(f"chunk ref {_first_unlocated(refs, found)} is not in the index "
                              "(missing data)")
        out = np.empty(len(refs), dtype=LOCATION_DTYPE)
        out["ref"] = refs
        records = np.frombuffer(b"".join(raw for _, raw in found), dtype=REF_REC_DTYPE)
        for name in REF_REC_DTYPE.names:
            out[name] = records[name]
        return out


def lacks(txn: lmdb.Transaction, db: object, refs: np.ndarray) -> np.ndarray:
    """Per ref of `refs`, whether `db` (keyed by ref) lacks it: one batched look-up."""
    return ~np.isin(refs, refs_found(txn.cursor(db=db).getmulti(ref_keys(refs))))


def _first_unlocated(refs: np.ndarray, found: list[tuple[bytes, bytes]]) -> int:
    """The first of `refs` without a well-formed place record in `found`."""
    good = {REF_KEY.unpack(key)[0] for key, raw in found if len(raw) == REF_REC.size}
    return next(int(ref) for ref in refs.tolist() if ref not in good)


def _items_between(cursor: lmdb.Cursor, first: bytes, end: bytes) -> Iterator[tuple[bytes, bytes]]:
    """The (key, value) items of a cursor's database with keys in [first, end), in key order."""
    if cursor.set_range(first):
        for key, value in cursor:
            if key >= end:
                return
            yield key, value
