"""Block maps, point manifests, journal entries and checkpoints of an encrypted repository:
sealed, bound to their kind and name; every changed, swapped or planted cleartext one refused as
tampering (exit code 3); an unencrypted repository's unchanged."""

from __future__ import annotations

import blake3
import numpy as np
import pytest

from repo_engine.errors import DamageError, FormatError, TamperedError
from repo_engine.repository.blockmap import BlockMap, map_object, read_map, write_map
from repo_engine.repository.checkpoint import checkpoint_object, write_checkpoint
from repo_engine.repository.crypto.null import NULL_SEALER
from repo_engine.repository.envelope import SEALED, seal, unseal
from repo_engine.repository.formats import POINT
from repo_engine.repository.journal import entry_object
from repo_engine.repository.location import init_repository, open_repository
from repo_engine.repository.points import DiskRecord, PointRecord, point_object, read_point
from test_crypto_keys import SMALL

VM = "payroll-db-01"
REFS = np.arange(1000, 1000 + 4096, dtype=np.uint64)


@pytest.fixture
def repo(tmp_path):
    with init_repository(str(tmp_path / "repo"), cache_dir=tmp_path / "cache",
                         passphrase=b"pw", kdf=SMALL) as opened:
        yield opened


def point(point_id: str, map_name: str) -> PointRecord:
    disk = DiskRecord(key="scsi0:0", capacity=4096 * 65536, block_size=65536, map=map_name,
                      kind="full", parent=None, links=1)
    return PointRecord(id=point_id, vm=VM, time="2026-11-30T03:00:00.000000Z", source="image",
                       disks=[disk], config={"guest": "secret-config"}, seq=1)


def stored(repo, name: str) -> bytes:
    return repo.store.get(name, limit=1 << 30)


def test_maps_and_manifests_are_sealed_and_read_back(repo):
    name = repo.write_map(BlockMap.full(REFS))
    repo.write_manifest(point("0123456789abcdef", name))
    data, manifest = stored(repo, map_object(name)), stored(repo, point_object("0123456789abcdef"))
    for raw in (data, manifest):
        assert int.from_bytes(raw[12:16], "little") == SEALED
    assert REFS[:64].tobytes() not in data and len(data) > 24 + 36 + 16
    for plain in (VM.encode(), b"secret-config", b"scsi0:0", name.encode()):
        assert plain not in manifest
    assert repo.read_map(name).refs.tolist() == REFS.tolist()
    assert repo.load_point("0123456789abcdef") == point("0123456789abcdef", name)


