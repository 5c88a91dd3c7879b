"""gc after a forget of most points counts the maps still in use instead of settling the dead
ones (`_live_side_cheaper`): the same index and the same files as the decrements leave, without
reading a dead map or a trailer; a count found too low on the way is reported; and a forget of
many points decodes each catalog record once."""

from __future__ import annotations

import os
from pathlib import Path

import lmdb
import numpy as np
import pytest

from helpers import MIB, DiskModel, cli, copy_repo, restore_bytes, write_extents
from repo_engine.maintenance import gc as gc_module
from repo_engine.maintenance.forget import forget_points
from repo_engine.repository import index as index_module
from repo_engine.repository.index import U64
from repo_engine.repository.index_records import LIVE_REC, PACK_KEY, PACK_REC, REF_KEY, REF_REC
from repo_engine.repository.repo import Repository
from repo_engine.repository.seals import seal

_TIMING = {"seconds", "waited_seconds"}


def _history(tmp_path: Path, capsys, seed: int) -> tuple[Path, dict[str, bytes]]:
    """Two VMs of random chains (max chain 3), a crashed backup's chunks indexed without a
    count, and each point's content."""
    rng = np.random.default_rng(seed)
    repo = tmp_path / "repo"
    assert cli(capsys, "init", repo, "--block-size", "16KiB", "--max-chain", "3",
               "--pack-size", "64KiB").code == 0
    contents: dict[str, bytes] = {}
    for vm in ("a", "b"):
        model = DiskModel(tmp_path / f"{vm}.img", MIB, rng)
        model.random_changes(6)
        for day in range(int(rng.integers(5, 9))):
            args = ["backup", "image", repo, "--vm", vm, "--disk", f"sda={model.path}", "--json"]
            if day:
                extents = model.random_changes(int(rng.integers(1, 4)), 60_000)
                args += ["--changed", f"sda={write_extents(tmp_path / 'e.json', extents)}"]
            done = cli(capsys, *args)
            assert done.code == 0, done.err
            contents[done.json()["point"]["id"]] = model.copy_of_content()
    crashed_backup_pack(repo, rng)
    return repo, contents


def crashed_backup_pack(repo: Path, rng: np.random.Generator) -> None:
    """A pack a backup indexed before it died: chunks no point counts."""
    with Repository.open(repo) as opened:
        writer = opened.pack_writer()
        for ref in opened.reserve_refs(int(rng.integers(1, 20))):
            blob = rng.integers(0, 256, 900, np.uint8).tobytes()
            writer.add(ref, opened.codec.chunk_id(blob), blob, len(blob), 0)
        opened.commit_pack(writer)


def _index_tables(repo: Path) -> dict[bytes, list[tuple[bytes, bytes]]]:
    env = lmdb.open(str(repo / "index"), readonly=True, lock=False, max_dbs=64)
    try:
        with env.begin() as txn:
            names = [key for key, _ in txn.cursor()]
            return {name: [(k, v) for k, v in txn.cursor(db=env.open_db(name, txn=txn))]
                    for name in names}
    finally:
        env.close()


def _files(repo: Path) -> list[str]:
    return sorted(str(p.relative_to(repo)) for kind in ("maps", "packs", "points")
                  for p in (repo / kind).rglob("*") if p.is_file())


def _gc(repo: Path, monkeypatch, live_side: bool) -> dict:
    with monkeypatch.context() as patch:
        patch.setattr(gc_module, "_live_side_cheaper", lambda _repo: live_side)
        with Repository.open(repo) as opened:
            report = gc_module.gc(opened, max_unused=0)
    return {k: v for k, v in vars(report).items() if k not in _TIMING}


@pytest.mark.parametrize("seed", range(4))
def test_counting_the_live_maps_leaves_what_settling_the_dead_ones_leaves(tmp_path, capsys,
                                                                          monkeypatch, seed):
    """A forget of most points (random histories), then gc by either path: every table of
    the index byte-identical (counts, seals, candidates, live counts, gc_mark), the same files
    left, the same report; and a forget and gc after that agree too."""
    repo, contents = _history(tmp_path, capsys, seed)
    rng = np.random.default_rng(100 + seed)
    ids = sorted(contents)
    for step, share in enumerate((0.7, 0.5)):
        with Repository.open(repo) as opened:
            live = sorted(p.id for p in opened.points())
            victims = [str(v) for v in rng.choice(live, int(len(live) * share), replace=False)]
            forget_points(opened, victims)
        dead, live_side = tmp_path / f"dead{step}", tmp_path / f"live{step}"
        copy_repo(repo, dead)
        copy_repo(repo, live_side)
        settled, counted = _gc(dead, monkeypatch, False), _gc(live_side, monkeypatch, True)
        assert settled == counted
        assert settled["maps_settled"] and (step or settled["chunks_dropped"])
        assert _index_tables(dead) == _index_tables(live_side)
        assert _files(dead) == _files(live_side)
        repo = live_side
    result = cli(capsys, "verify", repo, "--json")
    assert result.code == 0 and result.json()["ok"], result.out
    with Repository.open(repo) as opened:
        kept = [p.id for p in opened.points()]
    for point in kept:
        assert restore_bytes(capsys, repo, point, "sda", tmp_path / "r.img") == contents[point]
    assert set(kept) < set(ids)


