"""Range reads into the caller's buffer hold under faults: answers cut at any byte, re-framed
in chunks, stalled, and TLS records damaged on their way, each while a piece is read into the
caller's buffer or between pieces read other ways; the directory store past 4 GiB and truncated
under an open reader; a journal's pack entries made PackEntry rows exactly as one row at a
time did. The proxies and fixtures are those of tests/test_s3_range_answers.py."""

from __future__ import annotations

import os

import numpy as np
import pytest

from repo_engine.repository.index_replay import _pack_entries
from repo_engine.repository.packs import ENTRY_DTYPE, PackEntry
from repo_engine.repository.store import ShortRead
from repo_engine.repository.store.local import LocalStore
from repo_engine.repository.store.s3 import S3Store
from repo_engine.repository.store.s3_settings import MIB, S3Settings
from test_s3_range_answers import (FAST, AnswerRule, FlipProxy, _without_header,  # noqa: F401
                                   cut_answer, http_proxy, stores)

PIECES = [MIB, MIB]  # two pieces read into one buffer, from byte 1000 of a 3 MiB object
CUTS = [0, 1, MIB - 1, MIB, MIB + 1, 2 * MIB - 1]  # body bytes an answer keeps


def pieces_read_into(store: S3Store, name: str, offset: int, sizes: list[int]) -> list[bytes]:
    buffer = memoryview(bytearray(max(sizes)))
    got = []
    with store.open_range(name, offset, sum(sizes)) as reader:
        for size in sizes:
            reader.read_into(buffer[:size])
            got.append(bytes(buffer[:size]))
    return got


def chunked_answer(keep: int | None = None, cut: bool = False) -> AnswerRule:
    """The answer re-framed in chunks of 64 KiB without Content-Length; with `keep`, that many
    body bytes, then a clean end of the body or (`cut`) the connection closed."""
    def rule(_request: bytes, head: bytes, body: bytes) -> tuple[bytes, bool]:
        kept = body if keep is None or cut else body[:keep]
        head = _without_header(head, b"content-length")[:-2] + b"Transfer-Encoding: chunked\r\n\r\n"
        framed = head + b"".join(b"%x\r\n" % len(kept[i:i + 65536]) + kept[i:i + 65536] + b"\r\n"
                                 for i in range(0, len(kept), 65536)) + b"0\r\n\r\n"
        return (framed[:len(head) + keep], True) if cut else (framed, False)
    return rule


@pytest.fixture
def object_3mib(stores):
    direct, proxied = stores
    data = os.urandom(3 * MIB)
    direct.put("packs/00/a.pack", data)
    return proxied, data


def expected(data: bytes) -> list[bytes]:
    return [data[1000:1000 + MIB], data[1000 + MIB:1000 + 2 * MIB]]


@pytest.mark.parametrize("keep", CUTS)
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_an_answer_cut_anywhere_is_asked_again_from_the_piece_read(object_3mib, http_proxy,
                                                                   keep, framing):
    proxied, data = object_3mib
    http_proxy.on_answer = cut_answer(keep) if framing == "content-length" else \
        chunked_answer(keep, cut=True)
    assert pieces_read_into(proxied, "packs/00/a.pack", 1000, PIECES) == expected(data)


def test_a_chunked_answer_is_read_whole_and_its_connection_serves_the_next(object_3mib,
                                                                           http_proxy):
    proxied, data = object_3mib
    http_proxy.on_answer = chunked_answer()
    assert pieces_read_into(proxied, "packs/00/a.pack", 1000, PIECES) == expected(data)
    assert pieces_read_into(proxied, "packs/00/a.pack", 7, [100]) == [data[7:107]]


def test_a_chunked_answer_that_ends_early_is_a_short_read(object_3mib, http_proxy):
    proxied, _data = object_3mib
    http_proxy.on_answer = chunked_answer(keep=MIB + 5)
    with pytest.raises(ShortRead):
        pieces_read_into(proxied, "packs/00/a.pack", 1000, PIECES)


def test_an_answer_that_stalls_midway_times_out_and_is_asked_again(seaweedfs, s3_bucket,
                                                                   http_proxy, stores):
    direct, _ = stores
    data = os.urandom(3 * MIB)
    direct.put("packs/00/a.pack", data)
    stalling = S3Store(f"s3://{s3_bucket}/r",
                       S3Settings(endpoint=http_proxy.endpoint, **{**FAST, "read_timeout": 0.5}))
    http_proxy.on_answer = lambda _r, head, body: (head + body[:MIB + 7], False)
    assert pieces_read_into(stalling, "packs/00/a.pack", 1000, PIECES) == expected(data)
    assert pieces_read_into(stalling, "packs/00/a.pack", 9, [10]) == [data[9:19]]
    stalling.close()


