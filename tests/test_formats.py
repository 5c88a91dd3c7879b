"""Golden bytes of the on-disk formats: any change to what we write is noticed here."""

from __future__ import annotations

import json
import struct

import blake3
import lmdb
import numpy as np
import pytest
import zstandard

from repo_engine.errors import DamageError, FormatError
from repo_engine.repository.blockmap import (DELTA, BlockMap, encode, map_object, open_map,
                                             read_map, resolve_windows)
from repo_engine.repository.envelope import seal, unseal
from repo_engine.repository.formats import BLOCK_MAP, CONFIG, JOURNAL, PACK
from repo_engine.repository.index_records import decode_record, encode_record
from repo_engine.repository.lmdbfile import META, MetaPage, check_data_file
from repo_engine.repository.packs import HEADER, PackWriter, pack_object, read_trailer
from repo_engine.repository.repo import Repository
from repo_engine.repository.store.local import LocalStore
from repo_engine.repository import seals


def test_envelope_golden():
    sealed = seal(CONFIG, b"{}")
    # magic, major 1, minor 0, flags 0, length 2, payload, BLAKE3 of all before it
    assert sealed.hex() == (
        "524563666700011a" "0100" "0000" "00000000" "0200000000000000" "7b7d"
        "68a064be598cbb10e1e29c4dce6fefce527545bb550ee1b32d1df97609ed2b67")
    assert sealed[26:] == blake3.blake3(sealed[:26]).digest()


def test_envelope_refuses_damage_and_future_versions():
    sealed = bytearray(seal(CONFIG, b"payload"))
    with pytest.raises(FormatError, match="not a block map"):
        unseal(BLOCK_MAP, bytes(sealed), "f")
    sealed[25] ^= 1
    with pytest.raises(DamageError, match="checksum"):
        unseal(CONFIG, bytes(sealed), "f")
    with pytest.raises(DamageError, match="wrong length"):
        unseal(CONFIG, seal(CONFIG, b"payload")[:-1], "f")


def test_block_map_golden():
    """Version 2: header, then per stored segment its index, entries, frame length and frame
    checksum before the frame; a segment of all-ZERO refs is not stored."""
    refs = np.zeros(20, np.uint64)
    refs[[2, 17]] = [7, 2**64 - 1]
    data = encode(BlockMap.full(refs), shift=3)  # segments of 8 blocks: 0, 1 (all ZERO), 2
    assert data[:12] == BLOCK_MAP.magic + b"\x02\x00\x00\x00"  # major 2, minor 0
    assert data[24:56].hex() == ("00" + "00" * 7 + "1400000000000000" + "0c00000000000000"
                                 + "03000000" + "02000000")
    at, found = 56, []
    for _ in range(2):
        index, entries, length = struct.unpack_from("<QQQ", data, at)
        frame = data[at + 40:at + 40 + length]
        assert data[at + 24:at + 40] == blake3.blake3(frame).digest()[:16]
        raw = zstandard.ZstdDecompressor().decompressobj().decompress(frame)
        found.append((index, np.frombuffer(raw, "<u8").tolist()))
        at += 40 + length
    assert found == [(0, [0, 0, 7, 0, 0, 0, 0, 0]), (2, [0, 2**64 - 1, 0, 0])]
    assert data[at:] == blake3.blake3(data[:at]).digest()


@pytest.mark.parametrize("at, renamed, error, text", [
    (8, True, FormatError, "block map format version 4 is not supported"),  # a newer map
    (8, False, DamageError, "content does not match its name"),  # its version byte changed
    (0, True, DamageError, "bad magic"),  # a map object is only ever one of ours
])
def test_a_block_map_header_refused_as_newer_only_when_its_bytes_are_its_name(
        tmp_path, at, renamed, error, text):
    (tmp_path / "tmp").mkdir()
    store = LocalStore(tmp_path)
    data = bytearray(encode(BlockMap.full(np.arange(1, 5, dtype=np.uint64))))
    name = blake3.blake3(data).hexdigest()
    data[at] = 4 if at == 8 else data[at] ^ 0x55
    if renamed:
        name = blake3.blake3(data).hexdigest()
    store.put(map_object(name), bytes(data))
    with pytest.raises(error, match=text):
        open_map(store, name)


