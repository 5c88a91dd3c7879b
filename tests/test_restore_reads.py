"""How a restore reads packs: coalesced requests, several in flight, the bytes held bounded by a
cap whatever the disk's size, and a missing, truncated or damaged pack reported as the point,
the disk and the disk byte ranges it costs (exit 3, one line), after the restore read all it
could. On a directory store here; tests/test_restore_s3.py does the same on S3."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest
import vddk_ext

from helpers import KIB, MIB, DiskModel, cli, resident_pages, write_extents
from repo_engine.errors import DamageError, UsageError
from repo_engine.repository.blockmap import map_object
from repo_engine.repository.config import read_config
from repo_engine.repository.index_records import LOCATION_DTYPE
from repo_engine.repository.repo import Repository
from repo_engine.repository.store.local import LocalStore
from repo_engine.restore.plan import ReadSettings, read_requests
from repo_engine.restore import restorer
from repo_engine.restore.restorer import RestoreDamaged, restore_disk, restore_to_device
from restore_helpers import WatchedStore, backup_image, damage_pack, pack_of_block

BS = 16 * KIB


def random_locations(rng: np.random.Generator, count: int) -> np.ndarray:
    """Chunks of a few packs, sorted by (pack, offset), with gaps of every size between them."""
    rows = np.zeros(count, dtype=LOCATION_DTYPE)
    rows["pack"] = np.sort(rng.integers(0, 4, count))
    rows["stored"] = rng.integers(1, 300 * KIB, count)
    gaps = rng.choice([0, 10, 100 * KIB, 300 * KIB, 2 * MIB], count)
    for pack in range(4):
        mine = rows["pack"] == pack
        ends = np.cumsum(rows["stored"][mine] + gaps[mine])
        rows["offset"][mine] = ends - rows["stored"][mine]
    return rows


def first_after(chunks: np.ndarray, start: int) -> int:
    """The span from `start` to the end of the first of `chunks`."""
    return int(chunks["offset"][0]) + int(chunks["stored"][0]) - start


@pytest.mark.parametrize("settings", [
    ReadSettings(), ReadSettings(max_request=512 * KIB), ReadSettings(max_read=512 * KIB),
    ReadSettings(max_request=MIB, max_read=100 * KIB, max_gap=0, memory=MIB)])
def test_requests_and_runs_coalesce_within_a_pack_up_to_the_gap_and_their_sizes(settings):
    """A request: chunks of one pack, no gap over max_gap, at most max_request bytes; cut into
    runs of at most max_read bytes; a new request or run only where one of these says so."""
    rng = np.random.default_rng(5)
    locations = random_locations(rng, 3000)
    requests = read_requests(locations, settings)
    runs = [run for request in requests for run in request.runs]
    assert [run.first_chunk for run in runs] == list(
        np.cumsum([0] + [len(r.chunks) for r in runs])[:-1])
    assert sum(len(r.chunks) for r in runs) == len(locations)
    for request, after in zip(requests, requests[1:] + [None]):
        c = np.concatenate([run.chunks for run in request.runs])
        ends = c["offset"].astype(np.int64) + c["stored"]
        assert (c["pack"] == request.pack).all()
        assert (request.start, request.start + request.size) == (c["offset"][0], ends[-1])
        assert np.all(c["offset"][1:] - ends[:-1] <= settings.max_gap)
        assert request.size <= settings.max_request or len(c) == 1
        assert request.held == max(run.size for run in request.runs)
        for run, next_run in zip(request.runs, request.runs[1:] + [None]):
            run_ends = run.chunks["offset"].astype(np.int64) + run.chunks["stored"]
            assert (run.start, run.end) == (run.chunks["offset"][0], run_ends[-1])
            assert run.size <= settings.max_read or len(run.chunks) == 1
            if next_run is not None:
                assert first_after(next_run.chunks, run.start) > settings.max_read
        if after is not None and after.pack == request.pack:
            gap = after.start - (request.start + request.size)
            joined = first_after(after.runs[0].chunks, request.start)
            assert gap > settings.max_gap or joined > settings.max_request


def test_settings_are_checked():
    with pytest.raises(UsageError, match="memory cap"):
        ReadSettings(max_read=16 * MIB, memory=8 * MIB)
    with pytest.raises(UsageError, match="in_flight"):
        ReadSettings(in_flight=0)


@pytest.fixture
def two_points(tmp_path, capsys):
    """2 MiB of random data in 16 KiB blocks and 128 KiB packs; the second point changes six
    blocks apart from each other (their new chunks share one pack)."""
    path = tmp_path / "repo"
    assert cli(capsys, "init", path, "--block-size", "16KiB", "--pack-size", "128KiB").code == 0
    rng = np.random.default_rng(7)
    model = DiskModel(tmp_path / "a.img", 2 * MIB, rng)
    model.write(0, rng.integers(0, 256, 2 * MIB, dtype=np.uint8).tobytes())
    with Repository.open(path) as repo:
        first = backup_image(repo, "a", model.path)
        changed = [[b * BS, BS] for b in range(3, 120, 20)]
        for offset, length in changed:
            model.write(offset, rng.integers(0, 256, length, dtype=np.uint8).tobytes())
        second = backup_image(repo, "a", model.path, write_extents(tmp_path / "c.json", changed))
    return path, model, first, second


def watched(path, **watch) -> Repository:
    store = LocalStore(path)
    return Repository(WatchedStore(store, **watch), read_config(store), path)


def test_several_reads_in_flight(two_points, tmp_path):
    path, model, _first, second = two_points
    with watched(path, gather=4) as repo:
        restore_disk(repo, second, "sda", tmp_path / "out.img",
                     reads=ReadSettings(in_flight=4, max_request=64 * KIB))
        assert repo.store.most_outstanding == 4
    assert (tmp_path / "out.img").read_bytes() == bytes(model.content)


def test_restored_image_bypasses_the_page_cache(two_points, tmp_path):
    """A new image is written past the page cache (its chunks decoded into aligned buffers,
    each run of blocks one write straight from there): none of it is cached afterwards, and
    it is the point's image."""
    path, model, _first, second = two_points
    with Repository.open(path) as repo:
        restore_disk(repo, second, "sda", tmp_path / "out.img")
    assert resident_pages(tmp_path / "out.img") == 0
    assert (tmp_path / "out.img").read_bytes() == bytes(model.content)