def flipped(good: bytes, bits=None):
    """`good` with one of `bits` flipped (default: every 7th bit of an envelope's payload), the
    checksum made good again (as an attacker who writes the store would)."""
    body = len(good) - 32
    for bit in range(24 * 8, body * 8, 7) if bits is None else bits:
        data = bytearray(good[:body])
        data[bit // 8] ^= 1 << bit % 8
        yield bytes(data) + blake3.blake3(data).digest()


def test_every_bit_flip_of_a_sealed_manifest_is_refused(repo):
    repo.write_manifest(point("0123456789abcdef", "ab" * 32))
    name = point_object("0123456789abcdef")
    for data in flipped(stored(repo, name)):
        repo.store.put(name, data)
        with pytest.raises(TamperedError, match=name):
            repo.load_point("0123456789abcdef")


def test_every_bit_flip_of_a_sealed_map_is_refused_even_under_its_new_hash(repo):
    # a map is named by the hash of its stored bytes: a changed one under its old name is damage
    # already; under the name of its new hash (which only a sealed manifest could point to),
    # authentication refuses it
    good = stored(repo, map_object(repo.write_map(BlockMap.full(REFS[:8]))))
    for data in flipped(good):
        name = blake3.blake3(data).hexdigest()
        repo.store.put(map_object(name), data)
        with pytest.raises(TamperedError, match=name):
            repo.read_map(name)


def test_a_manifest_moved_to_another_point_id_is_refused(repo):
    name = repo.write_map(BlockMap.full(REFS[:8]))
    repo.write_manifest(point("0123456789abcdef", name))
    repo.store.put(point_object("fedcba9876543210"),
                   stored(repo, point_object("0123456789abcdef")))
    with pytest.raises(TamperedError, match="fails authentication"):
        repo.load_point("fedcba9876543210")


def test_a_cleartext_map_or_manifest_planted_in_an_encrypted_repository_is_refused(repo):
    planted = write_map(repo.store, BlockMap.full(REFS[:8]))  # as an unencrypted repository
    with pytest.raises(TamperedError, match="cleartext block map in an encrypted repository"):
        repo.read_map(planted)
    repo.store.put(point_object("0123456789abcdef"), seal(POINT, b"{}"))
    with pytest.raises(TamperedError, match="cleartext restore point in an encrypted"):
        repo.load_point("0123456789abcdef")
    assert TamperedError.exit_code == 3


def test_a_sealed_object_read_without_keys_is_refused(repo):
    name = repo.write_map(BlockMap.full(REFS[:8]))
    repo.write_manifest(point("0123456789abcdef", name))
    with pytest.raises(FormatError, match="block map is encrypted"):
        read_map(repo.store, name)
    with pytest.raises(FormatError, match="restore point is encrypted"):
        read_point(repo.store, point_object("0123456789abcdef"))


def test_an_unencrypted_repository_writes_cleartext_envelopes(tmp_path):
    with init_repository(str(tmp_path / "plain"), shared=True,
                         cache_dir=tmp_path / "cache") as plain:
        name = plain.write_map(BlockMap.full(REFS[:8]))
        data = stored(plain, map_object(name))
        assert int.from_bytes(data[12:16], "little") == 0
        assert read_map(plain.store, name).refs.tolist() == REFS[:8].tolist()
        plain.write_manifest(point("0123456789abcdef", name))
        assert VM.encode() in unseal(POINT, stored(plain, point_object("0123456789abcdef")), "p")


def committed(repo, point_id: str = "0123456789abcdef") -> None:
    bmap = BlockMap.full(np.zeros(8, dtype=np.uint64))  # all ZERO: no chunk needed
    name = repo.write_map(bmap)
    repo.commit_point(point(point_id, name), {name: bmap})


def replayed(repo, cache) -> list[str]:
    """The VMs of the points another host, its cache in `cache`, sees after a refresh."""
    with open_repository(repo.location, cache_dir=cache, passphrase=lambda: b"pw") as other:
        other.refresh()
        return [p.vm for p in other.points()]


def assert_sealed(data: bytes) -> None:
    assert int.from_bytes(data[12:16], "little") == SEALED
    assert VM.encode() not in data and b"scsi0:0" not in data


def test_journal_entries_are_sealed_and_replayed_by_another_host(repo, tmp_path):
    committed(repo)
    entries = list(repo.store.list("journal/"))
    assert entries
    for info in entries:
        assert_sealed(stored(repo, info.name))
    assert replayed(repo, tmp_path / "other") == [VM]


def test_a_journal_entry_changed_or_moved_to_another_seq_is_refused(repo, tmp_path):
    committed(repo)
    committed(repo, "fedcba9876543210")
    first, last = stored(repo, entry_object(1)), stored(repo, entry_object(repo.refresh()))
    # the last entry under the first one's name; then bits flipped (an epoch bit names an epoch
    # the keyring lacks: tampering too)
    cases = [(last, "fails authentication")] + [(data, "") for data in list(flipped(first))[::9]]
    for number, (data, message) in enumerate(cases):
        repo.store.put(entry_object(1), data)
        with pytest.raises(TamperedError, match=f"{entry_object(1)}.*{message}"):
            replayed(repo, tmp_path / f"host{number}")


def checkpointed(repo) -> str:
    """A checkpoint of one committed point, the entries it holds compacted; its name."""
    committed(repo)
    seq = write_checkpoint(repo.store, repo.index, repo.sealer)
    repo.store.delete([entry_object(s) for s in range(1, seq + 1)])
    return checkpoint_object(seq)


def test_a_checkpoint_is_sealed_and_loaded_by_a_new_host(repo, tmp_path):
    assert_sealed(stored(repo, checkpointed(repo)))
    assert replayed(repo, tmp_path / "new") == [VM]


def test_a_changed_or_cleartext_checkpoint_is_refused(repo, tmp_path):
    name = checkpointed(repo)
    good = stored(repo, name)
    # the SEALED flag, bits of the key header, record headers and sealed frames, the checksum
    # made good again (the other flag bits mean nothing yet: readers ignore them)
    changed = list(flipped(good, [12 * 8, *range(16 * 8, len(good) * 8 - 256, 13)]))
    repo.store.delete([name])
    write_checkpoint(repo.store, repo.index, NULL_SEALER)
    changed.append(stored(repo, name))  # a cleartext checkpoint
    for number, data in enumerate(changed):
        repo.store.put(name, data)
        with pytest.raises(DamageError, match=name):
            replayed(repo, tmp_path / f"host{number}")
    with pytest.raises(TamperedError, match="cleartext checkpoint in an encrypted"):
        replayed(repo, tmp_path / "last")
