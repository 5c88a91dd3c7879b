"""gc of a shared repository (maintenance/shared_gc.py) holds a few bytes per chunk, whatever the
repository holds: the refs table is read a batch at a time and the use of each chunk is a mark
aligned with its sorted refs, never every map's refs. With the batches made tiny, gc takes the
many-batch path and must decide, say and leave exactly what it does in one batch; and the Python
memory it uses at its peak (plan and sweep, the dry run, a repack) stays a small number of bytes
per chunk."""

from __future__ import annotations

import gc as collector
import json
import random
import shutil
import sys
import tracemalloc
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import lmdb
import numpy as np
import pytest

from helpers import attach_shared, shared_repo
from repo_engine.maintenance import shared_gc, tally
from repo_engine.maintenance.forget import forget_points
from repo_engine.maintenance.gc import gc
from repo_engine.repository.journal import entry_seqs, read_entry
from repo_engine.repository.store.local import LocalStore

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from bigrepo import BLOCK, PACK_SIZE, add_point, grow_open  # noqa: E402

CHUNKS = 60_000
PER_POINT = 6_000


def _grow(base: Path, chunks: int, halved: int = 2, forgotten: int = 4,
          pack_size: int = PACK_SIZE) -> Path:
    """A shared repository of `chunks` chunks in points of PER_POINT (a pack each); for each of
    the first `halved`, a point naming every other of its chunks; then the first `forgotten`
    points forgotten: by default two packs wholly unused, two half used (what a repack
    rewrites).
    `pack_size`: the new packs' (a repack's), those grown are of PACK_SIZE."""
    repo = shared_repo(base / "root", base / "cache", block_size=BLOCK, pack_size=pack_size)
    try:
        made = grow_open(repo, chunks, PER_POINT, 3)
        points = sorted(repo.points(), key=lambda p: p.id)
        for number, point in enumerate(points[:halved], made):
            add_point(repo, number, repo.map_refs(point.disks[0].map)[::2], 3)
        forget_points(repo, [p.id for p in points[:forgotten]])
    finally:
        repo.close()
    return base