# written by the version 1 encoder: FULL [0, 1, 2^64-1]; salted FULL [1]; DELTA on 5 blocks
V1_MAPS = [
    ("52456d617000011a0100000000000000350000000000000000000000000000000300000000000000030000000000"
     "000028b52ffd0058a500006000000100ffffffffffffffff020060e0016001b25f4003d6fd6811ac573e23fefa7e"
     "116ee8a5819a2c6ee42c101951e5edb634", [0, 1, 2**64 - 1]),
    ("52456d617000011a0100010000000000290000000000000000050505050505050100000000000000010000000000"
     "000028b52ffd005841000001000000000000006af14208b446a1a79ac4b1aaaf777ffebf349837044220da2fe3b1"
     "9db748b343", [1]),
    ("52456d617000011a0100000000000000360000000000000001000000000000000500000000000000020000000000"
     "000028b52ffd0058ad000070010003000700090000000000000003540200030184f4fec55ee59ee4f3f777e50924"
     "74cd22fec8f4e153eae553de59e20ce526e6", [0, 7, 0, 9, 0]),
]


@pytest.mark.parametrize("hexdata, want", V1_MAPS)
def test_version_1_block_maps_still_read(tmp_path, hexdata, want):
    """Maps written before segments (one frame for the disk, salted or not) read and resolve
    as before, alone or under a version 2 delta."""
    (tmp_path / "tmp").mkdir()
    store = LocalStore(tmp_path)
    data = bytes.fromhex(hexdata)
    name = blake3.blake3(data).hexdigest()
    store.put(map_object(name), data)
    bmap = read_map(store, name)
    if bmap.kind == DELTA:
        assert (bmap.nblocks, bmap.blocks.tolist(), bmap.refs.tolist()) == (5, [1, 3], [7, 9])
        return
    assert bmap.refs.tolist() == [r for r in want if r]
    child = encode(BlockMap.delta(len(want) + 1, np.array([len(want)]), np.array([5])))
    child_name = blake3.blake3(child).hexdigest()
    store.put(map_object(child_name), child)
    windows = list(resolve_windows([open_map(store, name), open_map(store, child_name)]))
    assert [(first, w.tolist()) for first, w in windows] == [(0, want + [5])]


def test_pack_layout_and_trailing_nul_ids(tmp_path):
    (tmp_path / "tmp").mkdir()
    store = LocalStore(tmp_path)
    writer = PackWriter(store)
    ids = [bytes(31) + b"\x01", b"\x07" * 31 + b"\x00", bytes(32)]
    for ref, chunk_id in enumerate(ids, start=1):
        writer.add(ref, chunk_id, b"blob%d" % ref, 5, 0)
    pack = writer.finish()
    path = tmp_path / "packs" / pack.name[:2] / f"{pack.name}.pack"
    raw = path.read_bytes()
    assert pack.name == blake3.blake3(raw).hexdigest()
    assert raw[:HEADER.size] == PACK.magic + b"\x01\x00\x00\x00" + bytes(4)
    assert raw[16:31] == b"blob1blob2blob3"
    entries = read_trailer(store, pack_object(pack.name))
    assert [e.tobytes() for e in entries["id"]] == ids
    assert entries["offset"].tolist() == [16, 21, 26]
    damaged = bytearray(raw)
    damaged[40] ^= 0xFF
    path.write_bytes(bytes(damaged))
    with pytest.raises(DamageError, match="trailer checksum"):
        read_trailer(store, pack_object(pack.name))
    path.write_bytes(raw[:-3])
    with pytest.raises(DamageError, match="truncated|damaged"):
        read_trailer(store, pack_object(pack.name))


def test_catalog_record_golden():
    record = {"id": "00112233aabbccdd", "seq": 7, "time": "2026-01-01T00:00:00.000000Z",
              "vm": "web1"}
    raw = encode_record(record)
    # the JSON with sorted keys; `check` = BLAKE3 (first 16 bytes, hex) of the JSON without it
    assert raw == (b'{"check": "835dc1aee2fe8e5bd604ba2cb92f5e59", "id": "00112233aabbccdd", '
                   b'"seq": 7, "time": "2026-01-01T00:00:00.000000Z", "vm": "web1"}')
    assert decode_record(b"00112233aabbccdd", raw) == record
    for spot in range(len(raw)):
        damaged = bytearray(raw)
        damaged[spot] ^= 0x04
        with pytest.raises(DamageError, match="catalog record of point 00112233aabbccdd"):
            decode_record(b"00112233aabbccdd", bytes(damaged))
    with pytest.raises(DamageError, match="names point"):
        decode_record(b"00112233aabbccde", raw)
    legacy = b'{"id": "00112233aabbccdd", "time": "2026-01-01T00:00:00.000000Z"}'
    assert decode_record(b"00112233aabbccdd", legacy, checked=False)["id"] == "00112233aabbccdd"


