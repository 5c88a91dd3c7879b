"""The first prune of a long history: gc counting the maps in use instead of settling the dead
ones (`_live_side_cheaper`), forget's rewrites in one transaction, on repositories a later
command must still handle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import MIB, DiskModel, cli, copy_repo, restore_bytes, write_extents
from race import Command
from test_gc_live_count import _files, _gc, _index_tables, crashed_backup_pack
from test_prune_edges import _DIE_AFTER, vms  # noqa: F401 (a fixture)
from repo_engine.maintenance import gc as gc_module
from repo_engine.maintenance.forget import forget_points
from repo_engine.repository.blockmap import map_object
from repo_engine.repository.repo import Repository


def _chain(tmp_path: Path, capsys, points: int = 8, seed: int = 3) -> tuple[Path, dict[str, bytes]]:
    """One VM of `points` points (chains of at most 3), and each point's content."""
    rng = np.random.default_rng(seed)
    repo = tmp_path / "repo"
    assert cli(capsys, "init", repo, "--block-size", "16KiB", "--max-chain", "3",
               "--pack-size", "64KiB").code == 0
    model = DiskModel(tmp_path / "a.img", MIB, rng)
    model.random_changes(6)
    contents: dict[str, bytes] = {}
    for day in range(points):
        args = ["backup", "image", repo, "--vm", "a", "--disk", f"sda={model.path}", "--json"]
        if day:
            extents = model.random_changes(2, 60_000)
            args += ["--changed", f"sda={write_extents(tmp_path / 'e.json', extents)}"]
        done = cli(capsys, *args)
        assert done.code == 0, done.err
        contents[done.json()["point"]["id"]] = model.copy_of_content()
    return repo, contents


def _forget_most(repo: Path, keep: int = 2) -> list[str]:
    """Forget all points but the last `keep`; returns the kept ids. gc would now count the
    maps in use."""
    with Repository.open(repo) as opened:
        points = opened.points()
        forget_points(opened, [p.id for p in points[:-keep]])
        assert gc_module._live_side_cheaper(opened)
        return [p.id for p in opened.points()]


def test_a_map_in_use_that_is_not_a_regular_file_leaves_gc_settling(tmp_path, capsys):
    """A map file in use replaced by a symlink (to a good copy) or a FIFO: gc does not stop at
    costing the recount (settling the dead maps needs no map in use, as before the recount
    existed): it finishes, frees what the forget left, deletes nothing a kept point uses and
    leaves the odd file to verify."""
    for kind in ("symlink", "fifo"):
        base = tmp_path / kind
        base.mkdir()
        repo, contents = _chain(base, capsys)
        kept = _forget_most(repo)
        with Repository.open(repo) as opened:
            name = opened.catalogued(kept[0]).disks[0].map
            path = opened.store.path_of(map_object(name))
        good = base / "good.map"
        os.rename(path, good)
        if kind == "symlink":
            os.symlink(good, path)
        else:
            os.mkfifo(path)
        result = cli(capsys, "gc", repo, "--json")
        assert result.code == 0, result.err
        report = result.json()
        assert report["maps_settled"] and report["chunks_dropped"]
        os.unlink(path)
        os.rename(good, path)
        for point in kept:
            assert restore_bytes(capsys, repo, point, "sda", base / "r.img") == contents[point]
        assert cli(capsys, "verify", repo).code == 0


def _two_gcs_keep(capsys, repo: Path, expected: dict[str, bytes], target: Path) -> None:
    """Two more gcs (the next retires packs whose live count is 0), then every point of
    `expected` restores its bytes and verify is clean."""
    for _ in range(2):
        assert cli(capsys, "gc", repo, "--max-unused", "0").code == 0
    for point, content in expected.items():
        assert restore_bytes(capsys, repo, point, "sda", target) == content
    verified = cli(capsys, "verify", repo, "--json")
    assert verified.code == 0 and verified.json()["ok"], verified.out


