"""Restore from a repository on S3 (the test SeaweedFS server, tests/s3server.py, reached through
the fault proxy tests/s3proxy.py): several range GETs in flight, 503s and connection resets
mid-restore retried to a byte-identical image (or one line when they do not stop), and a
deleted or truncated pack object named as the point, the disk and the disk byte ranges hit."""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest

from repo_engine.errors import RepoError
from repo_engine.repository.config import RepoConfig, write_config
from repo_engine.repository.index import Index
from repo_engine.repository.repo import Repository
from repo_engine.repository.store.s3 import S3Store
from repo_engine.repository.store.s3_settings import S3Settings
from repo_engine.restore.plan import ReadSettings
from repo_engine.restore.restorer import RestoreDamaged, restore_disk
from restore_helpers import WatchedStore, backup_image, damage_pack, pack_of_block
from s3proxy import FaultProxy
from s3server import ACCESS_KEY, SECRET_KEY

KIB, MIB = 1 << 10, 1 << 20
DISK = 4 * MIB


@pytest.fixture
def proxy(seaweedfs):
    p = FaultProxy(seaweedfs.ports["s3.port"])
    yield p
    p.close()


class S3Repo:
    """A repository in a bucket of the test server; this host's index under `local`."""

    def __init__(self, tmp_path: Path, bucket: str, seaweedfs, proxy: FaultProxy) -> None:
        self.location, self.local = f"s3://{bucket}/repo", tmp_path / "local"
        self.direct, self.proxy = seaweedfs.endpoint, proxy
        self.config = RepoConfig.new(block_size=64 * KIB, pack_size=512 * KIB)
        (self.local / "locks").mkdir(parents=True)
        Index(self.local / "index", create=True).close()
        store = self.store()
        write_config(store, self.config)
        store.close()

    def store(self, *, through_proxy: bool = False, **changes) -> S3Store:
        endpoint = self.proxy.endpoint if through_proxy else self.direct
        return S3Store(self.location, S3Settings(
            endpoint=endpoint, access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY,
            backoff_base=0.01, backoff_cap=0.05, connect_timeout=2.0, read_timeout=10.0,
            **changes))

    def open(self, **watch) -> Repository:
        """The repository, its reads going through the fault proxy and watched."""
        settings = {k: watch.pop(k) for k in ("max_attempts",) if k in watch}
        return Repository(WatchedStore(self.store(through_proxy=True, **settings), **watch),
                          self.config, self.local)


