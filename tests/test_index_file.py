"""Every write transaction on the index goes through `Index.write`, which makes the data file hold
every page its meta page names once the transaction commits: LMDB never writes a page allocated
and freed in one transaction, so a large delete (forget of most points, a gc sweep) can leave the
file short of its last page, and the next open would report a truncated, damaged index.
tests/test_many_points.py::test_forget_of_many_points_leaves_the_others_restoring[all-but-newest]
is such a delete: it fails when `Index.write` does not cover the file."""

from __future__ import annotations

import re
from pathlib import Path

import repo_engine
from repo_engine.repository.index import Index
from repo_engine.repository.lmdbfile import check_data_file

PACKAGE = Path(repo_engine.__file__).parent


def test_only_index_write_begins_a_write_transaction():
    raw = [(path.relative_to(PACKAGE).as_posix(), number)
           for path in sorted(PACKAGE.rglob("*.py"))
           for number, line in enumerate(path.read_text().splitlines(), 1)
           if re.search(r"begin\(\s*write\s*=\s*True", line)]
    body = _lines_of_index_write()
    assert raw and all(path == "repository/index.py" and number in body for path, number in raw), raw


def _lines_of_index_write() -> range:
    """The line numbers of `Index.write`'s body (up to the next definition)."""
    source = (PACKAGE / "repository" / "index.py").read_text().splitlines()
    start = next(i for i, line in enumerate(source) if "def write(self)" in line)
    end = next(i for i in range(start + 1, len(source)) if source[i].lstrip().startswith("def "))
    return range(start + 1, end + 1)


def test_the_file_holds_every_page_after_inserts_and_deletes_in_one_transaction(tmp_path):
    index = Index(tmp_path / "index", create=True)
    for _ in range(3):
        with index.write() as txn:
            for i in range(20000):
                txn.put(b"%016x" % i, b"r" * 200, db=index.forgetting)
            for i in range(20000):
                txn.delete(b"%016x" % i, db=index.forgetting)
    index.close()
    check_data_file(tmp_path / "index" / "data.mdb")
    reopened = Index(tmp_path / "index")
    with reopened.env.begin() as txn:
        assert txn.stat(reopened.forgetting)["entries"] == 0
    reopened.close()
