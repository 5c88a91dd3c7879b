"""forget and gc at their edges: deletions left to a rerun, owed decrements summed per ref,
trailers read ahead, VMs rebased in parallel, a directory swapped during a delete."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import MIB, DiskModel, cli, restore_bytes
from repo_engine.errors import DamageError, RepoError
from repo_engine.maintenance import forget as forget_module
from repo_engine.maintenance import gc as gc_module
from repo_engine.repository.index import U64, Index
from repo_engine.repository.index_records import REF_KEY
from repo_engine.repository.packs import (ENTRY, FOOTER, HEADER, PackWriter, pack_object,
                                          read_trailer)
from repo_engine.repository.repo import Repository
from repo_engine.repository.store import ObjectDamaged
from repo_engine.repository.store import local as local_module
from repo_engine.repository.store.local import LocalStore
from test_store_local import store  # noqa: F401  (the fixture)




def _inode(path: Path) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_dev, info.st_ino


# -- LocalStore.delete: a rerun must make the removals durable --------------------------------
@pytest.mark.parametrize("count", [3, 300], ids=["one-thread", "threads"])
def test_a_rerun_delete_syncs_the_directories_an_interrupted_one_removed_from(store, monkeypatch,
                                                                               count):
    """A delete unlinks its names, then cannot make the removals durable (its directory fsync
    fails, or it is killed before it): the caller keeps the names queued (gc's dead packs stay
    in `deadpacks` until delete returns) and its rerun deletes them again, finds them gone, and
    then forgets them for good. The rerun must still fsync their directories: a name gone from
    the namespace is not durably gone until its directory is synced."""
    names = [f"packs/ab/{i:04x}.pack" for i in range(count)] + ["points/0001.point"]
    for name in names:
        store.put(name, b"p")
    real_fsync = os.fsync

    def failing(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OSError):
        store.delete(names)
    assert not (store.root / names[0]).exists()  # unlinked, not durably
    synced: set[tuple[int, int]] = set()

    def recording(fd: int) -> None:
        info = os.fstat(fd)
        synced.add((info.st_dev, info.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    store.delete(names)
    assert _inode(store.root / "packs" / "ab") in synced
    assert _inode(store.root / "points") in synced


def test_a_threaded_delete_switches_threads_often_and_puts_the_interval_back(store, monkeypatch):
    """While a threaded delete unlinks, the interpreter's thread switch interval is
    DELETE_SWITCH (a thread back from its unlink waits that long at most for the GIL while the
    command's thread computes); afterwards, whether the delete failed or not, it is what it
    was."""
    names = [f"packs/{i % 4:02x}/{i:04x}.pack" for i in range(300)]
    for name in names:
        store.put(name, b"p")
    real_unlink, seen = local_module.unlink_from, []

    def watching(directory: Path, files: list[str]) -> bool:
        seen.append(sys.getswitchinterval())
        return real_unlink(directory, files)

    before = sys.getswitchinterval()
    monkeypatch.setattr(local_module, "unlink_from", watching)
    store.delete(names)
    assert len(seen) > 1 and set(seen) == {local_module.DELETE_SWITCH}
    assert sys.getswitchinterval() == before
    assert not any(store.exists(name) for name in names)

    def failing(directory: Path, files: list[str]) -> bool:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(local_module, "unlink_from", failing)
    for name in names:
        store.put(name, b"p")
    with pytest.raises(OSError):
        store.delete(names)
    assert sys.getswitchinterval() == before


# -- gc: dead maps' decrements summed per ref ---------------------------------------------------
def _repo_with_one_counted_ref(tmp_path: Path, capsys) -> tuple[Path, int]:
    path = tmp_path / "repo"
    assert cli(capsys, "init", path, "--block-size", "16KiB").code == 0
    model = DiskModel(tmp_path / "a.img", MIB // 4, np.random.default_rng(3))
    model.write(0, np.random.default_rng(4).integers(0, 256, MIB // 4, np.uint8).tobytes())
    assert cli(capsys, "backup", "image", path, "--vm", "a", "--disk",
               f"sda={model.path}").code == 0
    with Repository.open(path) as repo, repo.index.env.begin() as txn:
        key, _ = next(iter(txn.cursor(db=repo.index.refcount)))
        return path, REF_KEY.unpack(key)[0]


def _settle_owed(path: Path, ref: int, owed: list[int]) -> tuple[bool, int]:
    """Dead maps owing `owed` decrements each, all holding `ref`, settled in one batch: (counts
    still trusted, the ref's count after)."""
    with Repository.open(path) as repo:
        index = repo.index
        keys = [bytes([i + 1]) * 32 for i in range(len(owed))]
        with index.write() as txn:
            before = U64.unpack(index.get_sealed(txn, "refcount", REF_KEY.pack(ref)))[0]
            for key, amount in zip(keys, owed):
                index.put_sealed(txn, "deadmaps", key, U64.pack(amount))
        assert before == 1
        gc_module._settle(index, [(key, np.array([ref], np.uint64)) for key in keys])
        with index.env.begin() as txn:
            raw = txn.get(REF_KEY.pack(ref), db=index.refcount)
            after = U64.unpack(raw[:8])[0] if raw else 0
        return index.counts_valid(), after


@pytest.mark.parametrize("owed", [[1 << 63], [1 << 62] * 3, [1 << 62] * 4],
                         ids=["one-at-2^63", "three-summing-past-2^63", "four-summing-to-2^64"])
def test_owed_decrements_too_large_for_a_count_are_damage_not_a_crash_or_a_raise(
        tmp_path, capsys, owed):
    """A dead map owing more decrements than the count holds is damage: the counts are
    distrusted (gc recounts) and the count is left as it is. Summed per ref, the owed amounts
    must neither crash gc (OverflowError: a traceback) nor wrap around int64 into an increment
    that goes unnoticed (a count raised by 2^62, trusted: the chunk is never freed)."""
    path, ref = _repo_with_one_counted_ref(tmp_path, capsys)
    trusted, after = _settle_owed(path, ref, owed)
    assert (trusted, after) == (False, 1)


# -- forget: the VMs rebased in parallel --------------------------------------------------------
class _Vms:
    """VMs a, b (a clone of a: the same bytes, the same changes, so the same maps) and c, four
    points each; `expected` holds every catalogued point's disk bytes."""

    def __init__(self, tmp_path: Path, capsys) -> None:
        self.tmp, self.capsys = tmp_path, capsys
        self.repo = tmp_path / "repo"
        assert cli(capsys, "init", self.repo, "--block-size", "16KiB", "--pack-size",
                   "256KiB").code == 0
        rng = np.random.default_rng(21)
        self.models = {vm: DiskModel(tmp_path / f"{vm}.img", MIB // 2, rng) for vm in "abc"}
        self.points: dict[str, list[str]] = {vm: [] for vm in "abc"}
        self.expected: dict[str, bytes] = {}
        for step in range(4):
            for vm in "ac":
                size = MIB // 2 if step == 0 else 64 * 1024
                offset = 0 if step == 0 else int(rng.integers(0, 7)) * 64 * 1024
                data = rng.integers(0, 256, size, np.uint8).tobytes()
                self.models[vm].write(offset, data)
                if vm == "a":
                    self.models["b"].write(offset, data)
            for vm in "abc":
                self.backup(vm)

    def backup(self, vm: str) -> None:
        model = self.models[vm]
        result = cli(self.capsys, "backup", "image", self.repo, "--vm", vm, "--disk",
                     f"sda={model.path}", "--json")
        assert result.code == 0, result.err
        point = result.json()["point"]["id"]
        self.points[vm].append(point)
        self.expected[point] = bytes(model.content)

    def middle(self) -> list[str]:
        return [p for vm in "abc" for p in self.points[vm][1:3]]

    def assert_restores(self) -> None:
        catalogued = {p["id"] for p in cli(self.capsys, "points", self.repo, "--json").json()["points"]}
        assert catalogued <= self.expected.keys()
        for point in sorted(catalogued):
            assert restore_bytes(self.capsys, self.repo, point, "sda",
                                 self.tmp / "out.img") == self.expected[point], point

    def assert_clean(self) -> None:
        result = cli(self.capsys, "verify", self.repo)
        assert result.code == 0, result.out + result.err

    def gc_finishes_forgetting(self, gone: list[str]) -> None:
        """gc leaves exactly the points not in `gone`, each restoring, and verify clean."""
        assert cli(self.capsys, "gc", self.repo, "--max-unused", "0").code == 0
        for point in gone:
            del self.expected[point]
        catalogued = {p["id"] for p in
                      cli(self.capsys, "points", self.repo, "--json").json()["points"]}
        assert catalogued == self.expected.keys()
        self.assert_restores()
        self.assert_clean()


@pytest.fixture
def vms(tmp_path, capsys):
    return _Vms(tmp_path, capsys)


def test_parallel_rebase_of_cloned_vms_sharing_maps_keeps_every_point(vms, capsys):
    """The children of a and b get the very same new maps (one name) from two threads at
    once; every remaining point restores byte-identically, before and after gc."""
    gone = vms.middle()
    result = cli(capsys, "forget", vms.repo, *[p[:12] for p in gone])
    assert result.code == 0, result.err
    for point in gone:
        del vms.expected[point]
    vms.assert_restores()
    vms.assert_clean()
    assert cli(capsys, "gc", vms.repo, "--max-unused", "0").code == 0
    vms.assert_restores()
    vms.assert_clean()


def test_a_rebase_failing_in_one_vm_leaves_all_restorable_and_the_next_gc_finishes(
        vms, capsys, monkeypatch):
    """One VM's rebase fails (damage) while the other threads write their maps: the forget
    ends with one line naming the damage, every catalogued point restores, and the next gc
    finishes the forget (the maps written for nothing are reclaimed)."""
    real = forget_module._delta_on

    def failing(repo, point, base, disk):
        if point.vm == "b":
            raise DamageError("block map of b is damaged (injected)")
        return real(repo, point, base, disk)

    monkeypatch.setattr(forget_module, "_delta_on", failing)
    gone = vms.middle()
    result = cli(capsys, "forget", vms.repo, *[p[:12] for p in gone])
    assert result.code == 3
    assert result.err.strip().splitlines() == [
        "repo-engine: error: block map of b is damaged (injected)"]
    vms.assert_restores()
    monkeypatch.setattr(forget_module, "_delta_on", real)
    vms.gc_finishes_forgetting(gone)


# SIGKILL at call number `after` + 1 of a hook: a method of Repository, or `module:attr` (a
# module's function, or Class.method)
_DIE_AFTER = """
import importlib, os, signal, sys
from repo_engine.cli.main import run
from repo_engine.repository.repo import Repository
hook, after = sys.argv[1], int(sys.argv[2])
module, _, name = hook.rpartition(":")
owner = importlib.import_module(module) if module else Repository
if "." in name:
    cls, name = name.split(".")
    owner = getattr(owner, cls)
real, calls = getattr(owner, name), []
def dying(*args, **kwargs):
    calls.append(1)
    if len(calls) > after:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
setattr(owner, name, dying)
sys.exit(run(sys.argv[3:]))
"""


_BATCH = "repo_engine.repository.blockmap:MapBatch.add"
_SYNCED = "repo_engine.repository.atomic:_write_synced"
_DIR_SYNC = "repo_engine.repository.atomic:fsync_dir"


@pytest.mark.parametrize("hook,after", [(_BATCH, 0), (_BATCH, 1), (_BATCH, 2), (_SYNCED, 0),
                                        (_DIR_SYNC, 0), (_DIR_SYNC, 1), (_SYNCED, 1),
                                        ("next_generation", 1), ("next_generation", 2),
                                        ("_commit_records", 0)])
def test_a_forget_killed_during_the_parallel_rebase_leaves_all_restorable(vms, capsys, hook,
                                                                          after):
    """SIGKILL while the threads compute the maps (`MapBatch.add`), before the maps' batch is
    written or fsynced (`_write_synced` 0), after its renames, before or while their
    directories are synced (`fsync_dir`), while the threads read the rewritten points'
    manifests (`next_generation`), before those manifests' batch (`_write_synced` 1) or before
    the points' catalog commit (`_commit_records`): every catalogued point restores; the next
    gc finishes the forget and reclaims the maps written for nothing; verify is clean."""
    gone = vms.middle()
    killed = subprocess.run([sys.executable, "-c", _DIE_AFTER, hook, str(after), "forget",
                             str(vms.repo), *[p[:12] for p in gone]], capture_output=True)
    assert killed.returncode == -9, killed.stderr
    vms.assert_restores()
    vms.gc_finishes_forgetting(gone)


_UNLINK = "repo_engine.repository.store.local:unlink_from"
_DELETED = "repo_engine.repository.store.local:sync_dir"


@pytest.mark.parametrize("hook,after", [(_UNLINK, 0), (_DELETED, 0), (_UNLINK, 2), (_DELETED, 2),
                                        (_UNLINK, 6), (_DELETED, 7)])
def test_a_forget_prune_killed_while_its_deleter_deletes_leaves_orphans_gc_removes(
        vms, capsys, hook, after):
    """`forget --prune` hands its deletions to one thread that runs beside the rest of the
    command (the forgotten points' manifests, then gc's unused maps inside its sweep, then the
    dead packs). SIGKILL before or among the manifests' unlinks or before their directory's
    fsync, among the maps' (before the sweep commits), among the packs' (after it): every
    catalogued point restores, and the next gc removes what was left (orphans: manifests no
    record names, maps no count names, packs no table lists) and leaves verify clean."""
    gone = vms.points["c"] + vms.points["a"][1:3]
    killed = subprocess.run([sys.executable, "-c", _DIE_AFTER, hook, str(after), "forget",
                             "--prune", str(vms.repo), *[p[:12] for p in gone]],
                            capture_output=True)
    assert killed.returncode == -9, killed.stderr
    vms.assert_restores()
    vms.gc_finishes_forgetting(gone)
    orphans = cli(capsys, "verify", vms.repo, "--json").json()["orphans"]
    assert not any(orphans.values()), orphans


def test_a_forget_prune_whose_background_delete_fails_ends_with_one_error_line(
        vms, capsys, monkeypatch):
    """The deletion of the forgotten points' manifests fails while gc goes on beside it: the
    command still ends with exit code 1 and one error line naming the failure (no traceback,
    no report claiming success), and the next gc deletes what was left."""
    real = LocalStore.delete

    def failing(self, names):
        names = list(names)
        if any(n.startswith("points/") for n in names):
            raise OSError(errno.EIO, "Input/output error (injected)")
        return real(self, names)

    monkeypatch.setattr(LocalStore, "delete", failing)
    gone = vms.points["c"] + vms.points["a"][1:3]
    result = cli(capsys, "forget", "--prune", vms.repo, *[p[:12] for p in gone])
    assert result.code == 1 and "injected" in result.err, result.err
    assert result.err.count("\n") == 1 and "Traceback" not in result.err
    monkeypatch.setattr(LocalStore, "delete", real)
    vms.gc_finishes_forgetting(gone)
    orphans = cli(capsys, "verify", vms.repo, "--json").json()["orphans"]
    assert not any(orphans.values()), orphans


def test_the_rewritten_points_commit_together_or_not_at_all(vms, capsys, monkeypatch):
    """The points a forget rewrites (one a VM here) commit in one transaction: a failure at
    its end (the map use of all of them moved, once every record is put) leaves none
    rewritten (each at its generation, restoring), and gc then finishes the forget, each
    rewritten once."""
    with Repository.open(vms.repo) as repo:
        before = {p.id: p.generation for p in repo.points()}
    real, calls = Index.change_map_use, []

    def failing(self, txn, delta, map_refs):
        calls.append(1)
        if len(calls) == 1:
            # each of the 3 points: its old map out, its new one in (a and b share them)
            assert sorted(delta.values()) == [-2, -1, 1, 2]
            raise OSError(errno.EIO, "Input/output error (injected)")
        return real(self, txn, delta, map_refs)

    monkeypatch.setattr(Index, "change_map_use", failing)
    gone = vms.middle()
    result = cli(capsys, "forget", vms.repo, *[p[:12] for p in gone])
    assert result.code == 1 and "injected" in result.err
    monkeypatch.setattr(Index, "change_map_use", real)
    with Repository.open(vms.repo) as repo:
        assert {p.id: p.generation for p in repo.points()} == before
    vms.assert_restores()
    vms.gc_finishes_forgetting(gone)
    with Repository.open(vms.repo) as repo:
        after = {p.id: p.generation for p in repo.points()}
    assert after == {point: before[point] + 1 if point == vms.points[vm][3] else before[point]
                     for vm in "abc" for point in vms.points[vm] if point not in gone}


def test_a_local_forget_opens_each_chains_maps_in_turn(vms):
    """On a local store a map open is a read of a file: the chains a forget resolves (each
    4th point's, through the removed 3rd and 2nd to the 1st) are opened in turn, with no pool
    of threads (object storage opens them together: test_restore_s3); every point left
    restores as before."""
    gone = vms.middle()
    with Repository.open(vms.repo) as repo:
        assert len(repo.chain(repo.catalogued(vms.points["a"][3]), "sda")) == 4
        report = forget_module.forget_points(repo, gone)
        assert sorted(report.removed) == sorted(gone) and len(report.rewritten) == 3
        assert repo._map_opener is None
    for point in gone:
        del vms.expected[point]
    vms.assert_restores()


# -- read_trailer's first request of 64 KiB -----------------------------------------------------
def _pack_of(tmp_path: Path, blobs: list[int]) -> tuple[LocalStore, str, Path]:
    (tmp_path / "tmp").mkdir(exist_ok=True)
    store = LocalStore(tmp_path)
    writer = PackWriter(store)
    for ref, size in enumerate(blobs, start=1):
        writer.add(ref, ref.to_bytes(32, "big"), bytes([ref % 251]) * size, size, 0)
    pack = writer.finish()
    return store, pack.name, tmp_path / "packs" / pack.name[:2] / f"{pack.name}.pack"


def _fixed_size(total: int, count: int) -> list[int]:
    """`count` blobs making an unsealed pack of `total` bytes."""
    left = total - HEADER.size - FOOTER.size - count * ENTRY.size
    return [left - (count - 1)] + [1] * (count - 1)


AHEAD = 64 * 1024


@pytest.mark.parametrize("total,count", [
    (AHEAD - 1, 1), (AHEAD, 1), (AHEAD + 1, 1), (AHEAD + 40, 2), (AHEAD + 200, 3),
    (3 * AHEAD, 1500), (200, 0)])
def test_read_trailer_at_the_edges_of_its_first_request(tmp_path, total, count):
    """Packs ending just before, at and after the first request's end, a trailer straddling it,
    a trailer larger than it, an empty pack: the entries read are the ones written, and a flip
    of a byte of the magic, the trailer or the footer is refused."""
    store, name, path = _pack_of(tmp_path, _fixed_size(total, count) if count else [])
    raw = path.read_bytes()
    assert len(raw) == total or not count
    entries = read_trailer(store, pack_object(name))
    assert entries["ref"].tolist() == list(range(1, count + 1))
    trailer_start = len(raw) - FOOTER.size - count * ENTRY.size
    footer = len(raw) - FOOTER.size
    unsealed_reserved = {footer + 14, footer + 15}  # unchecked in an unsealed pack (format)
    places = [0] + [p for p in range(max(trailer_start, HEADER.size), len(raw))
                    if p not in unsealed_reserved]
    for place in places[::max(1, len(places) // 300)]:
        damaged = bytearray(raw)
        damaged[place] ^= 0x41
        path.write_bytes(bytes(damaged))
        store.close()
        with pytest.raises(RepoError):
            read_trailer(store, pack_object(name))
    path.write_bytes(raw)


def test_a_rebase_failing_in_one_vm_starts_no_other_vm(vms, capsys, monkeypatch):
    """Once one VM's rebase has failed, the VMs still queued are not rebased (Executor.map
    cancels the futures not started): no maps are written for nothing, and the error (or a
    Ctrl-C) is reported once the running VMs are done, not after every VM."""
    real, started = forget_module._rebased_vm, []

    def first_fails(repo, batch, catalog, gone, ids):
        started.append(catalog[ids[0]].vm)
        if len(started) == 1:
            raise DamageError("block map is damaged (injected)")
        return real(repo, batch, catalog, gone, ids)

    monkeypatch.setattr(forget_module, "REBASE_THREADS", 1)
    monkeypatch.setattr(forget_module, "_rebased_vm", first_fails)
    result = cli(capsys, "forget", vms.repo, *[p[:12] for p in vms.middle()])
    assert result.code == 3, result.err
    assert len(started) == 1, started


def test_a_gc_rerun_syncs_the_dead_packs_removals_before_it_forgets_them(vms, capsys,
                                                                        monkeypatch):
    """gc unlinks its dead packs, then the fsync of their directories fails (EIO; a kill at
    that moment is the same): it ends with one error line and the packs stay queued. The next
    gc deletes them again (they are gone already) and drops them from the queue: by then their
    directories must have been synced, or a power loss brings back packs the index has
    forgotten."""
    real_fsync, real_delete = os.fsync, LocalStore.delete
    deleted: list[str] = []
    synced: set[tuple[int, int]] = set()
    mode = {"fail": True}

    def fsync(fd: int) -> None:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            if mode["fail"]:
                raise OSError(errno.EIO, "Input/output error")
            synced.add((info.st_dev, info.st_ino))
        real_fsync(fd)

    def delete(self, names):
        names = list(names)
        packs = [n.rpartition("/")[2].removesuffix(".pack") for n in names
                 if n.startswith("packs/")]
        if not packs:
            return real_delete(self, names)
        deleted.extend(packs)
        monkeypatch.setattr(os, "fsync", fsync)
        try:
            real_delete(self, names)
        finally:
            monkeypatch.setattr(os, "fsync", real_fsync)

    monkeypatch.setattr(LocalStore, "delete", delete)
    assert cli(capsys, "forget", vms.repo, *[p[:12] for p in vms.points["c"]]).code == 0
    first = cli(capsys, "gc", vms.repo, "--max-unused", "0")
    assert first.code == 1 and "input/output error" in first.err, first.err
    assert deleted
    mode["fail"] = False
    assert cli(capsys, "gc", vms.repo).code == 0
    dirs = {vms.repo / "packs" / name[:2] for name in deleted}
    assert all(d.is_dir() for d in dirs)
    assert {_inode(d) for d in dirs} <= synced


@pytest.mark.parametrize("count", [3, 300], ids=["one-thread", "threads"])
def test_a_directory_swapped_for_a_symlink_during_a_delete_never_loses_the_target(
        store, tmp_path, monkeypatch, count):
    """packs/ab is renamed away and replaced by a symlink to a directory holding files of the
    same names just after delete opened it: the unlinks land in the directory it opened,
    never in the symlink's target, and the swap is reported as damage."""
    names = [f"packs/ab/{i:04x}.pack" for i in range(count)]
    for name in names:
        store.put(name, b"p")
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in names:
        (outside / Path(name).name).write_bytes(b"keep")
    real_unlink, swapped = os.unlink, []

    def unlink(path, *, dir_fd=None):
        if not swapped:
            swapped.append(1)
            directory = store.root / "packs" / "ab"
            directory.rename(store.root / "packs" / "ab.old")
            directory.symlink_to(outside)
        return real_unlink(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "unlink", unlink)
    with pytest.raises(ObjectDamaged):
        store.delete(names)
    assert sorted(p.read_bytes() for p in outside.iterdir()) == [b"keep"] * count
