"""A small version of the big-repository bench (bench/bigrepo.py): the loader grows a repository
through the real pack writer and index, resumes where it stopped, and leaves a repository that
verifies, whose points own their chunks and whose id filter is saved."""

from __future__ import annotations

import sys
from pathlib import Path

from helpers import cli
from repo_engine.repository.formats import INDEX_VERSION
from repo_engine.repository.idfilter import FILE
from repo_engine.repository.repo import Repository

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from bigrepo import as_version_3, grow, locality, lookups  # noqa: E402


def test_grow_resumes_and_the_repository_verifies(tmp_path, capsys):
    repo = tmp_path / "big"
    first = grow(repo, 20_000, 5_000, 3)
    assert (first["chunks"], first["points"]) == (20_000, 4)
    again = grow(repo, 30_000, 5_000, 3)
    assert (again["chunks"], again["points"]) == (30_000, 6)
    assert (repo / "index" / FILE).exists()
    assert cli(capsys, "verify", repo).code == 0
    with Repository.open(repo) as opened:
        points = opened.points()
        assert {p.vm for p in points} == {"vm000", "vm001", "vm002"}
        refs = [set(opened.resolve(p, "sda").tolist()) for p in points]
    assert all(len(r) == 5_000 for r in refs)
    assert len(set().union(*refs)) == 30_000, "every point owns its chunks"
    forgotten = cli(capsys, "forget", repo, points[0].id)
    assert forgotten.code == 0, forgotten.err
    assert cli(capsys, "gc", repo).code == 0
    with Repository.open(repo) as opened:
        assert opened.index.counters()["chunks"] == 25_000


def test_lookups_measure_each_step(tmp_path):
    repo = tmp_path / "big"
    grow(repo, 10_000, 5_000, 2)
    rows = lookups(repo, 1_000, cold=True)
    assert [r["what"] for r in rows] == [
        "look-ups, new ids", "look-ups, stored ids in sequence", "look-ups, stored ids at random",
        "id filter: built from the index", "id filter: loaded from its file",
        "look-ups, new ids, id filter first", "inserts, new ids"]
    assert all(r["seconds"] >= 0 and r["major_faults"] >= 0 for r in rows)


def test_locality_finds_every_id_both_ways_and_writes_nothing_read_only(tmp_path):
    repo = tmp_path / "big"
    grow(repo, 40_000, 10_000, 2)
    as_version_3(repo)  # as an older build leaves it: read-only, the bench must not upgrade it
    before = (repo / "index" / "data.mdb").read_bytes()
    rows = locality(repo, 2_000, cold=True, read_only=True, no_readahead=True)
    assert [r["what"].split(": ")[1] for r in rows] == [
        "by locality, in batches", "one by one through ids"] * 2
    assert all(r["found"] == r["count"] for r in rows)
    assert (repo / "index" / "data.mdb").read_bytes() == before
    with Repository.open(repo) as opened:  # opened writable: upgraded, nothing unfindable
        assert opened.index.meta_u64("version") == INDEX_VERSION
    as_version_3(repo)
