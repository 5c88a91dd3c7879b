"""The journal: a shared repository's index and catalog, as immutable, numbered entries.

Entry `journal/<16 lowercase hex: seq>.jnl`, seq 1, 2, 3, ... without gaps, written once with
`put(if_absent=True)` at head + 1: that conditional write is the commit, and it orders the
commits of every host (docs/FORMAT.md, "Journal"). An entry is an envelope (envelope.py, magic
JOURNAL) whose payload is:

| offset | size | field                                                                 |
|--------|------|-----------------------------------------------------------------------|
| 0      | 4    | header length H, u32 little endian                                    |
| 4      | H    | header: JSON `{"seq", "time", "host", "pid", "ops": [...]}`           |
| 4+H    | ...  | zstd frame of the binary section (empty when no op has arrays)        |

An op's arrays are slices `[byte offset, item count]` of the binary section: `entries` are pack
trailer rows (packs.ENTRY_DTYPE, 60 bytes), `refs` u64 little endian. A reader checks that the
header's `seq` is the one its name says (a moved entry is damage) and refuses an op it does not
know (FormatError: upgrade repo-engine). In an encrypted repository the payload is sealed
(envelope.py, flag SEALED) as kind "journal" named by the seq (u64 little endian): an entry
moved to another seq fails authentication.

Ops, built with the dataclasses below (maintenance builds the last five), and what the cache
applies (index_replay.py, `Index.apply_entry`):

| op       | dataclass                                  | the cache applies                        |
|----------|--------------------------------------------|------------------------------------------|
| `refs`   | RefsOp(first, count): a claimed ref range  | next_ref = max(next_ref, first + count)  |
| `pack`   | PackOp(name, size, entries)                | the pack and its chunks; a placed ref    |
|          |                                            | moves to it (a healed or repacked copy)  |
| `point`  | PointOp(record): new or rewritten record   | put or replace the catalog record        |
| `forget` | ForgetOp(id)                               | remove the catalog record                |
| `plan`   | PlanOp(plan, time, refs, packs, maps,      | `ids` entries of `refs` removed (no more |
|          | objects): gc's candidates                  | dedup against them); plan kept in `plans`|
| `waits`  | WaitsOp(plan, leases)                      | the plan's leases noted                  |
| `sweep`  | SweepOp(plan, refs, packs, maps); `refs`   | refs and packs removed, packs and maps   |
|          | lists every ref of a swept pack, `packs`   | noted in `sweptmaps`, the plan dropped;  |
|          | every pack deleted (unindexed ones too),   | the plan's refs kept get `ids` back (not |
|          | `maps` the manifests deleted too           | damaged or doomed by another plan)       |
|          | (`manifest_key`)                           |                                          |
| `quarantine` | QuarantineOp(refs, reasons): chunks    | out of `ids`, listed in `unfindable` and |
|          | `scrub --repair` found damaged             | `quarantine`, until a `pack` op places   |
|          |                                            | them again (a heal)                      |
| `retire` | RetireOp(epochs): key epochs being retired | noted in meta `retired`: a commit sealed |
|          |                                            | under one of them is refused             |

A caller commits ops with `Repository.commit_journal(build)` (`append` below, then the entry
applied to the cache): `build(seq)` returns the ops to commit at `seq`, checked against the
cache caught up to seq - 1.

`new_plan_id()` makes a plan id (16 hex); `Index.pending_plans()` lists the pending plans
(PendingPlan: the op and the leases gc waits for); `Index.doomed_maps(names)` says which map
names a pending plan or a sweep lists; `Index.missing_refs(refs)` which refs a sweep removed;
`Index.swept(names)` which packs, maps and manifests (`manifest_key`) a sweep deleted.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import zstandard

from ..errors import DamageError, FormatError
from .crypto.null import NULL_SEALER, Sealer
from .envelope import Binding, seal, unseal
from .formats import JOURNAL
from .packs import ENTRY_DTYPE, FinishedPack
from .safefile import JOURNAL_MAX, is_name
from .store import ObjectExists, ObjectMissing, Store, StoreError

PREFIX = "journal/"
HEAD_LEN = struct.Struct("<I")
U64 = np.dtype("<u8")
SEQ = struct.Struct("<Q")
EMPTY_REFS = np.zeros(0, U64)


@dataclass(frozen=True)
class RefsOp:
    first: int
    count: int


@dataclass(frozen=True)
class PackOp:
    name: str
    size: int
    entries: np.ndarray  # packs.ENTRY_DTYPE

    @classmethod
    def of(cls, pack: FinishedPack) -> "PackOp":
        rows = np.array([(e.ref, e.chunk_id, e.offset, e.stored, e.raw, e.codec)
                         for e in pack.entries], dtype=ENTRY_DTYPE)
        return cls(pack.name, pack.size, rows)


@dataclass(frozen=True)
class PointOp:
    record: dict  # PointRecord.summary()


@dataclass(frozen=True)
class ForgetOp:
    id: str


@dataclass(frozen=True)
class PlanOp:
    """gc phase 1: `refs` become unfindable at once (no host dedups against them), and `refs`,
    `packs`, `maps` and `objects` (store names the cache does not know) may be swept later."""

    plan: str
    time: str
    refs: np.ndarray = field(default_factory=lambda: EMPTY_REFS)
    packs: list[str] = field(default_factory=list)
    maps: list[str] = field(default_factory=list)
    objects: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class WaitsOp:
    plan: str
    leases: list[str]


@dataclass(frozen=True)
class SweepOp:
    plan: str
    refs: np.ndarray = field(default_factory=lambda: EMPTY_REFS)
    packs: list[str] = field(default_factory=list)
    maps: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class QuarantineOp:
    """`scrub --repair` found the chunks of `refs` damaged where they are placed (`reasons`:
    what it found, one each): every host takes them out of deduplication until a `pack` op
    places them again (a heal)."""

    refs: np.ndarray
    reasons: list[str]


@dataclass(frozen=True)
class RetireOp:
    """`key retire`: no commit may seal under `epochs` from this entry on."""

    epochs: list[int]


Op = (RefsOp | PackOp | PointOp | ForgetOp | PlanOp | WaitsOp | SweepOp | QuarantineOp
      | RetireOp)
OP_NAMES: dict[type, str] = {RefsOp: "refs", PackOp: "pack", PointOp: "point", ForgetOp: "forget",
                             PlanOp: "plan", WaitsOp: "waits", SweepOp: "sweep",
                             QuarantineOp: "quarantine", RetireOp: "retire"}
OP_TYPES = {name: kind for kind, name in OP_NAMES.items()}
ARRAYS = {"entries": ENTRY_DTYPE, "refs": U64}  # op fields held in the binary section


@dataclass
class PendingPlan:
    """A plan the cache holds: its op, and the leases gc waits for (None before `waits`)."""

    op: PlanOp
    leases: list[str] | None = None


@dataclass(frozen=True)
class Entry:
    seq: int
    ops: list[Op]
    time: str = ""
    host: str = ""
    pid: int = 0

    @classmethod
    def new(cls, seq: int, ops: list[Op]) -> "Entry":
        return cls(seq, ops, datetime.now(timezone.utc).isoformat(timespec="microseconds"),
                   socket.gethostname(), os.getpid())


class NothingToCommit(Exception):
    """Raised by an `append` builder that finds, caught up, that there is nothing to commit;
    `result` is what the committing caller reports instead."""

    def __init__(self, result: object = None) -> None:
        super().__init__()
        self.result = result


def manifest_key(point_id: str) -> str:
    """How a sweep lists, among its `maps`, the manifest of point `point_id` it deletes (not
    catalogued: a writer's that stalled past its lease, or a forgotten point's), and how the
    cache notes it in `sweptmaps`: the id's 8 bytes and 24 zero bytes, 64 hex as a map name."""
    return point_id + "00" * 24


