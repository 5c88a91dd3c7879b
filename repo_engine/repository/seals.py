"""Seals of the index's count tables: the values gc trusts to delete things carry a check.

A sealed value is its payload followed by an 8-byte check (u64 little endian):

    h = SEED[table]                     first 8 bytes (LE) of BLAKE3("repo-engine seal " + table)
    for w in words(key) + words(payload):
        h = fmix64(h ^ w)               the MurmurHash3 64-bit finalizer
    check = h

`words` cuts the bytes into u64 little-endian words, the last one zero-padded. Every step is a
bijection of h, so any change confined to one word of the key or the payload, or to the check,
is always detected; wider damage is missed with odds 2^-64. It guards against bad media, not
against an attacker, and it runs vectorised: gc checks whole tables before it deletes anything.
One value (a count read or written inside a transaction) is sealed and checked with Python ints
instead (`seal`, `unseal`): the same arithmetic, masked to 64 bits, without numpy's cost per call.

| table    | key size | payload                                  | sealed value size |
|----------|----------|------------------------------------------|-------------------|
| mapuse   | 32       | u64 use                                  | 16                |
| refcount | 8        | u64 count                                | 16                |
| deadmaps | 32       | u64 decrements owed                      | 16                |
| packlive | 4        | u64 live count, u64 live stored bytes    | 24                |

A listing table (`unfindable`: a set of keys) has no payload: each value is the check of its
key alone (`mark`), so a key moved by damage, or a value changed, fails as a count does.

| table      | key size | payload | value size |
|------------|----------|---------|------------|
| unfindable | 8        | none    | 8          |
"""

from __future__ import annotations

import blake3
import numpy as np

from ..errors import DamageError
from .lmdbfile import U64

PAYLOAD = {"mapuse": 8, "refcount": 8, "deadmaps": 8, "packlive": 16}
KEY = {"mapuse": 32, "refcount": 8, "deadmaps": 32, "packlive": 4}
LISTS = {"unfindable": 8}  # listing tables: key size (the value is the key's check)
CHECK_SIZE = 8
_M1, _M2 = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)
_MASK = (1 << 64) - 1
_INT_M1, _INT_M2 = int(_M1), int(_M2)


class CountDamaged(DamageError):
    """A sealed count failed its check (or a decrement found no count to take from)."""

    def __init__(self, table: str, key: bytes, why: str = "check mismatch") -> None:
        super().__init__(f"the index's {table} entry {key.hex()} is damaged ({why}); run "
                         "'repo-engine gc --full' (or 'repo-engine rebuild-index')")
        self.table = table


def _seed(table: str) -> np.uint64:
    return np.frombuffer(blake3.blake3(b"repo-engine seal " + table.encode()).digest()[:8],
                         "<u8")[0]


_SEEDS = {table: _seed(table) for table in (*PAYLOAD, *LISTS)}
_INT_SEEDS = {table: int(seed) for table, seed in _SEEDS.items()}


def _words(rows: np.ndarray) -> np.ndarray:
    """(n, width) bytes -> (n, ceil(width/8)) u64 little-endian words, zero-padded."""
    pad = -rows.shape[1] % 8
    if pad:
        rows = np.concatenate([rows, np.zeros((len(rows), pad), np.uint8)], axis=1)
    return np.ascontiguousarray(rows).view("<u8")


def checks(table: str, keys: np.ndarray, payloads: np.ndarray) -> np.ndarray:
    """The checks of n rows: `keys` (n, key size) and `payloads` (n, payload size) as uint8."""
    h = np.full(len(keys), _SEEDS[table], np.uint64)
    for words in (_words(keys), _words(payloads)):
        mix(h, words)
    return h


def mix(h: np.ndarray, words: np.ndarray) -> None:
    """Mix the columns of `words` (n, k) u64 into `h` (n) in place, one bijective step each."""
    for column in words.T:
        h ^= column
        h ^= h >> _S33
        h *= _M1
        h ^= h >> _S33
        h *= _M2
        h ^= h >> _S33


def check_of(table: str, key: bytes, payload: bytes) -> int:
    """The check of one row: `checks` for a single key and payload, in Python ints."""
    h = _INT_SEEDS[table]
    for data in (key, payload):
        for (word,) in U64.iter_unpack(data + bytes(-len(data) % 8)):
            h ^= word
            h ^= h >> 33
            h = h * _INT_M1 & _MASK
            h ^= h >> 33
            h = h * _INT_M2 & _MASK
            h ^= h >> 33
    return h


def seal(table: str, key: bytes, payload: bytes) -> bytes:
    """One sealed value."""
    return payload + U64.pack(check_of(table, key, payload))


def unseal(table: str, key: bytes, value: bytes) -> bytes:
    """The payload of one sealed value; CountDamaged when it fails its check (a key or value of
    the wrong size fails too)."""
    size = PAYLOAD[table]
    if (len(key) != KEY[table] or len(value) != size + CHECK_SIZE
            or U64.unpack_from(value, size)[0] != check_of(table, key, value[:size])):
        raise CountDamaged(table, key)
    return value[:size]


def unsealed_rows(table: str, keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray,
                                                                             np.ndarray]:
    """(payloads (n, payload size) uint8, ok mask) of n sealed rows given as (n, width) uint8
    arrays; a row of the wrong size fails as a whole (pass such tables' rows one by one)."""
    size = PAYLOAD[table]
    if keys.shape[1:] != (KEY[table],) or values.shape[1:] != (size + CHECK_SIZE,):
        return values[:, :size], np.zeros(len(values), bool)
    payloads = values[:, :size]
    stored = np.ascontiguousarray(values[:, size:]).view("<u8")[:, 0]
    return payloads, checks(table, keys, payloads) == stored


def seal_rows(table: str, keys: np.ndarray, payloads: np.ndarray) -> np.ndarray:
    """Sealed values (n, payload size + 8) uint8 of n rows."""
    check = checks(table, keys, payloads).astype("<u8").view(np.uint8).reshape(-1, CHECK_SIZE)
    return np.concatenate([payloads, check], axis=1)


def mark(table: str, key: bytes) -> bytes:
    """The value of a listing table's entry: the check of its key."""
    return U64.pack(check_of(table, key, b""))


def marks(table: str, keys: np.ndarray) -> np.ndarray:
    """The values (n, 8) uint8 of n keys (n, key size) of a listing table."""
    empty = np.zeros((len(keys), 0), np.uint8)
    return checks(table, keys, empty).astype("<u8").view(np.uint8).reshape(-1, CHECK_SIZE)


def marked_rows(table: str, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Which of n listing rows, (n, key size) and (n, 8) uint8, pass their check."""
    if keys.shape[1:] != (LISTS[table],) or values.shape[1:] != (CHECK_SIZE,):
        return np.zeros(len(values), bool)
    return (marks(table, keys) == values).all(axis=1)