def test_a_forget_of_most_points_reads_no_dead_map_and_no_trailer(tmp_path, capsys,
                                                                   monkeypatch):
    """The first prune of a long history: its gc reads the maps still in use, never one of the
    maps the forget left unused nor a pack's trailer (it was 9,820 maps and 10,000 trailers at
    10,000 points)."""
    repo, contents = _history(tmp_path, capsys, 7)
    with Repository.open(repo) as opened:
        points = opened.points()
        forget_points(opened, [p.id for p in points[:-2]])
        with opened.index.env.begin() as txn:
            dead = {k.hex() for k, _ in txn.cursor(db=opened.index.deadmaps)}
    read: list[str] = []
    trailers: list[str] = []
    real_map_refs, real_trailer = Repository.map_refs, Repository.read_trailer
    monkeypatch.setattr(Repository, "map_refs",
                        lambda self, name: read.append(name) or real_map_refs(self, name))
    monkeypatch.setattr(Repository, "read_trailer",
                        lambda self, name, *a, **k: trailers.append(name)
                        or real_trailer(self, name, *a, **k))
    with Repository.open(repo) as opened:
        report = gc_module.gc(opened, max_unused=100)  # no repack: it reads what it copies
    assert dead and report.maps_settled == len(dead) and report.maps_deleted >= len(dead)
    assert read and not set(read) & dead
    assert not trailers
    for point in points[-2:]:
        assert restore_bytes(capsys, repo, point.id, "sda", tmp_path / "r.img") == \
            contents[point.id]


def test_a_count_lower_than_the_live_maps_need_is_reported_and_repaired(tmp_path, capsys):
    """A sealed count of a chunk a kept point uses, lowered to nothing (no row, not queued):
    settling the dead maps never looks at it; counting the live maps finds it, reports it as
    damage and writes the right count, and the chunk stays."""
    repo, contents = _history(tmp_path, capsys, 8)
    with Repository.open(repo) as opened:
        points = opened.points()
        forget_points(opened, [p.id for p in points[:-1]])
        kept = opened.points()[0]
        victim = REF_KEY.pack(int(opened.map_refs(kept.disks[0].map)[0]))
        with opened.index.write() as txn:
            txn.delete(victim, db=opened.index.refcount)
    with Repository.open(repo) as opened:
        report = gc_module.gc(opened)
        with opened.index.env.begin() as txn:  # the one map in use holds it
            assert opened.index.get_sealed(txn, "refcount", victim) == U64.pack(1)
    assert report.counts_damaged and report.mode == "full"
    assert report.recount["under_counted"] == 1
    assert restore_bytes(capsys, repo, kept.id, "sda", tmp_path / "r.img") == contents[kept.id]


def test_an_unreadable_map_in_use_leaves_the_dead_maps_to_settle(tmp_path, capsys):
    """A map in use that cannot be read: counting the live maps would take its chunks for
    unused, so gc settles the dead maps instead (as before), and deletes nothing it uses."""
    repo, _contents = _history(tmp_path, capsys, 9)
    with Repository.open(repo) as opened:
        points = opened.points()
        forget_points(opened, [p.id for p in points[:-2]])
        kept = opened.points()
        name = kept[-1].disks[0].map
    path = next((repo / "maps").rglob(f"{name}*"))
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))
    with Repository.open(repo) as opened:
        report = gc_module.gc(opened)
        assert report.mode == "incremental" and report.maps_settled
        refs = opened.map_refs(kept[-2].disks[0].map)
        assert not opened.index.missing_refs(refs).size
    assert path.exists()


def test_a_forget_of_many_points_decodes_each_record_once(tmp_path, capsys, monkeypatch):
    """`forget --keep-last 1` passes over the catalog for its policy, under its lock and to
    remove the points: each record is decoded (JSON parsed, check computed) once."""
    repo, contents = _history(tmp_path, capsys, 10)
    decoded: list[bytes] = []
    real = index_module.decode_record
    monkeypatch.setattr(index_module, "decode_record",
                        lambda key, raw, **kw: decoded.append(key) or real(key, raw, **kw))
    result = cli(capsys, "forget", repo, "--keep-last", "1", "--json")
    assert result.code == 0, result.err
    rewritten = result.json()["rewritten"]
    assert rewritten  # their new records are decoded once more, when the others are removed
    assert len(decoded) == len(contents) + len(rewritten)
    assert set(decoded) == {i.encode() for i in contents}