def _halved(base: Path, chunks: int) -> Path:
    """Every pack half used: points naming every other chunk, the others forgotten. A repack
    writes packs of a few chunks (a pack's are held while it is written: the synthetic chunks
    are 48 bytes, a real pack holds some hundreds)."""
    return _grow(base, chunks, chunks // PER_POINT, chunks // PER_POINT, 4 * BLOCK)


@pytest.fixture(scope="module")
def repos(tmp_path_factory) -> Callable[[str], tuple[Path, Path]]:
    """Repositories of CHUNKS and three times as many chunks, grown on first use: "some"
    (`_grow`) or "every" pack half used (`_halved`)."""
    made: dict[str, tuple[Path, Path]] = {}

    def pair(kind: str) -> tuple[Path, Path]:
        build = {"some": _grow, "every": _halved}[kind]
        if kind not in made:
            made[kind] = tuple(build(tmp_path_factory.mktemp(f"shared-{kind}"), chunks)
                               for chunks in (CHUNKS, 3 * CHUNKS))
        return made[kind]

    return pair


def _copy(base: Path, to: Path) -> Path:
    shutil.rmtree(to, ignore_errors=True)
    shutil.copytree(base, to)
    return to


def _gc(base: Path, **options) -> dict:
    """gc's report (its timings aside) on the shared repository copied to `base`."""
    repo = attach_shared(LocalStore(base / "root"), base / "cache")
    try:
        report = asdict(gc(repo, **options))
    finally:
        repo.close()
    report.pop("seconds")
    return report


def _journal(base: Path) -> list:
    """The gc ops of the journal, with the plans' ids and times left out (new each run)."""
    store = LocalStore(base / "root")
    out = []
    for seq in sorted(entry_seqs(store)):
        for op in read_entry(store, seq).ops:
            fields = {k: (v.tolist() if isinstance(v, np.ndarray) else v)
                      for k, v in vars(op).items() if k not in ("plan", "time")}
            out.append((type(op).__name__, sorted(fields.items(), key=lambda kv: kv[0])))
    return out


def _objects(base: Path) -> set[str]:
    store = LocalStore(base / "root")
    return {i.name for kind in ("packs/", "maps/", "points/") for i in store.list(kind)}


RUNS = [{"dry_run": True, "grace": 0}, {"grace": 0}, {"grace": 0, "repack": True}]


def _steps(base: Path) -> list[dict]:
    return [_gc(base, **options) for options in RUNS]


def test_many_batches_decide_what_one_does(repos, tmp_path, monkeypatch):
    grown = repos("some")[0]
    one, many = _copy(grown, tmp_path / "one"), _copy(grown, tmp_path / "many")
    single = _steps(one)
    monkeypatch.setattr(tally, "ROWS", 777)
    monkeypatch.setattr(shared_gc, "ROWS", 777)  # a map marked, marks compacted, in batches
    monkeypatch.setattr(shared_gc, "GROUP_ROWS", 1_000)  # a repack's packs read one at a time
    batched = _steps(many)
    assert batched == single
    dry, swept, repacked = single
    assert dry["candidates"] == 4 * PER_POINT - PER_POINT and dry["planned_packs"] == 2
    assert dry["repack_packs"] == 2
    assert swept["chunks_dropped"] == 3 * PER_POINT and swept["packs_deleted"] == 2
    assert repacked["packs_repacked"] == 2 and repacked["packs_deleted"] == 2
    assert _journal(many)[-40:] == _journal(one)[-40:]
    assert _objects(many) == _objects(one)


def _peak(base: Path, work: Path, options: dict) -> int:
    """The Python memory (numpy arrays, rows read from the index) a gc with `options` adds at
    its peak, on a copy of the repository in `base`."""
    copy = _copy(base, work)
    _gc(copy, dry_run=True, grace=0)  # imports and caches warmed
    repo = attach_shared(LocalStore(copy / "root"), copy / "cache")
    try:
        collector.collect()  # no garbage of earlier tests freed during the run
        tracemalloc.start()
        try:
            start = tracemalloc.get_traced_memory()[0]
            gc(repo, **options)
            peak = tracemalloc.get_traced_memory()[1] - start
        finally:
            tracemalloc.stop()
    finally:
        repo.close()
    shutil.rmtree(copy)
    return peak


@pytest.mark.parametrize("kind, options", [("some", RUNS[0]), ("some", RUNS[1]),
                                           ("some", RUNS[2]), ("every", RUNS[0]),
                                           ("every", RUNS[2])],
                         ids=["dry-run", "plan-and-sweep", "repack", "every-pack-repack-cost",
                              "every-pack-repack"])
def test_memory_is_a_few_bytes_a_chunk(repos, tmp_path, monkeypatch, kind, options):
    """What a shared gc holds per chunk: the growth of its peak from a repository to one of
    three times the chunks. With some packs partly used, the work of the forgotten points is
    the same in both and cancels out; with every pack half used, a repack copies half of all
    chunks (and the cost every gc reports counts them): their rows are read a group of packs
    at a time, never all at once. Before, the whole refs table and every map's refs were held:
    170, 155 and 160 bytes a chunk for the first three."""
    monkeypatch.setattr(tally, "ROWS", 777)
    monkeypatch.setattr(shared_gc, "GROUP_ROWS", 1_000)
    grown, larger = repos(kind)
    per_chunk = (_peak(larger, tmp_path / "larger", options)
                 - _peak(grown, tmp_path / "grown", options)) / (2 * CHUNKS)
    assert per_chunk < 25, f"{options}: {per_chunk:.0f} bytes a chunk at its peak"


class _Cache:
    """The two tables of a cache a mark reads (refs: ref -> row; points: id -> record, JSON
    here), in a real LMDB environment."""

    def __init__(self, path: Path) -> None:
        self.env = lmdb.open(str(path), max_dbs=2, map_size=1 << 24)
        self.refs, self.points = self.env.open_db(b"refs"), self.env.open_db(b"points")

    @staticmethod
    def record(_key: bytes, raw: bytes) -> dict:
        return json.loads(raw)


@pytest.mark.parametrize("seed", range(40))
def test_marks_carried_over_as_the_cache_changes_are_a_fresh_mark(tmp_path, monkeypatch, seed):
    """One marker through a run's worth of cache changes, in batches of a few rows: rows added
    (other hosts' commits, refs a map held before its rows), rows removed (sweeps, refs still
    in a map), points added and forgotten. After each change its marks are exactly a fresh
    mark's: the table's refs, each used if and only if a catalogued map holds it."""
    rng = random.Random(seed)
    rows = rng.choice([1, 3, 7, 64])
    monkeypatch.setattr(tally, "ROWS", rows)
    monkeypatch.setattr(shared_gc, "ROWS", rows)
    cache, maps = _Cache(tmp_path / "cache"), {}
    repo = SimpleNamespace(index=cache, map_refs=maps.__getitem__)
    marker, table, catalog = shared_gc.Marker(repo), set(), {}
    for step in range(30):
        with cache.env.begin(write=True) as txn:
            change = rng.random()
            if change < 0.3:
                for ref in rng.sample(range(1, 200), rng.randint(0, 20)):
                    txn.put(ref.to_bytes(8, "big"), b"", db=cache.refs)
                    table.add(ref)
            elif change < 0.5:
                for ref in rng.sample(sorted(table), min(len(table), rng.randint(0, 15))):
                    txn.delete(ref.to_bytes(8, "big"), db=cache.refs)
                    table.discard(ref)
            elif change < 0.75:
                maps[f"m{step}"] = np.unique(np.array(rng.sample(range(1, 200), 25), np.uint64))
                catalog[f"p{step}"] = f"m{step}"
                txn.put(f"p{step}".encode(), json.dumps(
                    {"id": f"p{step}", "disks": [{"map": f"m{step}"}]}).encode(), db=cache.points)
            elif catalog:
                gone = rng.choice(sorted(catalog))
                del catalog[gone]
                txn.delete(gone.encode(), db=cache.points)
        with cache.env.begin() as txn:
            mark = marker.mark(txn)
        used = set().union(*(maps[name].tolist() for name in catalog.values()))
        assert mark.maps == frozenset(catalog.values())
        assert marker.refs.tolist() == sorted(table)
        assert mark.used.tolist() == [ref in used for ref in sorted(table)], step
    cache.env.close()
