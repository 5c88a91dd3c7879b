"""The index is a cache: damage to it is found (exit 3, a named cause, 'rebuild-index' as advice)
or does no harm, and never turns into a wrong restore. Bits are flipped in every LMDB table and in
every field of a catalog record; the LMDB file itself is truncated, zeroed and filled with garbage;
commit order, not the clock, decides a VM's latest point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import pytest

from helpers import KIB, MIB, DiskModel, cli, write_extents
from repo_engine.maintenance import gc as gc_module
from repo_engine.repository.formats import INDEX_VERSION
from repo_engine.repository.index import U64, Index
from repo_engine.repository.locality import dedup_refs
from repo_engine.repository.repo import Repository
from repo_engine.repository.seals import PAYLOAD

BS = 16 * KIB
TABLES = ("meta", "ids", "refs", "packs", "packnames", "points", "mapuse", "refcount",
          "packlive")


class Chain:
    """Repository with VM a (three points of a changing disk, the disk shares nothing with
    VM b) and b (one point); `expected` maps point ids to their disk's bytes."""

    def __init__(self, tmp_path: Path, capsys) -> None:
        self.tmp, self.capsys = tmp_path, capsys
        self.repo = tmp_path / "repo"
        assert cli(capsys, "init", self.repo, "--block-size", "16KiB",
                   "--pack-size", "64KiB").code == 0
        self.rng = np.random.default_rng(11)
        self.models = {vm: DiskModel(tmp_path / f"{vm}.img", MIB // 2, self.rng) for vm in "ab"}
        self.expected: dict[str, bytes] = {}
        for model in self.models.values():
            model.write(0, self.rng.integers(0, 256, MIB // 2, dtype=np.uint8).tobytes())
        for _ in range(3):
            self.backup("a", changes=2)
        self.backup("b")

    def backup(self, vm: str, changes: int = 0, *extra: object) -> str:
        model = self.models[vm]
        args = ["backup", "image", self.repo, "--vm", vm, "--disk", f"sda={model.path}", "--json"]
        if changes:
            extents = []
            for _ in range(changes):
                offset = int(self.rng.integers(0, MIB // 2 // BS)) * BS
                model.write(offset, self.rng.integers(0, 256, BS, dtype=np.uint8).tobytes())
                extents.append([offset, BS])
            path = write_extents(self.tmp / f"{vm}-{len(self.expected)}.json", extents)
            args += ["--changed", f"sda={path}"]
        result = cli(self.capsys, *args, *extra)
        assert result.code == 0, result.err
        point = result.json()["point"]["id"]
        self.expected[point] = model.copy_of_content()
        return point

    def restore(self, point: str) -> tuple[int, bytes | None, str]:
        target = self.tmp / "out.img"
        target.unlink(missing_ok=True)
        result = cli(self.capsys, "restore", self.repo, point[:12], "--disk", "sda", "--to", target)
        return result.code, target.read_bytes() if result.code == 0 else None, result.err

    def assert_never_wrong(self, sample: bool = False) -> list[int]:
        """Every point (`sample`: the first and the last three) restores right or fails loudly
        (exit 3 naming the cause); returns the exit codes."""
        codes = []
        points = list(self.expected)
        for point in points[:1] + points[-3:] if sample else points:
            content = self.expected[point]
            code, data, err = self.restore(point)
            assert code in (0, 3), err
            assert code == 0 and data == content or code == 3 and "error:" in err, (point, err)
            codes.append(code)
        return codes


@pytest.fixture
def chain(tmp_path, capsys) -> Chain:
    return Chain(tmp_path, capsys)


def flip(repo: Path, table: str, key: bytes, *, bit: int, in_key: bool = False) -> bool:
    """Flip one bit of a value (or the key) of an index table, as bad media would. A flipped
    key that equals another key is not applied (returns False): in the file both records would
    remain, which a put cannot express."""
    env = lmdb.open(str(repo / "index"), max_dbs=32, map_size=1 << 40)
    try:
        db = env.open_db(table.encode())
        with env.begin(write=True) as txn:
            value = txn.get(key, db=db)
            assert value is not None
            data = bytearray(key if in_key else value)
            data[bit // 8 % len(data)] ^= 1 << bit % 8
            if in_key:
                if txn.get(bytes(data), db=db) is not None:
                    return False
                txn.delete(key, db=db)
                txn.put(bytes(data), value, db=db)
            else:
                txn.put(key, bytes(data), db=db)
    finally:
        env.close()
    return True


def table_items(repo: Path, table: str) -> list[tuple[bytes, bytes]]:
    env = lmdb.open(str(repo / "index"), max_dbs=32, map_size=1 << 40, readonly=True)
    try:
        with env.begin() as txn:
            return list(txn.cursor(db=env.open_db(table.encode(), txn=txn, create=False)))
    finally:
        env.close()


# -- ids and refs: a dedup hit is checked -----------------------------------------------------------
def test_flipped_ids_never_dedup_a_block_to_another_chunk(chain, capsys):
    ids = table_items(chain.repo, "ids")
    for key, value in ids:
        # the flipped value names another stored chunk (refs are dense small numbers)
        flip(chain.repo, "ids", key, bit=int(U64.unpack(value)[0] > 1))
    verify = cli(capsys, "verify", chain.repo)
    assert verify.code == 3 and "ids table" in verify.err + verify.out
    assert "rebuild-index" in verify.err + verify.out
    # a full read of a's disk looks every block up: each damaged hit must be refused
    point = chain.backup("a")
    shown = cli(capsys, "show", chain.repo, point[:12], "--json").json()["point"]
    assert shown["disks"][0]["counters"]["index_mismatches"] > 0
    assert "stored again" in shown["disks"][0]["note"]
    assert chain.assert_never_wrong() == [0] * len(chain.expected)
    assert cli(capsys, "rebuild-index", chain.repo).code == 0
    assert cli(capsys, "verify", chain.repo).code == 0


# -- catalog records: checked, and compared with the manifests ----------------------------------
def test_every_bit_of_a_catalog_record_is_checked(chain, capsys):
    point = next(iter(chain.expected))
    [(key, value)] = [(k, v) for k, v in table_items(chain.repo, "points")
                      if k.decode() == point]
    record = json.loads(value)
    # one flip inside each field's text, plus the whole record's first and last byte
    text = value.decode()
    spots = [0, len(value) - 1] + [text.index(f'"{name}"') + len(name) + 4 for name in record]
    for spot in spots:
        flip(chain.repo, "points", key, bit=spot * 8 + 1)
        verify = cli(capsys, "verify", chain.repo)
        assert verify.code == 3, (spot, verify.out)
        assert "catalog record" in verify.out + verify.err and "rebuild-index" in verify.out
        code, _data, err = chain.restore(point)
        assert code == 3 and "catalog record of point" in err and "rebuild-index" in err, err
        flip(chain.repo, "points", key, bit=spot * 8 + 1)  # flip back
    assert chain.assert_never_wrong() == [0] * len(chain.expected)


def test_capacity_flip_in_a_catalog_record_fails_loudly(chain, capsys):
    point = list(chain.expected)[1]
    [(key, value)] = [(k, v) for k, v in table_items(chain.repo, "points")
                      if k.decode() == point]
    spot = value.index(b'"capacity": ') + len(b'"capacity": ')
    flip(chain.repo, "points", key, bit=spot * 8)  # 524288 -> 424288
    code, _data, err = chain.restore(point)
    assert code == 3 and "rebuild-index" in err
    assert cli(capsys, "verify", chain.repo).code == 3
    assert cli(capsys, "rebuild-index", chain.repo).code == 0
    assert chain.assert_never_wrong() == [0] * len(chain.expected)


def test_verify_compares_catalog_records_with_manifests(chain, capsys):
    point = list(chain.expected)[1]
    with Repository.open(chain.repo) as repo:
        record = repo.find_point(point).summary()
        record["disks"][0]["capacity"] += BS  # well sealed, and wrong
        repo.index.put_point(point, record)
    result = cli(capsys, "verify", chain.repo, "--json")
    assert result.code == 3
    assert any("disagrees with the manifest in disks" in e for e in result.json()["errors"])
    assert point in result.json()["damaged_points"]


# -- every table --------------------------------------------------------------------------------
@pytest.mark.parametrize("table", TABLES)
def test_bit_flips_in_every_table_are_found_or_harmless(chain, capsys, table):
    items = table_items(chain.repo, table)
    assert items
    step = 1 if table in ("meta", "points") else max(1, len(items) // 3)
    for n in range(0, len(items), step):
        if n >= len(items):
            return
        key = items[n][0]
        for bit in (0, 1, 4, 30, 63):
            in_key = table != "meta" and bit == 30
            if not flip(chain.repo, table, key, bit=bit, in_key=in_key):
                continue
            _check_damaged_repository(chain, capsys, f"{table}[{n}] bit {bit}")
            assert cli(capsys, "rebuild-index", chain.repo).code == 0
            assert cli(capsys, "verify", chain.repo).code == 0
            items = table_items(chain.repo, table)
            if n >= len(items):
                return
            key = items[n][0]


def _check_damaged_repository(chain: Chain, capsys, what: str) -> None:
    """Commands exit 0 or 3; restores are right or loud; a backup after the damage (new chunks
    get refs and pack numbers, every other block a dedup hit through the damaged tables) restores
    right; so do the points left after a forget and a gc that run on the damaged index."""
    verify = cli(capsys, "verify", chain.repo)
    assert verify.code in (0, 3), (what, verify.err)
    for command in ("points", "stats"):
        result = cli(capsys, command, chain.repo)
        assert result.code in (0, 3), (what, command, result.err)
    chain.assert_never_wrong(sample=True)
    model = chain.models["a"]
    for block in chain.rng.choice(MIB // 2 // BS, size=2, replace=False).tolist():
        model.write(block * BS, chain.rng.integers(0, 256, BS, dtype=np.uint8).tobytes())
    result = cli(capsys, "backup", "image", chain.repo, "--vm", "a", "--disk",
                 f"sda={model.path}", "--json")
    assert result.code in (0, 3), (what, result.err)
    if result.code == 0:
        chain.expected[result.json()["point"]["id"]] = model.copy_of_content()
    chain.assert_never_wrong(sample=True)
    if len(chain.expected) > 3:
        victim = list(chain.expected)[1]
        forget = cli(capsys, "forget", chain.repo, victim[:12])
        assert forget.code in (0, 3), (what, forget.err)
        if forget.code == 0:
            del chain.expected[victim]
    gc = cli(capsys, "gc", chain.repo, "--max-unused", "0")
    assert gc.code in (0, 3), (what, gc.err)
    chain.assert_never_wrong(sample=True)


# -- the LMDB file itself -----------------------------------------------------------------------
def _run(*args: object) -> subprocess.CompletedProcess:
    """The command in its own process: a mapped truncated file kills a process with SIGBUS."""
    return subprocess.run([sys.executable, "-m", "repo_engine", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("damage", ["truncated", "zeroed", "garbage", "empty"])
def test_damaged_lmdb_file_is_reported_and_rebuilt(chain, tmp_path, damage):
    data = chain.repo / "index" / "data.mdb"
    size = data.stat().st_size
    if damage == "truncated":
        os.truncate(data, size // 2)
    elif damage == "zeroed":
        data.write_bytes(bytes(size))
    elif damage == "garbage":
        data.write_bytes(np.random.default_rng(1).integers(0, 256, size, np.uint8).tobytes())
    else:
        data.write_bytes(b"")
    point = next(iter(chain.expected))
    for args in (["points", chain.repo], ["verify", chain.repo], ["stats", chain.repo],
                 ["restore", chain.repo, point[:12], "--disk", "sda", "--to", tmp_path / "x"],
                 ["backup", "image", chain.repo, "--vm", "a", "--disk",
                  f"sda={chain.models['a'].path}"]):
        result = _run(*args)
        assert result.returncode == 3, (args[0], result.returncode, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("repo-engine: error: "), result.stderr
        assert "rebuild-index" in lines[0] and "index" in lines[0]
    rebuilt = _run("rebuild-index", chain.repo)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert _run("verify", chain.repo).returncode == 0
    assert chain.assert_never_wrong() == [0] * len(chain.expected)


# -- commit order, not the clock ----------------------------------------------------------------
def test_latest_and_parents_follow_commit_order_when_the_clock_steps_back(chain, capsys,
                                                                          monkeypatch):
    times = iter(["2030-01-01T00:00:00.000000Z", "2029-06-01T00:00:00.000000Z",
                  "2029-06-01T00:00:01.000000Z", "2029-06-01T00:00:02.000000Z"])
    monkeypatch.setattr("repo_engine.backup.job.now_iso", lambda: next(times))
    future = chain.backup("a", 2)
    stepped = chain.backup("a", 2)  # the clock went back before this one
    after = chain.backup("a", 2)    # its change list is relative to `stepped`
    shown = cli(capsys, "show", chain.repo, stepped[:12], "--json").json()["point"]
    assert any("clock went backwards" in n for n in shown["notes"])
    disk = cli(capsys, "show", chain.repo, after[:12], "--json").json()["point"]["disks"][0]
    assert disk["parent"] == stepped
    latest = cli(capsys, "show", chain.repo, "a@latest", "--json").json()["point"]
    assert latest["id"] == after
    listed = [p["id"] for p in cli(capsys, "points", chain.repo, "--vm", "a",
                                      "--json").json()["points"]]
    assert listed[-3:] == [future, stepped, after]
    assert chain.assert_never_wrong() == [0] * len(chain.expected)
    # the order survives a rebuild of the index (manifests carry the sequence)
    assert cli(capsys, "rebuild-index", chain.repo).code == 0
    assert cli(capsys, "show", chain.repo, "a@latest", "--json").json()["point"]["id"] == after
    final = chain.backup("a", 2)
    disk = cli(capsys, "show", chain.repo, final[:12], "--json").json()["point"]["disks"][0]
    assert disk["parent"] == after
    assert chain.assert_never_wrong() == [0] * len(chain.expected)


def downgrade(repo: Path, version: int) -> None:
    """Rewrite the index as an older repo-engine wrote it: version 4 has no checks in its
    `unfindable` values (empty); version 3 no `unfindable` table; version 2 also no seals on
    the count tables; version 1 also no checks and no sequences in the catalog (nor in the
    manifests)."""
    env = lmdb.open(str(repo / "index"), max_dbs=32, map_size=1 << 40)
    with env.begin(write=True) as txn:
        unfindable = env.open_db(b"unfindable", txn=txn)
        if version == 4:
            for key in list(txn.cursor(db=unfindable).iternext(values=False)):
                txn.put(key, b"", db=unfindable)
        else:
            txn.drop(unfindable, delete=True)
        for table, size in PAYLOAD.items():
            if version >= 3:
                break
            db = env.open_db(table.encode(), txn=txn)
            for key, value in list(txn.cursor(db=db)):
                txn.put(key, value[:size], db=db)
        meta = env.open_db(b"meta", txn=txn)
        txn.put(b"version", U64.pack(version), db=meta)
        if version == 1:
            points = env.open_db(b"points", txn=txn)
            for key, value in list(txn.cursor(db=points)):
                record = json.loads(value)
                del record["check"], record["seq"]
                txn.put(key, json.dumps(record, sort_keys=True).encode(), db=points)
            txn.delete(b"next_seq", db=meta)
    env.close()
    if version == 1:
        with Repository.open(repo) as opened:  # manifests of that time had no sequence either
            for point in opened.points():
                manifest = opened.load_point(point.id)
                manifest.seq = 0
                opened.write_manifest(manifest)


@pytest.mark.parametrize("version", [1, 2, 3, 4])
def test_index_of_an_older_version_still_opens(chain, capsys, version):
    """Converted in place on open (1 via 2 and 3): records sealed with checks, counts with seals,
    the unfindable table made."""
    downgrade(chain.repo, version)
    listed = cli(capsys, "points", chain.repo, "--json")
    assert listed.code == 0, listed.err
    old = [p["id"] for p in listed.json()["points"]]
    assert old == list(chain.expected)
    assert dict(table_items(chain.repo, "meta"))[b"version"] == U64.pack(INDEX_VERSION)
    for table, size in PAYLOAD.items():
        assert {len(v) for _, v in table_items(chain.repo, table)} <= {size + 8}, table
    new = chain.backup("a", 2)
    assert cli(capsys, "show", chain.repo, "a@latest", "--json").json()["point"]["id"] == new
    assert cli(capsys, "verify", chain.repo).code == 0
    # the converted counts are trusted: forget + gc run incrementally and keep every point whole
    victim = list(chain.expected)[1]
    assert cli(capsys, "forget", chain.repo, victim[:12]).code == 0
    del chain.expected[victim]
    gc = cli(capsys, "gc", chain.repo, "--json")
    assert gc.code == 0 and gc.json()["mode"] == "incremental", gc.out
    assert gc.json()["counts_damaged"] == [] and gc.json()["chunks_dropped"] > 0
    assert cli(capsys, "verify", chain.repo).code == 0
    assert chain.assert_never_wrong() == [0] * len(chain.expected)


# -- counts gc trusts ---------------------------------------------------------------------------
def _flip_every_row(repo: Path, table: str, in_key: bool) -> int:
    """Flip a bit in every row of a count table: in the key, or the lowest set bit of the value's
    first u64 (a count lowered, the damage that would cost data). Returns the rows flipped."""
    flipped = 0
    for key, value in table_items(repo, table):
        first = U64.unpack(value[:8])[0]
        bit = 30 if in_key else (first & -first).bit_length() - 1
        if bit >= 0 and flip(repo, table, key, bit=bit, in_key=in_key):
            flipped += 1
    return flipped


@pytest.mark.parametrize("in_key", [False, True], ids=["value", "key"])
@pytest.mark.parametrize("table", list(PAYLOAD))
def test_damaged_counts_make_gc_recount_before_deleting(chain, capsys, table, in_key):
    """A count lowered or moved by damage, then a forget and a gc: gc notices (the seal fails,
    or a decrement finds no count), recounts from the catalog first, reports it, and every
    remaining point restores byte-identical."""
    victim = list(chain.expected)[1]
    if table == "deadmaps":  # owed decrements exist between a forget and the next gc
        assert cli(capsys, "forget", chain.repo, victim[:12]).code == 0
        del chain.expected[victim]
    assert _flip_every_row(chain.repo, table, in_key)
    verify = cli(capsys, "verify", chain.repo)
    assert verify.code == 3 and f"{table} entries of the index fail their check" in verify.out
    assert "gc --full" in verify.out
    if victim in chain.expected:
        forget = cli(capsys, "forget", chain.repo, victim[:12])
        assert forget.code == 0, forget.err
        del chain.expected[victim]
    gc = cli(capsys, "gc", chain.repo, "--max-unused", "0", "--json")
    assert gc.code == 0, gc.err
    report = gc.json()
    assert report["mode"] == "full" and report["counts_damaged"], report
    assert any(table in damage for damage in report["counts_damaged"]), report
    assert chain.assert_never_wrong() == [0] * len(chain.expected)
    assert cli(capsys, "verify", chain.repo).code == 0
    again = cli(capsys, "gc", chain.repo, "--json").json()
    assert again["mode"] == "incremental" and again["counts_damaged"] == []


# -- read-only media ----------------------------------------------------------------------------
@pytest.fixture
def read_only_repo(chain, tmp_path):
    """The chain's repository seen through a read-only bind mount."""
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "--bind", chain.repo, mount], capture_output=True).returncode:
        pytest.skip("cannot bind-mount here")
    try:
        remount = subprocess.run(["mount", "-o", "remount,ro,bind", mount], capture_output=True)
        if remount.returncode:
            pytest.skip("cannot remount read-only here")
        yield mount
    finally:
        subprocess.run(["umount", mount], check=True)


def test_read_only_repository_restores_and_refuses_writes(chain, capsys, tmp_path,
                                                          read_only_repo):
    ro = read_only_repo
    with pytest.raises(OSError):
        (ro / "probe").write_bytes(b"")
    points = list(chain.expected)
    for args in (["points", ro], ["show", ro, "a@latest"], ["diff", ro, points[0][:12],
                 points[2][:12]], ["stats", ro], ["verify", ro], ["scrub", ro]):
        result = cli(capsys, *args)
        assert result.code == 0, (args[0], result.err)
    for point, content in chain.expected.items():
        target = tmp_path / "out.img"
        target.unlink(missing_ok=True)
        result = cli(capsys, "restore", ro, point[:12], "--disk", "sda", "--to", target)
        assert result.code == 0, result.err
        assert target.read_bytes() == content
    model = chain.models["a"]
    for args in (["backup", "image", ro, "--vm", "a", "--disk", f"sda={model.path}"],
                 ["gc", ro], ["forget", ro, "--keep-last", "1"], ["rebuild-index", ro],
                 ["scrub", ro, "--repair"], ["verify", ro, "--repair"],
                 ["protect", ro, points[0][:12]]):
        result = cli(capsys, *args)
        assert result.code == 1, (args[0], result.err)
        assert result.err.startswith("repo-engine: error: ") and "read-only" in result.err
        assert len(result.err.strip().splitlines()) == 1, result.err


@pytest.mark.parametrize("live_side", [False, True], ids=["settled", "live-count"])
def test_queue_keys_naming_live_things_are_harmless(chain, capsys, monkeypatch, live_side):
    """gcq and deadpacks carry no seal: a damaged key there may name any ref or pack. Every live
    ref queued as a gc candidate and every listed pack queued for deletion cost nothing: the
    sweep gives a queued ref with a count back (`settled`), and a gc counting the live maps
    writes gcq anew (`live-count`)."""
    monkeypatch.setattr(gc_module, "_live_side_cheaper", lambda _repo: live_side)
    env = lmdb.open(str(chain.repo / "index"), max_dbs=32, map_size=1 << 40)
    with env.begin(write=True) as txn:
        gcq, deadpacks = env.open_db(b"gcq", txn=txn), env.open_db(b"deadpacks", txn=txn)
        for key, _ in txn.cursor(db=env.open_db(b"refs", txn=txn)):
            txn.put(key, b"", db=gcq)
        for name, _ in txn.cursor(db=env.open_db(b"packnames", txn=txn)):
            txn.put(name, b"", db=deadpacks)
    env.close()
    gc = cli(capsys, "gc", chain.repo, "--max-unused", "0", "--json")
    assert gc.code == 0, gc.err
    assert (gc.json()["resurrected"] > 0) != live_side
    assert chain.assert_never_wrong() == [0] * len(chain.expected)


def test_read_only_index_of_version_2_is_read_unsealed(chain, capsys, tmp_path, read_only_repo):
    downgrade(chain.repo, 2)  # through the writable path; the read-only mount sees it
    verify = cli(capsys, "verify", read_only_repo, "--json")
    assert verify.code == 0, verify.out
    for point, content in chain.expected.items():
        target = tmp_path / "out.img"
        target.unlink(missing_ok=True)
        assert cli(capsys, "restore", read_only_repo, point[:12], "--disk", "sda", "--to",
                   target).code == 0
        assert target.read_bytes() == content
    assert dict(table_items(chain.repo, "meta"))[b"version"] == U64.pack(2)  # left as it was


def test_read_only_index_of_version_3_answers_duplicates_by_id_alone(chain, read_only_repo):
    """No `unfindable` table to honour: the look-up by locality stays off (a read-only index
    backs nothing up, but the reader must not guess)."""
    downgrade(chain.repo, 3)
    index = Index(read_only_repo / "index")
    try:
        assert index.read_only and index.unfindable is None
        with index.reader() as reader:
            assert reader.places_between(1, 100) is None
            chunk_id = reader.chunk_id_of(1)
            assert dedup_refs(reader, [chunk_id]) == ([1], 0)
    finally:
        index.close()
    assert dict(table_items(chain.repo, "meta"))[b"version"] == U64.pack(3)
