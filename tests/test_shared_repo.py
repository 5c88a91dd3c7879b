"""A shared repository in a local directory: several hosts (Repository objects with their own
caches) write it through its journal, deduplicate against each other's chunks, never share a
ref, and every host (and a fresh one) restores every point byte-identical."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from helpers import MIB, DiskModel, attach_shared, shared_repo
from repo_engine.backup.job import BackupOptions, backup_vm
from repo_engine.repository.index import ParentGone
from repo_engine.repository.journal import entry_object, read_entry
from repo_engine.repository.repo import Repository
from repo_engine.repository.store.local import LocalStore
from repo_engine.restore.restorer import restore_disk
from repo_engine.sources.image import ImageDisk, image_snapshot


class Host:
    """One backup host: its own cache directory and Repository on the shared store."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo

    def backup(self, vm: str, model: DiskModel):
        return backup_vm(self.repo, image_snapshot(vm, [ImageDisk("d", model.path)]),
                         BackupOptions())

    def restored(self, point, tmp_path: Path) -> bytes:
        target = tmp_path / f"restore-{point.id}.img"
        target.unlink(missing_ok=True)
        current = next(p for p in self.repo.points() if p.id == point.id)
        restore_disk(self.repo, current, "d", target)
        return target.read_bytes()

    def refs(self) -> set[int]:
        with self.repo.index.env.begin() as txn:
            return {int.from_bytes(k, "big") for k, _ in txn.cursor(db=self.repo.index.refs)}


@pytest.fixture
def hosts(tmp_path):
    root = tmp_path / "repo"
    first = Host(shared_repo(root, tmp_path / "cache-a"))
    second = Host(attach_shared(LocalStore(root), tmp_path / "cache-b"))
    yield root, first, second
    first.repo.close()
    second.repo.close()


def disk(tmp_path: Path, name: str, seed: int, size: int = 2 * MIB) -> DiskModel:
    model = DiskModel(tmp_path / f"{name}.img", size, np.random.default_rng(seed))
    model.random_changes(6)
    return model


def test_two_hosts_back_up_concurrently_and_restore_everything(hosts, tmp_path):
    root, a, b = hosts
    two_hosts_back_up_concurrently(a, b, Host(attach_shared(LocalStore(root),
                                                            tmp_path / "cache-c")), tmp_path)


