"""A check of LMDB's data file (`index/data.mdb`) before it is mapped.

LMDB maps the file and trusts it: a truncated file kills the process with SIGBUS when a page past
its end is touched, a zeroed or garbage one fails deep inside the library. Both meta pages are
read with plain reads first:

| offset (in a meta page) | size | field                                                  |
|-------------------------|------|--------------------------------------------------------|
| 0                       | 8    | page number (0 or 1)                                   |
| 10                      | 2    | page flags (P_META = 0x08)                             |
| 16                      | 4    | magic 0xBEEFC0DE                                       |
| 20                      | 4    | data format version (1)                                |
| 40                      | 4    | the free-page database's pad field: the page size      |
| 136                     | 8    | last page number in use                                |
| 144                     | 8    | id of the transaction that wrote this meta page        |

Meta page 0 sits at offset 0, meta page 1 at offset page size; LMDB uses the one with the higher
transaction id, and the file must hold every page up to that meta page's last page.

Also what every reader of the index's tables shares: a counter's value (`get_u64`) and a table
read in batches of rows (`sized_batches`).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lmdb
import numpy as np

from ..errors import DamageError
from ..memory import available as available_memory

U64 = struct.Struct("<Q")  # a counter's value in the index's tables
MAGIC = 0xBEEFC0DE
DATA_VERSION = 1
P_META = 0x08
META = struct.Struct("<Q2xH4xII16xI92xQQ")
assert META.size == 152


@dataclass(frozen=True)
class MetaPage:
    page: int
    flags: int
    magic: int
    version: int
    page_size: int
    last_page: int
    txn_id: int

    def valid(self, number: int) -> bool:
        return (self.page == number and self.flags & P_META and self.magic == MAGIC
                and self.version == DATA_VERSION)


def _damaged(path: Path, why: str) -> DamageError:
    return DamageError(f"index file {path} is damaged ({why}); run 'repo-engine rebuild-index'")


def _meta_at(data: bytes) -> MetaPage:
    return MetaPage(*META.unpack_from(data))


def check_data_file(path: Path) -> None:
    """DamageError unless `path` looks like an LMDB data file whose pages are all present."""
    size, needed = _size_and_need(path)
    if size < needed:
        raise _damaged(path, f"{size} bytes, but its pages need {needed}: truncated")


def cover_last_page(path: Path) -> None:
    """Make the file hold every page up to the last page number the current meta page names.
    LMDB does not write a page allocated and freed within one transaction (a "loose" page), so a
    transaction that frees many pages (a large delete) can leave the file ending before its last
    page, which `check_data_file` cannot tell from a truncation. The pages added are free ones,
    which LMDB writes before it reads them. Call it inside a write transaction (no other writer
    extends the file meanwhile); it only ever allocates, never shrinks."""
    size, needed = _size_and_need(path)
    if size < needed:
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, size, needed - size)
        finally:
            os.close(fd)


def _size_and_need(path: Path) -> tuple[int, int]:
    """The file's size, and the size its current meta page needs (DamageError when it has no
    valid meta pages)."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(0)
        first = f.read(META.size)
        if len(first) < META.size:
            raise _damaged(path, f"{size} bytes, shorter than a meta page")
        meta0 = _meta_at(first)
        page_size = meta0.page_size
        if not meta0.valid(0) or not 512 <= page_size <= 65536 or page_size & (page_size - 1):
            raise _damaged(path, "no LMDB meta page at its start")
        f.seek(page_size)
        second = f.read(META.size)
    if len(second) < META.size or not _meta_at(second).valid(1):
        raise _damaged(path, "its second meta page is missing or not a meta page")
    meta1 = _meta_at(second)
    current = meta1 if meta1.txn_id > meta0.txn_id else meta0
    return size, (current.last_page + 1) * page_size


def readahead_pays(path: Path) -> bool:
    """Whether LMDB should leave the kernel's read-ahead on for its map of `path`: yes while the
    file fits in half the memory available (a cold index is then read in large sequential pieces
    and stays cached). Past that, each random page fault of a look-up would read a whole
    read-ahead window (8 MiB on the bench machine's disk, for one 4 KiB page) and evict index
    pages the next look-ups need: LMDB's MDB_NORDAHEAD then keeps a fault at one page."""
    available = available_memory()
    try:
        size = path.stat().st_size
    except OSError:
        return True
    return available is None or size <= available // 2


def get_u64(txn: lmdb.Transaction, key: bytes, db: object) -> int:
    """The u64 stored under `key` in table `db` (0 when absent)."""
    raw = txn.get(key, db=db)
    return U64.unpack(raw)[0] if raw else 0


def sized_batches(txn: lmdb.Transaction, db: object, key_size: int, width: int,
                  rows: int) -> Iterator[tuple[bytearray, bytearray, np.ndarray]]:
    """A table's rows in key order, `rows` at a time: (keys, values, fits), keys and values
    concatenated (not copied into bytes: numpy reads them where they are); a row whose key is
    not `key_size` bytes or whose value is not `width` is zeroed, and not fit."""
    items = txn.cursor(db=db).iternext(keys=True, values=True)
    blank_key, blank = bytes(key_size), bytes(width)
    while True:
        keys, vals, unfit, count = bytearray(), bytearray(), [], 0
        for key, value in items:
            if len(key) == key_size and len(value) == width:
                keys += key
                vals += value
            else:
                keys += blank_key
                vals += blank
                unfit.append(count)
            count += 1
            if count == rows:
                break
        if not count:
            return
        fits = np.ones(count, bool)
        fits[unfit] = False
        yield keys, vals, fits
        if count < rows:
            return
