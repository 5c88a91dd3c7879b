"""The packs of an encrypted repository: chunks sealed, backed up and restored byte-identical,
repacked, scrubbed (with and without the key), verified and rebuilt; every flipped bit, every
swap of two chunks or two packs, a truncated pack and a pack of another repository refused as
damage (exit code 3) naming the pack; the stored bytes hold no chunk id, ref or plaintext."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import numpy as np
import pytest

from repo_engine.errors import RepoError, TamperedError
from repo_engine.maintenance.forget import forget_points
from repo_engine.maintenance.gc import gc
from repo_engine.maintenance.rebuild import rebuild_cache
from repo_engine.maintenance.scrub import scrub
from repo_engine.maintenance.stored_scrub import scrub_stored
from repo_engine.maintenance.verify import verify
from repo_engine.repository.blockmap import read_map
from repo_engine.repository.location import init_repository, open_repository, open_stored
from repo_engine.repository.crypto.null import PART_HEADER_SIZE
from repo_engine.repository.packs import HEADER, STORED, pack_object
from repo_engine.restore.restorer import RestoreDamaged, restore_disk
from helpers import cli
from restore_helpers import backup_image
from test_crypto_keys import SMALL

KIB, MIB = 1 << 10, 1 << 20
BLOCK = 64 * KIB
SETTINGS = {"block_size": BLOCK, "pack_size": 512 * KIB}
PASS = b"correct horse"


def disk_image(path: Path, seed: int, blocks: int = 48) -> bytes:
    """Incompressible blocks (so an unencrypted pack stores them as they are), a few repeated
    (dedup), a few zero."""
    rng = np.random.default_rng(seed)
    data = bytearray(rng.bytes(blocks * BLOCK))
    data[5 * BLOCK:6 * BLOCK] = data[:BLOCK]
    data[9 * BLOCK:10 * BLOCK] = bytes(BLOCK)
    path.write_bytes(bytes(data))
    return bytes(data)


def new_repo(location: str, tmp_path: Path, **kw):
    return init_repository(location, cache_dir=tmp_path / "cache", passphrase=PASS, kdf=SMALL,
                           **SETTINGS, **kw)


def reopen(location: str, tmp_path: Path, cache: str = "cache", **kw):
    return open_repository(location, cache_dir=tmp_path / cache, passphrase=lambda: PASS, **kw)


@pytest.fixture
def encrypted(tmp_path):
    """An encrypted local repository holding one point of VM web1; yields (repo, point,
    image bytes)."""
    location = str(tmp_path / "repo")
    content = disk_image(tmp_path / "web1.img", 1)
    with new_repo(location, tmp_path) as repo:
        point = backup_image(repo, "web1", tmp_path / "web1.img")
        yield repo, point, content


def pack_names(repo) -> list[str]:
    return sorted(info.name for info in repo.objects("packs"))


def restored(repo, point, tmp_path: Path, name: str = "out.img") -> bytes:
    target = tmp_path / name
    target.unlink(missing_ok=True)
    restore_disk(repo, point, "sda", target)
    return target.read_bytes()


def rewrite(repo, obj: str, change) -> bytes:
    """Replace object `obj` of the store by `change(its bytes)`; returns the old bytes."""
    old = repo.store.get(obj, limit=1 << 30)
    repo.store.delete([obj])
    repo.store.put(obj, change(bytearray(old)))
    return old


def flip(offset: int):
    def change(data: bytearray) -> bytes:
        data[offset] ^= 0x01
        return bytes(data)
    return change


# -- what is stored ----------------------------------------------------------------------------
def test_backup_restores_byte_identical_and_packs_hold_no_plaintext_id_or_ref(encrypted,
                                                                              tmp_path):
    repo, point, content = encrypted
    assert restored(repo, point, tmp_path) == content
    names = pack_names(repo)
    assert len(names) >= 3
    entries = np.concatenate([repo.read_trailer(Path(n).stem) for n in names])
    assert len(entries) == 46  # 48 blocks, one a repeat and one zero
    secrets = [e["id"].tobytes() for e in entries] + [int(e["ref"]).to_bytes(8, "little")
                                                       for e in entries]
    samples = [content[i * BLOCK + 1000:i * BLOCK + 1064] for i in range(48) if i != 9]
    for name in names:
        data = repo.store.get(name, limit=1 << 30)
        assert data[:12] == b"REpak\x00\x01\x1a" + b"\x02\x00\x00\x00"  # major 2, minor 0
        body = data[52:-56]  # the header's and footer's small numbers look like small refs
        assert not [s for s in secrets if s in body]
        assert not [s for s in samples if s in data]
    # the same check finds all three in an unencrypted repository: it is not vacuous
    with init_repository(str(tmp_path / "plain"), **SETTINGS) as plain:
        backup_image(plain, "web1", tmp_path / "web1.img")
        data = b"".join(plain.store.get(n, limit=1 << 30) for n in pack_names(plain))
        plain_ids = [e["id"].tobytes() for n in pack_names(plain)
                     for e in plain.read_trailer(Path(n).stem)]
        assert data[:12] == b"REpak\x00\x01\x1a" + b"\x01\x00\x00\x00"
        assert all(s in data for s in samples) and all(i in data for i in plain_ids)


def test_a_new_host_restores_verifies_and_rebuilds_its_cache(encrypted, tmp_path):
    repo, point, content = encrypted
    with reopen(repo.location, tmp_path, "cache-other") as other:
        other.refresh()
        assert restored(other, other.load_point(point.id), tmp_path) == content
        assert verify(other).ok
        rebuild_cache(other)
        assert restored(other, other.load_point(point.id), tmp_path, "again.img") == content


def test_gc_repack_rewrites_sealed_packs_that_restore_byte_identical(tmp_path):
    location = str(tmp_path / "repo")
    first = disk_image(tmp_path / "a.img", 1)
    second = disk_image(tmp_path / "b.img", 2)
    with new_repo(location, tmp_path) as repo:
        a = backup_image(repo, "web1", tmp_path / "a.img")
        # vm2 shares every other block with vm1: forgetting vm1 leaves packs partly used
        mixed = bytearray(second)
        for i in range(0, 48, 2):
            mixed[i * BLOCK:(i + 1) * BLOCK] = first[i * BLOCK:(i + 1) * BLOCK]
        (tmp_path / "b.img").write_bytes(bytes(mixed))
        b = backup_image(repo, "vm2", tmp_path / "b.img")
        before = set(pack_names(repo))
        forget_points(repo, [a.id])
        report = gc(repo, grace=0, max_unused=0, repack=True)
        assert report.packs_repacked >= 1 and report.packs_written >= 1
        written = set(pack_names(repo)) - before
        assert written
        for name in written:
            data = repo.store.get(name, limit=1 << 30)
            assert data[8:10] == b"\x02\x00"
            assert first[2 * BLOCK + 100:2 * BLOCK + 164] not in data
        assert restored(repo, b, tmp_path) == bytes(mixed)
        assert scrub(repo).ok and verify(repo).ok


# -- tampering ---------------------------------------------------------------------------------
def chunk_places(repo, point) -> list[tuple[str, int, int]]:
    """(pack object, offset, stored) of every chunk `point` uses, by block."""
    refs = repo.resolve(point, "sda")
    with repo.index.reader() as lookup:
        where = lookup.locate(refs[refs != 0])
    return [(pack_object(repo.index.pack_info(int(w["pack"])).name), int(w["offset"]),
             int(w["stored"])) for w in where]


def assert_restore_refused(repo, point, tmp_path: Path, pack: str) -> RestoreDamaged:
    with pytest.raises(RestoreDamaged) as refused:
        restore_disk(repo, point, "sda", tmp_path / "refused.img")
    message = str(refused.value)
    assert Path(pack).stem in message and "\n" not in message
    assert refused.value.exit_code == 3
    return refused.value


def test_a_flipped_bit_in_a_chunk_is_refused_by_restore_and_found_by_both_scrubs(encrypted,
                                                                                 tmp_path):
    repo, point, _ = encrypted
    pack, offset, stored = chunk_places(repo, point)[7]
    rewrite(repo, pack, flip(offset + stored // 2))
    damaged = assert_restore_refused(repo, point, tmp_path, pack)
    assert damaged.extents == [[7 * BLOCK, BLOCK]]
    assert "authentication" in str(damaged)
    report = scrub(repo)
    assert not report.ok and len(report.damaged) == 1
    assert Path(pack).stem in report.damaged[0]["reason"]
    with closing(open_stored(repo.location)) as stored_repo:
        keyless = scrub_stored(stored_repo)
    assert len(keyless.damaged) == 1
    assert keyless.damaged[0].startswith(f"{repo.location}/{pack}: the chunk at offset {offset} ")


def test_a_flipped_bit_in_a_pack_s_key_header_makes_scrub_count_its_every_chunk(encrypted):
    """The salt the pack's keys derive from: its trailer fails authentication, so every chunk
    the index places in the pack is damaged, and no chunk of another pack."""
    repo, point, _ = encrypted
    places = chunk_places(repo, point)
    chunks: dict[str, int] = {}
    for pack, _, _ in set(places):  # a chunk two blocks hold counts once
        chunks[pack] = chunks.get(pack, 0) + 1
    pack = max(chunks, key=lambda p: (chunks[p], p))
    refs = {int(e["ref"]) for e in repo.read_trailer(Path(pack).stem)}
    assert len(refs) == chunks[pack] > 1 and len(chunks) > 1
    rewrite(repo, pack, flip(HEADER.size + 4 + 16))  # past the epoch, inside the salt
    report = scrub(repo)
    assert report.packs_scrubbed == len(pack_names(repo))
    assert len(report.damaged) == len(refs) and {d["ref"] for d in report.damaged} == refs
    assert all(Path(pack).stem in d["reason"] and "authentication" in d["reason"]
               for d in report.damaged)
    [affected] = report.affected
    assert (affected.point, affected.blocks) == (point.id, [p for p, _, _ in places].count(pack))


def swap_blobs(data: bytearray, a: tuple[int, int], b: tuple[int, int]) -> bytes:
    (oa, sa), (ob, sb) = a, b
    assert sa == sb
    data[oa:oa + sa], data[ob:ob + sb] = data[ob:ob + sb], data[oa:oa + sa]
    return bytes(data)


def test_a_read_starting_inside_a_pack_s_key_header_is_a_plain_range(encrypted):
    """An index row placing a chunk inside the pack's key header (damage): its request is read
    as asked, and the chunk's authentication names the damage (not an internal error)."""
    repo, _point, _ = encrypted
    name = Path(pack_names(repo)[0]).stem
    repo.pack_keys._openers.clear()  # no header known yet, as for a restore's first request
    offset = HEADER.size + PART_HEADER_SIZE - 10
    with repo.read_chunk_stream(name, offset, 100) as stream:
        assert stream.position == offset
        assert stream.read(100) == repo.store.get_range(pack_object(name), offset, 100)