@pytest.fixture
def s3_point(tmp_path, seaweedfs, s3_bucket, proxy, monkeypatch):
    """A 4 MiB disk (random data, a zero stretch) backed up into a bucket in 512 KiB packs."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # spooled packs under the test
    s3 = S3Repo(tmp_path, s3_bucket, seaweedfs, proxy)
    image = tmp_path / "a.img"
    data = bytearray(np.random.default_rng(11).integers(0, 256, DISK, dtype=np.uint8).tobytes())
    data[MIB:MIB + 256 * KIB] = bytes(256 * KIB)
    image.write_bytes(bytes(data))
    with Repository(s3.store(), s3.config, s3.local) as repo:
        point = backup_image(repo, "a", image)
    return s3, point, bytes(data)


def staged_left(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith(".")]


def test_restore_reads_several_objects_at_once(s3_point, tmp_path):
    """With the default settings (8 in flight), eight range GETs are outstanding together."""
    s3, point, data = s3_point
    with s3.open(gather=8) as repo:
        restore_disk(repo, point, "sda", tmp_path / "out.img")
        assert repo.store.most_outstanding == 8
        assert repo.store.most_held <= ReadSettings().memory
    assert (tmp_path / "out.img").read_bytes() == data


def test_restore_reads_each_pack_stretch_with_one_request(s3_point, tmp_path):
    """Every chunk of the point, in packs of 512 KiB: one GET per pack (of at most 64 MiB by
    default), whatever the size of the runs a worker holds at once."""
    s3, point, data = s3_point
    with s3.open() as repo:
        packs = {pack_of_block(repo, point, block) for block in range(DISK // (64 * KIB))
                 if data[block * 64 * KIB:(block + 1) * 64 * KIB].strip(b"\0")}
        for reads in (ReadSettings(), ReadSettings(max_read=64 * KIB)):
            calls = repo.store.calls
            restore_disk(repo, point, "sda", tmp_path / "out.img", reads=reads)
            assert repo.store.calls - calls == len(packs) > 1
            assert (tmp_path / "out.img").read_bytes() == data
            (tmp_path / "out.img").unlink()


@pytest.mark.parametrize("kind", ["503", "reset"])
def test_faults_mid_restore_are_retried(s3_point, tmp_path, kind):
    """Faults armed once the restore runs (arming also cuts the open connections, mid-answer):
    every request retries to success (4 faults, 6 attempts each)."""
    s3, point, data = s3_point
    with s3.open(gather=4, before_read=lambda n: n == 5 and s3.proxy.arm(kind, 4)) as repo:
        restore_disk(repo, point, "sda", tmp_path / "out.img",
                     reads=ReadSettings(in_flight=4, max_request=128 * KIB))
    assert s3.proxy.served == 4
    assert (tmp_path / "out.img").read_bytes() == data


def test_faults_that_do_not_stop_fail_in_one_line(s3_point, tmp_path):
    s3, point, _data = s3_point
    target = tmp_path / "out" / "a.img"
    target.parent.mkdir()
    with s3.open(max_attempts=3, before_read=lambda n: n == 3 and s3.proxy.arm("503", 10_000)
                 ) as repo, pytest.raises(RepoError) as raised:
        restore_disk(repo, point, "sda", target,
                     reads=ReadSettings(in_flight=4, max_request=128 * KIB))
    message = str(raised.value)
    assert raised.value.exit_code == 1 and "\n" not in message
    assert "kept failing (SlowDown, HTTP 503" in message and "3 attempts" in message
    assert not target.exists() and staged_left(target.parent) == []


@pytest.mark.parametrize("kind", ["delete", "truncate"])
def test_damaged_pack_object_names_point_disk_and_byte_ranges(s3_point, tmp_path, kind):
    s3, point, _data = s3_point
    with s3.open() as repo:
        victim = pack_of_block(repo, point, 40)
        lost = damage_pack(kind, repo, repo.store.inner, point, victim)
        with pytest.raises(RestoreDamaged) as raised:
            restore_disk(repo, point, "sda", tmp_path / "out.img",
                         reads=ReadSettings(max_request=128 * KIB))
    assert lost and raised.value.extents == lost
    message = str(raised.value)
    assert "\n" not in message and raised.value.exit_code == 3
    offset, length = lost[0]
    assert f"disk sda of point {point.id[:8]} (a@{point.time}) cannot be restored whole" in message
    assert f"at disk bytes [{offset}, {offset + length})" in message
    assert f"pack {victim} is {'missing' if kind == 'delete' else 'truncated'}" in message
    assert staged_left(tmp_path) == [] and not (tmp_path / "out.img").exists()


class MapsTogether(WatchedStore):
    """A watched store whose first `gather` map openings (`get_start` of maps/) each wait until
    that many are outstanding together: maps opened one after the other fail the restore
    (BrokenBarrierError) instead of passing by luck of the scheduler."""

    def __init__(self, inner, gather: int) -> None:
        super().__init__(inner)
        self.maps = 0
        self._maps_barrier, self._maps_gather = threading.Barrier(gather, timeout=10), gather

    def get_start(self, name: str, length: int) -> tuple[bytes, int]:
        if name.startswith("maps/"):
            with self._lock:
                self.maps += 1
                wait = self.maps <= self._maps_gather
            if wait:
                self._maps_barrier.wait()
        return self.inner.get_start(name, length)


def test_restore_opens_the_chains_maps_together(s3_point, tmp_path):
    """A point on top of two others: the three maps of its chain are asked for together, each a
    request on object storage, before the first pack request; the image is the point's."""
    s3, _point, data = s3_point
    changed = bytearray(data)
    with Repository(s3.store(), s3.config, s3.local) as repo:
        for day in (1, 2):
            changed[day * MIB:day * MIB + 64 * KIB] = bytes([day]) * (64 * KIB)
            (tmp_path / "a.img").write_bytes(bytes(changed))
            point = backup_image(repo, "a", tmp_path / "a.img")
        assert len(repo.chain(point, "sda")) == 3
    with Repository(MapsTogether(s3.store(), 3), s3.config, s3.local) as repo:
        restore_disk(repo, point, "sda", tmp_path / "out.img")
        assert repo.store.maps == 3  # each once: the windows of the first pass are kept
    assert (tmp_path / "out.img").read_bytes() == bytes(changed)


class RangesAsked(WatchedStore):
    """A watched store that lists every range read (object, offset, length) in the order they
    open."""

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.ranges: list[tuple[str, int, int]] = []

    def open_range(self, name: str, offset: int, length: int):
        self.ranges.append((name, offset, length))
        return super().open_range(name, offset, length)


@pytest.mark.parametrize("max_request", [ReadSettings().max_request, 192 * KIB])
def test_restore_asks_the_packs_with_the_longest_requests_first(s3_point, tmp_path,
                                                                max_request):
    """Requests of several sizes (packs cut short by the zero stretch and the disk's end, or
    cut into several requests): the packs whose longest request is longer go first, so that
    those that end the restore are short; a pack's requests one after the other, in offset
    order (the first one, at the pack's start, reads what the others need of it)."""
    s3, point, data = s3_point
    with Repository(RangesAsked(s3.store()), s3.config, s3.local) as repo:
        restore_disk(repo, point, "sda", tmp_path / "out.img",
                     reads=ReadSettings(in_flight=1, max_request=max_request))
        ranges = repo.store.ranges
    packs = [name for k, (name, _, _) in enumerate(ranges) if not k or ranges[k - 1][0] != name]
    assert len(packs) == len(set(packs)) > 1  # each pack's requests together
    longest = [max(n for name, _, n in ranges if name == pack) for pack in packs]
    assert longest == sorted(longest, reverse=True)
    assert len(set(longest)) > 1 or max_request < 512 * KIB  # (cut: each pack's longest alike)
    for pack in packs:
        offsets = [offset for name, offset, _ in ranges if name == pack]
        assert offsets == sorted(offsets)
    assert (tmp_path / "out.img").read_bytes() == data
