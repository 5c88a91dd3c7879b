"""One value's seal (Python ints) against the vectorised form gc checks whole tables with."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from repo_engine.repository import seals
from repo_engine.repository.seals import KEY, PAYLOAD, CountDamaged

TABLES = sorted(PAYLOAD)


@st.composite
def tables_of_rows(draw):
    """A table and some rows of it (keys and payloads of that table's sizes)."""
    table = draw(st.sampled_from(TABLES))
    rows = draw(st.lists(st.tuples(st.binary(min_size=KEY[table], max_size=KEY[table]),
                                   st.binary(min_size=PAYLOAD[table], max_size=PAYLOAD[table])),
                         min_size=1, max_size=20))
    return table, rows


def _array(parts: list[bytes], width: int) -> np.ndarray:
    return np.frombuffer(b"".join(parts), np.uint8).reshape(-1, width)


@settings(max_examples=300, deadline=None)
@given(tables_of_rows())
def test_one_value_is_sealed_and_checked_bit_for_bit_as_the_rows_are(table_rows):
    table, rows = table_rows
    keys = _array([k for k, _ in rows], KEY[table])
    payloads = _array([p for _, p in rows], PAYLOAD[table])
    vector = seals.seal_rows(table, keys, payloads)
    for i, (key, payload) in enumerate(rows):
        sealed = seals.seal(table, key, payload)
        assert sealed == vector[i].tobytes()
        assert seals.check_of(table, key, payload) == int(seals.checks(table, keys, payloads)[i])
        assert seals.unseal(table, key, sealed) == payload
    unsealed, ok = seals.unsealed_rows(table, keys, vector)
    assert ok.all() and unsealed.tobytes() == payloads.tobytes()


@settings(max_examples=200, deadline=None)
@given(tables_of_rows(), st.data())
def test_one_damaged_value_fails_as_its_row_fails(table_rows, data):
    """A flipped bit of the value or the key, or a value of the wrong size: both forms refuse."""
    table, rows = table_rows
    key, payload = rows[0]
    sealed = bytearray(seals.seal(table, key, payload))
    where = data.draw(st.sampled_from(["value", "key", "short", "long"]))
    if where == "value":
        bit = data.draw(st.integers(0, len(sealed) * 8 - 1))
        sealed[bit // 8] ^= 1 << bit % 8
    elif where == "key":
        bit = data.draw(st.integers(0, len(key) * 8 - 1))
        key = bytes(b ^ (1 << bit % 8) if i == bit // 8 else b for i, b in enumerate(key))
    elif where == "short":
        sealed = sealed[:-1]
    else:
        sealed += b"\0"
    with pytest.raises(CountDamaged, match=f"{table} entry {key.hex()} is damaged"):
        seals.unseal(table, key, bytes(sealed))
    if where in ("value", "key"):
        _, ok = seals.unsealed_rows(table, _array([key], KEY[table]),
                                    _array([bytes(sealed)], len(sealed)))
        assert not ok.any()


def test_a_key_of_the_wrong_size_fails():
    sealed = seals.seal("refcount", bytes(8), bytes(8))
    with pytest.raises(CountDamaged):
        seals.unseal("refcount", bytes(9), sealed)
