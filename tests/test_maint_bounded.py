"""gc, verify and rebuild-index hold a few bytes per chunk, whatever the repository holds: the
index's tables are read a batch at a time (maintenance/tally.py) and rebuild-index spills the
trailers' entries to files by key range. With the batches and ranges made tiny, every command
takes the many-batch path (and every look-up in the refs table the sorted-search path), and must
say and leave exactly what it does in one batch; and the
Python memory they use at their peak stays a small number of bytes per chunk."""

from __future__ import annotations

import gc
import json
import shutil
import sys
import tracemalloc
from pathlib import Path

import lmdb
import numpy as np
import pytest

from helpers import cli
from repo_engine.maintenance import inventory, rebuild, tally
from repo_engine.repository import blockmap
from repo_engine.repository.index import U64
from repo_engine.repository.index_records import PACK_KEY, REF_KEY, REF_REC
from repo_engine.repository.repo import Repository

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from bigrepo import grow  # noqa: E402

CHUNKS = 60_000


def _small_budget(monkeypatch) -> None:
    monkeypatch.setattr(tally, "ROWS", 777)
    monkeypatch.setattr(rebuild, "REF_SPAN", 1024)
    monkeypatch.setattr(rebuild, "ID_ROWS", 500)
    monkeypatch.setattr(blockmap, "SORT_FIRST", 0)


def _dump(repo: Path) -> dict[str, list]:
    """Every table of the index (the id filter's random epoch aside)."""
    env = lmdb.open(str(repo / "index"), max_dbs=32, readonly=True, lock=False)
    out = {}
    try:
        with env.begin() as txn:
            for name, _ in list(txn.cursor()):
                db = env.open_db(name, txn=txn, create=False)
                out[name.decode()] = [(k, v) for k, v in txn.cursor(db=db)
                                      if not (name == b"meta" and k == b"ids_epoch")]
    finally:
        env.close()
    return out


def _run(capsys, *args: object) -> tuple[int, dict]:
    result = cli(capsys, *args, "--json")
    doc = json.loads(result.out) if result.out.strip() else {"err": result.err}
    doc.pop("seconds", None)
    doc.pop("waited_seconds", None)
    return result.code, doc


def _damage(repo: Path) -> None:
    """Index damage of every kind verify tells apart, far from the first batch: a place record
    gone, one naming a pack its trailer does not list the ref in, one with a wrong offset, one
    naming an unlisted pack, an ids entry naming another chunk's ref, a lowered count."""
    with Repository.open(repo) as opened:
        index = opened.index
        with index.write() as txn:
            refs = sorted(REF_KEY.unpack(k)[0] for k, _ in txn.cursor(db=index.refs))
            gone, moved, shifted, unlisted = refs[-5], refs[40_123], refs[33_333], refs[-7]
            txn.delete(REF_KEY.pack(gone), db=index.refs)
            for ref, change in ((moved, "pack"), (shifted, "offset"), (unlisted, "unlisted")):
                fields = list(REF_REC.unpack(txn.get(REF_KEY.pack(ref), db=index.refs)))
                if change == "pack":
                    fields[1] = 0 if fields[1] else 1
                elif change == "offset":
                    fields[2] += 1
                else:
                    fields[1] = 999_999
                txn.put(REF_KEY.pack(ref), REF_REC.pack(*fields), db=index.refs)
            other = txn.get(REF_KEY.pack(refs[20_000]), db=index.refs)[:32]
            txn.put(other, U64.pack(refs[20_001]), db=index.ids)
            key = REF_KEY.pack(refs[45_000])
            index.put_sealed(txn, "refcount", key, U64.pack(0))
            assert txn.get(PACK_KEY.pack(999_999), db=index.packs) is None


