"""The records of the index's tables (index.py's docstring has the tables): the layouts of their
keys and values, the catalog record with its check, a shared repository's pending plan, and the
keys of refs for a batched look-up. Each record's reader stands beside its writer."""

from __future__ import annotations

import json
import struct

import blake3
import numpy as np

from ..errors import DamageError
from .journal import PendingPlan, PlanOp
from .seals import PAYLOAD

class RowDamaged(DamageError):
    """A row of an index table of the wrong size: its LMDB value cut short or extended."""

    def __init__(self, table: str, size: int, expected: int) -> None:
        super().__init__(f"the index's {table} table holds a row of {size} bytes where "
                         f"{expected} belong: the index is damaged; run 'repo-engine "
                         "rebuild-index' (it rebuilds the index from the packs and manifests)")


class Row(struct.Struct):
    """The fixed layout of one table's rows: `unpack` of a value of another size is damage
    (RowDamaged, naming the table), never a struct.error."""

    def __init__(self, fmt: str, table: str) -> None:
        super().__init__(fmt)
        self.table = table

    def unpack(self, buffer: bytes | memoryview) -> tuple:  # type: ignore[override]
        if len(buffer) != self.size:
            raise RowDamaged(self.table, len(buffer), self.size)
        return super().unpack(buffer)


REF_KEY = struct.Struct(">Q")
PACK_KEY = struct.Struct(">I")
REF_REC = Row("<32sIQIIB", "refs")
PACK_REC = Row("<32sQI", "packs")
LIVE_REC = Row("<QQ", "packlive")

LOCATION_DTYPE = np.dtype(
    [("ref", "<u8"), ("id", "V32"), ("pack", "<u4"), ("offset", "<u8"),
     ("stored", "<u4"), ("raw", "<u4"), ("codec", "u1")]
)
# REF_REC as a numpy record (packed, little endian): parses many place records at once
REF_REC_DTYPE = np.dtype([("id", "V32"), ("pack", "<u4"), ("offset", "<u8"), ("stored", "<u4"),
                          ("raw", "<u4"), ("codec", "u1")])
assert REF_REC_DTYPE.itemsize == REF_REC.size
SEALED_DBS = tuple(PAYLOAD)  # mapuse, refcount, deadmaps, packlive
PLAN_HEAD = struct.Struct("<I")


class DamagedRecord(DamageError):
    """A catalog record failed its check."""

    def __init__(self, point: str, why: str) -> None:
        super().__init__(f"the catalog record of point {point} is damaged ({why}); run "
                         "'repo-engine rebuild-index'")
        self.point = point


def encode_record(record: dict) -> bytes:
    """A catalog record as stored: its JSON with `check`, the BLAKE3 of the JSON without it."""
    body = {k: v for k, v in record.items() if k != "check"}
    body["check"] = _record_check(body)
    return json.dumps(body, sort_keys=True).encode()


def _record_check(body: dict) -> str:
    return blake3.blake3(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]


_CHECK_HEAD = len(b'{"check": "') + 32


def _sealed_as_stored(raw: bytes, check: object) -> bool:
    """Whether `check` is the BLAKE3 of `raw` without its `check` pair, hashed as stored: as
    encode_record writes a record (sorted keys, `check` first), that is the JSON `_record_check`
    hashed, so the record need not be encoded again to be checked. False for any other layout
    (the caller then checks the decoded record)."""
    return (isinstance(check, str) and raw[_CHECK_HEAD:_CHECK_HEAD + 3] == b'", '
            and raw[:_CHECK_HEAD] == b'{"check": "' + check.encode()
            and blake3.blake3(b"{" + raw[_CHECK_HEAD + 3:]).hexdigest()[:32] == check)


def decode_record(key: bytes, raw: bytes, *, checked: bool = True) -> dict:
    """A stored catalog record without its `check`; DamageError when it does not parse, its
    check does not match (`checked`: version 1 records carry none) or it names another point."""
    name = key.decode("ascii", "replace")
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise DamagedRecord(name, f"unreadable: {exc}") from None
    check = doc.pop("check", None)
    if checked and not _sealed_as_stored(raw, check) and check != _record_check(doc):
        raise DamagedRecord(name, "checksum mismatch")
    if doc.get("id") != name:
        raise DamagedRecord(name, f"it names point {doc.get('id')!r}")
    return doc


def encode_plan(plan: PendingPlan) -> bytes:
    """A pending plan as `plans` stores it (u32 JSON length, JSON, refs u64[])."""
    op = plan.op
    doc = json.dumps({"time": op.time, "packs": op.packs, "maps": op.maps,
                      "objects": op.objects, "leases": plan.leases}).encode()
    refs = np.ascontiguousarray(op.refs, dtype="<u8").tobytes()
    return PLAN_HEAD.pack(len(doc)) + doc + refs


def decode_plan(plan_id: str, raw: bytes) -> PendingPlan:
    (length,) = PLAN_HEAD.unpack_from(raw)
    doc = json.loads(raw[4:4 + length])
    refs = plan_refs(raw).astype(np.uint64)
    op = PlanOp(plan_id, doc["time"], refs, doc["packs"], doc["maps"], doc["objects"])
    return PendingPlan(op, doc["leases"])


def plan_refs(raw: bytes) -> np.ndarray:
    """The refs of a stored plan, a view of `raw` (u64 little endian)."""
    return np.frombuffer(raw, "<u8", offset=PLAN_HEAD.size + PLAN_HEAD.unpack_from(raw)[0])


def pack_fields(raw: bytes) -> tuple[str, int, int]:
    """(name hex, size, chunk count) of a `packs` record."""
    name, size, count = PACK_REC.unpack(raw)
    return name.hex(), size, count


def ref_keys(refs: np.ndarray) -> list[bytes]:
    """LMDB keys of `refs` (big-endian u64) for one batched `getmulti`."""
    keys = np.ascontiguousarray(refs, dtype=">u8").tobytes()
    return [keys[i:i + 8] for i in range(0, len(keys), 8)]


def refs_found(found: list[tuple[bytes, bytes]]) -> np.ndarray:
    """The refs whose keys a `getmulti` found, as native u64: numpy's `isin` refuses a
    big-endian array holding a value past 2^63 (a damaged key can name such a ref)."""
    return np.frombuffer(b"".join(key for key, _ in found), dtype=">u8").astype(np.uint64)
