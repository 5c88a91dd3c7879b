"""The id filter in front of the index (idfilter.py): it may only ever answer "surely absent" for
an id the index lacks, whatever happened since it was built (inserts, a crash before it was saved,
another writer, rebuild-index, a shared repository's journal replay), and a backup stores the
same bytes with it as without it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import MIB, DiskModel, attach_shared, cli, repo_with_point, shared_repo, tree_digest
from repo_engine.backup.job import BackupOptions, backup_vm
from repo_engine.repository import idfilter
from repo_engine.repository.idfilter import FILE, IdFilter
from repo_engine.repository.index import Index
from repo_engine.repository.packs import FinishedPack, PackEntry
from repo_engine.repository.store.local import LocalStore
from repo_engine.sources.image import ImageDisk, image_snapshot

ROOT = Path(__file__).resolve().parent.parent


def random_ids(count: int, seed: int) -> list[bytes]:
    return [bytes(i) for i in np.random.default_rng(seed).integers(0, 256, (count, 32), np.uint8)]


def commit_ids(index: Index, ids: list[bytes], name: int) -> None:
    """Index one pack holding `ids` (fresh refs), as a backup's pack commit does."""
    first = index.reserve_refs(len(ids))
    entries = [PackEntry(first + i, chunk_id, 16 + 10 * i, 10, 10, 0)
               for i, chunk_id in enumerate(ids)]
    index.commit_pack(FinishedPack(f"{name:064x}", 100, entries))


def absent(index: Index, ids: list[bytes]) -> np.ndarray | None:
    with index.reader() as reader:
        return reader.surely_absent(ids)


def assert_never_absent(index: Index, present: list[bytes]) -> None:
    """No present id is called absent (None: the filter declined to answer, also correct)."""
    answer = absent(index, present)
    assert answer is None or not answer.any()


@pytest.fixture
def index(tmp_path):
    opened = Index(tmp_path / "index", create=True)
    yield opened
    opened.close()


def test_inserts_after_the_filter_is_built_are_never_absent(index):
    stored = random_ids(500, 1)
    commit_ids(index, stored, 1)
    new = random_ids(500, 2)
    assert absent(index, new).all()  # built from the index: answers, and knows the new ones
    assert not absent(index, stored).any()
    for n in range(2, 12):  # inserts while the filter is loaded go into it
        batch = random_ids(300, 100 + n)
        commit_ids(index, batch, n)
        stored += batch
        answer = absent(index, stored + new)
        assert answer is not None, "a filter that saw every insert keeps answering"
        assert not answer[:len(stored)].any()
    # most new ids are still known to be absent (10 bits per id: about 1% say "maybe")
    assert absent(index, random_ids(2000, 3)).mean() > 0.9


def test_a_crash_before_the_filter_is_saved(tmp_path):
    """The saved filter misses inserts committed after it (the process died before saving):
    the next process sees it is stale and builds it again."""
    path = tmp_path / "index"
    first = Index(path, create=True)
    early = random_ids(200, 1)
    commit_ids(first, early, 1)
    absent(first, early)
    first.close()  # saves the filter
    saved = (path / FILE).read_bytes()
    second = Index(path)
    absent(second, early)
    late = random_ids(200, 2)
    commit_ids(second, late, 2)
    second.env.close()  # killed: committed to the index, the filter not saved
    assert (path / FILE).read_bytes() == saved
    third = Index(path)
    try:
        assert not absent(third, early + late).any()
        assert absent(third, random_ids(200, 3)).mean() > 0.9
    finally:
        third.close()
    assert IdFilter.decode((path / FILE).read_bytes(), "f").covered == [
        (0, 400)], "the rebuilt filter is saved, covering every insert"


def test_a_damaged_filter_file_is_built_again(tmp_path):
    path = tmp_path / "index"
    first = Index(path, create=True)
    stored = random_ids(100, 1)
    commit_ids(first, stored, 1)
    absent(first, stored)
    first.close()
    data = bytearray((path / FILE).read_bytes())
    data[100] ^= 0xFF
    (path / FILE).write_bytes(bytes(data))
    again = Index(path)
    try:
        assert not absent(again, stored).any()
    finally:
        again.close()