def test_two_chunks_swapped_in_a_pack_are_refused(encrypted, tmp_path):
    repo, point, _ = encrypted
    places = chunk_places(repo, point)
    pack = places[0][0]
    same = [(o, s) for p, o, s in places if p == pack]
    assert len(same) >= 2 and same[0][1] == same[1][1]  # raw chunks: every blob alike in size
    rewrite(repo, pack, lambda data: swap_blobs(data, same[0], same[1]))
    assert_restore_refused(repo, point, tmp_path, pack)
    assert len(scrub(repo).damaged) == 2


def test_two_packs_swapped_a_truncated_pack_and_a_foreign_pack_are_refused(encrypted, tmp_path):
    repo, point, _ = encrypted
    names = sorted({p for p, _, _ in chunk_places(repo, point)})
    first = rewrite(repo, names[0], lambda _: repo.store.get(names[1], limit=1 << 30))
    rewrite(repo, names[1], lambda _: first)
    assert_restore_refused(repo, point, tmp_path, names[0])
    found = scrub(repo)
    assert {r["ref"] for r in found.damaged} == {int(e["ref"]) for n in names[:2]
                                                 for e in repo.read_trailer(Path(n).stem)}
    # either pack is the wrong size for its name, or its trailer lists none of the index's refs
    assert all(Path(names[0]).stem in r["reason"] or Path(names[1]).stem in r["reason"]
               for r in found.damaged)
    assert any("another pack was put in its place" in r["reason"] for r in found.damaged)
    with closing(open_stored(repo.location)) as stored_repo:
        keyless = scrub_stored(stored_repo)
    assert sorted(line.split(": ")[0] for line in keyless.damaged) == \
        [f"{repo.location}/{n}" for n in names[:2]]
    assert all("do not hash to its name" in line for line in keyless.damaged)
    rewrite(repo, names[1], lambda data: bytes(data[:len(data) // 2]))
    rewrite(repo, names[0], lambda _: first)
    assert_restore_refused(repo, point, tmp_path, names[1])

    # a pack of another encrypted repository (its own keys) in place of one of ours
    other_location = str(tmp_path / "other")
    with init_repository(other_location, cache_dir=tmp_path / "cache2", passphrase=PASS,
                         kdf=SMALL, **SETTINGS) as other:
        backup_image(other, "web1", tmp_path / "web1.img")  # the same disk: the same chunk ids
        foreign = other.store.get(pack_names(other)[0], limit=1 << 30)
    rewrite(repo, names[1], lambda _: foreign)
    refused = assert_restore_refused(repo, point, tmp_path, names[1])
    assert "authentication" in str(refused)


def test_a_cleartext_pack_planted_in_an_encrypted_repository_is_refused(encrypted, tmp_path):
    repo, point, _ = encrypted
    with init_repository(str(tmp_path / "plain"), **SETTINGS) as plain:
        backup_image(plain, "web1", tmp_path / "web1.img")
        cleartext = max((plain.store.get(name, limit=1 << 30) for name in pack_names(plain)),
                        key=len)
    # the smallest pack the point uses, so that the cleartext one holds every range read from
    # it (a shorter one would be refused as truncated before its header is looked at)
    pack = min({place[0] for place in chunk_places(repo, point)}, key=repo.store.size)
    assert repo.store.size(pack) <= len(cleartext)
    rewrite(repo, pack, lambda _: cleartext)
    assert "a cleartext pack in an encrypted repository" in str(
        assert_restore_refused(repo, point, tmp_path, pack))
    with pytest.raises(TamperedError, match="cleartext pack"):
        repo.read_trailer(Path(pack).stem)


def test_every_bit_flip_of_a_pack_is_refused_with_and_without_the_key(tmp_path):
    """A pack of three small chunks: each of its bits flipped in turn is refused by reading it
    whole with the key (trailer, then every chunk) and found by the keyless check."""
    from repo_engine.repository.packs import check_stored

    location = str(tmp_path / "repo")
    with new_repo(location, tmp_path) as repo:
        writer = repo.pack_writer()
        for ref in (1, 2, 3):
            writer.add(ref, bytes([ref]) * 32, b"stored bytes %d" % ref, 14, 0)
        pack = writer.finish()
        obj = pack_object(pack.name)
        good = repo.store.get(obj, limit=1 << 20)
        path = Path(location) / obj
        assert len(good) == 52 + 3 * (14 + 16) + 3 * 28 + 3 * 48 + 16 + 56

        def read_whole() -> list[bytes]:
            repo.pack_keys = type(repo.pack_keys)(repo.store, repo.sealer)  # header read anew
            entries = repo.read_trailer(pack.name)
            blobs = [repo.read_chunk_range(pack.name, int(e["offset"]), int(e["stored"]))
                     for e in entries]
            return [bytes(repo.open_chunk(pack.name, int(e["offset"]), e["id"].tobytes(), b,
                                          "t")) for e, b in zip(entries, blobs)]

        assert read_whole() == [b"stored bytes 1", b"stored bytes 2", b"stored bytes 3"]
        unrefused, unfound = [], []
        for bit in range(len(good) * 8):
            data = bytearray(good)
            data[bit // 8] ^= 1 << bit % 8
            path.write_bytes(data)  # in place: the store keeps its descriptor of the pack open
            try:
                read_whole()
                unrefused.append(bit)
            except RepoError:  # damage, or (major flipped) a version it cannot read
                pass
            try:
                if not check_stored(bytes(data), pack.name, "t").damaged:
                    unfound.append(bit)
            except RepoError:  # damage, or (major flipped) a version it cannot read
                pass
        assert (unrefused, unfound) == ([], [])


def test_keyless_scrub_checks_key_records_as_stored_bytes_and_writes_nothing(encrypted, tmp_path):
    repo, point, _ = encrypted
    repo.write_checkpoint() if hasattr(repo, "write_checkpoint") else None
    with closing(open_stored(repo.location)) as stored_repo:
        read: list[str] = []
        inner_get, inner_range = stored_repo.store.get, stored_repo.store.get_range
        object.__setattr__(stored_repo.store, "get",
                           lambda name, **kw: read.append(name) or inner_get(name, **kw))
        object.__setattr__(stored_repo.store, "get_range",
                           lambda name, *a: read.append(name) or inner_range(name, *a))
        report = scrub_stored(stored_repo)
        assert report.ok and report.chunks_checked == 46
        assert report.objects["packs"] == len(pack_names(repo))
        assert report.objects["maps"] >= 1 and report.objects["points"] == 1
        assert report.objects["journal"] >= 1
        keys = sorted(info.name for info in stored_repo.store.list("keys/"))
        assert report.objects["keys"] == len(keys) == 3  # a slot, the keyring record and its copy
        assert read and {n for n in read if n.startswith("keys/")} == set(keys)
        with pytest.raises(Exception, match="opened without its key"):
            stored_repo.store.put("points/x", b"x")


def test_keyless_scrub_cli(encrypted, tmp_path, capsys):
    repo, point, _ = encrypted
    clean = cli(capsys, "scrub", "--no-key", repo.location)
    assert clean.code == 0 and "no damage found" in clean.out
    assert "packs" not in clean.err
    pack, offset, stored = chunk_places(repo, point)[3]
    rewrite(repo, pack, flip(offset + 3))
    found = cli(capsys, "scrub", "--no-key", repo.location)
    assert found.code == 3
    assert f"DAMAGED {repo.location}/{pack}: the chunk at offset {offset}" in found.out
    error = found.err.strip()
    assert error.startswith("repo-engine: error: scrub --no-key found 1 damaged object or "
                            "chunk, the first: ") and Path(pack).stem in error
    assert "\n" not in error and "Traceback" not in found.err
    plain = str(tmp_path / "plain")
    init_repository(plain).close()
    refused = cli(capsys, "scrub", "--no-key", plain)
    assert refused.code == 2 and "is not encrypted" in refused.err


def test_stored_size_of_a_chunk_counts_its_tag(encrypted):
    repo, point, _ = encrypted
    for pack, offset, stored in chunk_places(repo, point):
        table = repo.read_trailer(Path(pack).stem)
        assert stored == BLOCK + 16  # raw chunks, sealed
        assert offset in table["offset"].tolist()
    assert STORED.size == 28 and HEADER.size == 16


# -- object storage ----------------------------------------------------------------------------
@contextmanager
def counted_requests(store, monkeypatch) -> Iterator[list[tuple[str, str, int]]]:
    """(method, object, offset) of every read request made to `store` meanwhile."""
    requests: list[tuple[str, str, int]] = []

    def counting(method: str):
        real = getattr(store, method)

        def call(name, offset, length):
            requests.append((method, name, offset))
            return real(name, offset, length)
        return call

    with monkeypatch.context() as patch:
        for method in ("get_range", "open_range"):
            patch.setattr(store, method, counting(method))
        yield requests


def test_an_encrypted_repository_on_s3(tmp_path, capsys, monkeypatch, seaweedfs, s3_bucket):
    """Backup, a new host's restore, scrub with and without the key, then a flipped bit found by
    both and refused by restore; the bucket's packs hold no plaintext."""
    from repo_engine.repository.store.s3_settings import S3Settings
    from s3cli import s3_environment
    from s3server import ACCESS_KEY, SECRET_KEY

    settings = S3Settings(endpoint=seaweedfs.endpoint, access_key_id=ACCESS_KEY,
                          secret_access_key=SECRET_KEY)
    location = f"s3://{s3_bucket}/repo"
    content = disk_image(tmp_path / "web1.img", 3)
    with new_repo(location, tmp_path, settings=settings) as repo:
        point = backup_image(repo, "web1", tmp_path / "web1.img")
        packs = pack_names(repo)
        for name in packs:
            data = repo.store.get(name, limit=1 << 30)
            assert data[8:10] == b"\x02\x00" and content[BLOCK:BLOCK + 64] not in data
    with reopen(location, tmp_path, "cache-other", settings=settings) as other:
        other.refresh()
        with counted_requests(other.store, monkeypatch) as requests:
            assert restored(other, other.load_point(point.id), tmp_path) == content
        # the new host reads each pack's key header with the request for its chunks (the
        # first chunk read lies near it): one request per pack, none for a header alone
        assert sorted(name for _, name, _ in requests) == sorted(
            {place[0] for place in chunk_places(other, other.load_point(point.id))})
        assert {(kind, offset) for kind, _, offset in requests} == {("open_range", 0)}
        assert scrub(other).ok
        s3_environment(monkeypatch, tmp_path, seaweedfs.endpoint)
        clean = cli(capsys, "scrub", "--no-key", location)
        assert clean.code == 0 and "no damage found" in clean.out
        pack, offset, stored = chunk_places(other, other.load_point(point.id))[11]
        rewrite(other, pack, flip(offset + stored - 1))  # the chunk's tag
        found = cli(capsys, "scrub", "--no-key", location)
        assert found.code == 3 and f"{location}/{pack}: the chunk at offset {offset}" in found.err
        damaged = assert_restore_refused(other, other.load_point(point.id), tmp_path, pack)
        assert damaged.extents == [[12 * BLOCK, BLOCK]]  # block 9 is zero: not stored
        assert len(scrub(other).damaged) == 1


def test_scrub_repair_quarantines_and_the_next_backup_heals_into_a_sealed_pack(encrypted,
                                                                              tmp_path):
    repo, point, content = encrypted
    pack, offset, stored = chunk_places(repo, point)[4]
    rewrite(repo, pack, flip(offset + 40))
    report = scrub(repo, repair=True)
    assert report.repair.quarantined == 1 and [d["ref"] for d in report.damaged]
    again = backup_image(repo, "web1", tmp_path / "web1.img")  # stores block 4 again: heals
    assert restored(repo, point, tmp_path) == content
    assert restored(repo, again, tmp_path, "again.img") == content
    assert scrub(repo).ok  # the damaged copy stays in its pack, which no point uses
    healed_pack = chunk_places(repo, point)[4][0]
    assert healed_pack != pack and repo.store.get(healed_pack, limit=1 << 30)[8:10] == b"\x02\x00"


def test_keyless_scrub_json(encrypted, capsys):
    repo, _, _ = encrypted
    doc = cli(capsys, "scrub", "--no-key", "--json", repo.location).json()
    assert doc["ok"] is True and doc["damaged"] == [] and doc["chunks_checked"] == 46
    assert set(doc["objects"]) == {"keys", "packs", "maps", "points", "journal"}


def test_scrub_finds_two_packs_of_one_size_swapped_in_an_unencrypted_repository(tmp_path):
    """Their trailers check out and list whole chunks, none of them where the index places
    them: only the pack names (BLAKE3 of the bytes) tell."""
    disk_image(tmp_path / "web1.img", 1)
    with init_repository(str(tmp_path / "plain"), **SETTINGS) as repo:
        point = backup_image(repo, "web1", tmp_path / "web1.img")
        names = sorted({p for p, _, _ in chunk_places(repo, point)})
        sizes = [repo.store.size(n) for n in names]
        # the size most packs have (the chunk key is random: which pack is the odd one varies)
        common = max(set(sizes), key=sizes.count)
        first, second = [n for n, size in zip(names, sizes) if size == common][:2]
        a = (tmp_path / "plain" / first).read_bytes()
        (tmp_path / "plain" / first).write_bytes((tmp_path / "plain" / second).read_bytes())
        (tmp_path / "plain" / second).write_bytes(a)
        found = scrub(repo)
        assert found.damaged and all(Path(first).stem in r["reason"] or
                                     Path(second).stem in r["reason"] for r in found.damaged)
        assert len(found.damaged) == 2 * 8  # both packs' chunks


def test_keyless_scrub_finds_a_damaged_map_manifest_journal_entry_checkpoint_and_huge_pack(
        encrypted, tmp_path):
    from repo_engine.repository.checkpoint import write_checkpoint

    repo, point, _ = encrypted
    seq = write_checkpoint(repo.store, repo.index, repo.sealer)
    root = Path(repo.location)
    victims = [next(root.glob("maps/*/*.map")), next(root.glob("points/*.point")),
               next(root.glob("journal/*.jnl")), root / f"journal/{seq:016x}.ckpt"]
    for path in victims:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x10
        path.write_bytes(data)
    huge = root / "packs/ee" / ("ee" * 32 + ".pack")
    huge.parent.mkdir(exist_ok=True)
    with open(huge, "wb") as f:
        f.truncate(2 * (512 * KIB + 4 * MIB) + 1)  # sparse: larger than any pack can be
    with closing(open_stored(repo.location)) as stored_repo:
        report = scrub_stored(stored_repo)
    lines = sorted(report.damaged)
    assert len(lines) == 5, lines
    for path in victims:
        line = next(x for x in lines if x.startswith(f"{repo.location}/"
                                                     f"{path.relative_to(root)}: "))
        assert "checksum mismatch" in line
    assert any(x.startswith(f"{repo.location}/packs/ee/") and "more than any pack" in x
               for x in lines)


def test_keyless_open_of_a_config_swapped_for_an_unencrypted_one_on_a_host_that_knew(encrypted,
                                                                                    tmp_path):
    from repo_engine.repository.config import (CONFIG_NAME, RepoConfig, read_config,
                                               write_config)
    from repo_engine.repository.store.local import LocalStore

    repo, _, _ = encrypted
    root = Path(repo.location)
    config = read_config(LocalStore(root))
    (root / CONFIG_NAME).unlink()
    write_config(LocalStore(root), RepoConfig(repo_id=config.repo_id, chunk_key="00" * 32,
                                              shared=True))
    with pytest.raises(TamperedError, match="this host knows it as encrypted"):
        open_stored(repo.location, cache_dir=tmp_path / "cache")
    with pytest.raises(RepoError, match="is not encrypted") as elsewhere:  # a host that did not
        open_stored(repo.location, cache_dir=tmp_path / "elsewhere")
    assert elsewhere.value.exit_code == 2


@pytest.mark.parametrize("encrypted_repo", [False, True])
def test_a_block_map_is_read_with_one_request(tmp_path, monkeypatch, encrypted_repo):
    """Reading a map (as every backup reads its parent's and every restore its point's) costs
    one request: its first bytes come with its size (no HEAD first), and a sealed one is not
    read a second time to be opened whole."""
    location = str(tmp_path / "repo")
    content = disk_image(tmp_path / "web1.img", 5)
    with (new_repo(location, tmp_path) if encrypted_repo
          else init_repository(location, **SETTINGS)) as repo:
        point = backup_image(repo, "web1", tmp_path / "web1.img")
        name = point.disks[0].map
        calls: list[str] = []
        for method in ("size", "get", "get_range", "get_start", "open_range"):
            def counted(*args, _real=getattr(repo.store, method), _m=method, **kw):
                calls.append(_m)
                return _real(*args, **kw)
            monkeypatch.setattr(repo.store, method, counted)
        bmap = read_map(repo.store, name, repo.sealer)
        assert calls == ["get_start"]
        assert bmap.nblocks == len(content) // BLOCK
