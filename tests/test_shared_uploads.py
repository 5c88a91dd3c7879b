"""A backup publishes its packs from several upload threads (backup/chunk_writer.py): the packs
overlap in flight, at most UPLOADS at once and UPLOADS + 1 spool files; each pack is indexed only
once it is durable in the store (INDEX_BATCH packs a commit, so a shared repository writes
fewer journal entries), the point only once every pack is; an upload failing midway
fails the backup with one line, stores no point, and gc removes what it left. Run against the
real SeaweedFS server (tests/s3server.py) and a local repository alike."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from helpers import MIB, DiskModel
from repo_engine.backup.chunk_writer import INDEX_BATCH, UPLOADS, ChunkWriter
from repo_engine.repository.packs import PackWriter, pack_object
from repo_engine.repository.repo import Repository
from repo_engine.repository.store import StoreError
from repo_engine.repository.store.local import LocalStore
from repo_engine.repository.store.s3 import S3Store
from s3cli import (Leftovers, assert_one_line_error, bucket_objects, in_process, leftovers,
                   s3_environment)
from s3proxy import FaultProxy
from s3server import new_bucket

DISK = 6 * MIB
PACKS = "128KiB"  # dozens of packs per backup
HOLD = 30.0  # seconds an upload waits for the others before it gives up waiting


@dataclass
class Uploads:
    """Watches every pack upload of a backup: holds the first ones until the pack writer has
    filled every upload slot (the spool then holds UPLOADS + 1 files), and checks the write
    order at each index commit and at the point's commit."""

    spool_seen: int = 0  # most spool files at once
    in_flight: int = 0
    most_in_flight: int = 0
    published: set[str] = field(default_factory=set)
    indexed: list[str] = field(default_factory=list)
    commits: int = 0
    points: int = 0
    fail_at: int = 0  # the n-th pack upload fails (0: none does)
    started: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    full: threading.Event = field(default_factory=threading.Event)

    def watch_spool(self, spool: Path) -> None:
        with self.lock:
            files = len(list(spool.iterdir()))
            self.spool_seen = max(self.spool_seen, files)
            if files >= UPLOADS + 1:
                self.full.set()

    def upload(self, put_file, store, name: str, path: Path, **kw) -> None:
        if not name.startswith("packs/"):
            return put_file(store, name, path, **kw)
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            self.started += 1
            number = self.started
        try:
            self.watch_spool(path.parent)
            if not self.full.wait(HOLD):  # the pack writer goes on while the first ones wait
                self.full.set()  # it never filled the slots: hold no upload after this one
            if number == self.fail_at:
                raise StoreError(f"{store.location}: put {name}: the server kept failing")
            put_file(store, name, path, **kw)
            with self.lock:
                self.published.add(name)
        finally:
            with self.lock:
                self.in_flight -= 1

    def index(self, index_packs, repo: Repository, packs) -> None:
        for pack in packs:  # durable before indexed
            assert repo.store.exists(pack_object(pack.name)), pack.name
        index_packs(repo, packs)
        self.indexed += [pack_object(p.name) for p in packs]
        self.commits += 1

    def commit_point(self, commit_point, repo: Repository, point, maps=None) -> None:
        with self.lock:  # every pack durable and indexed, no upload running
            assert self.in_flight == 0 and self.published == set(self.indexed)
        self.points += 1
        commit_point(repo, point, maps)


@pytest.fixture
def uploads(monkeypatch) -> Uploads:
    watch = Uploads()
    for store in (S3Store, LocalStore):
        put_file = store.put_file
        monkeypatch.setattr(store, "put_file", lambda self, name, path, _put=put_file, **kw:
                            watch.upload(_put, self, name, path, **kw))
    index_packs, commit_point = Repository.index_packs, Repository.commit_point
    pack_writer = Repository.pack_writer

    def new_pack_writer(repo: Repository):
        writer = pack_writer(repo)
        watch.watch_spool(repo.store.spool_dir())
        return writer
    monkeypatch.setattr(Repository, "pack_writer", new_pack_writer)
    monkeypatch.setattr(Repository, "index_packs",
                        lambda repo, packs: watch.index(index_packs, repo, packs))
    monkeypatch.setattr(Repository, "commit_point", lambda repo, point, maps=None:
                        watch.commit_point(commit_point, repo, point, maps))
    return watch