WRITER = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[2])
from test_idfilter import commit_ids, random_ids
from repo_engine.repository.index import Index
index = Index(__import__("pathlib").Path(sys.argv[1]))
commit_ids(index, random_ids(300, 7), 7)
index.close()
"""


def another_writer(tmp_path: Path) -> list[bytes]:
    """Commit ids from another process (LMDB: one environment per process); returns them."""
    subprocess.run([sys.executable, "-c", WRITER, str(tmp_path / "index"),
                    str(ROOT / "tests")], check=True, cwd=ROOT)
    return random_ids(300, 7)


def test_another_writers_inserts_are_never_absent(index, tmp_path):
    """Another process commits ids after this one loaded its filter: this one's filter does
    not cover the index its readers see, so it does not answer until it is rebuilt."""
    commit_ids(index, random_ids(100, 1), 1)
    assert absent(index, random_ids(10, 2)).all()
    assert absent(index, another_writer(tmp_path)) is None


def test_an_aborted_insert_claims_nothing(index, tmp_path):
    """Counts an aborted transaction took are taken again by the next insert, here another
    process's: the filter must not claim it covers them."""
    commit_ids(index, random_ids(10, 1), 1)
    absent(index, random_ids(1, 9))
    with pytest.raises(RuntimeError):
        with index.write() as txn:
            index.id_filter.inserted(txn, random_ids(300, 2))
            raise RuntimeError("stop")
    assert_never_absent(index, another_writer(tmp_path))


def test_a_filter_of_another_index_is_not_trusted(tmp_path, capsys):
    """rebuild-index makes a new index (a new epoch): an old filter file put back next to it
    answers nothing; the backup after the rebuild finds every chunk."""
    repo = tmp_path / "repo"
    assert cli(capsys, "init", repo, "--block-size", "64KiB").code == 0
    model = DiskModel(tmp_path / "d.img", 2 * MIB, np.random.default_rng(1))
    model.random_changes(5)
    assert cli(capsys, "backup", "image", repo, "--vm", "v", "--disk", f"d={model.path}").code == 0
    old = (repo / "index" / FILE).read_bytes()
    assert cli(capsys, "rebuild-index", repo).code == 0
    (repo / "index" / FILE).write_bytes(old)
    stale = IdFilter.decode(old, "f")
    rebuilt = Index(repo / "index")
    try:
        with rebuilt.env.begin() as txn:
            epoch = txn.get(idfilter.EPOCH, db=rebuilt.meta)
        assert epoch is not None and epoch != stale.epoch
    finally:
        rebuilt.close()
    again = cli(capsys, "backup", "image", repo, "--vm", "w", "--disk", f"d={model.path}",
                "--json")
    assert again.code == 0
    assert again.json()["backup"]["new_chunks"] == 0


def test_a_shared_repository_refresh_feeds_the_filter(tmp_path):
    """A host whose filter is loaded replays another host's backup from the journal: the
    ids it learns that way are never absent, and its filter keeps answering."""
    a = shared_repo(tmp_path / "repo", tmp_path / "cache-a")
    b = attach_shared(LocalStore(tmp_path / "repo"), tmp_path / "cache-b")
    try:
        assert_never_absent(b.index, random_ids(1, 1))
        model = DiskModel(tmp_path / "d.img", 2 * MIB, np.random.default_rng(2))
        model.random_changes(6)
        backup_vm(a, image_snapshot("vm", [ImageDisk("d", model.path)]), BackupOptions())
        b.refresh()
        with b.index.env.begin() as txn:
            theirs = [key for key, _ in txn.cursor(db=b.index.ids)]
        assert theirs
        answer = absent(b.index, theirs + random_ids(50, 3))
        assert answer is not None and not answer[:len(theirs)].any()
        assert answer[len(theirs):].mean() > 0.9
    finally:
        a.close()
        b.close()


def backups(tmp_path: Path, capsys, repo: Path, images: list[Path]) -> None:
    for n, image in enumerate(images):
        assert cli(capsys, "backup", "image", repo, "--vm", f"v{n}", "--disk",
                   f"d={image}").code == 0


