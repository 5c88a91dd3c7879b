"""The upgrades of an index of an earlier format version, which a writer makes on open
(`Index._check_version`; index.py's docstring says what each version added): a version at a
time, each step in a write transaction of its own."""

from __future__ import annotations

import lmdb
import numpy as np

from ..errors import DamageError
from .index_records import (REF_KEY, REF_REC, REF_REC_DTYPE, SEALED_DBS, decode_record,
                            encode_record, ref_keys, refs_found)
from .lmdbfile import U64, sized_batches
from .seals import KEY, PAYLOAD, marks, seal_rows

_NAMED_DTYPE = np.dtype([("id", "S32"), ("ref", "<u8")])  # an `ids` entry: key, value
UPGRADE_ROWS = 1 << 17  # rows an upgrade reads, and looks up, at once (some 7 MiB of `refs`)


class Upgrades:
    """The upgrade steps of `Index` (index.py), which inherits them: they read and write its
    tables in its write transactions, and the step to version 4 takes refs out of
    deduplication as a writer does (`Unfindable.hide`, index_unfindable.py)."""

    def _upgrade_to(self, version: int, last: int) -> int:
        """Upgrade the index, read at `version`, a version at a time up to `last`; returns its
        version then. Each step reads the version it upgrades in its own write transaction:
        another process opening the index at the same time may have upgraded it since (a step
        taken twice would seal sealed counts again)."""
        steps = {1: self._upgrade_from_1, 2: self._upgrade_from_2, 3: self._upgrade_from_3,
                 4: self._upgrade_from_4}
        while version < last:
            with self.write() as txn:
                version = self._get_u64(txn, b"version", self.meta)
                if version < last:
                    steps[version](txn)
                    version += 1
                    txn.put(b"version", U64.pack(version), db=self.meta)
        return version

    def _upgrade_from_1(self, txn: lmdb.Transaction) -> None:
        """Version 1 -> 2: seal every catalog record with its check. Records keep no sequence:
        they rank before every sequenced point, by time (see Repository.points)."""
        for key, value in list(txn.cursor(db=self.points)):
            record = decode_record(key, value, checked=False)
            txn.put(key, encode_record(record), db=self.points)

    def _upgrade_from_2(self, txn: lmdb.Transaction) -> None:
        """Version 2 -> 3: seal every value of the count tables."""
        for table in SEALED_DBS:
            db = getattr(self, table)
            rows = list(txn.cursor(db=db))
            if not rows:
                continue
            if {(len(k), len(v)) for k, v in rows} != {(KEY[table], PAYLOAD[table])}:
                raise DamageError(f"the index's {table} table is damaged; run "
                                  "'repo-engine rebuild-index'")
            keys = np.frombuffer(b"".join(k for k, _ in rows), np.uint8).reshape(
                len(rows), KEY[table])
            payloads = np.frombuffer(b"".join(v for _, v in rows), np.uint8).reshape(
                len(rows), PAYLOAD[table])
            values = seal_rows(table, keys, payloads)
            for (key, _), value in zip(rows, values):
                txn.put(key, value.tobytes(), db=db)

    def _upgrade_from_3(self, txn: lmdb.Transaction) -> None:
        """Version 3 -> 4: take out of deduplication (`ids` and `unfindable`) the quarantined
        chunks (an earlier sweep could give one its `ids` entry back) and the refs of pending
        plans, and list in `unfindable` the queued gc candidates `ids` does not name (a gc
        stopped between its mark and its sweep took them out; one `ids` still names is found
        by id until a mark takes it out, so locality may answer it too). Small tables: the
        upgrade costs what gc would. A shared repository's cache also lists every ref `ids`
        does not name: loaded from a checkpoint, it knows a ref the writing host quarantined by
        that alone (its rows read in batches, the `ids` entries of a batch looked up at once:
        `_unnamed`); a malformed place record, which no look-up answers, is not listed."""
        self.hide(txn, np.array([REF_KEY.unpack(k)[0] for k, _ in
                                 txn.cursor(db=self.quarantine)], np.uint64))
        for plan in list(self.plans_in(txn)):
            self.hide(txn, plan.op.refs)
        unnamed = []
        for keys, _, fits in sized_batches(txn, self.gcq, REF_KEY.size, 0, UPGRADE_ROWS):
            queued = np.frombuffer(keys, ">u8")[fits].astype(np.uint64)
            places = txn.cursor(db=self.refs).getmulti(ref_keys(queued))
            good = [(key, raw) for key, raw in places if len(raw) == REF_REC.size]
            unnamed += [queued[~np.isin(queued, refs_found(places))], self._unnamed(
                txn, refs_found(good),
                np.frombuffer(b"".join(raw for _, raw in good), REF_REC_DTYPE)["id"])]
        if self.journal_seq_in(txn):
            for keys, values, fits in sized_batches(txn, self.refs, REF_KEY.size,
                                                    REF_REC.size, UPGRADE_ROWS):
                unnamed.append(self._unnamed(
                    txn, np.frombuffer(keys, ">u8")[fits].astype(np.uint64),
                    np.frombuffer(values, REF_REC_DTYPE)["id"][fits]))
        self._list(txn, np.unique(np.concatenate([np.zeros(0, np.uint64), *unnamed])))

    def _unnamed(self, txn: lmdb.Transaction, refs: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Those of `refs` (their place records holding `ids`, V32) that `ids` does not name
        by that id. The ids are looked up in one batch, in key order (`getmulti` over sorted
        keys reads neighbouring pages: twice as fast as in ref order), and the answers matched
        to the requests and compared with the refs all at once."""
        ids = np.ascontiguousarray(ids)
        order = np.argsort(ids.view("S32"), kind="stable")  # fixed size: NULs strip nothing
        wanted = ids[order]
        named = txn.cursor(db=self.ids).getmulti(wanted.tolist())
        found = np.frombuffer(b"".join([k + v for k, v in named if len(v) == U64.size]),
                              _NAMED_DTYPE)
        at = np.minimum(np.searchsorted(found["id"], wanted.view("S32")),
                        max(len(found) - 1, 0))
        hit = np.zeros(len(refs), bool)
        if len(found):
            hit[order] = (found["id"][at] == wanted.view("S32")) & (found["ref"][at]
                                                                   == refs[order])
        return refs[~hit]

    def _list(self, txn: lmdb.Transaction, refs: np.ndarray) -> None:
        """List `refs` in `unfindable` (hide_key of each), their checks computed at once."""
        rows = np.ascontiguousarray(refs, ">u8").view(np.uint8).reshape(-1, REF_KEY.size)
        values = marks("unfindable", rows).tobytes()
        txn.cursor(db=self.unfindable).putmulti(
            (key, values[8 * i:8 * i + 8]) for i, key in enumerate(ref_keys(refs)))

    def _upgrade_from_4(self, txn: lmdb.Transaction) -> None:
        """Version 4 -> 5: each `unfindable` value becomes the check of its key (version 4
        wrote none; a later build writing a version 4 index kept open by an earlier one wrote
        them already). One pass over the table, the checks computed all at once."""
        keys = list(txn.cursor(db=self.unfindable).iternext(keys=True, values=False))
        if any(len(key) != REF_KEY.size for key in keys):
            raise DamageError("the index's unfindable table is damaged (a key of another "
                              "size); run 'repo-engine rebuild-index'")
        self._list(txn, np.frombuffer(b"".join(keys), ">u8").astype(np.uint64))