@pytest.mark.parametrize("decoders", [1, 2])
def test_requests_in_flight_are_decoded_a_few_at_a_time(many_packs, tmp_path, decoders):
    """Six requests outstanding at once, yet no more than `decoders` runs decoded at once
    (decoding is CPU work: more threads at it than cores only contend for the GIL)."""
    path, model, point = many_packs
    decoding, most, lock = [0], [0], threading.Lock()
    with watched(path, gather=6) as repo:
        real = repo.codec.decoder

        def decoder() -> Callable[..., object]:
            decode_one = real()

            def decode(*args: object) -> object:
                with lock:
                    decoding[0] += 1
                    most[0] = max(most[0], decoding[0])
                try:
                    time.sleep(0.002)  # time for the other workers to come in, if they may
                    return decode_one(*args)
                finally:
                    with lock:
                        decoding[0] -= 1
            return decode

        repo.codec.decoder = decoder
        restore_disk(repo, point, "sda", tmp_path / "out.img",
                     reads=ReadSettings(in_flight=6, max_request=256 * KIB, decoders=decoders))
        assert repo.store.most_outstanding >= 6
    assert most[0] == decoders
    assert (tmp_path / "out.img").read_bytes() == bytes(model.content)


@pytest.mark.parametrize("size", [1 * MIB, 8 * MIB])
def test_bytes_held_stay_under_the_cap_whatever_the_disk_size(tmp_path, size):
    """Runs of up to 128 KiB, 8 workers, a cap of three full runs: three reads are in flight
    at once (the store holds the first three until they are), and the bytes read and not yet
    written (as the store sees them freed) never pass the cap."""
    rng = np.random.default_rng(size)
    model = DiskModel(tmp_path / "a.img", size, rng)
    model.write(0, rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    cap = 3 * 128 * KIB
    with Repository.init(tmp_path / "repo", block_size=BS, pack_size=256 * KIB) as repo:
        point = backup_image(repo, "a", model.path)
    with watched(tmp_path / "repo", gather=3) as repo:
        restore_disk(repo, point, "sda", tmp_path / "out.img",
                     reads=ReadSettings(in_flight=8, max_request=128 * KIB, memory=cap))
        assert repo.store.most_outstanding >= 3  # (more when some runs are short)
        assert 0 < repo.store.most_held <= cap
        assert repo.store.held == 0
    assert (tmp_path / "out.img").read_bytes() == bytes(model.content)


def test_blocks_planned_a_slice_at_a_time_restore_whole(two_points, tmp_path):
    path, model, _first, second = two_points
    with Repository.open(path) as repo:
        summary = restore_disk(repo, second, "sda", tmp_path / "out.img",
                               reads=ReadSettings(plan_blocks=5))
    assert (tmp_path / "out.img").read_bytes() == bytes(model.content)
    assert summary.blocks_written == model.capacity // BS


class MapReads:
    """A store that counts the reads of each block map object."""

    READS = ("get", "get_start", "get_range", "open_range")

    def __init__(self, inner) -> None:
        self.inner, self.reads = inner, Counter()

    def __getattr__(self, name: str):
        method = getattr(self.inner, name)
        if name not in self.READS:
            return method

        def counted(key: str, *args, **kwargs):
            if key.startswith("maps/"):
                self.reads[key] += 1
            return method(key, *args, **kwargs)
        return counted


def test_the_maps_of_a_small_disk_are_read_once(two_points, tmp_path):
    """A restore passes over the maps twice (the bytes to write, then the writes): the windows
    of the first pass are kept when they are small, not read from the store again."""
    path, model, _first, second = two_points
    store = LocalStore(path)
    with Repository(MapReads(store), read_config(store), path) as repo:
        list(repo.resolve_windows(second, "sda"))
        once, repo.store.reads = repo.store.reads, Counter()
        restore_disk(repo, second, "sda", tmp_path / "out.img")
        assert len(once) == 2 and repo.store.reads == once
    assert (tmp_path / "out.img").read_bytes() == bytes(model.content)


@pytest.mark.parametrize("kind", ["delete", "truncate", "flip"])
def test_damaged_pack_names_point_disk_and_byte_ranges(two_points, tmp_path, capsys, kind):
    path, model, first, second = two_points
    with Repository.open(path) as repo:
        victim = pack_of_block(repo, second, 3)
        lost = damage_pack(kind, repo, repo.store, second, victim)
        assert lost and (kind == "flip" or len(lost) > 1)
        # ranges across slices too; short requests, and long ones read in short runs
        for plan_blocks in (ReadSettings().plan_blocks, 5):
            for reads in (ReadSettings(max_request=64 * KIB, plan_blocks=plan_blocks),
                          ReadSettings(max_read=32 * KIB, plan_blocks=plan_blocks)):
                with pytest.raises(RestoreDamaged) as raised:
                    restore_disk(repo, second, "sda", tmp_path / "out.img", reads=reads)
                assert raised.value.extents == lost
        assert (raised.value.point, raised.value.disk) == (second.id, "sda")
    assert not (tmp_path / "out.img").exists()

    result = cli(capsys, "restore", path, second.id[:12], "--disk", "sda",
                 "--to", tmp_path / "out.img")
    assert result.code == 3
    line = result.err.strip()
    assert "\n" not in line and "Traceback" not in line
    ranges = ", ".join(f"[{o}, {o + n})" for o, n in lost[:4])
    more = f" and {len(lost) - 4} more" if len(lost) > 4 else ""
    assert f"disk sda of point {second.id[:8]} (a@{second.time}) cannot be restored whole" in line
    assert f"in {len(lost)} byte range" in line and f"at disk bytes {ranges}{more} (" in line
    assert {"delete": f"pack {victim} is missing", "truncate": f"pack {victim} is truncated",
            "flip": f"pack {victim} chunk ref"}[kind] in line
    assert "scrub --repair" in line
    # the first point does not use the damaged pack: it restores whole
    assert cli(capsys, "restore", path, first.id[:12], "--disk", "sda", "--to",
               tmp_path / "first.img").code == 0


def test_missing_block_map_names_point_and_disk(two_points, tmp_path, capsys):
    path, _model, first, second = two_points
    name = second.disk("sda").map
    with Repository.open(path) as repo:
        repo.store.delete([map_object(name)])
    result = cli(capsys, "restore", path, second.id[:12], "--disk", "sda",
                 "--to", tmp_path / "out.img")
    line = result.err.strip()
    assert result.code == 3 and "\n" not in line
    assert f"{name}.map is missing" in line
    assert f"disk sda of point {second.id[:8]} cannot be restored whole" in line
    assert cli(capsys, "restore", path, first.id[:12], "--disk", "sda",
               "--to", tmp_path / "out.img").code == 0


def test_damaged_block_map_stops_a_device_restore_before_any_write(two_points, tmp_path):
    """A map that turns out damaged past its first bytes (its last bytes flipped: the
    checksum, checked at its end) is found before the first block is written, also on a
    device with no progress asked, and named once."""
    path, model, _first, second = two_points
    name = second.disk("sda").map
    with Repository.open(path) as repo:
        object_path = path / map_object(name)
        data = bytearray(object_path.read_bytes())
        data[-1] ^= 1
        object_path.write_bytes(bytes(data))
        target = tmp_path / "device.img"
        target.write_bytes(b"\xaa" * model.capacity)
        with vddk_ext.open_local(str(target), writable=True) as device, \
                pytest.raises(DamageError) as caught:
            restore_to_device(repo, second, "sda", device)
    assert str(caught.value).count("cannot be restored whole") == 1, caught.value
    assert "checksum" in str(caught.value) or "does not match its name" in str(caught.value)
    assert target.read_bytes() == b"\xaa" * model.capacity


def test_damage_leaves_every_other_block_written_on_a_device(two_points, tmp_path):
    """A device (or --onto) target is written in place: the restore goes on past the damaged
    pack and every block outside the ranges it names holds the point's content."""
    path, model, _first, second = two_points
    target = tmp_path / "device.img"
    target.write_bytes(b"\xaa" * model.capacity)
    with Repository.open(path) as repo:
        lost = damage_pack("delete", repo, repo.store, second, pack_of_block(repo, second, 40))
        with vddk_ext.open_local(str(target), writable=True) as device, \
                pytest.raises(RestoreDamaged) as raised:
            restore_to_device(repo, second, "sda", device,
                              reads=ReadSettings(max_request=64 * KIB, plan_blocks=7))
    assert raised.value.extents == lost
    got = np.frombuffer(target.read_bytes(), dtype=np.uint8)
    want = np.frombuffer(bytes(model.content), dtype=np.uint8)
    unwritten = np.zeros(len(got), dtype=bool)
    for offset, length in lost:
        unwritten[offset:offset + length] = True
    assert (got[unwritten] == 0xAA).all()
    assert (got[~unwritten] == want[~unwritten]).all()


@pytest.fixture
def many_packs(tmp_path):
    """8 MiB in 16 KiB blocks over some thirty 256 KiB packs: random, compressible and zero
    stretches, and blocks repeated far apart (one chunk, several blocks)."""
    rng = np.random.default_rng(23)
    model = DiskModel(tmp_path / "a.img", 8 * MIB + 5000, rng)  # a short last block too
    for offset in range(0, model.capacity, 256 * KIB):
        model.write(offset, model.random_data(min(256 * KIB, model.capacity - offset)))
    repeated = rng.integers(0, 256, BS, dtype=np.uint8).tobytes()
    for block in (1, 100, 333, 480):
        model.write(block * BS, repeated)
    with Repository.init(tmp_path / "repo", block_size=BS, pack_size=256 * KIB) as repo:
        point = backup_image(repo, "a", model.path)
    return tmp_path / "repo", model, point


def _write_queue_settings() -> list[ReadSettings]:
    return [ReadSettings(), ReadSettings(write_queue=1, in_flight=8, max_request=64 * KIB),
            ReadSettings(write_queue=64 * KIB, in_flight=3, max_request=128 * KIB,
                         plan_blocks=100),
            ReadSettings(write_queue=64 * KIB, in_flight=3, max_read=48 * KIB)]


@pytest.mark.parametrize("settings", _write_queue_settings())
def test_many_packs_restore_whole_through_the_write_queue(many_packs, tmp_path, settings):
    path, model, point = many_packs
    with Repository.open(path) as repo:
        summary = restore_disk(repo, point, "sda", tmp_path / "out.img", reads=settings)
    assert (tmp_path / "out.img").read_bytes() == bytes(model.content)
    content = np.frombuffer(bytes(model.content) + bytes(-model.capacity % BS), dtype=np.uint8)
    assert summary.blocks_written == np.count_nonzero(content.reshape(-1, BS).any(axis=1))
    assert summary.chunks_read < summary.blocks_written  # the repeated block: one chunk


@pytest.mark.parametrize("settings", _write_queue_settings())
@pytest.mark.parametrize("kind", ["delete", "flip"])
def test_damage_among_many_packs_names_exactly_its_ranges(many_packs, tmp_path, settings, kind):
    """Damage in a pack in the middle of the restore, whatever is queued for the writer at the
    time: the error names exactly the byte ranges of the chunks lost (every block of a chunk
    that fills several), and no image is left."""
    path, model, point = many_packs
    with Repository.open(path) as repo:
        refs = repo.resolve(point, "sda")
        lost = damage_pack(kind, repo, repo.store, point, pack_of_block(repo, point, 333))
        with pytest.raises(RestoreDamaged) as raised:
            restore_disk(repo, point, "sda", tmp_path / "out.img", reads=settings)
    assert raised.value.extents == lost
    shared = np.flatnonzero(refs == refs[333])
    assert len(shared) > 1
    if kind == "delete":  # a lost chunk is lost at each of its blocks
        assert all(any(o <= b * BS < o + n for o, n in lost) for b in shared)
    assert list(tmp_path.glob("*out.img*")) == []


class FailingDisk:
    """A local disk whose `fail_at`-th batch write fails as a full disk would."""

    def __init__(self, disk: vddk_ext.Disk, fail_at: int) -> None:
        self.disk, self.fail_at, self.calls = disk, fail_at, 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.disk, name)

    def write_chunks(self, *args: object) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            raise vddk_ext.DiskError(28, f"cannot write to {self.disk.path}: no space left")
        self.disk.write_chunks(*args)


