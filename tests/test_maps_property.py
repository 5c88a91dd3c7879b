"""Delta maps and chain resolution against a plain-Python model (hypothesis)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import blake3
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from repo_engine.repository import blockmap
from repo_engine.repository.blockmap import (DELTA, FULL, BlockMap, delta_between, encode,
                                             map_object, open_map, read_map, resize,
                                             resolve_windows)
from repo_engine.repository.store.local import LocalStore

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


def _store(store: LocalStore, bmap: BlockMap, shift: int) -> str:
    data = encode(bmap, shift=shift)
    name = blake3.blake3(data).hexdigest()
    store.put(map_object(name), data)
    return name


def _resolved(store: LocalStore, names: list[str], size: int, shift: int) -> np.ndarray:
    out = np.zeros(size, np.uint64)
    for first, window in resolve_windows([open_map(store, n) for n in names], shift=shift):
        out[first:first + len(window)] = window
    return out


@given(versions(), st.integers(1, 5), st.integers(3, 6))
@settings(max_examples=300, deadline=None)
def test_chain_of_deltas_resolves_like_the_model(history, max_chain, shift):
    """Write each version as FULL or DELTA on the previous (as the backup does), store each map
    in segments of 2^shift blocks (several windows a disk), resolve the chain window by window
    streaming its maps: every version comes back exactly, and a map read back is the same."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tmp").mkdir()
        store = LocalStore(Path(tmp))
        names: list[str] = []
        kinds: list[int] = []
        links: list[int] = []
        resolved = None
        for size, mapping in history:
            want = _as_array(size, mapping)
            if resolved is None or links[-1] + 1 > max_chain:
                bmap, link = BlockMap.full(want), 1
            else:
                bmap, link = delta_between(resolved, want), links[-1] + 1
            names.append(_store(store, bmap, shift))
            kinds.append(bmap.kind)
            links.append(link)
            back = read_map(store, names[-1])
            assert (back.kind, back.nblocks) == (bmap.kind, bmap.nblocks)
            assert back.refs[back.refs != 0].tolist() == bmap.refs[bmap.refs != 0].tolist()
            # resolve from the newest FULL up, as Repository.resolve_windows does
            start = max(i for i, kind in enumerate(kinds) if kind == FULL)
            resolved = _resolved(store, names[start:], size, shift)
            assert resolved.tolist() == want.tolist()
            assert link <= max_chain


@given(st.lists(refs, max_size=80), st.lists(refs, max_size=80))
def test_delta_between_is_minimal_and_exact(a, b):
    parent, child = np.array(a, dtype=np.uint64), np.array(b, dtype=np.uint64)
    delta = delta_between(parent, child)
    assert delta.kind == DELTA
    base = resize(parent, len(child))
    base[delta.blocks.astype(np.int64)] = delta.refs
    assert base.tolist() == child.tolist()
    base = resize(parent, len(child))
    assert len(delta.blocks) == int(np.count_nonzero(base != child))


def test_a_map_larger_than_a_read_streams_and_damage_stops_at_its_segment(tmp_path,
                                                                          monkeypatch):
    """A map read in many ranged reads (read-ahead of 4 KiB, segments of 8 KiB) resolves
    exactly; a byte flipped in one segment's frame is found at that segment: windows before it
    were handed out (the one just before is not: each map is read one segment ahead), none
    after it."""
    import pytest

    from repo_engine.errors import DamageError
    from repo_engine.repository import blockmap
    from repo_engine.repository.envelope import HEADER

    monkeypatch.setattr(blockmap, "READ_AHEAD", 4096)
    (tmp_path / "tmp").mkdir()
    store = LocalStore(tmp_path)
    refs = np.random.default_rng(5).integers(1, 2**40, 5000, dtype=np.uint64)
    name = _store(store, BlockMap.full(refs), 10)
    assert _resolved(store, [name], 5000, 10).tolist() == refs.tolist()
    path = tmp_path / map_object(name)
    data = bytearray(path.read_bytes())
    at = HEADER.size + blockmap.HEAD2.size
    for _ in range(3):
        at += blockmap.SEGMENT.size + blockmap.SEGMENT.unpack_from(data, at)[2]
    data[at + blockmap.SEGMENT.size + 10] ^= 1
    path.write_bytes(bytes(data))
    seen = []
    with pytest.raises(DamageError, match="segment 3 checksum mismatch"):
        for first, _window in resolve_windows([open_map(store, name)], shift=10):
            seen.append(first)
    assert seen == [0, 1024]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 60), unique=True), st.lists(st.integers(0, 70), max_size=50),
       st.booleans())
def test_find_sorted_answers_alike_whatever_the_order_of_search(table, keys, sort_first):
    """The search sorted first (a large table) places and finds every key as the plain one
    does and as a dict would: duplicates, absent keys and keys past the end included."""
    sorted_keys = np.array(sorted(table), np.uint64)
    wanted = np.array(keys, np.uint64)
    saved = blockmap.SORT_FIRST
    blockmap.SORT_FIRST = 0 if sort_first else saved
    try:
        pos, found = blockmap.find_sorted(sorted_keys, wanted)
    finally:
        blockmap.SORT_FIRST = saved
    at = {int(k): i for i, k in enumerate(sorted_keys)}
    assert found.tolist() == [k in at for k in keys]
    assert [int(p) for p, f in zip(pos, found) if f] == [at[k] for k in keys if k in at]
    assert blockmap.holds(sorted_keys, wanted).tolist() == found.tolist()


def test_a_map_batch_names_maps_as_write_map_does_and_holds_bounded_bytes(tmp_path,
                                                                          monkeypatch):
    """MapBatch: each map gets write_map's name; nothing is stored before `write` while the
    bytes held stay under BATCH_BYTES, and the batch so far is written once they would not; a
    map stored already is not written again; threads may add at once."""
    from concurrent.futures import ThreadPoolExecutor

    store = LocalStore(tmp_path)
    rng = np.random.default_rng(5)
    maps = [BlockMap.delta(1 << 20, np.sort(rng.choice(1 << 20, 64, replace=False)).astype(
        np.uint64), rng.integers(1, 1 << 40, 64).astype(np.uint64)) for _ in range(40)]
    expected = [blockmap.encoded_map(m)[0] for m in maps]
    stored = blockmap.write_map(store, maps[0])
    batch = blockmap.MapBatch(store, blockmap.NULL_SEALER, None)
    with ThreadPoolExecutor(4) as pool:
        names = list(pool.map(batch.add, maps[:20]))
    assert names == expected[:20] and stored == expected[0]
    assert [o.name for o in store.list("maps/")] == [blockmap.map_object(stored)]
    size = len(blockmap.encoded_map(maps[0])[1])
    monkeypatch.setattr(blockmap, "BATCH_BYTES", size * 25)
    names += [batch.add(m) for m in maps[20:30]]  # 19 + 10 held: past 25, written
    assert len(list(store.list("maps/"))) >= 25
    names += [batch.add(m) for m in maps[30:]]
    batch.write()
    assert names == expected
    assert {o.name for o in store.list("maps/")} == {blockmap.map_object(n) for n in expected}
    assert all(blockmap.read_map(store, n).refs.tolist() == m.refs.tolist()
               for n, m in zip(names, maps))