def new_plan_id() -> str:
    return os.urandom(8).hex()


def entry_object(seq: int) -> str:
    return f"{PREFIX}{seq:016x}.jnl"


def seq_of(name: str, suffix: str) -> int | None:
    """The seq of a journal object name ending in `suffix`, or None for another name."""
    base = name[len(PREFIX):] if name.startswith(PREFIX) else ""
    if not base.endswith(suffix) or len(base) != 16 + len(suffix):
        return None
    return int(base[:16], 16) if is_name(base[:16], 16) else None


# -- encoding ---------------------------------------------------------------------------------
def _binding(sealer: Sealer, seq: int) -> Binding:
    return Binding(sealer, "journal", SEQ.pack(seq))


def encode(entry: Entry, sealer: Sealer = NULL_SEALER) -> bytes:
    arrays: list[bytes] = []
    offset = 0
    ops = []
    for op in entry.ops:
        doc: dict = {"op": OP_NAMES[type(op)]}
        for name, value in vars(op).items():
            if name in ARRAYS:
                data = np.ascontiguousarray(value, dtype=ARRAYS[name]).tobytes()
                doc[name] = [offset, len(value)]
                arrays.append(data)
                offset += len(data)
            else:
                doc[name] = value
        ops.append(doc)
    header = json.dumps({"seq": entry.seq, "time": entry.time, "host": entry.host,
                         "pid": entry.pid, "ops": ops}, sort_keys=True).encode()
    binary = zstandard.ZstdCompressor(level=3).compress(b"".join(arrays)) if arrays else b""
    return seal(JOURNAL, HEAD_LEN.pack(len(header)) + header + binary,
                _binding(sealer, entry.seq))