def test_backups_store_the_same_bytes_with_and_without_the_filter(tmp_path, capsys,
                                                                  monkeypatch):
    """One repository, copied: the same backups (new chunks, duplicates of stored ones,
    duplicates within a disk) with the filter and without it write the same packs and maps."""
    base = tmp_path / "base"
    assert cli(capsys, "init", base, "--block-size", "64KiB").code == 0
    rng = np.random.default_rng(4)
    models = [DiskModel(tmp_path / f"d{n}.img", 4 * MIB, rng) for n in range(3)]
    for model in models:
        model.random_changes(8)
    backups(tmp_path, capsys, base, [models[0].path])
    (base / "index" / FILE).unlink()
    shutil.copyfile(models[0].path, tmp_path / "same.img")
    images = [models[1].path, tmp_path / "same.img", models[2].path, models[1].path]
    digests = []
    for enabled in (True, False):
        monkeypatch.setattr(idfilter, "ENABLED", enabled)
        repo = tmp_path / f"repo-{enabled}"
        shutil.copytree(base, repo)
        backups(tmp_path, capsys, repo, images)
        digests.append({part: tree_digest(repo / part) for part in ("packs", "maps")})
        assert (repo / "index" / FILE).exists() == enabled
    assert digests[0] == digests[1]


def test_the_filter_file_format(tmp_path):
    """The envelope, then epoch, bits, ids, intervals, the bits themselves."""
    made = IdFilter.sized(b"e" * 16, 0)
    made.add(bytes(range(32)))
    made.note(0, 1)
    data = made.encode()
    assert data[:8] == b"REflt\x00\x01\x1a"
    payload = data[24:-32]
    assert payload[:16] == b"e" * 16
    assert int.from_bytes(payload[16:24], "little") == idfilter.MIN_BITS
    assert payload[24:36] == (1).to_bytes(8, "little") + (1).to_bytes(4, "little")
    assert payload[36:52] == bytes(8) + (1).to_bytes(8, "little")
    back = IdFilter.decode(data, "f")
    assert (back.epoch, back.ids, back.covered) == (b"e" * 16, 1, [(0, 1)])
    assert not back.surely_absent(bytes(range(32)))[0]
    assert len(payload) == 52 + idfilter.MIN_BITS // 8


@pytest.mark.parametrize(("memory", "readahead"), [(1 << 40, True), (4096, False), (None, True)])
def test_an_index_larger_than_memory_is_mapped_without_readahead(tmp_path, monkeypatch,
                                                                 memory, readahead):
    """Once the index is over half the available memory, a random page fault reads one page,
    not a read-ahead window (which would also evict pages the next look-ups need)."""
    from repo_engine.repository import lmdbfile

    made = Index(tmp_path / "index", create=True)
    commit_ids(made, random_ids(2000, 1), 1)
    made.close()
    monkeypatch.setattr(lmdbfile, "available_memory", lambda: memory)
    opened = Index(tmp_path / "index")
    try:
        assert opened.env.flags()["readahead"] is readahead
    finally:
        opened.close()


def test_verify_reads_a_large_index_with_readahead_and_look_ups_go_back_without(
        tmp_path, capsys, monkeypatch):
    """verify reads whole tables in key order: an index over half the available memory is
    mapped with read-ahead while it runs (a page at a time would be four times slower), and
    without it again afterwards (random look-ups read one page). Its findings are the same."""
    from repo_engine.maintenance import verify as verify_module
    from repo_engine.repository import lmdbfile
    from repo_engine.repository.repo import Repository

    repo, _model = repo_with_point(tmp_path, capsys, 5)
    with Repository.open(repo) as opened:
        expected = verify_module.verify(opened)
    monkeypatch.setattr(lmdbfile, "available_memory", lambda: 4096)
    seen = []
    real = verify_module._verify

    def recording(opened, tick):
        seen.append(opened.index.env.flags()["readahead"])
        return real(opened, tick)

    monkeypatch.setattr(verify_module, "_verify", recording)
    with Repository.open(repo) as opened:
        before = opened.index.env.flags()["readahead"]
        report = verify_module.verify(opened)
        after = opened.index.env.flags()["readahead"]
    assert (before, seen, after) == (False, [True], False)
    assert report.ok and (report.points, report.refs, report.errors) == (
        expected.points, expected.refs, expected.errors)
    assert cli(capsys, "verify", repo).code == 0
