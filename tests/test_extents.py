"""Widening changed extents to blocks, and back."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from repo_engine.backup.extents import blocks_to_extents, extents_to_blocks, parse_extents
from repo_engine.errors import UsageError

CAP = 1 << 20


@given(st.lists(st.tuples(st.integers(0, CAP - 1), st.integers(0, 200_000))),
       st.sampled_from([4096, 16384, 65536]))
def test_extents_to_blocks_matches_model(pairs, bs):
    extents = [[o, min(n, CAP - o)] for o, n in pairs]
    model = sorted({b for o, n in extents if n for b in range(o // bs, -(-(o + n) // bs))})
    assert extents_to_blocks(np.array(extents, dtype=np.int64).reshape(-1, 2), bs).tolist() == model


@given(st.sets(st.integers(0, 300)), st.sampled_from([512, 4096]))
def test_blocks_to_extents_round_trip(blocks, bs):
    capacity = 301 * bs - 100
    arr = np.array(sorted(blocks), dtype=np.uint64)
    extents = blocks_to_extents(arr, bs, capacity)
    assert all(o + n <= capacity for o, n in extents)
    assert extents_to_blocks(np.array(extents, dtype=np.int64).reshape(-1, 2), bs).tolist() == sorted(blocks)


def test_parse_rejects_booleans_and_accepts_edges():
    with pytest.raises(UsageError, match="entry 0"):
        parse_extents([[True, 1]], 10, "x")
    assert parse_extents([[0, 10], [10, 0]], 10, "x").tolist() == [[0, 10], [10, 0]]
    with pytest.raises(UsageError, match="ends at 11"):
        parse_extents([[1, 10]], 10, "x")