def decode(data: bytes, what: str, binding: Binding | None = None) -> Entry:
    payload = unseal(JOURNAL, data, what, binding)
    try:
        (length,) = HEAD_LEN.unpack_from(payload)
        header = json.loads(payload[4:4 + length])
        binary = payload[4 + length:]
        binary = zstandard.ZstdDecompressor().decompress(binary) if binary else b""
        ops = [_decode_op(doc, binary, what) for doc in header["ops"]]
        return Entry(int(header["seq"]), ops, str(header["time"]), str(header["host"]),
                     int(header["pid"]))
    except (struct.error, ValueError, KeyError, TypeError, zstandard.ZstdError) as exc:
        raise DamageError(f"{what}: journal entry is malformed ({exc})") from None


def _decode_op(doc: dict, binary: bytes, what: str) -> Op:
    kind = OP_TYPES.get(doc.get("op"))
    if kind is None:
        raise FormatError(f"{what}: journal operation {doc.get('op')!r} is unknown to this "
                          "repo-engine (written by a newer one); upgrade repo-engine")
    fields = {k: v for k, v in doc.items() if k != "op"}
    for name, dtype in ARRAYS.items():
        if name in fields:
            start, count = fields[name]
            end = start + count * dtype.itemsize
            if not 0 <= start <= end <= len(binary):
                raise ValueError(f"array {name} lies outside the binary section")
            fields[name] = np.frombuffer(binary, dtype, count, start)
    op = kind(**fields)
    if isinstance(op, PointOp) and not isinstance(op.record, dict):
        raise ValueError("a point record is not a JSON object")
    if isinstance(op, RetireOp) and not (isinstance(op.epochs, list) and all(
            type(e) is int and e > 0 for e in op.epochs)):
        raise ValueError("retired epochs are not a list of positive integers")
    if isinstance(op, QuarantineOp):
        check_reasons(op.reasons, len(op.refs))
    return op


def check_reasons(reasons: object, count: int) -> None:
    """ValueError unless `reasons` (of a `quarantine` op or a checkpoint's `QUAR` record) is a
    list of `count` texts the cache can store (UTF-8: JSON lets a lone surrogate through)."""
    if not (isinstance(reasons, list) and len(reasons) == count
            and all(isinstance(r, str) and _utf8(r) for r in reasons)):
        raise ValueError("quarantine reasons are not one text per ref")


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


# -- the store's journal ----------------------------------------------------------------------
def write_entry(store: Store, entry: Entry, sealer: Sealer = NULL_SEALER) -> None:
    """Commit `entry` at its seq: ObjectExists when another writer took that seq first."""
    store.put(entry_object(entry.seq), encode(entry, sealer), if_absent=True)


def read_entry(store: Store, seq: int, sealer: Sealer = NULL_SEALER) -> Entry | None:
    """The checked entry `seq`; None when there is none (not written yet, or compacted)."""
    name = entry_object(seq)
    try:
        data = store.get(name, limit=JOURNAL_MAX)
    except ObjectMissing:
        return None
    what = f"{store.location}/{name}"
    entry = decode(data, what, _binding(sealer, seq))
    if entry.seq != seq:
        raise DamageError(f"{what}: journal entry says it is entry {entry.seq}: it was moved or "
                          "tampered with")
    return entry


def entry_seqs(store: Store, suffix: str = ".jnl") -> Iterator[int]:
    """Seqs of the journal's objects ending in `suffix` (entries, or checkpoints), any order."""
    for info in store.list(PREFIX):
        seq = seq_of(info.name, suffix)
        if seq is not None:
            yield seq


MAX_RACES = 1000  # each lost race is another writer's commit: progress, never a livelock


def append(store: Store, catch_up: Callable[[], int],
           build: Callable[[int], list[Op]], sealer: Sealer = NULL_SEALER) -> Entry:
    """Commit the ops `build(seq)` returns as entry `seq` = head + 1 and return that entry.
    `catch_up()` brings the caller's cache to the head and returns its seq; `build` then
    re-checks what the commit depends on against that cache (raising gives up) and may run
    again, at a later seq, when another writer took this one (ObjectExists)."""
    for _race in range(MAX_RACES):
        head = catch_up()
        entry = Entry.new(head + 1, build(head + 1))
        try:
            write_entry(store, entry, sealer)
        except ObjectExists:
            continue
        return entry
    raise StoreError(f"{store.location}: {MAX_RACES} journal commits in a row lost the race for "
                     "the next entry; try again")