@pytest.mark.parametrize("full", [True, False], ids=["gc-full", "live-count"])
def test_a_pack_record_moved_to_another_number_keeps_its_file(tmp_path, capsys, monkeypatch,
                                                               full):
    """A `packs` key damaged into a number no ref names (the refs still name the old one, which
    no record lists): a recount finds no chunk placed under the new number and counts it empty,
    but its file holds live chunks and must not be deleted; rebuild-index then finds them all."""
    repo, contents = _history(tmp_path, capsys, 11)
    env = lmdb.open(str(repo / "index"), max_dbs=64, map_size=1 << 30)
    with env.begin(write=True) as txn:
        db = env.open_db(b"packs", txn=txn)
        key, value = next(iter(txn.cursor(db=db)))
        txn.delete(key, db=db)
        txn.put((int.from_bytes(key, "big") | 1 << 20).to_bytes(4, "big"), value, db=db)
    env.close()
    model = DiskModel(tmp_path / "c.img", MIB // 4, np.random.default_rng(12))
    model.random_changes(3)
    done = cli(capsys, "backup", "image", repo, "--vm", "c", "--disk", f"sda={model.path}",
               "--json")
    assert done.code == 0, done.err  # its packs are numbered above the moved record
    contents[done.json()["point"]["id"]] = model.copy_of_content()
    with monkeypatch.context() as patch:
        patch.setattr(gc_module, "_live_side_cheaper", lambda _repo: True)
        with Repository.open(repo) as opened:
            gc_module.gc(opened, full=full, max_unused=0)
    assert cli(capsys, "rebuild-index", repo).code == 0
    result = cli(capsys, "verify", repo, "--json")
    assert result.code == 0 and result.json()["ok"], result.out
    for point, content in contents.items():
        assert restore_bytes(capsys, repo, point, "sda", tmp_path / "r.img") == content


def _set_sealed(repo: Path, table: str, key: bytes, value: bytes) -> None:
    env = lmdb.open(str(repo / "index"), max_dbs=64, map_size=1 << 30)
    with env.begin(write=True) as txn:
        txn.put(key, value, db=env.open_db(table.encode(), txn=txn))
    env.close()


def _pack_with_live_chunks(repo: Path) -> tuple[bytes, str]:
    """The key and file name of a pack some catalogued point reads a chunk from."""
    with Repository.open(repo) as opened:
        point = opened.points()[-1]
        refs = opened.map_refs(point.disks[0].map)
        with opened.index.env.begin() as txn:
            rec = txn.get(REF_KEY.pack(int(refs[refs > 0][0])), db=opened.index.refs)
            number = REF_REC.unpack(rec)[1]
            key = PACK_KEY.pack(number)
            name = PACK_REC.unpack(txn.get(key, db=opened.index.packs))[0].hex()
    return key, name


def test_a_live_count_lowered_to_zero_retires_no_pack_a_chunk_is_placed_in(tmp_path, capsys,
                                                                            monkeypatch):
    """A pack's live count sealed as 0 (well formed, wrong): gc's retiring of empty packs looks
    up the refs of the pack's trailer, finds chunks still placed there and keeps it."""
    repo, contents = _history(tmp_path, capsys, 21)
    key, name = _pack_with_live_chunks(repo)
    _set_sealed(repo, "packlive", key, seal("packlive", key, LIVE_REC.pack(0, 0)))
    _gc(repo, monkeypatch, live_side=False)
    assert (repo / "packs" / name[:2] / f"{name}.pack").exists()
    for point, content in contents.items():
        assert restore_bytes(capsys, repo, point, "sda", tmp_path / "r.img") == content


def test_an_unreadable_ref_record_keeps_the_packs_that_may_place_it(tmp_path, capsys,
                                                                    monkeypatch):
    """A ref record of another size among the refs of a pack whose live count says 0: gc keeps
    the pack (where that chunk lies is unknown) and goes on, one line of damage at most, no
    internal error; verify then names the damage."""
    repo, _contents = _history(tmp_path, capsys, 22)
    key, name = _pack_with_live_chunks(repo)
    _set_sealed(repo, "packlive", key, seal("packlive", key, LIVE_REC.pack(0, 0)))
    with Repository.open(repo) as opened:
        ref = int(opened.read_trailer(name)["ref"][0])
    env = lmdb.open(str(repo / "index"), max_dbs=64, map_size=1 << 30)
    with env.begin(write=True) as txn:
        refs_db = env.open_db(b"refs", txn=txn)
        txn.put(REF_KEY.pack(ref), txn.get(REF_KEY.pack(ref), db=refs_db)[:-3], db=refs_db)
    env.close()
    done = cli(capsys, "gc", repo)
    assert done.code == 0, done.err
    assert (repo / "packs" / name[:2] / f"{name}.pack").exists()
    result = cli(capsys, "verify", repo, "--json")
    assert result.code != 0
