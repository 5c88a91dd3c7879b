"""What gc, verify and rebuild-index know per chunk, in a few bytes each: the index's tables are
read in batches of ROWS rows, never whole, and what is kept of them is compact numpy arrays
aligned with the sorted refs of the `refs` table.

Per chunk (a row of `refs`): its ref (8 bytes), the number of maps counted that hold it (4), and
for verify a 64-bit fingerprint of its chunk id (8) and two marks (1 + 1). Per pack number: its
rows and their stored bytes. Map files are read one at a time and tallied, never held together.

The fingerprint mixes the id's four 64-bit words in turn (the MurmurHash3 finalizer, as
repository/seals.py does), each step a bijection: an id that differs from the one a ref's place
record holds in any one word never matches; wider differences match with odds 2^-64.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import lmdb
import numpy as np

from ..errors import RepoError
from ..repository.blockmap import find_sorted
from ..repository.index import Index
from ..repository.index_records import RowDamaged
from ..repository.lmdbfile import sized_batches
from ..repository.repo import Repository
from ..repository.seals import CHECK_SIZE, KEY, LISTS, PAYLOAD, marked_rows, mix, unsealed_rows

ROWS = 1 << 17  # rows of a table read (and parsed) at a time: about 8 MiB of `refs` rows
# a `refs` row's value: id, pack, offset, stored, raw, codec
REF_ROW = np.dtype({"names": ["id", "pack", "offset", "stored", "raw", "codec"],
                    "formats": ["V32", "<u4", "<u8", "<u4", "<u4", "u1"],
                    "offsets": [0, 32, 36, 44, 48, 52], "itemsize": 53})


def batches(txn: lmdb.Transaction, db: object, *, values: bool = True,
            rows: int | None = None,
            sized: tuple[str, int] | None = None) -> Iterator[tuple[bytearray, bytearray]]:
    """A table's keys and values in key order, concatenated, `rows` rows (ROWS) at a time (not
    copied into bytes: numpy reads them where they are). `sized`: (the table's name, its
    values' size): a value of another size is RowDamaged, as parsed whole it would shift
    every row after it."""
    rows = rows or ROWS
    cursor = txn.cursor(db=db)
    items = cursor.iternext(keys=True, values=values)
    while True:
        keys, vals, count = bytearray(), bytearray(), 0
        for item in items:
            if values:
                if sized is not None and len(item[1]) != sized[1]:
                    raise RowDamaged(sized[0], len(item[1]), sized[1])
                keys += item[0]
                vals += item[1]
            else:
                keys += item
            count += 1
            if count == rows:
                break
        if not count:
            return
        yield keys, vals
        if count < rows:
            return


def ref_rows(txn: lmdb.Transaction, index: Index) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The `refs` table in ref order, a batch at a time: (refs u64, rows REF_ROW)."""
    for keys, values in batches(txn, index.refs, sized=("refs", REF_ROW.itemsize)):
        yield (np.frombuffer(keys, ">u8").astype(np.uint64),
               np.frombuffer(values, REF_ROW))


def fingerprints(ids: np.ndarray) -> np.ndarray:
    """A u64 per 32-byte id (a V32 array): see the module docstring."""
    words = np.ascontiguousarray(ids).view("<u8").reshape(-1, 4)
    h = np.zeros(len(words), np.uint64)
    mix(h, words)
    return h


@dataclass
class RefTable:
    """The `refs` table as gc and verify keep it: refs sorted, the pack numbers rows name
    (sorted: a damaged number costs no array as long as it) with their rows and stored bytes,
    (verify) the fingerprint of each ref's chunk id and (gc) each row's pack."""

    refs: np.ndarray
    packs: np.ndarray
    pack_rows: np.ndarray
    pack_stored: np.ndarray
    id_prints: np.ndarray | None = None
    places: np.ndarray | None = None  # (gc) the pack each row places its chunk in

    def __len__(self) -> int:
        return len(self.refs)

    def find(self, refs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(position in `self.refs`, found) of each of `refs`."""
        return find_sorted(self.refs, np.asarray(refs, np.uint64))

    def rows_in(self, number: int) -> int:
        """The rows that place a chunk in pack `number`."""
        pos, found = find_sorted(self.packs, np.array([number], np.int64))
        return int(self.pack_rows[pos[0]]) if found[0] else 0


def read_ref_table(txn: lmdb.Transaction, index: Index, *, prints: bool = False,
                   places: bool = False) -> RefTable:
    """The `refs` table read in batches (module docstring), into arrays of its size; `prints`,
    `places`: with the fingerprints, the rows' packs."""
    count = txn.stat(index.refs)["entries"]  # the rows `txn` sees: those read below
    refs = np.empty(count, np.uint64)
    marks = np.empty(count if prints else 0, np.uint64)
    where = np.empty(count if places else 0, np.uint32)
    packs, at = (np.zeros(0, np.int64),) * 3, 0
    for keys, rows in ref_rows(txn, index):
        refs[at:at + len(keys)] = keys
        if prints:
            marks[at:at + len(keys)] = fingerprints(rows["id"])
        if places:
            where[at:at + len(keys)] = rows["pack"]
        at += len(keys)
        packs = summed(packs, per_pack(rows["pack"], rows["stored"]))
    return RefTable(refs, *packs, marks if prints else None, where if places else None)


def per_pack(packs: np.ndarray, stored: np.ndarray) -> tuple[np.ndarray, ...]:
    """(pack numbers, rows, stored bytes) of the rows of a batch placed in `packs`."""
    numbers, inverse = np.unique(packs.astype(np.int64), return_inverse=True)
    return numbers, np.bincount(inverse, minlength=len(numbers)), _sums(inverse, stored,
                                                                         len(numbers))


def _sums(inverse: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
    return np.bincount(inverse, weights=values.astype(np.float64),
                       minlength=size).astype(np.int64)


def summed(a: tuple[np.ndarray, ...], b: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    """Two (keys, counts, sums) triples with the counts and sums of equal keys added."""
    numbers, inverse = np.unique(np.concatenate([a[0], b[0]]), return_inverse=True)
    return (numbers, _sums(inverse, np.concatenate([a[1], b[1]]), len(numbers)),
            _sums(inverse, np.concatenate([a[2], b[2]]), len(numbers)))


@dataclass
class Tally:
    """How many of the maps (times their weight) tallied hold each ref of `table`; refs maps
    hold that `table` lacks (the index misses them) are kept aside with theirs."""

    table: RefTable
    counts: np.ndarray = field(init=False)
    _bound: int = field(init=False, default=0)
    errors: dict[str, str] = field(default_factory=dict)  # map name: why it cannot be read
    _extra: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)

    def __post_init__(self) -> None:
        # u32 (4 bytes a chunk) while no count can reach 2^32: the sum of the weights added
        # bounds every count; past it (damaged decrements owed) u64
        self.counts = np.zeros(len(self.table), np.uint32)

    def add(self, refs: np.ndarray, weight: int = 1) -> None:
        """Count the unique refs of one map `weight` times."""
        self._bound += weight
        if self._bound >= 1 << 32 and self.counts.dtype != np.uint64:
            self.counts = self.counts.astype(np.uint64)
        pos, found = self.table.find(refs)
        self.counts[pos[found]] += self.counts.dtype.type(weight)
        if not found.all():
            self._extra.append((np.asarray(refs, np.uint64)[~found],
                                np.full(int((~found).sum()), weight, np.uint64)))
            if len(self._extra) > 64:
                self._extra = [self.extra()]

    def add_maps(self, repo: Repository, names: Iterable[str],
                 weight: dict[str, int] | None = None) -> None:
        """Read each map once and count its refs; unreadable maps go to `errors`."""
        for name in sorted(set(names)):
            try:
                refs = repo.map_refs(name)
            except RepoError as exc:
                self.errors[name] = str(exc)
                continue
            self.add(refs, 1 if weight is None else weight[name])

    def extra(self) -> tuple[np.ndarray, np.ndarray]:
        """(refs the table lacks, their counts), sorted by ref."""
        if not self._extra:
            return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
        refs = np.concatenate([r for r, _ in self._extra])
        uniq, inverse = np.unique(refs, return_inverse=True)
        weights = np.concatenate([w for _, w in self._extra]).astype(np.float64)
        return uniq, np.bincount(inverse, weights=weights, minlength=len(uniq)).astype(np.uint64)

    def count_of(self, refs: np.ndarray, extra: tuple[np.ndarray, np.ndarray]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The tallied count of each of `refs` (0: no map counted holds it), and where the
        refs found are: positions in the table's refs, positions in `extra` (what extra()
        gave, passed in so that many calls build it once)."""
        pos, found = self.table.find(refs)
        at, hit = find_sorted(extra[0], refs)  # the table lacks every extra ref: never both
        out = np.zeros(len(refs), np.uint64)
        out[found] = self.counts[pos[found]]
        out[hit] = extra[1][at[hit]]
        return out, pos[found], at[hit]

    def live(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(refs, counts) of every ref with a count, in ref order, ROWS at a time (the table's
        refs and the extra ones merged)."""
        extra, extra_counts = self.extra()
        refs, counts = self.table.refs, self.counts
        done = 0
        for start in range(0, len(refs), ROWS):
            part, part_counts = refs[start:start + ROWS], counts[start:start + ROWS]
            end = len(extra) if start + ROWS >= len(refs) else int(
                np.searchsorted(extra, part[-1], side="right"))
            yield _merged(part, part_counts, extra[done:end], extra_counts[done:end])
            done = end
        if done < len(extra):
            yield extra[done:], extra_counts[done:]

    def dead(self) -> Iterator[np.ndarray]:
        """The table's refs no map counted holds, in ref order, ROWS at a time."""
        for start in range(0, len(self.counts), ROWS):
            yield self.table.refs[start:start + ROWS][self.counts[start:start + ROWS] == 0]


def _merged(refs: np.ndarray, counts: np.ndarray, extra: np.ndarray,
            extra_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = counts > 0
    refs, counts = refs[keep], counts[keep]
    if not len(extra):
        return refs, counts
    all_refs = np.concatenate([refs, extra])
    order = np.argsort(all_refs, kind="stable")
    return all_refs[order], np.concatenate([counts, extra_counts])[order]


def sealed_batches(index: Index, txn: lmdb.Transaction,
                   table: str) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """A count table's rows with their checks verified, a batch at a time: (keys (n, key size),
    payloads (n, payload size), ok). Rows of a wrong size, which no single flipped bit makes,
    fail without being looked at (zeroed)."""
    key_size, size = KEY[table], PAYLOAD[table]
    width = size + CHECK_SIZE if index.sealed else size
    for keys, values, fits in sized_batches(txn, getattr(index, table), key_size, width,
                                            ROWS):
        key_rows = np.frombuffer(keys, np.uint8).reshape(-1, key_size)
        value_rows = np.frombuffer(values, np.uint8).reshape(-1, width)
        if not index.sealed:
            yield key_rows, value_rows, fits
            continue
        payloads, ok = unsealed_rows(table, key_rows, value_rows)
        yield key_rows, payloads.copy(), ok & fits


def listed_batches(index: Index, txn: lmdb.Transaction,
                   table: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """A listing table's (`unfindable`) keys (n, key size) and which pass their check
    (seals.py), a batch at a time (an entry of a wrong size fails, its key zeroed). The index
    must carry the checks (`Index.listed`)."""
    key_size = LISTS[table]
    for keys, values, fits in sized_batches(txn, getattr(index, table), key_size, CHECK_SIZE,
                                            ROWS):
        rows = np.frombuffer(keys, np.uint8).reshape(-1, key_size)
        values = np.frombuffer(values, np.uint8).reshape(-1, CHECK_SIZE)
        yield rows, marked_rows(table, rows, values) & fits