@pytest.fixture(params=["s3", "local"])
def repo(request, seaweedfs, tmp_path, monkeypatch) -> str:
    if request.param == "s3":
        s3_environment(monkeypatch, tmp_path, seaweedfs.endpoint)
        location = f"s3://{new_bucket(seaweedfs)}/repo"
    else:
        location = str(tmp_path / "repo")
    assert in_process("init", location, "--no-encryption", "--pack-size", PACKS).code == 0
    return location


@pytest.fixture
def model(tmp_path) -> DiskModel:
    m = DiskModel(tmp_path / "d.img", DISK, np.random.default_rng(11))
    m.write(0, m.rng.integers(0, 256, DISK, dtype=np.uint8).tobytes())  # no chunk repeats
    return m


def backup(repo: str, model: DiskModel):
    return in_process("backup", "image", repo, "--vm", "v", "--disk", f"d={model.path}",
                      "--json")


def restored(repo: str, point: str, target: Path) -> bytes:
    result = in_process("restore", repo, point, "--disk", "d", "--to", target)
    assert result.code == 0, result.err
    return target.read_bytes()


def test_packs_upload_in_parallel_bounded_and_indexed_once_durable(repo, model, uploads,
                                                                   tmp_path):
    result = backup(repo, model)
    assert result.code == 0, result.err
    assert uploads.full.is_set(), "the pack writer never filled every upload slot"
    assert uploads.most_in_flight == UPLOADS  # several at once, never more
    assert uploads.spool_seen == UPLOADS + 1  # those and the pack being written
    assert uploads.points == 1 and len(uploads.published) > 2 * UPLOADS
    assert sorted(uploads.published) == sorted(uploads.indexed)  # each once
    # every commit but the last (at the flush) takes at least INDEX_BATCH packs
    assert uploads.commits <= len(uploads.published) // INDEX_BATCH + 1
    point = result.json()["point"]["id"]
    assert restored(repo, point, tmp_path / "out.img") == model.copy_of_content()


def test_an_upload_failing_midway_stores_nothing_gc_does_not_remove(repo, model, uploads,
                                                                      tmp_path):
    """A pack's upload fails while others are in flight: they finish (and may be indexed),
    the backup fails with one line, no point is stored, the spool is left empty, and
    gc removes every pack the backup left."""
    uploads.fail_at = UPLOADS + 1
    err = assert_one_line_error(backup(repo, model))
    assert "the server kept failing" in err and "no restore point was stored" in err, err
    assert uploads.points == 0 and uploads.published
    assert in_process("points", repo, "--json").json()["points"] == []
    if not repo.startswith("s3://"):  # an S3 store's spool is a directory of its own, gone
        assert list((Path(repo) / "tmp").iterdir()) == []  # no spool file left
    assert in_process("gc", repo, "--grace", "0s").code == 0
    assert leftovers(repo, tmp_path / "check") == Leftovers([], [], [])
    # the next backup's write order is checked on its own packs: the failed one's packs that
    # finished after the failure were published and never indexed
    uploads.fail_at = 0
    uploads.published.clear()
    uploads.indexed.clear()
    result = backup(repo, model)
    assert result.code == 0, result.err
    assert restored(repo, result.json()["point"]["id"], tmp_path / "out.img") == \
        model.copy_of_content()


def test_the_last_pack_uploads_while_the_map_is_written(repo, tmp_path, monkeypatch):
    """A backup hands its last, partly filled pack to the uploads before it writes the disk's
    block map (the two overlap): when the map is written, every chunk stored is in a sealed
    pack (waited for a while: the pack writer seals in a thread of its own)."""
    model = DiskModel(tmp_path / "odd.img", DISK + 64 * 1024, np.random.default_rng(12))
    model.write(0, model.rng.integers(0, 256, model.capacity, dtype=np.uint8).tobytes())
    added, sealed, seen = [0], [0], []
    add, seal, write_map = ChunkWriter.add, PackWriter.seal, Repository.write_map

    def counted_add(writer, *chunk):
        added[0] += 1
        return add(writer, *chunk)

    def counted_seal(writer):
        sealed[0] += len(writer.entries)
        return seal(writer)

    def watched_write_map(repository, bmap):
        deadline = time.monotonic() + 10
        while sealed[0] < added[0] and time.monotonic() < deadline:
            time.sleep(0.01)
        seen.append((sealed[0], added[0]))
        return write_map(repository, bmap)
    monkeypatch.setattr(ChunkWriter, "add", counted_add)
    monkeypatch.setattr(PackWriter, "seal", counted_seal)
    monkeypatch.setattr(Repository, "write_map", watched_write_map)
    result = backup(repo, model)
    assert result.code == 0, result.err
    assert added[0] > 0 and seen == [(added[0], added[0])]
