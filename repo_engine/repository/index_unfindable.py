"""Refs taken out of deduplication (index.py's docstring has the tables; docs/FORMAT.md,
"Duplicates by locality", the rule they keep): the bookkeeping of `unfindable` and of the
quarantine of damaged chunks, in the writers' transactions, and the check of the `unfindable`
entries a look-up by locality reads."""

from __future__ import annotations

from collections.abc import Iterable

import lmdb
import numpy as np

from .blockmap import holds
from .index_records import REF_KEY, REF_REC, plan_refs, ref_keys, refs_found
from .journal import SweepOp
from .lmdbfile import U64
from .seals import CHECK_SIZE, mark, marked_rows, marks

# refs either side of a look-up by locality whose `unfindable` entries are checked too: the
# table is sparse but where gc doomed many refs, so this costs a seek and a few entries
CHECKED_AROUND = 1024


class Unfindable:
    """The writes of `Index` (index.py), which inherits them, that take refs out of
    deduplication or make them findable again: in the caller's write transaction, on its
    tables (`ids`, `refs`, `unfindable`, `quarantine`, a cache's `plans`) and its id filter."""

    def hide(self, txn: lmdb.Transaction, refs: np.ndarray, *,
             drop: bool = False) -> tuple[int, int, int]:
        """Remove the `ids` entries naming `refs` and list the refs in `unfindable` (no dedup
        finds them any more, by id or by locality) or, with `drop`, remove their place records
        and those marks; returns how many of `refs` the cache held, and their raw and stored
        bytes. The refs are taken a few thousand at a time: a plan may name most
        chunks of the repository, and a Python object each would cost some 40 times its 8
        bytes."""
        held = raw_bytes = stored = 0
        refs = np.unique(refs)  # each looked up before any of its batch is dropped
        places = txn.cursor(db=self.refs)
        for start in range(0, len(refs), 4096):
            for key, raw in places.getmulti(ref_keys(refs[start:start + 4096])):
                chunk_id = raw[:32]
                if txn.get(chunk_id, db=self.ids) == U64.pack(REF_KEY.unpack(key)[0]):
                    txn.delete(chunk_id, db=self.ids)
                held += 1
                if drop:
                    _id, _pack, _offset, size, length, _codec = REF_REC.unpack(raw)
                    raw_bytes, stored = raw_bytes + length, stored + size
                    txn.delete(key, db=self.refs)
                    self.show_key(txn, key)
                else:
                    self.hide_key(txn, key)
        return held, raw_bytes, stored

    def hide_key(self, txn: lmdb.Transaction, key: bytes) -> None:
        """List the ref of `key` in `unfindable`, its value the check of the key (also in an
        index kept at version 4: that build reads keys alone); nothing on an index kept at
        version 3 (an earlier repo-engine's writers list nothing: locality is off there)."""
        if self.unfindable is not None:
            txn.put(key, mark("unfindable", key), db=self.unfindable)

    def hide_keys(self, txn: lmdb.Transaction, keys: list[bytes]) -> None:
        """`hide_key` of each of `keys`, their checks computed together (gc's mark lists every
        candidate: thousands after a forget of most points)."""
        if self.unfindable is None or not keys:
            return
        values = marks("unfindable", np.frombuffer(b"".join(keys), np.uint8).reshape(len(keys), -1))
        for key, value in zip(keys, values):
            txn.put(key, value.tobytes(), db=self.unfindable)

    def show_key(self, txn: lmdb.Transaction, key: bytes) -> None:
        """Take the ref of `key` off `unfindable` (see hide_key)."""
        if self.unfindable is not None:
            txn.delete(key, db=self.unfindable)

    def unhide(self, txn: lmdb.Transaction, places: Iterable[tuple[bytes, bytes]]) -> int:
        """Make findable again the refs of `places` (key, place record) taken out of
        deduplication that are kept after all (a count holds them, or a shared sweep keeps
        them): `ids` names each unless it names another copy, and `unfindable` lists it no
        more. A quarantined ref stays out (damaged), and so does one whose place record is of
        another size (damaged: it names no chunk; verify reports it). Returns how many were made
        findable."""
        added, shown = [], 0
        for key, rec in places:
            if len(rec) != REF_REC.size or txn.get(key, db=self.quarantine) is not None:
                continue
            if txn.put(rec[:32], U64.pack(REF_KEY.unpack(key)[0]), db=self.ids, overwrite=False):
                added.append(rec[:32])
            self.show_key(txn, key)
            shown += 1
        self.id_filter.inserted(txn, added)
        return shown

    def quarantine_ref(self, txn: lmdb.Transaction, ref: int, reason: str) -> bool:
        """Note a placed ref found damaged in `quarantine` and take it out of deduplication
        (its `ids` entry, if `ids` names it, and `unfindable`: neither a look-up by id nor
        locality finds it, healed or not); False when the index does not place it."""
        key = REF_KEY.pack(ref)
        rec = txn.get(key, db=self.refs)
        if rec is None:
            return False
        txn.put(key, reason.encode()[:1000], db=self.quarantine)
        if txn.get(rec[:32], db=self.ids) == U64.pack(ref):
            txn.delete(rec[:32], db=self.ids)
        self.hide_key(txn, key)
        return True

    def _placed_again(self, txn: lmdb.Transaction, number: int, refs: np.ndarray) -> None:
        """A replayed `pack` op placed `refs` in its pack `number`: a quarantined one placed
        there now (a heal's or a repack's copy, checked against its id when written) is whole
        again; so is one a known pack places, written again whole (a heal from the same copy
        makes the same bytes, and a pack is named by its bytes' hash). It stays out of
        deduplication (`ids` names its donor, or nothing)."""
        for ref in self._quarantined_of(txn, refs).tolist():
            rec = txn.get(REF_KEY.pack(ref), db=self.refs)
            if rec is not None and REF_REC.unpack(rec)[1] == number:
                txn.delete(REF_KEY.pack(ref), db=self.quarantine)

    def _unquarantine_unplaced(self, txn: lmdb.Transaction) -> None:
        """Drop the quarantine notes of refs no longer placed (a sweep removed them): the few
        notes are read, not the sweep's refs looked up (it may name millions)."""
        for key in list(txn.cursor(db=self.quarantine).iternext(keys=True, values=False)):
            if txn.get(key, db=self.refs) is None:
                txn.delete(key, db=self.quarantine)

    def _quarantined_of(self, txn: lmdb.Transaction, refs: np.ndarray) -> np.ndarray:
        """Those of `refs` the quarantine lists, at the cost of the smaller side: its keys read
        when they are fewer (the usual few), else `refs` looked up (a pack op's refs against
        the notes of a large damage: every replayed pack op asks)."""
        refs = np.asarray(refs, np.uint64)
        if txn.stat(self.quarantine)["entries"] > len(refs):
            return refs_found(txn.cursor(db=self.quarantine).getmulti(ref_keys(refs)))
        keys = list(txn.cursor(db=self.quarantine).iternext(keys=True, values=False))
        listed = np.array([REF_KEY.unpack(k)[0] for k in keys], np.uint64)
        return listed[np.isin(listed, refs)] if keys else listed

    def _give_back(self, txn: lmdb.Transaction, op: SweepOp) -> None:
        """The refs the plan of a sweep dooms and the sweep keeps (a backup counted them
        meanwhile: placed, not in the sweep's refs) are found again, as a local gc's sweep gives
        a candidate counted meanwhile its `ids` entry back (`unhide`, which leaves a quarantined
        one out), unless another pending plan dooms it. The plan's refs are taken a batch at a
        time, and the sweep's are searched as they are (gc writes them sorted): a plan may doom
        most chunks."""
        raw = txn.get(op.plan.encode(), db=self.plans)
        if raw is None:
            return
        swept = op.refs if not (op.refs[1:] < op.refs[:-1]).any() else np.unique(op.refs)
        doomed = plan_refs(raw)
        found = txn.cursor(db=self.refs).getmulti
        parts = []
        for start in range(0, len(doomed), 4096):
            part = doomed[start:start + 4096]
            parts.append(refs_found(found(ref_keys(part[~holds(swept, part)]))))
        del raw, doomed  # not held while the sweep runs
        kept = np.concatenate(parts or [np.zeros(0, np.uint64)])
        if not len(kept):
            return
        for other in self.plans_in(txn):
            if other.op.plan != op.plan:
                kept = kept[~np.isin(kept, other.op.refs)]
        for start in range(0, len(kept), 4096):
            self.unhide(txn, found(ref_keys(kept[start:start + 4096])))


def marks_hold(items: list[tuple[bytes, bytes]]) -> bool:
    """Whether every (key, value) of `unfindable` passes its check (seals.py), all at once."""
    if any(len(key) != REF_KEY.size or len(value) != CHECK_SIZE for key, value in items):
        return False
    keys = np.frombuffer(b"".join(key for key, _ in items), np.uint8).reshape(-1, REF_KEY.size)
    values = np.frombuffer(b"".join(v for _, v in items), np.uint8).reshape(-1, CHECK_SIZE)
    return bool(marked_rows("unfindable", keys, values).all())
