"""LocalStore: the store contract (store_contract.py) on a directory, plus what only a directory
can hold: modes, symlinks, FIFOs, temporary files, the local-only index/locks/tmp directories."""

from __future__ import annotations

import errno
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import MIB, DiskModel, cli, restore_bytes
from repo_engine.repository.store import (ObjectDamaged, ObjectMissing, ShortRead, StoreError,
                                          open_store)
from repo_engine.repository.store.local import LocalStore
from repo_engine.restore.plan import ReadSettings
from store_contract import StoreContract


@pytest.fixture
def store(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    local = LocalStore(root)
    yield local
    local.close()


class TestLocalStore(StoreContract):
    pass


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_objects_are_owner_only_files_at_their_names(store):
    old = os.umask(0)
    try:
        store.put("packs/ab/x.pack", b"p")
        spool = store.spool_dir() / "pack-9.tmp"
        spool.write_bytes(b"q")
        store.put_file("maps/cd/y.map", spool)
    finally:
        os.umask(old)
    root = store.root
    assert (root / "packs" / "ab" / "x.pack").read_bytes() == b"p"
    assert (root / "maps" / "cd" / "y.map").read_bytes() == b"q"
    assert [_mode(root / p) for p in ("packs", "packs/ab", "maps/cd")] == [0o700] * 3
    assert _mode(root / "packs/ab/x.pack") == 0o600


def _plant(root: Path) -> Path:
    """A symlink to a file, a FIFO and a symlinked directory where objects belong; returns the
    outside file the links point to."""
    outside = root.parent / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"s" * 10)
    (root / "packs" / "ab").mkdir(parents=True, exist_ok=True)
    (root / "packs" / "ab" / "link.pack").symlink_to(outside / "secret")
    os.mkfifo(root / "packs" / "ab" / "fifo.pack")
    (root / "packs" / "cd").symlink_to(outside)
    return outside / "secret"


def test_list_yields_regular_files_only_and_reports_the_rest(store):
    store.put("packs/ab/good.pack", b"g")
    _plant(store.root)
    (store.root / "packs" / "ab" / ".tmp-1-2-good2.pack").write_bytes(b"t")
    skipped: list[str] = []
    assert [i.name for i in store.list("packs/", skipped)] == ["packs/ab/good.pack"]
    assert len(skipped) == 3, skipped
    assert any("link.pack is a symlink" in s for s in skipped)
    assert any("fifo.pack is a FIFO" in s for s in skipped)
    assert any(s.startswith(f"{store.root / 'packs' / 'cd'} is a symlink") for s in skipped)


def test_local_only_directories_are_not_objects(store):
    for sub in ("index", "locks", "tmp"):
        (store.root / sub).mkdir()
        (store.root / sub / "data.mdb").write_bytes(b"l")
    store.put("config", b"c")
    assert [i.name for i in store.list("")] == ["config"]


def test_reads_never_follow_a_symlink_or_block_on_a_fifo(store):
    _plant(store.root)
    for name in ("packs/ab/link.pack", "packs/ab/fifo.pack"):
        for read in (lambda: store.get(name, limit=100), lambda: store.size(name)):
            with pytest.raises(ObjectDamaged, match="not a regular file|symlink"):
                read()
        assert not store.exists(name)
    with pytest.raises(ObjectDamaged, match="symlink"):
        store.get_range("packs/ab/link.pack", 0, 1)


def test_delete_removes_a_link_never_its_target_nor_through_a_linked_directory(store):
    secret = _plant(store.root)
    store.delete(["packs/ab/link.pack"])
    assert not os.path.lexists(store.root / "packs" / "ab" / "link.pack")
    with pytest.raises(ObjectDamaged, match="not a directory|symlink"):
        store.delete(["packs/cd/secret"])
    assert secret.read_bytes() == b"s" * 10


def test_a_delete_over_many_directories_removes_them_all_but_never_through_a_linked_one(store):
    """Directories are emptied by several threads: every file named goes, from every directory,
    and a symlinked directory among them is refused as damage without touching its target."""
    names = [f"packs/{d:02x}/{i}.pack" for d in range(0, 40) for i in range(3)]
    names += [f"points/{i:04x}.point" for i in range(300)]  # one directory split among threads
    for name in names:
        store.put(name, b"p")
    store.delete(names + ["packs/ef/never-written.pack"])
    assert list(store.list("")) == []
    secret = _plant(store.root)
    for name in names:
        store.put(name, b"p")
    with pytest.raises(ObjectDamaged, match="not a directory|symlink"):
        store.delete(["packs/cd/secret"] + names)
    assert secret.read_bytes() == b"s" * 10


