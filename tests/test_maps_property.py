"""Delta maps and chain resolution against a plain-Python model (hypothesis)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from repo_engine.repository.blockmap import (DELTA, FULL, BlockMap, decode, delta_between, encode,
                                             resize)
from repo_engine.repository.envelope import unseal
from repo_engine.repository.formats import BLOCK_MAP

refs = st.integers(min_value=0, max_value=2**64 - 1)


@st.composite
def versions(draw):
    """A disk's life: successive maps (dicts block -> ref) with changing sizes."""
    out = []
    current: dict[int, int] = {}
    size = draw(st.integers(0, 60))
    for _ in range(draw(st.integers(1, 12))):
        size = draw(st.integers(0, 60)) if draw(st.booleans()) else size
        current = {b: r for b, r in current.items() if b < size}
        for b in draw(st.lists(st.integers(0, max(size - 1, 0)), max_size=10)):
            if size:
                current[b] = draw(refs)
        out.append((size, dict(current)))
    return out


def _as_array(size: int, mapping: dict[int, int]) -> np.ndarray:
    arr = np.zeros(size, dtype=np.uint64)
    for b, r in mapping.items():
        arr[b] = r
    return arr


@given(versions(), st.integers(1, 5))
@settings(max_examples=300, deadline=None)
def test_chain_of_deltas_resolves_like_the_model(history, max_chain):
    """Write each version as FULL or DELTA on the previous (as the backup does), round-trip each
    map through its byte encoding, resolve the chain: every version comes back exactly."""
    stored: list[BlockMap] = []
    links: list[int] = []
    resolved = None
    for size, mapping in history:
        want = _as_array(size, mapping)
        if resolved is None or links[-1] + 1 > max_chain:
            bmap, link = BlockMap.full(want), 1
        else:
            bmap, link = delta_between(resolved, want), links[-1] + 1
        bmap = decode(unseal(BLOCK_MAP, encode(bmap), "t"), "t")
        stored.append(bmap)
        links.append(link)
        # resolve from the newest FULL up, as Repository.resolve does
        start = max(i for i, m in enumerate(stored) if m.kind == FULL)
        resolved = None
        for m in stored[start:]:
            resolved = m.apply(resolved)
        assert resolved.tolist() == want.tolist()
        assert link <= max_chain


@given(st.lists(refs, max_size=80), st.lists(refs, max_size=80))
def test_delta_between_is_minimal_and_exact(a, b):
    parent, child = np.array(a, dtype=np.uint64), np.array(b, dtype=np.uint64)
    delta = delta_between(parent, child)
    assert delta.kind == DELTA
    assert delta.apply(parent).tolist() == child.tolist()
    base = resize(parent, len(child))
    assert len(delta.blocks) == int(np.count_nonzero(base != child))
