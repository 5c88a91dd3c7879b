"""Checkpoints of a shared repository's journal, and catching a host's cache up with it.

A checkpoint `journal/<16 hex seq>.ckpt` is the whole replayed state after entry `seq`: what a
host needs to rebuild its cache without the entries up to `seq` (which gc may then delete) and
without reading any pack or map. It is written streamed, in bounded memory, as:

| part    | layout                                                                      |
|---------|-----------------------------------------------------------------------------|
| header  | magic CHECKPOINT (8), major u16, minor u16, flags u32 — 16 bytes; then,      |
|         | when flag SEALED (bit 0) is set, the key header (36: epoch, salt; seal.py)    |
| records | each: tag [4] ascii, JSON length u32, frame length u64, then a zstd frame of |
|         | the JSON followed by the record's binary part                                |
| footer  | BLAKE3 of every byte before it [32]                                          |

In an encrypted repository every frame is sealed as a part (crypto/seal.py) of kind
"checkpoint", its nonce the frame's byte position, named by its tag and JSON length: a record
changed, moved, dropped or taken from another checkpoint fails authentication. The footer stays
over the stored bytes (a keyless scrub checks them); the tags and lengths stay readable.

| tag    | JSON                                           | binary                            |
|--------|------------------------------------------------|-----------------------------------|
| `META` | seq, time, host, next_ref, next_seq, retired   | —                                 |
| `PACK` | list of [number, name, size, count]            | —                                 |
| `REFS` | {}                                             | REF_ROW rows: every placed ref    |
| `QUAR` | list of reasons, one per ref                   | quarantined refs u64[]            |
| `PNTS` | list of catalog records                        | —                                 |
| `PLAN` | plan, time, packs, maps, objects, leases       | refs u64[]                        |
| `SWPT` | {}                                             | `sweptmaps` names [32], then seqs u64[] |
| `END!` | records: how many came before (last)           | —                                 |

A reader loads a checkpoint into the cache in one write transaction, which commits only after
the footer checks out. A ref row's `indexed` flag says the `ids` table names it (a chunk stored
twice, or made unfindable by a plan or a quarantine, is placed but not found); those refs, and
the refs of a loaded `PLAN`, are listed in `unfindable`, as its replay lists them. `QUAR`
records are the quarantine the journal's `quarantine` ops made (chunks found damaged, not healed
since): loaded into `quarantine`, out of `ids`. A checkpoint holding one is of major version 2
(an older repo-engine asks to be upgraded), one without of version 1. The loading host's own
quarantine notes are replaced, but for a ref the checkpoint still places in the pack it was
found damaged in (a note an earlier repo-engine kept to its host): that one stays, out of `ids`
whatever its row says.

`catch_up` is a shared repository's refresh: apply entries `journal_seq + 1, ...` until one is
missing. A cache that is empty, or was last refreshed more than STALE_AFTER ago (on a clock no
setting of this host's moves: Index.refreshed_ago), first looks for
a newer checkpoint: entries at or below a checkpoint are deleted only once it is older than
STALE_AFTER (and gc's grace), so a cache refreshed more recently still finds the entries it needs.
That age is measured on the compacting host's clock alone, from when it first saw the checkpoint
(`compact`): each bound compares two times of one clock, whatever the skew between hosts.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import struct
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import blake3
import lmdb
import numpy as np
import zstandard

from ..errors import DamageError, TamperedError
from .atomic import spool_name, write_all
from .crypto.null import NULL_SEALER, PART_HEADER_SIZE, PartSealer, Sealer
from .envelope import SEALED
from .formats import CHECKPOINT, CHECKPOINT_QUARANTINE, FileFormat
from .index import COUNTERS, U64, Index
from .index_records import PACK_KEY, PACK_REC, REF_KEY, REF_REC, encode_record
from .journal import (PREFIX, Entry, PendingPlan, PlanOp, check_reasons, entry_object,
                      entry_seqs, read_entry)
from .points import PointRecord
from . import sightings
from .safefile import FILE_MODE
from .store import ObjectExists, Store

HEADER = struct.Struct("<8sHHI")
RECORD = struct.Struct("<4sIQ")
assert (HEADER.size, RECORD.size) == (16, 16)
CHECKSUM_SIZE = 32
REF_ROW = np.dtype([("ref", "<u8"), ("id", "V32"), ("pack", "<u4"), ("offset", "<u8"),
                    ("stored", "<u4"), ("raw", "<u4"), ("codec", "u1"), ("indexed", "u1")])
BATCH = 1 << 16  # rows per frame: bounds memory on both sides (4 MiB of refs)
RECORDS_BATCH = 1 << 10  # catalog records per frame (a record is up to a few KiB)
READ_PIECE = 8 << 20
MAX_FRAME = 1 << 30
STALE_AFTER = 3600.0
SEEN_KEY = b"checkpoints_seen"  # meta: when this host first listed each checkpoint (sightings)
READ_AHEAD = 8  # journal entries fetched at once by a long replay
CHECKPOINT_EVERY = 200
# what a checkpoint replaces in a cache (other tables are this host's own notes; `unfindable`
# is made again from the checkpoint, `quarantine` from its `QUAR` records and the notes of this
# host's own that still hold: _keep_quarantined)
REPLAYED = ("ids", "refs", "packs", "packnames", "packlive", "points", "plans", "sweptmaps",
            "unfindable", "quarantine")


def checkpoint_object(seq: int) -> str:
    return f"{PREFIX}{seq:016x}.ckpt"


def newest_checkpoint(store: Store) -> int | None:
    return max(entry_seqs(store, ".ckpt"), default=None)


# -- writing ----------------------------------------------------------------------------------
def _part_name(tag: bytes, text_len: int) -> bytes:
    return RECORD.pack(tag, text_len, 0)[:8]


class _Writer:
    """Records into a spool file, hashed as they go; the file is closed however it ends."""

    def __init__(self, path: Path, sealer: Sealer, fmt: FileFormat = CHECKPOINT) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        self._format = fmt
        self._hash = blake3.blake3()
        self._parts = sealer.parts("checkpoint")
        self._flags = SEALED if sealer.encrypted else 0
        self._pos = 0
        self.records = 0

    def __enter__(self) -> "_Writer":
        fmt = self._format
        self._out(HEADER.pack(fmt.magic, fmt.major, fmt.minor, self._flags)
                  + self._parts.header)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)

    def _out(self, data: bytes) -> None:
        self._hash.update(data)
        write_all(self._fd, data)
        self._pos += len(data)

    def record(self, tag: bytes, doc: object, binary: bytes = b"") -> None:
        text = json.dumps(doc, sort_keys=True).encode()
        frame = self._parts.seal(self._pos + RECORD.size, "checkpoint",
                                 _part_name(tag, len(text)),
                                 zstandard.ZstdCompressor(level=3).compress(text + binary))
        self._out(RECORD.pack(tag, len(text), len(frame)) + frame)
        self.records += 1

    def finish(self) -> None:
        self.record(b"END!", {"records": self.records})
        write_all(self._fd, self._hash.digest())
        os.fsync(self._fd)


def write_checkpoint(store: Store, index: Index, sealer: Sealer = NULL_SEALER) -> int:
    """Write the checkpoint of the cache's state at its `journal_seq` (the caller refreshed);
    returns that seq. One written by another host at the same seq is kept."""
    spool = store.spool_dir() / spool_name("ckpt")
    try:
        # one snapshot
        with index.env.begin(buffers=False) as txn, _Writer(spool, sealer, _format(
                index, txn)) as writer:
            seq = index.journal_seq_in(txn)
            writer.record(b"META", {
                "seq": seq, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "host": socket.gethostname(),
                "next_ref": Index._get_u64(txn, b"next_ref", index.meta),
                "next_seq": Index._get_u64(txn, b"next_seq", index.meta),
                "retired": sorted(index.retired_in(txn))})
            _write_state(writer, index, txn)
            writer.finish()
        try:
            store.put_file(checkpoint_object(seq), spool, if_absent=True)
        except ObjectExists:
            pass
        return seq
    finally:
        spool.unlink(missing_ok=True)


def _format(index: Index, txn: lmdb.Transaction) -> FileFormat:
    """Version 2 when the checkpoint holds quarantined chunks, else version 1."""
    return CHECKPOINT_QUARANTINE if txn.stat(index.quarantine)["entries"] else CHECKPOINT


def _write_state(writer: _Writer, index: Index, txn: lmdb.Transaction) -> None:
    for batch in _batches(txn.cursor(db=index.packs), BATCH):
        writer.record(b"PACK", [[PACK_KEY.unpack(k)[0], *_pack_fields(v)] for k, v in batch])
    ids = index.ids
    for batch in _batches(txn.cursor(db=index.refs), BATCH):
        rows = np.zeros(len(batch), REF_ROW)
        for i, (key, raw) in enumerate(batch):
            ref = REF_KEY.unpack(key)[0]
            place = REF_REC.unpack(raw)
            rows[i] = (ref, *place, txn.get(place[0], db=ids) == U64.pack(ref))
        writer.record(b"REFS", {}, rows.tobytes())
    for batch in _batches(txn.cursor(db=index.quarantine), RECORDS_BATCH):
        writer.record(b"QUAR", [v.decode("utf-8", "replace") for _, v in batch],
                      np.array([REF_KEY.unpack(k)[0] for k, _ in batch], "<u8").tobytes())
    for batch in _batches(txn.cursor(db=index.points), RECORDS_BATCH):
        writer.record(b"PNTS", [index.record(k, v) for k, v in batch])
    for plan in index.plans_in(txn):
        op = plan.op
        writer.record(b"PLAN", {"plan": op.plan, "time": op.time, "packs": op.packs,
                                "maps": op.maps, "objects": op.objects, "leases": plan.leases},
                      np.ascontiguousarray(op.refs, "<u8").tobytes())
    for batch in _batches(txn.cursor(db=index.sweptmaps), BATCH):
        names = b"".join(k for k, _ in batch)
        writer.record(b"SWPT", {}, names + b"".join(v for _, v in batch))


def _batches(cursor: lmdb.Cursor, size: int) -> Iterator[list[tuple[bytes, bytes]]]:
    batch: list[tuple[bytes, bytes]] = []
    for item in cursor:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _pack_fields(raw: bytes) -> list:
    name, size, count = PACK_REC.unpack(raw)
    return [name.hex(), size, count]


def checkpoint_due(store: Store, index: Index, every: int = CHECKPOINT_EVERY) -> bool:
    """Whether more than `every` entries were replayed since the newest checkpoint (gc then
    writes one)."""
    return index.journal_seq - (newest_checkpoint(store) or 0) > every


def compact(store: Store, index: Index, grace: float) -> int:
    """Delete the entries at or below the newest checkpoint older than `grace` seconds and
    STALE_AFTER (module doc), and the checkpoints before it; returns how many entries were
    deleted. Not only the newest checkpoint counts: gc writes one every CHECKPOINT_EVERY
    entries, and on a busy repository the newest may never be that old. A checkpoint's age is
    measured on this host's steady clock from when `index`, this host's cache, first saw it
    (`_first_seen`; the wall clock would not do: sightings.py): the time its writer put in it is
    of another host's clock, and a writer running an hour behind would have it compacted while a
    cache refreshed a minute ago still needs the entries after its own (such a host, between two
    commits of one command, would take the gap for the head and commit where no other host
    reads)."""
    at = time.time()  # only the seconds seen count: first sights come as `at` less those
    listed = sightings.monotonic()
    checkpoints = sorted(entry_seqs(store, ".ckpt"), reverse=True)
    seen = _first_seen(index, checkpoints, at, listed)
    for seq in checkpoints:
        if at >= seen[seq] + max(grace, STALE_AFTER):
            break
    else:
        return 0
    doomed = sorted(s for s in entry_seqs(store) if s <= seq)
    older = [checkpoint_object(s) for s in checkpoints if s < seq]
    store.delete([entry_object(s) for s in doomed] + older)
    return len(doomed)


def _first_seen(index: Index, checkpoints: list[int], at: float,
                listed: float) -> dict[int, float]:
    """When this host first saw each of `checkpoints` (Index.first_seen)."""
    seen = index.first_seen(SEEN_KEY, [str(seq) for seq in checkpoints], at, listed=listed)
    return {int(seq): when for seq, when in seen.items()}


# -- reading ----------------------------------------------------------------------------------
class _Reader:
    """Sequential, hashed reads of a checkpoint object, a piece at a time."""

    def __init__(self, store: Store, name: str, sealer: Sealer) -> None:
        self.store, self.name, self.sealer = store, name, sealer
        self.what = f"{store.location}/{name}"
        self.size = store.size(name)
        self.pos = 0
        self._hash = blake3.blake3()

    def read(self, length: int) -> bytes:
        if self.pos + length > self.size - CHECKSUM_SIZE:
            raise DamageError(f"{self.what}: checkpoint is truncated")
        parts = []
        for offset in range(self.pos, self.pos + length, READ_PIECE):
            size = min(READ_PIECE, self.pos + length - offset)
            parts.append(self.store.get_range(self.name, offset, size))
        data = b"".join(parts)
        self._hash.update(data)
        self.pos += length
        return data

    def records(self) -> Iterator[tuple[bytes, object, bytes]]:
        magic, major, _minor, flags = HEADER.unpack(self.read(HEADER.size))
        if magic != CHECKPOINT.magic:
            raise DamageError(f"{self.what}: not a checkpoint (bad magic)")
        CHECKPOINT.check_version(major, self.what)
        parts = self._opener(flags)
        count = 0
        while True:
            tag, text_len, frame_len = RECORD.unpack(self.read(RECORD.size))
            if frame_len > MAX_FRAME:
                raise DamageError(f"{self.what}: checkpoint record claims {frame_len} bytes")
            position = self.pos
            frame = parts.open(position, "checkpoint", _part_name(tag, text_len),
                               self.read(frame_len), self.what)
            try:
                body = zstandard.ZstdDecompressor().decompress(frame)
                doc = json.loads(body[:text_len])
            except (zstandard.ZstdError, ValueError) as exc:
                raise DamageError(f"{self.what}: checkpoint record is damaged ({exc})") from None
            if tag == b"END!":
                self._finish(doc, count)
                return
            count += 1
            yield tag, doc, body[text_len:]

    def _opener(self, flags: int) -> PartSealer:
        """What opens the frames: a sealed checkpoint's key header read first; a cleartext one
        in an encrypted repository was planted."""
        sealed = bool(flags & SEALED)
        if self.sealer.encrypted and not sealed:
            raise TamperedError(f"{self.what}: a cleartext checkpoint in an encrypted "
                                "repository; it was planted or tampered with")
        header = self.read(PART_HEADER_SIZE) if sealed else b""
        return self.sealer.parts_opener("checkpoint", header, self.what)

    def _finish(self, doc: object, count: int) -> None:
        digest = self.store.get_range(self.name, self.pos, CHECKSUM_SIZE)
        if (self.pos + CHECKSUM_SIZE != self.size or digest != self._hash.digest()
                or doc != {"records": count}):
            raise DamageError(f"{self.what}: checkpoint checksum mismatch (damaged)")


def load_checkpoint(store: Store, index: Index, seq: int, sealer: Sealer = NULL_SEALER) -> None:
    """Replace the cache's replayed state by checkpoint `seq`, in one transaction that commits
    only when the whole checkpoint checked out (DamageError otherwise, the cache unchanged); a
    cache that holds entry `seq` already is left as it is."""
    reader = _Reader(store, checkpoint_object(seq), sealer)
    try:
        with index.write() as txn:
            if index.journal_seq_in(txn) >= seq:
                return  # another process of this host got there first: never go back
            own = _quarantined(index, txn)
            for table in REPLAYED:
                if getattr(index, table) is not None:  # `unfindable`: none at version 3
                    txn.drop(getattr(index, table), delete=False)
            for tag, doc, binary in reader.records():
                _load_record(index, txn, tag, doc, binary, reader.what)
            if index.journal_seq_in(txn) != seq:
                raise DamageError(f"{reader.what}: checkpoint says it holds another seq")
            _keep_quarantined(index, txn, own)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise DamageError(f"{reader.what}: checkpoint is malformed ({exc})") from None


def _quarantined(index: Index, txn: lmdb.Transaction) -> list[tuple[int, bytes, bytes]]:
    """(ref, name of the pack it is placed in, reason) of each ref this host's cache holds
    quarantined (a few)."""
    out = []
    for key, reason in txn.cursor(db=index.quarantine):
        ref = REF_KEY.unpack(key)[0]
        pack = _pack_of(index, txn, ref)
        if pack is not None:
            out.append((ref, pack, reason))
    return out


def _pack_of(index: Index, txn: lmdb.Transaction, ref: int) -> bytes | None:
    """The name of the pack the cache places `ref` in (None: placed nowhere it lists)."""
    rec = txn.get(REF_KEY.pack(ref), db=index.refs)
    pack = None if rec is None else txn.get(PACK_KEY.pack(REF_REC.unpack(rec)[1]),
                                             db=index.packs)
    return None if pack is None else PACK_REC.unpack(pack)[0]


def _keep_quarantined(index: Index, txn: lmdb.Transaction,
                      own: list[tuple[int, bytes, bytes]]) -> None:
    """The loaded `quarantine` is the journal's (`QUAR`); a ref this host held quarantined
    that the checkpoint places in the same pack stays so too (a quarantine an earlier
    repo-engine kept to its host, which the writing host may not know of), out of `ids`. One
    placed elsewhere was healed (or repacked) meanwhile, one placed nowhere swept."""
    for ref, name, reason in own:
        if _pack_of(index, txn, ref) == name:
            index.quarantine_ref(txn, ref, reason.decode("utf-8", "replace"))


def _load_record(index: Index, txn: lmdb.Transaction, tag: bytes, doc, binary: bytes,
                 what: str) -> None:
    if tag == b"META":
        for key in ("next_ref", "next_seq"):
            txn.put(key.encode(), U64.pack(doc[key]), db=index.meta)
        txn.put(b"journal_seq", U64.pack(doc["seq"]), db=index.meta)
        index.put_retired(txn, {int(e) for e in doc.get("retired", [])})
        txn.put(b"counts", U64.pack(0), db=index.meta)
        for key in COUNTERS:
            txn.put(key.encode(), U64.pack(0), db=index.meta)
    elif tag == b"PACK":
        for number, name, size, count in doc:
            index.put_pack_record(txn, number, bytes.fromhex(name), size, count, count, 0)
            if number >= Index._get_u64(txn, b"next_pack", index.meta):
                txn.put(b"next_pack", U64.pack(number + 1), db=index.meta)
    elif tag == b"REFS":
        rows = np.frombuffer(binary, REF_ROW)
        findable = rows["indexed"] != 0
        index.id_filter.inserted(txn, [row["id"].tobytes() for row in rows[findable]])
        for row, found in zip(rows, findable.tolist()):
            ref, chunk_id = int(row["ref"]), row["id"].tobytes()
            txn.put(REF_KEY.pack(ref), REF_REC.pack(chunk_id, int(row["pack"]),
                    int(row["offset"]), int(row["stored"]), int(row["raw"]),
                    int(row["codec"])), db=index.refs)
            if found:
                txn.put(chunk_id, U64.pack(ref), db=index.ids)
        # a row the writer's `ids` did not name stays out of locality too: the writer may have
        # taken it out alone (an earlier repo-engine's quarantine), which only the flag says
        index.hide(txn, rows["ref"][~findable])
        for key, total in (("chunks", len(rows)), ("raw_bytes", int(rows["raw"].sum())),
                           ("stored_bytes", int(rows["stored"].sum()))):
            index._add(txn, key, total)
    elif tag == b"QUAR":
        refs = np.frombuffer(binary, "<u8")
        check_reasons(doc, len(refs))
        for ref, reason in zip(refs.tolist(), doc):
            index.quarantine_ref(txn, ref, reason)
    elif tag == b"PNTS":
        for record in doc:
            point = PointRecord.from_dict(record, what).summary()
            txn.put(point["id"].encode(), encode_record(point), db=index.points)
    elif tag == b"PLAN":
        op = PlanOp(doc["plan"], doc["time"], np.frombuffer(binary, "<u8").astype(np.uint64),
                    doc["packs"], doc["maps"], doc["objects"])
        index.put_plan(txn, PendingPlan(op, doc["leases"]))
        # as its replay does, whatever the REFS rows said (an earlier repo-engine's heal could
        # leave a doomed ref in the writer's `ids`)
        index.hide(txn, op.refs)
    elif tag == b"SWPT":
        count = len(binary) // 40
        for i in range(count):
            txn.put(binary[32 * i:32 * i + 32], binary[32 * count + 8 * i:32 * count + 8 * i + 8],
                    db=index.sweptmaps)
    else:
        raise DamageError(f"{what}: checkpoint record {tag!r} is unknown")


# -- refresh ----------------------------------------------------------------------------------
def catch_up(store: Store, index: Index, *, check: bool = False,
             sealer: Sealer = NULL_SEALER) -> int:
    """Apply the journal's new entries to the cache (from the newest checkpoint when the cache
    is empty or stale and a newer one exists); returns the cache's `journal_seq`, the head.
    `check` (a command's first refresh, after its lock): make sure the entry the cache stopped
    at is the journal's head (`_at_head`), at the cost of two HEAD requests."""
    seq = index.journal_seq
    # timed on a clock no setting moves: a wall clock set back while a command runs (or
    # noted while it ran ahead) would call a cache fresh that another host compacted past
    ago = index.refreshed_ago()
    if seq == 0 or ago is None or ago > STALE_AFTER:
        newest = newest_checkpoint(store)
        if newest is not None and newest > seq:
            load_checkpoint(store, index, newest, sealer)
            seq = newest
    while True:
        for entry in _new_entries(store, index.journal_seq, sealer):
            index.apply_entry(entry)  # a no-op for one another process of this host applied
        if not check or _at_head(store, index, sealer):
            break
    index.note_refreshed()
    return index.journal_seq


def _at_head(store: Store, index: Index, sealer: Sealer) -> bool:
    """Whether the cache, whose next entry is missing, holds the journal's head: its own last
    entry still exists (or a checkpoint at it does) and the entry after the missing one does
    not. Otherwise entries were compacted past the cache (the newest checkpoint is loaded:
    False, replay again), an entry was written meanwhile (False), or the journal lost entries
    this cache holds or one in its middle: DamageError, before anything is committed at a seq
    the journal holds already or that other hosts will never read."""
    head = index.journal_seq
    if head and not store.exists(entry_object(head)):
        return _from_checkpoint(store, index, head, f"entry {head}, the last one this host's "
                                "cache holds, is gone", covers_head=True, sealer=sealer)
    if not store.exists(entry_object(head + 2)):
        return True
    if store.exists(entry_object(head + 1)):
        return False  # written meanwhile
    return _from_checkpoint(store, index, head, f"entry {head + 1} is missing while entry "
                            f"{head + 2} exists", covers_head=False, sealer=sealer)


def _from_checkpoint(store: Store, index: Index, head: int, why: str, covers_head: bool,
                     sealer: Sealer) -> bool:
    newest = newest_checkpoint(store) or 0
    if newest > head:  # compacted past this cache
        load_checkpoint(store, index, newest, sealer)
        return False
    if covers_head and newest == head:
        return True
    raise DamageError(f"{store.location}: the journal does not hold what this host's cache "
                      f"holds ({why}): the journal was damaged or restored from an older copy, "
                      "or this cache belongs to another repository; nothing was written. Run "
                      "'repo-engine rebuild-index' to rebuild this host's cache from the journal "
                      "as it is, then 'repo-engine verify'")


def _new_entries(store: Store, seq: int, sealer: Sealer) -> Iterator[Entry]:
    """Entries seq + 1, seq + 2, ... up to the first missing one: one GET when nothing is new,
    else READ_AHEAD requests in flight (the store's latency, not its bandwidth, bounds a long
    replay), in bounded memory."""
    entry = read_entry(store, seq + 1, sealer)
    if entry is None:
        return
    yield entry
    with ThreadPoolExecutor(READ_AHEAD, thread_name_prefix="journal-read") as pool:
        for start in itertools.count(seq + 2, READ_AHEAD):
            window = [pool.submit(read_entry, store, s, sealer)
                      for s in range(start, start + READ_AHEAD)]
            for future in window:
                entry = future.result()
                if entry is None:
                    return
                yield entry
