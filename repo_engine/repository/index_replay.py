"""The replay of a shared repository's journal into its host's index (index.py's docstring has
the cache's tables; journal.py the entries): an entry at a time, each in one write transaction
on top of the entry before it, and the pending plans and retired key epochs the replay keeps."""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator

import lmdb
import numpy as np

from ..errors import DamageError
from .index_records import PACK_REC, decode_plan, encode_plan, encode_record
from .journal import (Entry, ForgetOp, Op, PackOp, PendingPlan, PlanOp, PointOp, QuarantineOp,
                      RefsOp, RetireOp, SweepOp, WaitsOp)
from .lmdbfile import U64
from .packs import FinishedPack, PackEntry
from .points import PointRecord


class Replay:
    """The journal's replay of `Index` (index.py), which inherits it: it writes the index's
    tables through its writers (packs, catalog records, `Unfindable`'s quarantine and
    give-back, index_unfindable.py) in its write transactions."""

    @property
    def journal_seq(self) -> int:
        return self.meta_u64("journal_seq")

    def apply_entry(self, entry: Entry) -> bool:
        """Apply a journal entry and advance `journal_seq` to it, in one transaction, when the
        cache holds exactly the entries before it; False when it holds this one already.
        DamageError when an entry before it is missing (the cache skipped one)."""
        with self.write() as txn:
            seq = self.journal_seq_in(txn)
            if seq >= entry.seq:
                return False
            if seq != entry.seq - 1:
                raise DamageError(f"the index holds journal entries up to {seq} and was given "
                                  f"entry {entry.seq}; run 'repo-engine rebuild-index'")
            for op in entry.ops:
                self._apply(txn, entry.seq, op)
            txn.put(b"journal_seq", U64.pack(entry.seq), db=self.meta)
            txn.put(b"counts", U64.pack(0), db=self.meta)  # replay keeps no counts
        return True

    def _apply(self, txn: lmdb.Transaction, seq: int, op: Op) -> None:
        if isinstance(op, RefsOp):
            if self._get_u64(txn, b"next_ref", self.meta) < op.first + op.count:
                txn.put(b"next_ref", U64.pack(op.first + op.count), db=self.meta)
        elif isinstance(op, PackOp):
            number = self._record_pack(txn, FinishedPack(op.name, op.size,
                                                         _pack_entries(op.entries)))
            self._placed_again(txn, number, op.entries["ref"])
        elif isinstance(op, PointOp):
            point = PointRecord.from_dict(op.record, f"journal entry {seq}").summary()
            txn.put(point["id"].encode(), encode_record(point), db=self.points)
            self._seq_used(txn, point["seq"])
        elif isinstance(op, ForgetOp):
            txn.delete(op.id.encode(), db=self.points)
        elif isinstance(op, PlanOp):
            self.hide(txn, op.refs)
            self.put_plan(txn, PendingPlan(op))
        elif isinstance(op, WaitsOp):
            plan = self._get_plan(txn, op.plan)
            if plan is not None:
                self.put_plan(txn, PendingPlan(plan.op, list(op.leases)))
        elif isinstance(op, SweepOp):
            self._give_back(txn, op)
            self._sweep(txn, seq, op)
            self._unquarantine_unplaced(txn)
        elif isinstance(op, QuarantineOp):
            for ref, reason in zip(op.refs.tolist(), op.reasons):
                self.quarantine_ref(txn, ref, reason)
        elif isinstance(op, RetireOp):
            self.put_retired(txn, self.retired_in(txn) | set(op.epochs))


    def _sweep(self, txn: lmdb.Transaction, seq: int, op: SweepOp) -> None:
        held, raw_bytes, stored = self.hide(txn, op.refs, drop=True)
        for name, delta in (("chunks", held), ("raw_bytes", raw_bytes),
                            ("stored_bytes", stored)):
            self._add(txn, name, -min(delta, self._get_u64(txn, name.encode(), self.meta)))
        # every object the sweep deletes is noted, so that a writer that stalled past its lease
        # learns it, caught up, before it commits anything naming one (Repository.pack_ops,
        # _point_ops): its packs (those no cache knows too) and its maps and manifests
        for pack in op.packs:
            self._drop_pack(txn, bytes.fromhex(pack))
            txn.put(bytes.fromhex(pack), U64.pack(seq), db=self.sweptmaps)
        for name in op.maps:
            txn.put(bytes.fromhex(name), U64.pack(seq), db=self.sweptmaps)
        txn.delete(op.plan.encode(), db=self.plans)

    def _drop_pack(self, txn: lmdb.Transaction, name: bytes) -> None:
        number = txn.get(name, db=self.packnames)
        if number is None:
            return
        raw = txn.get(number, db=self.packs)
        if raw is not None:
            self._add(txn, "packs", -1)
            self._add(txn, "pack_bytes", -PACK_REC.unpack(raw)[1])
        for db in (self.packs, self.packlive):
            txn.delete(number, db=db)
        txn.delete(name, db=self.packnames)

    def put_plan(self, txn: lmdb.Transaction, plan: PendingPlan) -> None:
        txn.put(plan.op.plan.encode(), encode_plan(plan), db=self.plans)

    def _get_plan(self, txn: lmdb.Transaction, plan_id: str) -> PendingPlan | None:
        raw = txn.get(plan_id.encode(), db=self.plans)
        return None if raw is None else decode_plan(plan_id, raw)

    def pending_plans(self) -> list[PendingPlan]:
        """The pending plans (committed, not swept yet), in id order."""
        with self.env.begin() as txn:
            return list(self.plans_in(txn))

    def plans_in(self, txn: lmdb.Transaction) -> Iterator[PendingPlan]:
        for key, raw in txn.cursor(db=self.plans):
            yield decode_plan(key.decode(), raw)

    def journal_seq_in(self, txn: lmdb.Transaction) -> int:
        return self._get_u64(txn, b"journal_seq", self.meta)

    def retired_in(self, txn: lmdb.Transaction) -> set[int]:
        """The key epochs `key retire` retired (journal op `retire`): nothing may be committed
        sealed under them."""
        raw = txn.get(b"retired", db=self.meta)
        return set() if raw is None else set(json.loads(raw))

    def put_retired(self, txn: lmdb.Transaction, epochs: set[int]) -> None:
        txn.put(b"retired", json.dumps(sorted(epochs)).encode(), db=self.meta)

    def retired_epochs(self) -> set[int]:
        with self.env.begin() as txn:
            return self.retired_in(txn)

    def swept(self, names: Collection[str]) -> set[str]:
        """Those of `names` (64 hex: packs, maps, journal.manifest_key of manifests) a sweep
        deleted."""
        with self.env.begin() as txn:
            return {n for n in names if txn.get(bytes.fromhex(n), db=self.sweptmaps) is not None}

    def doomed_maps(self, names: set[str]) -> set[str]:
        """Those of `names` that a pending plan or a sweep names: gc deletes, or may delete,
        that object, so a writer must not rely on it (it writes a salted copy instead)."""
        with self.env.begin() as txn:
            planned = {m for _k, v in txn.cursor(db=self.plans)
                       for m in decode_plan("", v).op.maps}
            return {n for n in names
                    if n in planned or txn.get(bytes.fromhex(n), db=self.sweptmaps) is not None}


def _pack_entries(rows: np.ndarray) -> list[PackEntry]:
    """The PackEntry of each row of a packs.ENTRY_DTYPE array: its columns taken as Python
    values once (a numpy scalar per field and row costs more than the index writes)."""
    ids = rows["id"].tobytes()
    columns = (rows[name].tolist() for name in ("ref", "offset", "stored", "raw", "codec"))
    return [PackEntry(ref, ids[32 * i:32 * i + 32], offset, stored, raw, codec)
            for i, (ref, offset, stored, raw, codec) in enumerate(zip(*columns))]