@pytest.fixture(scope="module")
def grown(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("bounded") / "repo"
    grow(repo, CHUNKS, 6_000, 3)
    return repo


def _copies(grown: Path, tmp_path: Path) -> tuple[Path, Path]:
    one, many = tmp_path / "one", tmp_path / "many"
    shutil.copytree(grown, one)
    shutil.copytree(grown, many)
    return one, many


def _steps(capsys, repo: Path, forget: list[str]) -> list[tuple[int, dict]]:
    return [_run(capsys, "forget", repo, *forget), _run(capsys, "gc", repo, "--dry-run"),
            _run(capsys, "gc", repo), _run(capsys, "verify", repo),
            _run(capsys, "gc", repo, "--full"), _run(capsys, "rebuild-index", repo),
            _run(capsys, "verify", repo)]


def test_many_batches_say_and_leave_what_one_does(grown, tmp_path, capsys, monkeypatch):
    one, many = _copies(grown, tmp_path)
    forget = sorted(p.stem for p in (grown / "points").glob("*.point"))[:2]
    single = _steps(capsys, one, forget)
    _small_budget(monkeypatch)
    batched = _steps(capsys, many, forget)
    assert batched == single
    assert [code for code, _ in single] == [0] * 7
    assert single[2][1]["chunks_dropped"] == 12_000
    assert single[-1][1]["refs"] == CHUNKS - 12_000
    assert _dump(many) == _dump(one)


def test_damage_found_in_many_batches_as_in_one(grown, tmp_path, capsys, monkeypatch):
    one, many = _copies(grown, tmp_path)
    for repo in (one, many):
        _damage(repo)
    single = [_run(capsys, "verify", one), _run(capsys, "gc", one, "--dry-run"),
              _run(capsys, "gc", one, "--full")]
    _small_budget(monkeypatch)
    batched = [_run(capsys, "verify", many), _run(capsys, "gc", many, "--dry-run"),
               _run(capsys, "gc", many, "--full")]
    assert batched == single
    assert single[2][1]["recount"] == {"under_counted": 1, "over_counted": 0}
    assert _dump(many) == _dump(one)  # the missing ref keeps its count
    code, report = single[0]
    assert code == 3
    text = "\n".join(report["errors"])
    assert "1 chunk refs used by points are not in the index" in text
    assert "2 entries of the index's ids table name a chunk ref" in text  # and the gone one's
    assert "2 index entries disagree with its trailer" in text or text.count(
        "1 index entries disagree with its trailer") == 2
    assert "1 index entries name pack number 999999, which the index does not list" in text
    assert "1 chunk reference counts are too low" in text
    assert len(report["affected"]) >= 3
    rebuilt = [_run(capsys, "rebuild-index", many), _run(capsys, "verify", many)]
    monkeypatch.undo()
    assert [_run(capsys, "rebuild-index", one), _run(capsys, "verify", one)] == rebuilt
    assert rebuilt[1][0] == 0, rebuilt[1]
    assert _dump(many) == _dump(one)


@pytest.fixture(scope="module")
def larger(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("bounded") / "larger"
    grow(repo, 3 * CHUNKS, 6_000, 3)
    return repo


def _peak(capsys, repo: Path, command: list[str], code: int = 0) -> int:
    """The Python memory (numpy arrays, bytes read from the index) `command` adds at its
    peak, on a copy of `repo` (for `scrub`, one of its packs deleted first: the damage path,
    which looks up the chunks the index places in that pack)."""
    copy = repo.with_name(repo.name + "-copy")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(repo, copy)
    assert cli(capsys, "verify", copy).code == 0  # imports and caches warmed
    if command[0] == "scrub":
        min((copy / "packs").rglob("*.pack")).unlink()
    gc.collect()  # no garbage of earlier tests freed during the command, lowering its peak
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        result = cli(capsys, *command, copy)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert result.code == code, result.err
    shutil.rmtree(copy)
    return peak


@pytest.mark.parametrize("command", [["verify"], ["gc", "--full"], ["gc", "--dry-run"],
                                     ["rebuild-index"], ["scrub"]])
def test_memory_is_a_few_bytes_a_chunk(grown, larger, capsys, monkeypatch, command):
    """What a command holds per chunk: the growth of its peak from a repository to one of three
    times the chunks (what does not grow with the chunks, such as a map's window, cancels out).
    About 25 bytes a chunk; before, the whole tables were held (290 bytes a chunk for verify,
    and more than 100 for the others)."""
    _small_budget(monkeypatch)
    code = 3 if command[0] == "scrub" else 0
    per_chunk = (_peak(capsys, larger, command, code) - _peak(capsys, grown, command, code)
                 ) / (2 * CHUNKS)
    assert per_chunk < 48, f"{' '.join(command)}: {per_chunk:.0f} bytes a chunk at its peak"


def test_rebuild_keeps_the_copy_that_decodes(grown, tmp_path, capsys, monkeypatch):
    """A ref in two packs (an interrupted repack): the copy that decodes is kept, as before the
    spill, in many ranges as in one."""
    one, many = _copies(grown, tmp_path)
    for repo in (one, many):
        refs, new = _duplicate_damaged(repo)
    rebuilt = _run(capsys, "rebuild-index", one)
    _small_budget(monkeypatch)
    assert _run(capsys, "rebuild-index", many) == rebuilt
    assert rebuilt[1]["duplicate_refs"] == 6_000
    assert _dump(many) == _dump(one)
    monkeypatch.undo()
    assert _run(capsys, "verify", many)[0] == 0
    with Repository.open(many) as opened, opened.index.reader() as reader:
        places = reader.locate(refs)
        assert {opened.index.pack_info(int(n)).name for n in places["pack"]} == {new}


def _duplicate_damaged(repo: Path) -> tuple[np.ndarray, str]:
    """Copy the chunks of the first pack into a new pack (the same refs: a repack that had not
    moved them yet), then damage the first byte of every chunk in the old one. Returns the refs
    and the new pack's name."""
    with Repository.open(repo) as opened:
        info = opened.index.all_packs()[0]
        entries = opened.read_trailer(info.name)
        data = bytearray(opened.read_pack(info.name, info.size))
        writer = opened.pack_writer()
        for e in entries[::-1]:  # another order: another pack (a pack's name is its hash)
            offset, stored = int(e["offset"]), int(e["stored"])
            writer.add(int(e["ref"]), e["id"].tobytes(), bytes(data[offset:offset + stored]),
                       int(e["raw"]), int(e["codec"]))
        new = writer.finish().name
        path = repo / "packs" / info.name[:2] / f"{info.name}.pack"
        for offset in np.unique(entries["offset"]).tolist():
            data[offset] ^= 0xFF
        path.chmod(0o600)
        path.write_bytes(bytes(data))
    return entries["ref"].astype(np.uint64), new


def test_the_whole_refs_table_costs_its_rows_only(grown, monkeypatch):
    """scan_refs: the whole table filled a batch at a time, the same rows as the LMDB cursor
    gives, at a peak of little more than the table itself (before, the table's bytes were joined
    whole first: 125 bytes a row)."""
    _small_budget(monkeypatch)
    with Repository.open(grown) as repo, repo.index.env.begin() as txn:
        gc.collect()
        tracemalloc.start()
        try:
            table = inventory.scan_refs(repo.index, txn)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        rows = list(txn.cursor(db=repo.index.refs))
    assert len(table) == len(rows) >= CHUNKS
    assert table["ref"].tolist() == [int.from_bytes(k, "big") for k, _ in rows]
    assert table[len(rows) // 2]["id"].tobytes() == rows[len(rows) // 2][1][:32]
    assert peak < (table.itemsize + 16) * len(table), f"{peak / len(table):.0f} bytes a row"
