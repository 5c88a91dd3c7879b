"""A summary of the index's chunk ids kept in memory: a Bloom filter in front of the `ids` table
(the summary vector of Zhu et al., FAST 2008), so that a backup's look-up of a NEW chunk, which
the index lacks, reads no index page; once the index is larger than the free memory each such
look-up would otherwise cost a random read.

The filter is never trusted for "present" (a hit goes to LMDB as before); only "surely absent"
skips the look-up. So it must hold every id the index holds. Every insert into `ids` is counted
in the same transaction (meta `ids_added`, a u64 that only grows, `Index.note_ids`), and the
filter knows which counts it covers (`covered`, intervals [start, end)): it answers for a read
transaction only when it covers [0, that transaction's `ids_added`), else the look-ups go to
LMDB. A filter built before a crash, or missing a concurrent writer's inserts, is thus stale,
never wrong: stale costs speed, and the next process that finds it so rebuilds it from `ids`.
Meta `ids_epoch` (16 random bytes, set with the first count) names one index's counting:
`rebuild-index` makes a new index, whose counts start again under another epoch.
Deleting ids (gc) leaves their bits: a superset only costs a look-up. Bits are added before the
inserting transaction commits (a reader seeing the ids finds their bits), the interval noted
only after it commits (an aborted one claims nothing).

File `index/idfilter` (written atomically, merged with what is there under an flock, read
checked: a damaged or foreign file is rebuilt): the envelope (envelope.py, magic
`REflt\\0\\x01\\x1a`) around

| offset | size | field                                                        |
|--------|------|--------------------------------------------------------------|
| 0      | 16   | epoch (meta `ids_epoch` of the index it summarises)          |
| 16     | 8    | bits u64 (a multiple of 64, at most 2^32)                    |
| 24     | 8    | ids u64: ids put in it (scanned or counted inserts)          |
| 32     | 4    | interval count N u32                                         |
| 36     | 16 N | covered intervals of `ids_added`: start u64, end u64, sorted |
| 36+16N | bits/8 | the bits; id i sets bit (u32 word k of id i) mod bits, k < 7 |

Ids are keyed BLAKE3 digests, uniform: their words are the hashes.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import lmdb
import numpy as np

from ..errors import DamageError, FormatError
from .atomic import write_atomic
from .envelope import seal, unseal
from .formats import ID_FILTER
from .lmdbfile import U64, get_u64
from .safefile import FILE_MODE

ENABLED = True  # tests compare backups with and without the filter
HASHES = 7
BITS_PER_ID = 10  # about 1% false "maybe present" at capacity
HEADROOM = 1.5  # a filter is sized for this many times the ids it starts with
MIN_BITS = 1 << 20
MAX_BITS = 1 << 32
SCAN_BATCH = 1 << 20  # ids hashed per numpy call while building from the index
HEAD = struct.Struct("<16sQQI")
INTERVAL = struct.Struct("<QQ")
ADDED, EPOCH = b"ids_added", b"ids_epoch"
FILE, LOCK = "idfilter", "idfilter.lock"


@dataclass
class IdFilter:
    epoch: bytes
    bits: np.ndarray  # uint8, one bit per position
    ids: int = 0
    covered: list[tuple[int, int]] = field(default_factory=list)

    @classmethod
    def sized(cls, epoch: bytes, ids: int) -> "IdFilter":
        nbits = min(MAX_BITS, max(MIN_BITS, -(-int(ids * HEADROOM * BITS_PER_ID) // 64) * 64))
        return cls(epoch, np.zeros(nbits // 8, np.uint8))

    @property
    def nbits(self) -> int:
        return len(self.bits) * 8

    def full(self) -> bool:
        return self.ids > self.nbits // BITS_PER_ID

    def _positions(self, ids: bytes) -> np.ndarray:
        words = np.frombuffer(ids, "<u4").reshape(-1, 8)[:, :HASHES]
        return (words % np.uint64(self.nbits)).astype(np.int64)

    def add(self, ids: bytes) -> None:
        """Put ids (32 bytes each, back to back) in the filter."""
        pos = self._positions(ids)
        np.bitwise_or.at(self.bits, pos >> 3, (1 << (pos & 7)).astype(np.uint8))
        self.ids += len(ids) // 32

    def surely_absent(self, ids: bytes) -> np.ndarray:
        """Per id: True when the index surely lacks it (some bit of it is clear)."""
        pos = self._positions(ids)
        return ((self.bits[pos >> 3] >> (pos & 7).astype(np.uint8)) & 1 == 0).any(axis=1)

    def note(self, start: int, end: int) -> None:
        self.covered = _merged([*self.covered, (start, end)])

    def covers(self, epoch: bytes | None, added: int) -> bool:
        """Whether every id counted below `added` in the index of `epoch` is in the filter."""
        return (epoch == self.epoch and
                (added == 0 or bool(self.covered) and self.covered[0][0] == 0
                 and self.covered[0][1] >= added))

    def merge(self, other: "IdFilter") -> bool:
        """Take the bits and intervals of a filter of the same index and size (False if not)."""
        if other.epoch != self.epoch or other.nbits != self.nbits:
            return False
        self.bits |= other.bits
        self.ids = max(self.ids, other.ids)  # an estimate: both hold the ids before they split
        self.covered = _merged([*self.covered, *other.covered])
        return True

    def encode(self) -> bytes:
        head = HEAD.pack(self.epoch, self.nbits, self.ids, len(self.covered))
        spans = b"".join(INTERVAL.pack(*span) for span in self.covered)
        return seal(ID_FILTER, head + spans + self.bits.tobytes())

    @classmethod
    def decode(cls, data: bytes, what: str) -> "IdFilter":
        payload = unseal(ID_FILTER, data, what)
        epoch, nbits, ids, count = HEAD.unpack_from(payload)
        start = HEAD.size + count * INTERVAL.size
        if nbits % 64 or not 0 < nbits <= MAX_BITS or len(payload) != start + nbits // 8:
            raise DamageError(f"{what}: the filter's sizes do not match its length")
        spans = [INTERVAL.unpack_from(payload, HEAD.size + i * INTERVAL.size)
                 for i in range(count)]
        return cls(epoch, np.frombuffer(payload, np.uint8, offset=start).copy(), ids,
                   _merged(spans))


def _merged(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


class FilterCache:
    """The filter of one open index: loaded (or built from `ids`) on the first question, told of
    every insert this process commits, saved at close, merged with the file under an flock."""

    def __init__(self, path: Path, env: lmdb.Environment, meta: object, ids: object,
                 write: Callable[[], AbstractContextManager[lmdb.Transaction]],
                 usable: bool) -> None:
        self._path = path
        self._env, self._meta, self._ids = env, meta, ids
        self._write = write  # Index.write
        self._usable = usable and ENABLED
        self._filter: IdFilter | None = None
        self._loading = threading.Lock()
        # per thread (a write transaction belongs to one): intervals of its open transaction
        self._pending: dict[int, list[tuple[bytes, int, int]]] = {}
        self._changed = False

    # -- the write side (inside Index.write) -----------------------------------------------
    def inserted(self, txn: lmdb.Transaction, ids: list[bytes]) -> None:
        """Count ids just put in `ids` in this write transaction; the filter gets their bits
        now, the interval once the transaction commits (`committed`)."""
        if not ids:
            return
        epoch = txn.get(EPOCH, db=self._meta)
        if epoch is None:
            epoch = os.urandom(16)
            txn.put(EPOCH, epoch, db=self._meta)
        start = get_u64(txn, ADDED, self._meta)
        txn.put(ADDED, U64.pack(start + len(ids)), db=self._meta)
        current = self._filter
        if current is not None and current.epoch == epoch:
            current.add(b"".join(ids))
        self._pending.setdefault(threading.get_ident(), []).append(
            (epoch, start, start + len(ids)))

    def committed(self) -> None:
        pending = self._pending.pop(threading.get_ident(), [])
        current = self._filter
        for epoch, start, end in pending:
            if current is not None and current.epoch == epoch:
                current.note(start, end)
                self._changed = True

    def aborted(self) -> None:
        self._pending.pop(threading.get_ident(), None)

    # -- the read side ------------------------------------------------------------------------
    def surely_absent(self, txn: lmdb.Transaction, ids: list[bytes]) -> np.ndarray | None:
        """Per id: True when the index, as `txn` sees it, surely lacks it; None when the filter
        cannot say (disabled, read-only index, or it does not cover what `txn` sees)."""
        current = self._load()
        if current is None or not ids:
            return None
        if not current.covers(txn.get(EPOCH, db=self._meta), get_u64(txn, ADDED, self._meta)):
            return None
        return current.surely_absent(b"".join(ids))

    def _load(self) -> IdFilter | None:
        if not self._usable:
            return None
        with self._loading:
            if self._filter is None:
                self._filter = self._read_fresh() or self._build()
            return self._filter

    def _read_fresh(self) -> IdFilter | None:
        """The saved filter when it covers the index as it is now and has room; else None."""
        saved = self._read_saved()
        if saved is None:
            return None
        with self._env.begin() as txn:
            fresh = saved.covers(txn.get(EPOCH, db=self._meta), get_u64(txn, ADDED, self._meta))
        return saved if fresh and not saved.full() else None

    def _read_saved(self) -> IdFilter | None:
        """The filter saved in the file; None when it is missing or damaged (it is only a
        cache: built again)."""
        try:
            return IdFilter.decode((self._path / FILE).read_bytes(), str(self._path / FILE))
        except (OSError, DamageError, FormatError, struct.error, ValueError):
            return None

    def _build(self) -> IdFilter:
        """A filter of every id in the index, scanned in one read transaction."""
        with self._write() as txn:  # the epoch names what the filter covers
            if txn.get(EPOCH, db=self._meta) is None:
                txn.put(EPOCH, os.urandom(16), db=self._meta)
        with self._env.begin() as txn:
            built = IdFilter.sized(txn.get(EPOCH, db=self._meta),
                                   txn.stat(self._ids)["entries"])
            keys = txn.cursor(db=self._ids).iternext(keys=True, values=False)
            while batch := list(islice(keys, SCAN_BATCH)):
                built.add(b"".join(batch))
            built.note(0, get_u64(txn, ADDED, self._meta))
        self._changed = True
        return built

    def save(self) -> None:
        """Write the filter if this process changed it, merged with the saved one."""
        current = self._filter
        if current is None or not self._changed:
            return
        try:
            with os.fdopen(os.open(self._path / LOCK, os.O_RDWR | os.O_CREAT, FILE_MODE)) as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                saved = self._read_saved()
                if saved is None or current.merge(saved) or not saved.covers(
                        current.epoch, current.covered[0][1] if current.covered else 0):
                    write_atomic(self._path / FILE, current.encode())
        except OSError:
            pass  # a cache that cannot be written costs the next backup a rebuild, nothing else
        self._changed = False
