"""Duplicate look-ups by locality (the locality-preserved caching of Zhu et al., FAST 2008): a
disk backed up before holds its chunks at consecutive refs, in the order the first backup stored
them, and `refs` is keyed by ref, so the place records of a run of such chunks share a few
leaves. Once one id of a batch is found through `ids` (a random read once the index is larger
than the memory), the refs after it are read in key order and the next ids of the batch are
answered from them, each run costing a few sequential pages instead of one random read a block.

Safety: an answer from a neighbourhood is exactly as safe as one from `ids`. Every writer that
takes a ref out of deduplication (gc's mark, a shared repository's plan, scrub's quarantine)
lists it in the index's `unfindable` table in the transaction that deletes its `ids` entry
(docs/FORMAT.md, "LMDB index"), and `IndexReader.places_between` reads the place records and the
`unfindable` keys of a range in the same read transaction as every other look-up of the batch.
So a neighbourhood answers only refs placed and not taken out at that snapshot: what `ids`
would answer, or another placed copy of the same chunk no writer has doomed (gc decides by ref,
not by id: a backup's commit counts whichever ref it names, and a plan dooms copies by ref).
Nothing is carried from one read transaction to the next. An `unfindable` entry that fails
its check (damage, which may have moved the entry of a ref nearby, in this window or the one
before) ends locality for the batch: every id of the batch goes to `ids`, those answered from
neighbourhoods before the damage was met included, as on an index without the table. The id of a
quarantined chunk is
looked up through `ids` alone: another copy may be near, but only a copy stored again (or one
`ids` names) heals the damaged ref (maintenance/scrub.py).

Cost bound: a run is read FIRST refs at a time after its `ids` hit (mostly the leaf of that hit,
read already), then in windows that double while the run goes on (up to MAX_WINDOW); a window is
read past only when the run's last answer lies near its end. After runs that answered nothing,
the next `ids` hits start none, twice as many each time (up to MAX_SKIP), so ids in random order
cost what they cost before plus a few windows a batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from .index import IndexReader

FIRST = 32  # refs read after an `ids` hit: about one leaf of `refs` (some 56 records)
MAX_WINDOW = 2048
NEAR_END = 8  # a run whose last answer is this close to its window's end is read further
RUNS = 4  # runs of one batch followed at once (a changed block sends the disk elsewhere)
MAX_SKIP = 256  # `ids` hits that start no run after runs that answered nothing


@dataclass
class _Run:
    begin: int  # the refs in [begin, end) have been read
    end: int
    last: int  # the ref of the run's last answer
    size: int  # the next window's size


class _Neighbourhood:
    """The neighbourhoods read in one read transaction: chunk id -> ref, by runs."""

    def __init__(self, reader: IndexReader) -> None:
        self._reader = reader
        self._known: dict[bytes, int] = {}
        self._runs: list[_Run] = []
        self._skip = 0  # `ids` hits left that start no run
        self._idle = 0  # runs in a row that answered nothing
        self.off = False  # no `unfindable` table, or an entry of it met damaged

    def start(self, ref: int) -> None:
        """Begin a run after `ref`, found through `ids` (nothing once locality is off)."""
        if self.off:
            return
        if self._skip:
            self._skip -= 1
            if self._skip:
                return
        elif self._runs and self._runs[0].last < self._runs[0].begin:  # it answered nothing
            self._idle += 1
            self._skip = min(MAX_SKIP, 1 << self._idle)
            return
        else:
            self._idle = 0
        if self._read(ref + 1, ref + 1 + FIRST):
            self._runs = [_Run(ref + 1, ref + 1 + FIRST, ref, FIRST), *self._runs[:RUNS - 1]]

    def find(self, chunk_id: bytes, left: int) -> int | None:
        """The ref of `chunk_id` in a run read so far, else after reading further the runs
        that reached the end of their window (`left`: ids of the batch still to look up,
        which bounds a window); None once locality is off."""
        if self.off:
            return None
        ref = self._known.get(chunk_id)
        if ref is None:
            ref = self._read_on(chunk_id, left)
        if ref is not None:
            for run in self._runs:
                if run.begin <= ref < run.end:
                    if ref > run.last:
                        run.last = ref
                    break
        return ref

    def _read_on(self, chunk_id: bytes, left: int) -> int | None:
        """Read the next window of each run whose answers reached its end, until one holds
        `chunk_id`."""
        for run in self._runs:
            if run.end - run.last > NEAR_END:
                continue
            run.size = min(MAX_WINDOW, 2 * run.size, max(FIRST, 2 * left))
            if not self._read(run.end, run.end + run.size):
                return None
            run.end += run.size
            ref = self._known.get(chunk_id)
            if ref is not None:
                return ref
        return None

    def _read(self, start: int, stop: int) -> bool:
        """Learn the answers of [start, stop); False, and locality off, when only `ids` may
        answer (IndexReader.places_between)."""
        found = self._reader.places_between(start, stop)
        if found is None:
            self.off = True
            return False
        for chunk_id, ref in found.items():
            self._known.setdefault(chunk_id, ref)
        return True


def dedup_refs(reader: IndexReader, chunk_ids: list[bytes]) -> tuple[list[int | None], int]:
    """Per id (in disk order), the ref of a stored chunk with that id, or None; and how many
    `ids` hits were refused because the two tables disagreed (IndexReader.dedup_ref)."""
    out: list[int | None] = []
    mismatched = 0
    near = _Neighbourhood(reader)
    nearby = []  # the ids answered from neighbourhoods, by position
    damaged = reader.quarantined_ids()  # a neighbour may hold another copy: `ids` decides
    total = len(chunk_ids)
    for i, chunk_id in enumerate(chunk_ids):
        ref = near.find(chunk_id, total - i) if chunk_id not in damaged else None
        if ref is not None:
            nearby.append(i)
        else:
            ref, wrong = reader.dedup_ref(chunk_id)
            mismatched += wrong
            if ref is not None:
                near.start(ref)
        out.append(ref)
    if near.off:  # a damaged `unfindable` entry was met: `ids` answers the whole batch
        for i in nearby:
            out[i], wrong = reader.dedup_ref(chunk_ids[i])
            mismatched += wrong
    return out, mismatched