@pytest.mark.parametrize("outcome", ["commits", "dies"])
def test_a_backup_deduplicating_against_forgotten_chunks_while_gc_recounts(tmp_path, capsys,
                                                                         outcome):
    """A backup of VM b with the content of a forgotten point looks its chunks up (counted only
    by maps the forget left dead) and indexes its own packs, then waits before its commit while
    gc counts the maps in use: those chunks and the backup's own are gc's candidates. gc waits
    for the backup: committed, every chunk it uses stays (counted again, findable again);
    killed, its packs go and nothing a kept point uses does."""
    repo, contents = _chain(tmp_path, capsys)
    with Repository.open(repo) as opened:
        first = opened.points()[0].id
    kept = _forget_most(repo)
    image = tmp_path / "b.img"
    image.write_bytes(contents[first][: MIB // 2] + bytes(tmp_path.name, "ascii") * 7
                      + contents[first][MIB // 2 + 7 * len(tmp_path.name):])
    backup = Command(tmp_path, "backup", "image", repo, "--vm", "b", "--disk", f"sda={image}",
                     "--json", pauses=("backup.before_commit",))
    assert backup.reached("backup.before_commit")
    collecting = Command(tmp_path, "gc", repo, "--json", pauses=("gc.waiting",))
    assert collecting.reached("gc.waiting")
    if outcome == "commits":
        backup.release("backup.before_commit")
        done = backup.finish()
        assert done.code == 0, done.err
    else:
        backup.proc.kill()
        backup.finish()
    collecting.release("gc.waiting")
    result = collecting.finish()
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["maps_settled"] and report["chunks_dropped"]
    assert report["resurrected"] if outcome == "commits" else not report["resurrected"]
    expected = {point: contents[point] for point in kept}
    if outcome == "commits":
        expected[done.json()["point"]["id"]] = image.read_bytes()
    _two_gcs_keep(capsys, repo, expected, tmp_path / "r.img")
    again = cli(capsys, "backup", "image", repo, "--vm", "c", "--disk", f"sda={image}", "--json")
    assert again.code == 0, again.err
    if outcome == "commits":  # deduplicated against what b's point uses: nothing new stored
        assert again.json()["point"]["disks"][0]["counters"]["new_chunks"] == 0


@pytest.mark.parametrize("seed", range(3))
def test_both_ways_of_counting_agree_on_maps_forgotten_and_used_again(tmp_path, capsys,
                                                                      monkeypatch, seed):
    """Maps a forget left dead that later backups name again (VMs b0, b1 back up the content
    of forgotten points of a: the same map files, owing decrements and in use at once), then a
    forget of most points: gc leaves the very same index and files whichever way it counts,
    and every kept point restores."""
    rng = np.random.default_rng(seed)
    repo, contents = _chain(tmp_path, capsys, points=int(rng.integers(7, 10)), seed=seed)
    with Repository.open(repo) as opened:
        points = opened.points()
    gone = [p.id for p in points[:int(rng.integers(2, 5))]]
    with Repository.open(repo) as opened:
        forget_points(opened, gone)
    copies = {}
    for n, point in enumerate([gone[0], *rng.choice(gone[1:], 1).tolist()]):
        image = tmp_path / f"{point}.img"
        image.write_bytes(contents[point])
        done = cli(capsys, "backup", "image", repo, "--vm", f"b{n}", "--disk",
                   f"sda={image}", "--json")
        assert done.code == 0, done.err
        copies[done.json()["point"]["id"]] = contents[point]
    with Repository.open(repo) as opened, opened.index.env.begin() as txn:
        again = {k for k, _ in txn.cursor(db=opened.index.deadmaps)
                 if txn.get(k, db=opened.index.mapuse) is not None}
    assert again  # owing decrements and in use again
    with Repository.open(repo) as opened:
        forget_points(opened, [p.id for p in opened.points("a")[:-2]])
        kept = [p.id for p in opened.points()]
    dead, live = tmp_path / "dead", tmp_path / "live"
    copy_repo(repo, dead)
    copy_repo(repo, live)
    settled, counted = _gc(dead, monkeypatch, False), _gc(live, monkeypatch, True)
    assert settled == counted
    assert _index_tables(dead) == _index_tables(live)
    assert _files(dead) == _files(live)
    expected = {**contents, **copies}
    for point in kept:
        assert restore_bytes(capsys, live, point, "sda", tmp_path / "r.img") == expected[point]


@pytest.mark.parametrize("then", ["backup", "rebuild-index"])
def test_a_forget_killed_before_its_one_commit_then_other_commands(vms, capsys, then):
    """forget killed after writing the rewritten points' manifests, before their one catalog
    commit: manifests newer than the catalog. A backup of every VM (on the points whose
    manifests are newer) or a rebuild-index (which takes the manifests for the truth and
    brings the marked points back) runs first: every point restores, verify finds no damage,
    and a forget and gc then leave exactly what they should."""
    gone = vms.middle()
    killed = subprocess.run([sys.executable, "-c", _DIE_AFTER, "_commit_records", "0",
                             "forget", str(vms.repo), *[p[:12] for p in gone]],
                            capture_output=True)
    assert killed.returncode == -9, killed.stderr
    newer = cli(capsys, "verify", vms.repo, "--json")
    assert newer.code == 0 and "is newer than the catalog" in newer.out, newer.out
    if then == "backup":
        for vm in "abc":
            vms.models[vm].write(0, bytes(range(256)) * 64)
            vms.backup(vm)
    else:
        assert cli(capsys, "rebuild-index", vms.repo).code == 0
        assert cli(capsys, "forget", vms.repo, *[p[:12] for p in gone]).code == 0
    vms.assert_restores()
    vms.gc_finishes_forgetting(gone)


class _Killed(Exception):
    """gc dying after its mark (as by SIGKILL), in process."""


def _gc_killed_after_mark(repo: Path, monkeypatch, live_side: bool) -> None:
    """gc that made its candidates unfindable and dies before it waits and sweeps."""
    def killed(*_args, **_kwargs):
        raise _Killed

    with monkeypatch.context() as patch, Repository.open(repo) as opened:
        patch.setattr(gc_module, "wait_for", killed)
        patch.setattr(gc_module, "_live_side_cheaper", lambda _repo: live_side)
        with pytest.raises(_Killed):
            gc_module.gc(opened)


@pytest.mark.parametrize("seed", range(4))
def test_both_ways_of_counting_agree_after_a_gc_killed_after_its_mark(tmp_path, capsys,
                                                                      monkeypatch, seed):
    """A gc (either way of counting) killed after its mark, with a crashed backup's pack before
    and after it, then a forget of most points: gc leaves the same index and files whichever
    way it counts (the killed run's candidates, unfindable, are dropped either way), and the
    kept points restore."""
    rng = np.random.default_rng(seed)
    repo, contents = _chain(tmp_path, capsys, points=int(rng.integers(6, 10)), seed=seed)
    crashed_backup_pack(repo, rng)
    with Repository.open(repo) as opened:
        forget_points(opened, [p.id for p in opened.points()[:int(rng.integers(1, 4))]])
    _gc_killed_after_mark(repo, monkeypatch, bool(seed % 2))
    crashed_backup_pack(repo, rng)
    with Repository.open(repo) as opened:
        forget_points(opened, [p.id for p in opened.points()[:-2]])
        kept = [p.id for p in opened.points()]
    dead, live = tmp_path / "dead", tmp_path / "live"
    copy_repo(repo, dead)
    copy_repo(repo, live)
    settled, counted = _gc(dead, monkeypatch, False), _gc(live, monkeypatch, True)
    assert settled == counted and settled["chunks_dropped"]
    assert _index_tables(dead) == _index_tables(live)
    assert _files(dead) == _files(live)
    for point in kept:
        assert restore_bytes(capsys, live, point, "sda", tmp_path / "r.img") == contents[point]
    assert cli(capsys, "verify", live).code == 0


@pytest.mark.parametrize("seed", range(3))
def test_a_gc_killed_right_after_its_recount_is_finished_by_the_rerun(tmp_path, capsys,
                                                                     monkeypatch, seed):
    """gc killed right after its recount's one transaction (counts, candidates, live counts,
    `gc_mark` written; the dead maps no longer owed, nothing marked): the rerun, which now
    settles (no dead map left), leaves the same index and files as a gc never killed."""
    rng = np.random.default_rng(seed)
    repo, contents = _chain(tmp_path, capsys, points=int(rng.integers(6, 10)), seed=seed)
    crashed_backup_pack(repo, rng)
    kept = _forget_most(repo)
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    copy_repo(repo, killed)
    copy_repo(repo, whole)
    with monkeypatch.context() as patch, Repository.open(killed) as opened:
        patch.setattr(gc_module, "_mark", lambda *_args: (_ for _ in ()).throw(_Killed()))
        with pytest.raises(_Killed):
            gc_module.gc(opened)
        assert not gc_module._live_side_cheaper(opened)
    with Repository.open(killed) as opened:
        gc_module.gc(opened, max_unused=0)
    with Repository.open(whole) as opened:
        gc_module.gc(opened, max_unused=0)
    assert _index_tables(killed) == _index_tables(whole)
    assert _files(killed) == _files(whole)
    for point in kept:
        assert restore_bytes(capsys, killed, point, "sda", tmp_path / "r.img") == \
            contents[point]


def test_a_backup_indexing_and_committing_while_gc_recounts_keeps_its_packs(tmp_path, capsys):
    """gc counting the maps in use reads its snapshot; a backup then indexes new packs (numbered
    past the snapshot: the recount knows none of their chunks) and commits its point before gc
    waits for it: its packs keep their live counts, nothing it uses goes, now or at the next
    gc."""
    repo, contents = _chain(tmp_path, capsys)
    kept = _forget_most(repo)
    counting = Command(tmp_path, "gc", repo, "--json", pauses=("gc.recount", "gc.waiting"))
    assert counting.reached("gc.recount")
    model = DiskModel(tmp_path / "b.img", MIB, np.random.default_rng(5))
    model.random_changes(8)
    backup = Command(tmp_path, "backup", "image", repo, "--vm", "b", "--disk",
                     f"sda={model.path}", "--json", pauses=("backup.before_commit",))
    assert backup.reached("backup.before_commit")
    counting.release("gc.waiting")
    counting.release("gc.recount")
    assert counting.reached("gc.waiting")
    backup.release("backup.before_commit")
    done = backup.finish()
    assert done.code == 0, done.err
    result = counting.finish()
    assert result.code == 0, result.err
    expected = {point: contents[point] for point in kept}
    expected[done.json()["point"]["id"]] = model.copy_of_content()
    _two_gcs_keep(capsys, repo, expected, tmp_path / "r.img")


def test_forget_reads_no_map_of_a_disk_its_rewrites_keep(tmp_path, capsys, monkeypatch):
    """VMs whose second disk came later (a full map): forgetting each VM's first point
    rewrites the second, whose first disk is rebased and whose second keeps its map. The one
    catalog commit of all the rewrites needs no kept map (its use does not change): none is
    read, so forget's memory does not grow with the rewritten points times the maps they keep
    (huge full maps of every multi-disk VM, all held until the commit)."""
    repo = tmp_path / "repo"
    assert cli(capsys, "init", repo, "--block-size", "16KiB").code == 0
    rng = np.random.default_rng(11)
    firsts, contents = [], {}
    for vm in ("v0", "v1", "v2"):
        sda, sdb = DiskModel(tmp_path / "sda.img", MIB, rng), DiskModel(tmp_path / "sdb.img",
                                                                        MIB, rng)
        sda.random_changes(4)
        sdb.random_changes(4)
        first = cli(capsys, "backup", "image", repo, "--vm", vm, "--disk", f"sda={sda.path}",
                    "--json")
        assert first.code == 0, first.err
        firsts.append(first.json()["point"]["id"])
        sda.random_changes(2)
        second = cli(capsys, "backup", "image", repo, "--vm", vm, "--disk", f"sda={sda.path}",
                     "--disk", f"sdb={sdb.path}", "--json")
        assert second.code == 0, second.err
        point = second.json()["point"]
        assert [(d["key"], d["kind"]) for d in point["disks"]] == [("sda", "delta"),
                                                                   ("sdb", "full")]
        contents[point["id"]] = {"sda": sda.copy_of_content(), "sdb": sdb.copy_of_content()}
    with Repository.open(repo) as opened:
        kept_maps = {opened.catalogued(point).disks[1].map for point in contents}
    read: list[str] = []
    real = Repository.read_map
    monkeypatch.setattr(Repository, "read_map",
                        lambda self, name: read.append(name) or real(self, name))
    result = cli(capsys, "forget", repo, *firsts, "--json")
    assert result.code == 0, result.err
    assert sorted(result.json()["rewritten"]) == sorted(contents)
    assert not set(read) & kept_maps
    monkeypatch.setattr(Repository, "read_map", real)
    assert cli(capsys, "gc", repo, "--max-unused", "0").code == 0
    for point, disks in contents.items():
        for key, content in disks.items():
            assert restore_bytes(capsys, repo, point, key, tmp_path / "r.img") == content
    verified = cli(capsys, "verify", repo, "--json")
    assert verified.code == 0 and verified.json()["ok"], verified.out