@pytest.mark.parametrize("fail_at", [1, 5])
def test_a_failed_write_stops_the_restore_with_its_error(many_packs, tmp_path, fail_at):
    """The writer's failure reaches the restore (no hang, no success); nothing of the restore
    keeps running after it returns."""
    path, _model, point = many_packs
    before = threading.active_count()
    with Repository.open(path) as repo, \
            vddk_ext.open_local(str(tmp_path / "t.img"), writable=True,
                                create_size=point.disk("sda").capacity) as disk:
        failing = FailingDisk(disk, fail_at)
        with pytest.raises(vddk_ext.DiskError, match="no space left"):
            restore_to_device(repo, point, "sda", failing, fresh=True,
                              reads=ReadSettings(write_queue=1, max_request=64 * KIB))
    deadline = time.monotonic() + 30
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before


@pytest.mark.parametrize("direct", [False, True])
def test_decoded_bytes_queued_for_the_writer_stay_under_their_cap(many_packs, tmp_path,
                                                                   monkeypatch, direct):
    """A slow target and a wide read window (64 MiB): the workers decode far ahead of the
    writers, yet the checked chunks handed over and not written never pass `write_queue`,
    plus, on a target written past the page cache, the batch each writer thread after the
    first holds (those threads do not shorten the queue of batches waiting)."""
    path, model, point = many_packs
    most: dict[int, int] = {}

    class Watched(restorer._Budget):
        def take(self, nbytes: int) -> None:
            super().take(nbytes)
            most[self.cap] = max(most.get(self.cap, 0), self.used)

    writers = restorer.DIRECT_WRITERS if direct else 1
    cap = (1 if direct else 3) * restorer.WRITE_BATCH  # direct: all 8 MiB would fit in 3
    whole = cap + (writers - 1) * restorer.WRITE_BATCH
    # (direct: more than the one writer's cap is held, as the writers' own batches are)
    least = cap if direct else whole - restorer.WRITE_BATCH

    class SlowDisk(FailingDisk):
        def write_chunks(self, *args: object) -> None:
            # the writers wait for the workers to fill the queue (or for a while: a queue that
            # never fills fails below), whatever the machine's load makes of their pace
            deadline = time.monotonic() + 10
            while most.get(whole, 0) <= least and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(0.01 * writers)  # as slow together as one writer
            self.disk.write_chunks(*args)

        def reopen(self) -> "SlowDisk":
            return SlowDisk(self.disk.reopen(), 0)

    monkeypatch.setattr(restorer, "_Budget", Watched)
    settings = ReadSettings(write_queue=cap, memory=64 * MIB, max_request=4 * MIB)
    with Repository.open(path) as repo, \
            vddk_ext.open_local(str(tmp_path / "t.img"), writable=True,
                                create_size=model.capacity, direct=direct) as disk:
        assert disk.direct == direct
        restore_to_device(repo, point, "sda", SlowDisk(disk, 0), fresh=True, reads=settings)
    assert (tmp_path / "t.img").read_bytes() == bytes(model.content)
    assert least < most[whole] <= whole