def test_a_file_truncated_after_a_read_is_a_short_read(store):
    store.put("packs/ab/t.pack", b"0123456789")
    assert store.get_range("packs/ab/t.pack", 0, 10) == b"0123456789"  # descriptor now cached
    os.truncate(store.root / "packs" / "ab" / "t.pack", 4)
    with pytest.raises(ShortRead, match="truncated"):
        store.get_range("packs/ab/t.pack", 0, 10)


def test_a_file_where_a_directory_belongs_means_the_object_is_missing(store):
    (store.root / "points").write_bytes(b"not a directory")
    with pytest.raises(ObjectMissing):
        store.get("points/1.point", limit=10)
    assert not store.exists("points/1.point")


def test_open_store_maps_locations(tmp_path, monkeypatch):
    local = open_store(str(tmp_path))
    assert isinstance(local, LocalStore) and local.root == tmp_path
    # not installed (also when another test imported it already)
    monkeypatch.setitem(sys.modules, "repo_engine.repository.store.s3", None)
    monkeypatch.delattr("repo_engine.repository.store.s3", raising=False)
    with pytest.raises(StoreError, match="S3 support is not installed") as caught:
        open_store("s3://bucket/prefix")
    assert "\n" not in str(caught.value) and "s3://bucket/prefix" in str(caught.value)


def test_restore_reads_each_coalesced_run_with_one_large_ranged_read(tmp_path, capsys,
                                                                     monkeypatch):
    """Restore goes through the store, and the planner's runs (`max_read`, a few MiB of one
    pack) reach it whole: 24 MiB of incompressible data come back in a few reads, not one per
    chunk."""
    repo = tmp_path / "repo"
    assert cli(capsys, "init", repo).code == 0
    model = DiskModel(tmp_path / "d.img", 24 * MIB, np.random.default_rng(5))
    model.write(0, model.rng.integers(0, 256, 24 * MIB, dtype=np.uint8).tobytes())
    assert cli(capsys, "backup", "image", repo, "--vm", "v", "--disk", f"d={model.path}").code == 0
    reads: list[tuple[str, int]] = []
    plain, into = LocalStore.get_range, LocalStore.get_range_into

    def counted(self, name, offset, length):
        reads.append((name, length))
        return plain(self, name, offset, length)

    def counted_into(self, name, offset, view):
        reads.append((name, len(view)))
        return into(self, name, offset, view)

    monkeypatch.setattr(LocalStore, "get_range", counted)
    monkeypatch.setattr(LocalStore, "get_range_into", counted_into)
    assert restore_bytes(capsys, repo, "v@latest", "d", tmp_path / "out.img") == \
        model.copy_of_content()
    assert reads and all(name.startswith("packs/") for name, _ in reads)
    assert sum(length for _, length in reads) >= 24 * MIB
    run = ReadSettings().max_read
    assert run >= 2 * MIB
    assert len(reads) <= 24 * MIB // run + 2 and max(length for _, length in reads) >= run, reads


def test_put_many_renames_nothing_before_every_file_is_durable(store, monkeypatch):
    """A batch fsyncs every temporary file before it renames any (so a crash leaves each
    object absent or whole), then fsyncs each directory once, after its renames."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        events.append(("dir" if os.path.isdir(path) else "file", path))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("rename", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    names = [f"maps/{d}/{i}.map" for d in ("aa", "bb") for i in range(5)]
    store.put_many([(name, name.encode()) for name in names])
    kinds = [kind for kind, _ in events]
    assert kinds == ["file"] * 10 + ["rename"] * 10 + ["dir"] * 2
    assert sorted(path for kind, path in events if kind == "dir") == \
        [str(store.root / "maps" / d) for d in ("aa", "bb")]


def test_put_many_failing_leaves_no_object_and_no_temporary_file(store, monkeypatch):
    """An fsync failing inside a batch: the error is raised, no object of the batch appears
    (none was renamed yet), and no temporary file is left behind."""
    real_fsync, calls = os.fsync, []

    def failing(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(errno.EIO, "Input/output error (injected)")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing)
    names = [f"maps/cc/{i}.map" for i in range(6)]
    with pytest.raises(OSError, match="injected"):
        store.put_many([(name, b"x" * 100) for name in names])
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert not any(store.exists(name) for name in names)
    assert os.listdir(store.root / "maps" / "cc") == []