@pytest.mark.parametrize("keep", [50, 1150, 1150 + MIB // 2, 1103 + MIB, 1112 + MIB, 2 * MIB])
def test_read_skip_and_read_into_mixed_on_one_answer_cut_anywhere(object_3mib, http_proxy, keep):
    """As a restore of an encrypted pack does: its key header read, a gap skipped, runs read
    into the buffer, another gap; the cut falls in each of them in turn."""
    proxied, data = object_3mib
    http_proxy.on_answer = cut_answer(keep)
    buffer = memoryview(bytearray(2 * MIB))
    with proxied.open_range("packs/00/a.pack", 0, 3 * MIB) as reader:
        head = reader.read(100)
        reader.skip(1000)
        reader.read_into(buffer[:MIB])
        first = bytes(buffer[:MIB])
        reader.skip(5)
        middle = reader.read(10)
        reader.read_into(buffer[:2 * MIB - 1115])
    assert [head, first, middle, bytes(buffer[:2 * MIB - 1115])] == [
        data[:100], data[1100:1100 + MIB], data[1105 + MIB:1115 + MIB], data[1115 + MIB:]]


def test_read_into_asks_again_after_a_tls_record_damaged_on_its_way(seaweedfs, s3_bucket,
                                                                     stores):
    direct, _ = stores
    data = os.urandom(3 * MIB)
    direct.put("packs/00/a.pack", data)
    flip = FlipProxy(seaweedfs.ports["s3.port.https"], count=1, at=400_000)
    tls = S3Store(f"s3://{s3_bucket}/r",
                  S3Settings(endpoint=flip.endpoint, verify_tls=False, **FAST))
    try:
        assert pieces_read_into(tls, "packs/00/a.pack", 0, [MIB]) == [data[:MIB]]
        assert flip.flipped == 1
    finally:
        flip.close()
        tls.close()


def test_the_directory_store_reads_into_a_buffer_past_4_gib_and_notices_truncation(tmp_path):
    (tmp_path / "repo").mkdir()
    store = LocalStore(tmp_path / "repo")
    store.put("packs/00/a.pack", b"x")
    path = store.path_of("packs/00/a.pack")
    marks = (2**31 - 3, 2**32 + 5, 5 * 2**30 - 10)
    with open(path, "r+b") as f:  # sparse
        for offset in marks:
            f.seek(offset)
            f.write(b"MARK%d" % offset)
    buffer = memoryview(bytearray(16))
    for offset in marks[:2]:
        with store.open_range("packs/00/a.pack", offset, 16) as reader:
            reader.read_into(buffer)
        assert bytes(buffer) == (b"MARK%d" % offset).ljust(16, b"\0")
    with store.open_range("packs/00/a.pack", marks[2], 10) as reader:
        os.truncate(path, marks[2] + 6)  # under the open reader's cached descriptor
        with pytest.raises(ShortRead, match="10 bytes at offset 5368709110 asked, 6 there"):
            reader.read_into(buffer[:10])
    store.close()


def test_pack_entries_of_a_journal_are_the_rows_one_at_a_time_made():
    def row_by_row(rows: np.ndarray) -> list[PackEntry]:
        return [PackEntry(int(e["ref"]), e["id"].tobytes(), int(e["offset"]), int(e["stored"]),
                          int(e["raw"]), int(e["codec"])) for e in rows]
    rng = np.random.default_rng(1)
    for count in (0, 1, 7, 1000):
        rows = np.frombuffer(rng.integers(0, 256, count * ENTRY_DTYPE.itemsize, np.uint8)
                             .tobytes(), ENTRY_DTYPE)
        assert _pack_entries(rows) == row_by_row(rows)
    edge = np.zeros(3, ENTRY_DTYPE)
    edge["ref"], edge["offset"] = [2**64 - 1, 2**63, 0], [2**64 - 1, 2**40, 1]
    edge["stored"], edge["raw"], edge["codec"] = 2**32 - 1, 2**32 - 1, 255
    for rows in (edge, edge[::2], edge.astype(ENTRY_DTYPE.newbyteorder(">"))):
        made = _pack_entries(rows)
        assert made == row_by_row(rows)
        assert all(type(e.ref) is int and type(e.chunk_id) is bytes for e in made)