def test_a_chunk_decoded_into_a_slot_is_checked_as_one_decoded_alone():
    """`ChunkCodec.decode(..., into)` gives the same bytes, in the slot, and refuses the same
    damage (a flipped byte, a frame of another length, a raw chunk of another length) as a
    decode into a buffer of its own."""
    from repo_engine.repository.chunks import ChunkCodec
    from repo_engine.repository.packs import CODEC_RAW, CODEC_ZSTD

    codec = ChunkCodec(b"k" * 32, 1)
    rng = np.random.default_rng(4)
    text = rng.integers(0, 4, 50_000, dtype=np.uint8).tobytes() + bytes(15_536)
    noise = rng.integers(0, 256, 65_536, dtype=np.uint8).tobytes()
    slot = memoryview(bytearray(65_536))
    for raw in (text, noise):
        blob, kind = codec.encode(raw)
        assert kind == (CODEC_ZSTD if raw is text else CODEC_RAW)
        chunk_id = codec.chunk_id(raw)
        got = codec.decode(blob, kind, len(raw), chunk_id, "c", slot)
        assert isinstance(got, memoryview) and bytes(got) == raw == bytes(slot[:len(raw)])
        damaged = bytearray(blob)
        damaged[len(damaged) // 2] ^= 1
        bad = [(bytes(damaged), len(raw)), (blob, len(raw) - 1)]
        if kind == CODEC_ZSTD:
            bad.append((codec.encode(raw[:-1])[0], len(raw)))
        for blob_, raw_len in bad:
            for into in (None, slot):
                with pytest.raises(DamageError, match="^c: chunk"):
                    codec.decode(blob_, kind, raw_len, chunk_id, "c", into)


@pytest.mark.parametrize("claimed", [65_537, 1 << 40, (1 << 64) - 3])
def test_a_frame_claiming_more_than_its_chunk_is_damage_not_an_allocation(claimed):
    """zstd allocates the content size a frame's header claims: a damaged one claiming a
    terabyte is refused as damage before that, the same with a slot as without."""
    import struct

    from repo_engine.repository.chunks import ChunkCodec
    from repo_engine.repository.packs import CODEC_ZSTD

    codec = ChunkCodec(b"k" * 32, 1)
    raw = bytes(range(256)) * 256
    blob, kind = codec.encode(raw)
    assert kind == CODEC_ZSTD and blob[4] & 0x20  # one segment: the content size follows
    # the header rewritten to claim `claimed` bytes in an 8-byte content size field
    width = (1, 2, 4, 8)[blob[4] >> 6]
    forged = blob[:4] + bytes([blob[4] | 0xC0]) + struct.pack("<Q", claimed) + \
        blob[5 + width:]
    for into in (None, memoryview(bytearray(len(raw)))):
        with pytest.raises(DamageError,
                           match=f"^c: chunk does not decompress \\(frame claims {claimed} "):
            codec.decode(forged, kind, len(raw), codec.chunk_id(raw), "c", into)


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("capacity", [MIB + 1000, MIB + 4096 + 512, MIB])
def test_a_device_larger_than_the_disk_gets_the_disk_and_keeps_the_rest(tmp_path, direct,
                                                                        capacity):
    """A device (a LUN) larger than the disk: the disk's last block, short when the disk's
    size is not a multiple of the block size, is written as the disk's bytes (not refused as
    shorter than the device's block there), and nothing past the disk's end is written."""
    rng = np.random.default_rng(capacity)
    model = DiskModel(tmp_path / "a.img", capacity, rng)
    model.write(0, rng.integers(0, 256, capacity, dtype=np.uint8).tobytes())
    model.write(BS, bytes(2 * BS))  # zero blocks too
    with Repository.init(tmp_path / "repo", block_size=BS, pack_size=256 * KIB) as repo:
        point = backup_image(repo, "a", model.path)
    target = tmp_path / "device.img"
    target.write_bytes(b"\xaa" * (capacity + 3 * BS))
    with Repository.open(tmp_path / "repo") as repo, \
            vddk_ext.open_local(str(target), writable=True, direct=direct) as device:
        restore_to_device(repo, point, "sda", device)
    got = target.read_bytes()
    assert got[:capacity] == bytes(model.content)
    assert got[capacity:] == b"\xaa" * (3 * BS)