def two_hosts_back_up_concurrently(a: Host, b: Host, fresh: Host, tmp_path: Path) -> None:
    """a and b back up a VM each, 3 times, at the same time; then a, b and a host that has
    never seen the repository restore every point byte-identical."""
    disks = {"vm1": disk(tmp_path, "vm1", 1), "vm2": disk(tmp_path, "vm2", 2)}
    points: list = []
    errors: list = []

    def run(host: Host, vm: str, rounds: int) -> None:
        try:
            for _ in range(rounds):
                points.append((host.backup(vm, disks[vm]), disks[vm].copy_of_content()))
                disks[vm].random_changes(2)
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(a, "vm1", 3)),
               threading.Thread(target=run, args=(b, "vm2", 3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for host in (a, b, fresh):
        host.repo.refresh()
        assert {p.id for p in host.repo.points()} == {p.id for p, _ in points}
        for point, content in points:
            assert host.restored(point, tmp_path) == content
    # each host's chunks lie in its own claimed ranges: the caches agree on every ref
    assert a.refs() == b.refs() == fresh.refs()
    seqs = sorted(p.seq for p in fresh.repo.points())
    assert len(set(seqs)) == len(seqs)  # a point's seq is its journal entry's
    fresh.repo.close()


def test_a_host_deduplicates_against_another_hosts_chunks(hosts, tmp_path):
    _root, a, b = hosts
    model = disk(tmp_path, "same", 3)
    first = a.backup("vm1", model)
    assert first.counters["new_chunks"] > 0
    second = b.backup("vm2", model)  # b refreshes when it locks: it sees a's pack
    assert second.counters["new_chunks"] == 0
    assert second.counters["dup_blocks"] == first.counters["new_chunks"] + first.counters[
        "dup_blocks"]
    assert b.restored(second, tmp_path) == model.copy_of_content()


def test_ref_ranges_never_collide(hosts):
    _root, a, b = hosts
    ranges = [a.repo.reserve_refs(10), b.repo.reserve_refs(10), a.repo.reserve_refs(10)]
    for i, r in enumerate(ranges):
        assert len(r) == 1 << 32
        for other in ranges[i + 1:]:
            assert r.stop <= other.start or other.stop <= r.start


def test_a_commit_racing_another_at_the_same_seq_catches_up_and_rechecks(hosts, tmp_path,
                                                                         monkeypatch):
    """b commits (forgets a's parent) between a's catch-up and a's put: a loses the seq, catches
    up, re-checks, finds its parent gone (ParentGone: the backup writes a full map) and commits
    at the next seq."""
    from repo_engine.repository import journal

    _root, a, b = hosts
    model = disk(tmp_path, "vm", 4)
    parent = a.backup("vm", model)
    b.repo.refresh()
    write = journal.write_entry
    raced: list[int] = []

    def racing(store, entry, *sealer):
        if not raced and entry.ops and type(entry.ops[0]).__name__ == "PointOp":
            raced.append(entry.seq)
            assert b.repo.remove_point(parent.id)
        write(store, entry, *sealer)

    monkeypatch.setattr(journal, "write_entry", racing)
    model.random_changes(2)
    child = a.backup("vm", model)
    assert child.disks[0].kind == "full" and "forgotten during the backup" in child.disks[0].note
    assert child.seq > raced[0]
    assert [p.id for p in a.repo.points()] == [child.id]
    assert a.restored(child, tmp_path) == model.copy_of_content()


def test_remove_point_keeps_a_parent_until_its_children_are_consolidated(hosts, tmp_path):
    _root, a, b = hosts
    model = disk(tmp_path, "vm", 5)
    parent = a.backup("vm", model)
    model.random_changes(1)
    child = a.backup("vm", model)
    assert child.disks[0].parent == parent.id
    assert b.repo.remove_point(parent.id) is False
    assert b.repo.remove_point(child.id) is True
    assert b.repo.remove_point(child.id) is True  # gone already: nothing committed
    head = b.repo.refresh()
    assert b.repo.remove_point(parent.id) is True
    assert b.repo.refresh() == head + 1
    assert a.repo.refresh() == head + 1 and a.repo.points() == []


def test_point_seq_is_its_journal_entry(hosts, tmp_path):
    root, a, _b = hosts
    point = a.backup("vm", disk(tmp_path, "vm", 6))
    entry = read_entry(LocalStore(root), point.seq)
    assert entry is not None and entry.ops[0].record["id"] == point.id
    assert a.repo.load_point(point.id).seq == point.seq


def test_the_local_store_layout_of_a_shared_repository(hosts, tmp_path):
    root, a, _b = hosts
    a.backup("vm", disk(tmp_path, "vm", 7))
    assert not (root / "index").exists()  # the index lives in each host's cache
    assert (tmp_path / "cache-a" / "index" / "data.mdb").is_file()
    assert (root / entry_object(1)).is_file()


WRITER = """
import sys
from pathlib import Path
from helpers import attach_shared
from repo_engine.backup.job import BackupOptions, backup_vm
from repo_engine.repository.store.local import LocalStore
from repo_engine.sources.image import ImageDisk, image_snapshot

root, cache, vm, image = sys.argv[1:]
with attach_shared(LocalStore(Path(root)), Path(cache)) as repo:
    for _ in range(2):
        backup_vm(repo, image_snapshot(vm, [ImageDisk("d", Path(image))]), BackupOptions())
"""


def test_processes_sharing_a_cache_and_hosts_with_their_own(hosts, tmp_path):
    """Two processes on one cache (the same host) and one on another back up at once: each
    entry is applied once to each cache, and every point restores from a fresh host."""
    root, a, _b = hosts
    models = {vm: disk(tmp_path, vm, seed) for vm, seed in (("p1", 11), ("p2", 12), ("p3", 13))}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                                         os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(tmp_path / cache),
                               vm, str(models[vm].path)], env=env, stderr=subprocess.PIPE)
             for vm, cache in (("p1", "cache-a"), ("p2", "cache-a"), ("p3", "cache-b"))]
    for proc in procs:
        _out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
    fresh = Host(attach_shared(LocalStore(root), tmp_path / "cache-c"))
    head = fresh.repo.refresh()
    assert a.repo.refresh() == head
    points = fresh.repo.points()
    assert sorted(p.vm for p in points) == ["p1", "p1", "p2", "p2", "p3", "p3"]
    for point in points:
        if point.id == max((p for p in points if p.vm == point.vm), key=lambda p: p.seq).id:
            assert fresh.restored(point, tmp_path) == models[point.vm].copy_of_content()
    assert a.refs() == fresh.refs()
    fresh.repo.close()
