"""IndexReader.locate: the places of many refs at once, each as its own index record says, and
the first ref the index lacks named in the error."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import repo_with_point
from repo_engine.errors import DamageError
from repo_engine.repository.index_records import REF_KEY, REF_REC
from repo_engine.repository.repo import Repository


def _refs(repo: Repository) -> np.ndarray:
    point = repo.points("v")[0]
    refs = repo.resolve(point, "d")
    return np.unique(refs[refs != 0])


def test_locate_matches_each_record(tmp_path, capsys) -> None:
    path, _ = repo_with_point(tmp_path, capsys, seed=5)
    repo = Repository.open(path)
    refs = _refs(repo)[::-1].copy()   # any order: the result follows the order asked
    assert len(refs) > 3
    with repo.index.reader() as lookup:
        located = lookup.locate(refs)
    with repo.index.env.begin() as txn:
        for row in located:
            raw = txn.get(REF_KEY.pack(int(row["ref"])), db=repo.index.refs)
            chunk_id, pack, offset, stored, raw_len, codec = REF_REC.unpack(raw)
            assert (row["id"].tobytes(), int(row["pack"]), int(row["offset"]), int(row["stored"]),
                    int(row["raw"]), int(row["codec"])) == (chunk_id, pack, offset, stored,
                                                            raw_len, codec)
    assert located["ref"].tolist() == refs.tolist()


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_locate_names_the_first_missing_ref(tmp_path, capsys, where: str) -> None:
    path, _ = repo_with_point(tmp_path, capsys, seed=6)
    repo = Repository.open(path)
    refs = _refs(repo)
    at = {"first": 0, "middle": len(refs) // 2, "last": len(refs) - 1}[where]
    with repo.index.env.begin(write=True) as txn:
        txn.delete(REF_KEY.pack(int(refs[at])), db=repo.index.refs)
    unknown = np.concatenate([refs, [int(refs.max()) + 1000]]).astype(np.uint64)
    with repo.index.reader() as lookup, pytest.raises(DamageError) as err:
        lookup.locate(unknown)
    assert str(err.value) == f"chunk ref {int(refs[at])} is not in the index (missing data)"


def test_locate_nothing(tmp_path, capsys) -> None:
    path, _ = repo_with_point(tmp_path, capsys, seed=7)
    repo = Repository.open(path)
    with repo.index.reader() as lookup:
        assert len(lookup.locate(np.empty(0, dtype=np.uint64))) == 0


def test_locate_refuses_a_short_record(tmp_path, capsys) -> None:
    """A damaged place record (wrong length) is damage found, named by its ref, not a crash."""
    path, _ = repo_with_point(tmp_path, capsys, seed=8)
    repo = Repository.open(path)
    refs = _refs(repo)
    with repo.index.env.begin(write=True) as txn:
        txn.put(REF_KEY.pack(int(refs[1])), b"short", db=repo.index.refs)
    with repo.index.reader() as lookup, pytest.raises(DamageError) as err:
        lookup.locate(refs)
    assert str(err.value) == f"chunk ref {int(refs[1])} is not in the index (missing data)"


def test_refs_found_compare_whatever_their_size() -> None:
    """A damaged key may name a ref past 2^63: numpy's `isin` then refuses a big-endian array
    (its table method cannot subtract in that byte order), so the refs a look-up found are
    native."""
    import struct

    from repo_engine.repository.index_records import refs_found

    refs = np.array([2**63 + 1, 2**63 + 2, 2**63 + 5, 7], np.uint64)
    found = [(struct.pack(">Q", r), b"") for r in (2**63 + 1, 2**63 + 5)]
    assert np.isin(refs, refs_found(found)).tolist() == [True, False, True, False]