def _fmix64(h: int) -> int:
    mask = (1 << 64) - 1
    h ^= h >> 33
    h = h * 0xFF51AFD7ED558CCD & mask
    h ^= h >> 33
    h = h * 0xC4CEB9FE1A85EC53 & mask
    return h ^ h >> 33


def _spec_check(table: str, key: bytes, payload: bytes) -> bytes:
    """The seal as docs/FORMAT.md states it, written out independently of seals.py."""
    h = int.from_bytes(blake3.blake3(b"repo-engine seal " + table.encode()).digest()[:8], "little")
    for part in (key, payload):
        part += bytes(-len(part) % 8)
        for i in range(0, len(part), 8):
            h = _fmix64(h ^ int.from_bytes(part[i:i + 8], "little"))
    return h.to_bytes(8, "little")


def test_count_seal_golden():
    ref5, count3 = (5).to_bytes(8, "big"), (3).to_bytes(8, "little")
    assert seals.seal("refcount", ref5, count3).hex() == "0300000000000000c44981cf495e1dcc"
    live = (2).to_bytes(8, "little") + (100).to_bytes(8, "little")
    assert seals.seal("packlive", (7).to_bytes(4, "big"), live).hex() == (
        "02000000000000006400000000000000218539e88e66c9be")
    rows = [("refcount", ref5, count3), ("packlive", (7).to_bytes(4, "big"), live),
            ("mapuse", bytes(range(32)), (1).to_bytes(8, "little")),
            ("deadmaps", bytes(range(32)), (2).to_bytes(8, "little"))]
    for table, key, payload in rows:
        sealed = seals.seal(table, key, payload)
        assert sealed == payload + _spec_check(table, key, payload)
        assert seals.unseal(table, key, sealed) == payload
        # every single flipped bit, in the key or the value (check included), is found
        for bit in range(len(sealed) * 8):
            damaged = bytearray(sealed)
            damaged[bit // 8] ^= 1 << bit % 8
            with pytest.raises(DamageError, match=f"{table} entry {key.hex()} is damaged"):
                seals.unseal(table, key, bytes(damaged))
        for bit in range(len(key) * 8):
            moved = bytearray(key)
            moved[bit // 8] ^= 1 << bit % 8
            with pytest.raises(DamageError, match="gc --full"):
                seals.unseal(table, bytes(moved), sealed)
    # the tables differ: a value moved into another table fails there
    with pytest.raises(DamageError):
        seals.unseal("deadmaps", bytes(range(32)), seals.seal("mapuse", bytes(range(32)), count3))
    with pytest.raises(DamageError):
        seals.unseal("refcount", ref5, count3)  # an unsealed (version 2) value


def test_unfindable_entry_golden(tmp_path):
    """An `unfindable` entry's value is the check of its key (the seal of an empty payload), as
    the index writes it; any flipped bit of key or value fails."""
    ref5 = (5).to_bytes(8, "big")
    assert seals.mark("unfindable", ref5).hex() == "ebf42d5f63a159d3"
    keys = [ref5, (2**64 - 1).to_bytes(8, "big"), bytes(8)]
    for key in keys:
        assert seals.mark("unfindable", key) == _spec_check("unfindable", key, b"")
    repo = Repository.init(tmp_path / "repo")
    with repo.index.write() as txn:
        repo.index.hide_key(txn, ref5)
        assert txn.get(ref5, db=repo.index.unfindable).hex() == "ebf42d5f63a159d3"
    repo.close()
    rows = np.frombuffer(b"".join(keys), np.uint8).reshape(-1, 8)
    values = np.frombuffer(b"".join(seals.mark("unfindable", k) for k in keys),
                           np.uint8).reshape(-1, 8)
    assert seals.marked_rows("unfindable", rows, values).all()
    for bit in range(128):
        key, value = bytearray(ref5), bytearray(seals.mark("unfindable", ref5))
        (key if bit < 64 else value)[bit % 64 // 8] ^= 1 << bit % 8
        assert not seals.marked_rows("unfindable", np.frombuffer(bytes(key), np.uint8)[None],
                                     np.frombuffer(bytes(value), np.uint8)[None]).any()
    # a mark of another table, or an empty value (version 4), fails
    assert not seals.marked_rows("unfindable", rows[:1], np.frombuffer(
        seals.seal("refcount", ref5, b"")[:8], np.uint8)[None]).any()
    assert not seals.marked_rows("unfindable", rows[:1], np.zeros((1, 0), np.uint8)).any()


def test_lmdb_meta_layout(tmp_path):
    """The fields check_data_file reads sit where the LMDB this build links writes them."""
    env = lmdb.open(str(tmp_path), max_dbs=2, map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i in range(500):
            txn.put(b"%06d" % i, bytes(100))
    env.close()
    data = (tmp_path / "data.mdb").read_bytes()
    metas = [MetaPage(*META.unpack_from(data, offset)) for offset in (0, 4096)]
    assert [m.valid(n) for n, m in enumerate(metas)] == [True, True]
    assert metas[0].page_size == 4096
    current = max(metas, key=lambda m: m.txn_id)
    assert (current.last_page + 1) * 4096 == len(data)
    check_data_file(tmp_path / "data.mdb")


def test_lease_record_golden(tmp_path):
    from dataclasses import replace

    from repo_engine.repository.formats import LEASE
    from repo_engine.repository.leases import LeaseInfo, read_lease, write_lease

    LEASE_1_0 = replace(LEASE, minor=0)
    store = LocalStore(tmp_path)
    info = LeaseInfo("session", "h1", 7, "gc", "2026-11-30T00:00:00.000000Z",
                     "2026-11-30T00:20:00.000000Z", "00112233aabbccdd", 600.0, "0123456789abcdef")
    write_lease(store, "leases/h1-7-01234567.lease", info)
    data = (tmp_path / "leases" / "h1-7-01234567.lease").read_bytes()
    assert data[:12].hex() == "52456c736500011a" "0100" "0200"  # version 1.2
    assert data[24:-32] == (b'{"kind": "session", "host": "h1", "pid": 7, "command": "gc", '
                            b'"started": "2026-11-30T00:00:00.000000Z", "expires": '
                            b'"2026-11-30T00:20:00.000000Z", "token": "00112233aabbccdd", '
                            b'"seconds": 600.0, "cache": "0123456789abcdef"}')
    assert read_lease(store, "leases/h1-7-01234567.lease") == info
    assert info.span().total_seconds() == 600  # renewed: its duration, not expiry less start
    # a record of version 1.1 names no cache: no host takes it for its own
    older = seal(replace(LEASE, minor=1), data[24:-32].replace(b', "cache": "0123456789abcdef"',
                                                               b""))
    (tmp_path / "leases" / "h1-7-01234567.lease").write_bytes(older)
    assert read_lease(store, "leases/h1-7-01234567.lease") == replace(info, cache="")
    # a record of version 1.0 gives no duration (expiry less start stands for it) nor cache
    old = seal(LEASE_1_0, data[24:-32].replace(b', "seconds": 600.0, "cache": "0123456789abcdef"',
                                               b""))
    (tmp_path / "leases" / "h1-7-01234567.lease").write_bytes(old)
    assert read_lease(store, "leases/h1-7-01234567.lease") == replace(info, seconds=0.0,
                                                                      cache="")
    assert replace(info, seconds=0.0).span().total_seconds() == 1200


def test_journal_entry_golden():
    from repo_engine.repository.formats import JOURNAL
    from repo_engine.repository.journal import (Entry, PackOp, RefsOp, SweepOp, decode,
                                                encode)
    from repo_engine.repository.packs import ENTRY_DTYPE

    rows = np.array([(5, b"\x01" * 32, 16, 10, 20, 1)], dtype=ENTRY_DTYPE)
    entry = Entry(3, [RefsOp(1, 4096), PackOp("ab" * 32, 99, rows),
                      SweepOp("00" * 8, np.array([7], np.uint64), [], [])], "T", "h", 9)
    data = encode(entry)
    assert data[:16] == JOURNAL.magic + b"\x01\x00\x00\x00" + bytes(4)
    (length,) = np.frombuffer(data[24:28], "<u4")
    header = data[28:28 + length]
    assert header == (
        b'{"host": "h", "ops": [{"count": 4096, "first": 1, "op": "refs"}, '
        b'{"entries": [0, 1], "name": "' + b"ab" * 32 + b'", "op": "pack", "size": 99}, '
        b'{"maps": [], "op": "sweep", "packs": [], "plan": "0000000000000000", '
        b'"refs": [60, 1]}], "pid": 9, "seq": 3, "time": "T"}')
    binary = zstandard.ZstdDecompressor().decompress(data[28 + length:-32])
    assert binary == rows.tobytes() + (7).to_bytes(8, "little")
    back = decode(data, "e")
    assert back.seq == 3 and back.ops[0] == RefsOp(1, 4096)
    assert back.ops[1].entries.tobytes() == rows.tobytes() and back.ops[2].refs.tolist() == [7]
    damaged = bytearray(data)
    damaged[30] ^= 1
    with pytest.raises(DamageError, match="checksum"):
        decode(bytes(damaged), "e")


def test_journal_retire_op_golden():
    from repo_engine.repository.journal import Entry, RetireOp, decode, encode

    data = encode(Entry(5, [RetireOp([1, 2])], "T", "h", 9))
    (length,) = np.frombuffer(data[24:28], "<u4")
    assert data[28:28 + length] == (b'{"host": "h", "ops": [{"epochs": [1, 2], "op": "retire"}], '
                                    b'"pid": 9, "seq": 5, "time": "T"}')
    assert decode(data, "e").ops == [RetireOp([1, 2])]
    for bad in (b'[0]', b'"1"', b'[1.5]', b'{"1": 1}'):
        header = data[28:28 + length].replace(b"[1, 2]", bad)
        forged = seal(JOURNAL, struct.pack("<I", len(header)) + header)
        with pytest.raises(DamageError, match="retired epochs are not"):
            decode(forged, "e")


def test_journal_quarantine_op_golden():
    from repo_engine.repository.journal import Entry, QuarantineOp, decode, encode

    data = encode(Entry(6, [QuarantineOp(np.array([7, 9], np.uint64), ["bad", "gone"])], "T",
                        "h", 9))
    (length,) = np.frombuffer(data[24:28], "<u4")
    header = data[28:28 + length]
    assert header == (b'{"host": "h", "ops": [{"op": "quarantine", "reasons": ["bad", "gone"], '
                      b'"refs": [0, 2]}], "pid": 9, "seq": 6, "time": "T"}')
    binary = zstandard.ZstdDecompressor().decompress(data[28 + length:-32])
    assert binary == np.array([7, 9], "<u8").tobytes()
    [op] = decode(data, "e").ops
    assert op.refs.tolist() == [7, 9] and op.reasons == ["bad", "gone"]
    for bad in (b'["bad"]', b'["bad", 1]', b'"bad"'):
        forged_header = header.replace(b'["bad", "gone"]', bad)
        frame = data[28 + length:-32]
        forged = seal(JOURNAL, struct.pack("<I", len(forged_header)) + forged_header + frame)
        with pytest.raises(DamageError, match="quarantine reasons are not"):
            decode(forged, "e")


def test_checkpoint_with_a_quarantine_golden(tmp_path):
    """A checkpoint of a cache holding a quarantined ref is of major version 2 and carries it in
    a `QUAR` record after the `REFS` one: JSON the reasons, binary the refs."""
    from repo_engine.repository.checkpoint import RECORD, checkpoint_object, write_checkpoint
    from repo_engine.repository.formats import CHECKPOINT_QUARANTINE
    from repo_engine.repository.index import Index
    from repo_engine.repository.packs import FinishedPack, PackEntry

    store = LocalStore(tmp_path)
    index = Index(tmp_path / "index", create=True)
    index.commit_pack(FinishedPack("ab" * 32, 99, [PackEntry(5, b"\x01" * 32, 16, 10, 20, 1)]))
    with index.write() as txn:
        assert index.quarantine_ref(txn, 5, "damaged")
    seq = write_checkpoint(store, index)
    index.close()
    raw = (tmp_path / checkpoint_object(seq)).read_bytes()
    assert CHECKPOINT_QUARANTINE.major == 2
    assert raw[:16] == CHECKPOINT_QUARANTINE.magic + b"\x02\x00\x00\x00" + bytes(4)
    records, at = [], 16
    while at < len(raw) - 32:
        tag, text, frame = RECORD.unpack_from(raw, at)
        body = zstandard.ZstdDecompressor().decompress(raw[at + 16:at + 16 + frame])
        records.append((tag, body[:text], body[text:]))
        at += 16 + frame
    assert [tag for tag, _, _ in records] == [b"META", b"PACK", b"REFS", b"QUAR", b"END!"]
    assert records[3][1:] == (b'["damaged"]', (5).to_bytes(8, "little"))
    assert records[2][2][-1] == 0  # the REFS row of ref 5: not `indexed`


def test_checkpoint_golden(tmp_path):
    from repo_engine.repository.checkpoint import (CHECKSUM_SIZE, RECORD, checkpoint_object,
                                                   write_checkpoint)
    from repo_engine.repository.formats import CHECKPOINT
    from repo_engine.repository.index import Index

    store = LocalStore(tmp_path)
    index = Index(tmp_path / "index", create=True)
    seq = write_checkpoint(store, index)
    index.close()
    raw = (tmp_path / checkpoint_object(seq)).read_bytes()
    assert checkpoint_object(0) == "journal/0000000000000000.ckpt"
    assert raw[:16] == CHECKPOINT.magic + b"\x01\x00\x00\x00" + bytes(4)
    tag, text, frame = RECORD.unpack_from(raw, 16)
    assert tag == b"META"
    body = zstandard.ZstdDecompressor().decompress(raw[32:32 + frame])
    assert sorted(json.loads(body[:text])) == ["host", "next_ref", "next_seq", "retired", "seq",
                                               "time"]
    end = 32 + frame
    tag, text, frame = RECORD.unpack_from(raw, end)
    assert tag == b"END!"
    assert zstandard.ZstdDecompressor().decompress(raw[end + 16:end + 16 + frame]) == \
        b'{"records": 1}'
    assert raw[-CHECKSUM_SIZE:] == blake3.blake3(raw[:-CHECKSUM_SIZE]).digest()


def test_salted_block_map_golden():
    """A salt is 7 bytes of the header: the same content under another name."""
    data = encode(BlockMap.full(np.array([1], dtype=np.uint64)), b"\x05" * 7)
    assert data[:12] == BLOCK_MAP.magic + b"\x02\x00\x00\x00"
    assert data[24:56].hex() == ("00" + "05" * 7 + "0100000000000000" + "0100000000000000"
                                 + "14000000" + "01000000")


def test_sealed_pack_golden(tmp_path):
    """Major 2, rebuilt from the primitives: AES-256-GCM under HKDF-SHA256(data key, salt,
    "repo-engine object v1 pack"), each chunk's nonce its offset, the toc's its offset."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    from repo_engine.repository.crypto.seal import ObjectSealer

    (tmp_path / "tmp").mkdir()
    store = LocalStore(tmp_path)
    data_key, salt = bytes(range(32)), b"\x07" * 32
    writer = PackWriter(store, ObjectSealer({3: data_key}, 3, random=lambda n: salt[:n]))
    chunks = [(5, b"\x01" * 32, b"first", 9, 1), (6, bytes(31) + b"\x02", b"second!", 7, 0)]
    for chunk in chunks:
        writer.add(*chunk)
    pack = writer.finish()
    raw = (tmp_path / pack_object(pack.name)).read_bytes()

    aead = AESGCM(HKDF(hashes.SHA256(), 32, salt, b"repo-engine object v1 pack").derive(data_key))

    def ad(kind: bytes, name: bytes) -> bytes:  # length-prefixed kind and name, then the epoch
        return bytes([len(kind)]) + kind + len(name).to_bytes(2, "little") + name + \
            (3).to_bytes(4, "little")

    header = PACK.magic + b"\x02\x00\x00\x00" + bytes(4) + (3).to_bytes(4, "little") + salt
    blobs, table, toc, at = b"", b"", b"", len(header)
    for ref, chunk_id, stored, raw_len, codec in chunks:
        blob = aead.encrypt(at.to_bytes(12, "little"), stored, ad(b"chunk", chunk_id))
        table += (at.to_bytes(8, "little") + len(blob).to_bytes(4, "little")
                  + blake3.blake3(blob).digest(length=16))
        toc += (ref.to_bytes(8, "little") + chunk_id + raw_len.to_bytes(4, "little")
                + bytes([codec]) + bytes(3))
        blobs, at = blobs + blob, at + len(blob)
    toc_at = at + len(table)
    sealed_toc = aead.encrypt(toc_at.to_bytes(12, "little"), toc,
                              ad(b"trailer", blake3.blake3(header + table).digest()))
    trailer = table + sealed_toc
    footer = (b"REtrl\x00\x01\x1a" + (2).to_bytes(4, "little") + b"\x02\x00" + bytes(2)
              + at.to_bytes(8, "little") + blake3.blake3(trailer).digest())
    assert raw == header + blobs + trailer + footer
    assert pack.name == blake3.blake3(raw).hexdigest()
    assert [(e.offset, e.stored) for e in pack.entries] == [(52, 5 + 16), (73, 7 + 16)]
