"""vddk_ext with the local backend: real files in tmp_path, checked against plain Python."""
from __future__ import annotations

import errno
import gc
import importlib
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vddk_ext
from helpers import resident_pages

KiB = 1024
MiB = 1024 * KiB


# ------------------------------------------------------------------ helpers


def blocks(*numbers: int) -> np.ndarray:
    return np.array(numbers, dtype=np.uint64)


def make_file(path, size: int, writes: dict[int, bytes]) -> bytes:
    """A sparse file of `size` bytes with `writes` at their offsets; returns its content."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in writes.items():
            f.seek(offset)
            f.write(data)
    with open(path, "rb") as f:
        return f.read()


def expected_block(content: bytes, block_size: int, block: int) -> bytes:
    return content[block * block_size:(block + 1) * block_size]


def read_all(disk, block_size, numbers, **kwargs):
    """{block: (bytes or None, zero flag, padded slot)} for every block read."""
    out = {}
    reader = disk.reader(block_size, numbers, **kwargs)
    for batch in reader:
        zero = list(batch.zero)
        for k, (number, view) in enumerate(batch):
            assert number == batch.blocks[k]
            slot = bytes(batch.data[k * block_size:(k + 1) * block_size])
            out[number] = (None if view is None else bytes(view), zero[k], slot,
                           bytes(batch.block(k)))
    return out, reader


def random_bytes(rng: np.random.Generator, n: int) -> bytes:
    return rng.integers(1, 256, n, dtype=np.uint8).tobytes()


def read_syscalls(fd: int) -> int:
    """The process's read-syscall count; each call is itself exactly one pread."""
    for line in os.pread(fd, 4096, 0).splitlines():
        if line.startswith(b"syscr:"):
            return int(line.split()[1])
    raise AssertionError("no syscr in /proc/self/io")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------ reading


@pytest.mark.parametrize("block_size", [4 * KiB, 64 * KiB, 1 * MiB])
def test_every_block_equals_plain_read(tmp_path, block_size):
    rng = np.random.default_rng(block_size)
    size = 5 * MiB + 12345
    content = make_file(tmp_path / "d.img", size,
                        {0: random_bytes(rng, 70000), 3 * MiB: random_bytes(rng, 9000),
                         size - 5: b"tail!"})
    with vddk_ext.open_local(str(tmp_path / "d.img")) as disk:
        assert disk.capacity == size and disk.kind == "file"
        assert disk.path == str(tmp_path / "d.img")
        n = -(-size // block_size)
        got, reader = read_all(disk, block_size, np.arange(n, dtype=np.uint64),
                               batch_bytes=max(block_size, 256 * KiB))
        assert sorted(got) == list(range(n))
        for b in range(n):
            want = expected_block(content, block_size, b)
            view, zero, slot, block = got[b]
            assert block == want
            assert slot == want + bytes(block_size - len(want))
            assert zero == (want.count(0) == len(want))
            assert view == (None if zero else want)
        assert reader.bytes_read == size


def test_zero_flags_single_nonzero_byte(tmp_path):
    bs = 64 * KiB
    writes = {
        1 * bs + bs - 1: b"\x01",   # last byte of block 1
        2 * bs: b"\x80",            # first byte of block 2
        3 * bs + 12345: b"\x01",    # middle of block 3
        5 * bs + bs - 8: b"\x00\x00\x00\x00\x00\x00\x00\x01",
    }
    make_file(tmp_path / "z.img", 6 * bs, writes)
    with vddk_ext.open_local(str(tmp_path / "z.img")) as disk:
        batch = next(disk.reader(bs, np.arange(6, dtype=np.uint64)))
        assert list(batch.zero) == [1, 0, 0, 0, 1, 0]
        assert [v is None for _, v in batch] == [True, False, False, False, True, False]


def test_short_last_block(tmp_path):
    bs = 16 * KiB
    size = 3 * bs + 1000
    content = make_file(tmp_path / "s.img", size, {3 * bs + 998: b"ab", 0: b"x"})
    with vddk_ext.open_local(str(tmp_path / "s.img")) as disk:
        reader = disk.reader(bs, blocks(0, 3))
        batch = next(reader)
        assert batch.count == 2
        assert len(batch.data) == 2 * bs
        assert bytes(batch.block(1)) == content[3 * bs:]
        assert len(batch.block(1)) == 1000
        assert bytes(batch.data[bs + 1000:]) == bytes(bs - 1000)   # zero-filled slot tail
        assert batch.zero[1] == 0
        assert [len(v) for _, v in batch] == [bs, 1000]
        assert reader.bytes_read == bs + 1000
        with pytest.raises(StopIteration):
            next(reader)


def test_all_zero_short_last_block(tmp_path):
    bs = 4 * KiB
    make_file(tmp_path / "s.img", bs + 10, {0: b"q"})
    with vddk_ext.open_local(str(tmp_path / "s.img")) as disk:
        batch = next(disk.reader(bs, blocks(0, 1)))
        assert list(batch.zero) == [0, 1]
        assert list(batch) == [(0, batch.block(0)), (1, None)]
        assert len(batch.block(1)) == 10


@pytest.mark.parametrize("max_request", [4 * KiB, 8 * KiB, 12 * KiB, 100_000, 1 * MiB])
def test_merged_requests_across_gaps(tmp_path, max_request):
    bs = 4 * KiB
    rng = np.random.default_rng(7)
    content = make_file(tmp_path / "g.img", 64 * bs, {0: random_bytes(rng, 64 * bs)})
    numbers = blocks(0, 1, 2, 5, 6, 9, 10, 11, 12, 13, 14, 15, 63)
    with vddk_ext.open_local(str(tmp_path / "g.img")) as disk:
        got, reader = read_all(disk, bs, numbers, batch_bytes=64 * bs, max_request=max_request)
    assert list(got) == [int(b) for b in numbers]
    for b, (view, _, _, _) in got.items():
        assert view == expected_block(content, bs, b)
    assert reader.bytes_read == len(numbers) * bs


def test_request_merging_counts_preads(tmp_path):
    """Contiguous runs become one pread each (capped by max_request); gaps split them."""
    bs = 4 * KiB
    make_file(tmp_path / "m.img", 64 * bs, {0: b"\x01" * (64 * bs)})
    cases = [
        (np.arange(64, dtype=np.uint64), 1 * MiB, 1),        # one run of 256 KiB
        (np.arange(64, dtype=np.uint64), 64 * KiB, 4),       # capped at 64 KiB
        (blocks(0, 1, 2, 5, 6, 9), 1 * MiB, 3),              # three runs
        (blocks(0, 2, 4, 6), 1 * MiB, 4),                    # no merging
    ]
    io = os.open("/proc/self/io", os.O_RDONLY)
    with vddk_ext.open_local(str(tmp_path / "m.img")) as disk:
        for numbers, max_request, preads in cases:
            reader = disk.reader(bs, numbers, batch_bytes=1 * MiB, max_request=max_request)
            before = read_syscalls(io)
            batch = next(reader)
            after = read_syscalls(io)
            assert after - before - 1 == preads, (numbers, max_request)
            assert batch.count == len(numbers)
    os.close(io)


def test_block_larger_than_max_request(tmp_path):
    bs = 1 * MiB
    rng = np.random.default_rng(3)
    content = make_file(tmp_path / "l.img", 2 * bs + 5000, {0: random_bytes(rng, 2 * bs + 5000)})
    with vddk_ext.open_local(str(tmp_path / "l.img")) as disk:
        got, _ = read_all(disk, bs, blocks(0, 1, 2), max_request=64 * KiB)
    for b in range(3):
        assert got[b][3] == expected_block(content, bs, b)


def test_batches_split_by_batch_bytes(tmp_path):
    bs = 4 * KiB
    make_file(tmp_path / "b.img", 10 * bs, {bs: b"x"})
    with vddk_ext.open_local(str(tmp_path / "b.img")) as disk:
        reader = disk.reader(bs, np.arange(10, dtype=np.uint64), batch_bytes=3 * bs + 100)
        counts = [b.count for b in reader]
        assert counts == [3, 3, 3, 1]
        assert list(reader) == []


def test_batch_views_have_formats_and_are_read_only(tmp_path):
    bs = 4 * KiB
    make_file(tmp_path / "f.img", 4 * bs, {0: b"x"})
    with vddk_ext.open_local(str(tmp_path / "f.img")) as disk:
        batch = next(disk.reader(bs, blocks(0, 2, 3)))
        assert batch.blocks.format == "Q" and batch.blocks.tolist() == [0, 2, 3]
        assert batch.zero.format == "B" and batch.zero.tolist() == [0, 1, 1]
        assert batch.data.format == "B" and batch.data.readonly
        assert batch.blocks.readonly and batch.zero.readonly
        assert bytes(memoryview(batch)) == bytes(batch.data)
        assert np.frombuffer(batch.blocks, dtype=np.uint64).tolist() == [0, 2, 3]
        with pytest.raises(TypeError):
            batch.data[0] = 1
        with pytest.raises(IndexError):
            batch.block(3)
        with pytest.raises(IndexError):
            batch.block(-1)


def test_blocks_accept_array_module_and_are_copied(tmp_path):
    import array

    bs = 4 * KiB
    content = make_file(tmp_path / "a.img", 4 * bs, {2 * bs: b"two", 3 * bs: b"three"})
    numbers = np.array([2, 3], dtype=np.uint64)
    with vddk_ext.open_local(str(tmp_path / "a.img")) as disk:
        reader = disk.reader(bs, numbers)
        numbers[:] = [0, 1]   # copied at construction: no effect
        batch = next(reader)
        assert batch.blocks.tolist() == [2, 3]
        assert bytes(batch.block(0)) == expected_block(content, bs, 2)
        batch = next(disk.reader(bs, array.array("Q", [3])))
        assert bytes(batch.block(0)) == expected_block(content, bs, 3)
        empty = disk.reader(bs, np.zeros(0, dtype=np.uint64))
        assert list(empty) == [] and empty.bytes_read == 0


# ------------------------------------------------------------------ extents


def test_allocated_extents_of_sparse_file(tmp_path):
    path = tmp_path / "x.img"
    with open(path, "wb") as f:
        os.truncate(f.fileno(), 10 * MiB)
    with open(path, "r+b") as f:
        for offset, length in [(0, 4 * KiB), (4 * KiB, 4 * KiB), (1 * MiB, 12 * KiB),
                               (5 * MiB, 4 * KiB), (10 * MiB - 4 * KiB, 4 * KiB)]:
            f.seek(offset)
            f.write(b"d" * length)
    with vddk_ext.open_local(str(path)) as disk:
        assert disk.allocated_extents() == [
            (0, 8 * KiB), (1 * MiB, 12 * KiB), (5 * MiB, 4 * KiB), (10 * MiB - 4 * KiB, 4 * KiB)]


def test_allocated_extents_all_hole_and_empty(tmp_path):
    (tmp_path / "h.img").touch()
    os.truncate(tmp_path / "h.img", 3 * MiB)
    (tmp_path / "e.img").touch()
    with vddk_ext.open_local(str(tmp_path / "h.img")) as disk:
        assert disk.allocated_extents() == []
    with vddk_ext.open_local(str(tmp_path / "e.img")) as disk:
        assert disk.capacity == 0 and disk.allocated_extents() == []


# ------------------------------------------------------------------ writing


def test_create_size_makes_sparse_file(tmp_path):
    path = tmp_path / "new.img"
    with vddk_ext.open_local(str(path), writable=True, create_size=8 * MiB + 100) as disk:
        assert disk.capacity == 8 * MiB + 100 and disk.kind == "file"
        assert disk.allocated_extents() == []
    assert os.path.getsize(path) == 8 * MiB + 100
    assert os.stat(path).st_blocks == 0


def test_write_blocks_pwrite_round_trip(tmp_path):
    bs = 64 * KiB
    path = tmp_path / "w.img"
    size = 10 * bs + 3000
    rng = np.random.default_rng(11)
    chunk, tail, other = random_bytes(rng, bs), random_bytes(rng, 3000), random_bytes(rng, 5000)
    with vddk_ext.open_local(str(path), writable=True, create_size=size) as disk:
        disk.write_blocks(bs, blocks(1, 2, 7), chunk)
        disk.write_blocks(bs, blocks(10), tail)                        # short last block
        disk.write_blocks(bs, blocks(10), tail + bytes(bs - 3000))     # full slot, zero tail
        disk.pwrite(4 * bs + 17, other)
        disk.flush()
        got, _ = read_all(disk, bs, np.arange(11, dtype=np.uint64))
    content = bytearray(size)
    for b in (1, 2, 7):
        content[b * bs:(b + 1) * bs] = chunk
    content[10 * bs:] = tail
    content[4 * bs + 17:4 * bs + 17 + 5000] = other
    assert (tmp_path / "w.img").read_bytes() == bytes(content)
    for b in range(11):
        assert got[b][3] == expected_block(bytes(content), bs, b)
    assert [b for b in range(11) if got[b][1]] == [0, 3, 5, 6, 8, 9]


def test_write_blocks_rejects_bad_lengths(tmp_path):
    bs = 4 * KiB
    with vddk_ext.open_local(str(tmp_path / "w.img"), writable=True, create_size=2 * bs + 10) as disk:
        with pytest.raises(vddk_ext.DiskError) as ei:
            disk.write_blocks(bs, blocks(0), b"x" * 100)     # short, not the last block
        assert ei.value.errno == errno.EINVAL
        with pytest.raises(vddk_ext.DiskError):
            disk.write_blocks(bs, blocks(2), b"x" * bs)      # data past the end is not zero
        with pytest.raises(vddk_ext.DiskError) as ei:
            disk.write_blocks(bs, blocks(3), b"x" * bs)      # beyond the end
        assert "block 3" in str(ei.value)
        with pytest.raises(vddk_ext.DiskError):
            disk.pwrite(2 * bs, b"x" * 11)                   # beyond the end
    assert (tmp_path / "w.img").read_bytes() == bytes(2 * bs + 10)


def test_write_chunks_puts_each_chunk_at_its_blocks(tmp_path):
    """One call: chunk i at the next counts[i] blocks, in any order, a chunk at several blocks,
    a short last block; the same file as one write_blocks per chunk."""
    bs = 16 * KiB
    size = 9 * bs + 700
    rng = np.random.default_rng(3)
    chunks = [random_bytes(rng, bs) for _ in range(3)] + [random_bytes(rng, 700)]
    counts = [2, 1, 3, 1]
    order = blocks(8, 0, 4, 1, 6, 2, 9)
    with vddk_ext.open_local(str(tmp_path / "a.img"), writable=True, create_size=size) as disk:
        disk.write_chunks(bs, order, np.array(counts, dtype=np.uint64),
                          [memoryview(chunks[0]), bytearray(chunks[1]), chunks[2], chunks[3]])
    with vddk_ext.open_local(str(tmp_path / "b.img"), writable=True, create_size=size) as disk:
        at = np.cumsum([0] + counts)
        for k, chunk in enumerate(chunks):
            disk.write_blocks(bs, order[at[k]:at[k + 1]], chunk)
    got = (tmp_path / "a.img").read_bytes()
    assert got == (tmp_path / "b.img").read_bytes()
    assert got[9 * bs:] == chunks[3] and got[3 * bs:4 * bs] == bytes(bs)


def test_write_chunks_checks_its_arguments_and_stops_at_a_bad_block(tmp_path):
    bs = 4 * KiB
    path = tmp_path / "w.img"
    with vddk_ext.open_local(str(path), writable=True, create_size=4 * bs) as disk:
        for counts, chunks in (([1], [b"a" * bs, b"b" * bs]),       # a count per chunk
                               ([1, 2], [b"a" * bs, b"b" * bs]),    # counts add up to blocks
                               ([2**64 - 1, 3], [b"a" * bs, b"b" * bs])):
            with pytest.raises(ValueError, match="one count per chunk"):
                disk.write_chunks(bs, blocks(0, 1), np.array(counts, dtype=np.uint64), chunks)
        with pytest.raises(TypeError):
            disk.write_chunks(bs, blocks(0), np.array([1], dtype=np.uint64), ["text"])
        with pytest.raises(TypeError):
            disk.write_chunks(bs, blocks(0), [1], [b"a" * bs])
        with pytest.raises(vddk_ext.DiskError) as ei:   # the first chunk written, then stop
            disk.write_chunks(bs, blocks(0, 7, 1), np.array([1, 1, 1], dtype=np.uint64),
                              [b"a" * bs, b"b" * bs, b"c" * bs])
        assert "block 7" in str(ei.value)
        with pytest.raises(vddk_ext.DiskError) as ei:
            disk.write_chunks(bs, blocks(2), np.array([1], dtype=np.uint64), [b"x" * 100])
        assert ei.value.errno == errno.EINVAL
        disk.write_chunks(bs, blocks(), np.array([], dtype=np.uint64), [])
    assert path.read_bytes() == b"a" * bs + bytes(3 * bs)
    with vddk_ext.open_local(str(path)) as disk, pytest.raises(vddk_ext.DiskError):
        disk.write_chunks(bs, blocks(0), np.array([1], dtype=np.uint64), [b"a" * bs])
    disk = vddk_ext.open_local(str(path), writable=True)
    disk.close()
    with pytest.raises(ValueError, match="closed"):
        disk.write_chunks(bs, blocks(0), np.array([1], dtype=np.uint64), [b"a" * bs])


def test_write_zeroes_makes_holes(tmp_path):
    path = tmp_path / "z.img"
    size = 4 * MiB
    with vddk_ext.open_local(str(path), writable=True, create_size=size) as disk:
        disk.pwrite(0, b"\xff" * size)
        disk.flush()
        blocks_before = os.stat(path).st_blocks
        disk.write_zeroes(1 * MiB, 2 * MiB)
        disk.write_zeroes(100, 50)                           # unaligned: zeroed, no hole
        disk.flush()
        assert disk.allocated_extents() == [(0, 1 * MiB), (3 * MiB, 1 * MiB)]
    data = path.read_bytes()
    assert data == b"\xff" * 100 + bytes(50) + b"\xff" * (1 * MiB - 150) + bytes(2 * MiB) \
        + b"\xff" * MiB
    assert os.stat(path).st_blocks <= blocks_before - (2 * MiB) // 512
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.lseek(fd, 1 * MiB, os.SEEK_DATA) == 3 * MiB
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 1 * MiB
    finally:
        os.close(fd)


# ------------------------------------------------------------------ errors


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.img")
    with pytest.raises(vddk_ext.DiskError) as ei:
        vddk_ext.open_local(path)
    assert isinstance(ei.value, OSError)
    assert ei.value.errno == errno.ENOENT
    assert f"cannot open {path}: No such file or directory" in str(ei.value)


def test_directory(tmp_path):
    for writable in (False, True):
        with pytest.raises(vddk_ext.DiskError) as ei:
            vddk_ext.open_local(str(tmp_path), writable=writable)
        assert ei.value.errno == errno.EISDIR
        assert str(tmp_path) in str(ei.value)


def test_not_a_file_or_block_device():
    with pytest.raises(vddk_ext.DiskError) as ei:
        vddk_ext.open_local("/dev/null")
    assert ei.value.errno == errno.EINVAL


def test_bad_arguments(tmp_path):
    make_file(tmp_path / "a.img", 64 * KiB, {})
    with pytest.raises(ValueError):
        vddk_ext.open_local(str(tmp_path / "b.img"), create_size=10)    # needs writable
    with pytest.raises(ValueError):
        vddk_ext.open_local(str(tmp_path / "b.img"), writable=True, create_size=-1)
    with pytest.raises(TypeError):
        vddk_ext.open_local(str(tmp_path / "a.img"), True)              # keyword-only
    with vddk_ext.open_local(str(tmp_path / "a.img")) as disk:
        for bs in (0, 512, 4096 + 1, 3 * 4096, 32 * MiB, -4096):
            with pytest.raises(ValueError, match="block_size"):
                disk.reader(bs, blocks(0))
        with pytest.raises(ValueError, match="batch_bytes"):
            disk.reader(64 * KiB, blocks(0), batch_bytes=4 * KiB)
        with pytest.raises(ValueError, match="max_request"):
            disk.reader(4 * KiB, blocks(0), max_request=100)
        for bad in (np.array([0, 1], dtype=np.int32), np.array([0.0]), [0, 1],
                    np.zeros((2, 2), dtype=np.uint64), np.arange(4, dtype=np.uint64)[::2]):
            with pytest.raises(TypeError):
                disk.reader(4 * KiB, bad)


def test_unsorted_blocks(tmp_path):
    make_file(tmp_path / "a.img", 64 * KiB, {})
    with vddk_ext.open_local(str(tmp_path / "a.img")) as disk:
        with pytest.raises(ValueError, match=r"blocks\[3\]"):
            disk.reader(4 * KiB, blocks(0, 1, 5, 5, 6))
        with pytest.raises(ValueError, match=r"blocks\[1\]"):
            disk.reader(4 * KiB, blocks(3, 2))


def test_block_beyond_end(tmp_path):
    make_file(tmp_path / "a.img", 64 * KiB + 1, {})
    with vddk_ext.open_local(str(tmp_path / "a.img")) as disk:
        disk.reader(4 * KiB, blocks(16))                  # the 1-byte last block is fine
        with pytest.raises(vddk_ext.DiskError) as ei:
            disk.reader(4 * KiB, blocks(0, 17))
        assert ei.value.errno == errno.EINVAL
        assert "block 17" in str(ei.value)


def test_write_on_read_only(tmp_path):
    make_file(tmp_path / "a.img", 64 * KiB, {})
    with vddk_ext.open_local(str(tmp_path / "a.img")) as disk:
        for call in (lambda: disk.pwrite(0, b"x"),
                     lambda: disk.write_blocks(4 * KiB, blocks(0), bytes(4 * KiB)),
                     lambda: disk.write_zeroes(0, 4 * KiB)):
            with pytest.raises(vddk_ext.DiskError) as ei:
                call()
            assert ei.value.errno == errno.EBADF
            assert "read-only" in str(ei.value) and str(tmp_path / "a.img") in str(ei.value)


def test_closed_disk(tmp_path):
    make_file(tmp_path / "a.img", 64 * KiB, {})
    disk = vddk_ext.open_local(str(tmp_path / "a.img"), writable=True)
    reader = disk.reader(4 * KiB, blocks(0, 1))
    with disk:
        pass
    assert disk.closed
    disk.close()   # idempotent
    assert disk.capacity == 64 * KiB and disk.kind == "file"
    for call in (disk.allocated_extents, disk.flush, lambda: disk.reader(4 * KiB, blocks(0)),
                 lambda: disk.pwrite(0, b"x"), lambda: disk.write_zeroes(0, 1),
                 lambda: disk.write_blocks(4 * KiB, blocks(0), bytes(4 * KiB)),
                 lambda: next(reader), disk.__enter__):
        with pytest.raises(ValueError, match="disk is closed"):
            call()


def test_closed_reader(tmp_path):
    make_file(tmp_path / "a.img", 64 * KiB, {0: b"keep"})
    with vddk_ext.open_local(str(tmp_path / "a.img")) as disk:
        reader = disk.reader(4 * KiB, np.arange(16, dtype=np.uint64), batch_bytes=8 * KiB)
        batch = next(reader)
        reader.close()
        reader.close()
        with pytest.raises(ValueError, match="reader is closed"):
            next(reader)
        assert bytes(batch.block(0))[:4] == b"keep"      # live batches stay valid
        del batch


def test_disk_error_is_raised_for_io_errors_not_leaked_paths(tmp_path):
    """A file that shrinks under the reader gives a DiskError naming the file."""
    path = tmp_path / "shrink.img"
    make_file(path, 64 * KiB, {0: b"x"})
    with vddk_ext.open_local(str(path)) as disk:
        reader = disk.reader(4 * KiB, np.arange(16, dtype=np.uint64))
        os.truncate(path, 4 * KiB)
        with pytest.raises(vddk_ext.DiskError) as ei:
            next(reader)
        assert ei.value.errno == errno.EIO and str(path) in str(ei.value)


# ------------------------------------------------------------------ buffers


def test_buffers_reused_when_batches_dropped(tmp_path):
    bs = 4 * KiB
    make_file(tmp_path / "r.img", 1 * MiB, {0: b"x"})
    with vddk_ext.open_local(str(tmp_path / "r.img")) as disk:
        reader = disk.reader(bs, np.arange(256, dtype=np.uint64), batch_bytes=4 * bs)
        total = 0
        for batch in reader:
            total += batch.count
            data = batch.data            # views are dropped with the batch
            assert len(data) == batch.count * bs
            del data
        assert total == 256
        assert reader.buffers_allocated <= 3


def test_kept_batches_allocate_new_buffers(tmp_path):
    bs = 4 * KiB
    make_file(tmp_path / "r.img", 64 * KiB, {0: b"x"})
    with vddk_ext.open_local(str(tmp_path / "r.img")) as disk:
        reader = disk.reader(bs, np.arange(16, dtype=np.uint64), batch_bytes=bs)
        kept = list(reader)
        assert reader.buffers_allocated == 16
        assert [b.blocks[0] for b in kept] == list(range(16))


def test_live_memoryview_keeps_its_bytes(tmp_path):
    bs = 4 * KiB
    rng = np.random.default_rng(5)
    content = make_file(tmp_path / "k.img", 64 * bs, {0: random_bytes(rng, 64 * bs)})
    with vddk_ext.open_local(str(tmp_path / "k.img")) as disk:
        reader = disk.reader(bs, np.arange(64, dtype=np.uint64), batch_bytes=2 * bs)
        batch = next(reader)
        kept_block = batch.block(1)
        kept_blocks = batch.blocks
        kept_zero = batch.zero
        kept_iter = [v for _, v in batch]
        del batch
        gc.collect()
        allocated = reader.buffers_allocated
        for later in reader:            # reuses other buffers, never the kept one
            assert bytes(later.block(0)) == expected_block(content, bs, later.blocks[0])
        # `later` still holds the previous batch while next() runs: two buffers in turn.
        assert reader.buffers_allocated == allocated + 2
        assert bytes(kept_block) == expected_block(content, bs, 1)
        assert kept_blocks.tolist() == [0, 1] and kept_zero.tolist() == [0, 0]
        assert bytes(kept_iter[0]) == expected_block(content, bs, 0)
        # Once every view is gone the buffer returns to the free list.
        del kept_block, kept_blocks, kept_zero, kept_iter
        reader2 = disk.reader(bs, np.arange(64, dtype=np.uint64), batch_bytes=2 * bs)
        held = next(reader2)
        view = held.data
        del held
        next(reader2)
        assert reader2.buffers_allocated == 2
        del view
        for _ in reader2:
            pass
        assert reader2.buffers_allocated == 2


# ------------------------------------------------------------------ threads, leaks


def test_concurrent_readers_on_one_disk(tmp_path):
    bs = 16 * KiB
    n = 512
    rng = np.random.default_rng(9)
    content = make_file(tmp_path / "c.img", n * bs, {0: random_bytes(rng, n * bs // 2),
                                                   n * bs * 3 // 4: random_bytes(rng, 4096)})
    errors: list[BaseException] = []
    with vddk_ext.open_local(str(tmp_path / "c.img")) as disk:
        def work(seed: int) -> None:
            try:
                local = np.random.default_rng(seed)
                for _ in range(5):
                    chosen = np.sort(local.choice(n, size=100, replace=False)).astype(np.uint64)
                    for batch in disk.reader(bs, chosen, batch_bytes=8 * bs, max_request=32 * KiB):
                        for k, (number, view) in enumerate(batch):
                            want = expected_block(content, bs, number)
                            assert bytes(batch.block(k)) == want
                            assert (view is None) == (want == bytes(bs))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors


def test_shared_reader_across_threads(tmp_path):
    bs = 4 * KiB
    n = 400
    rng = np.random.default_rng(2)
    content = make_file(tmp_path / "s.img", n * bs, {0: random_bytes(rng, n * bs)})
    seen: list[int] = []
    lock = threading.Lock()
    with vddk_ext.open_local(str(tmp_path / "s.img")) as disk:
        reader = disk.reader(bs, np.arange(n, dtype=np.uint64), batch_bytes=3 * bs)

        def work() -> None:
            for batch in reader:
                for k in range(batch.count):
                    assert bytes(batch.block(k)) == expected_block(content, bs, batch.blocks[k])
                with lock:
                    seen.extend(batch.blocks.tolist())

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sorted(seen) == list(range(n))


def test_no_leak_over_many_cycles(tmp_path):
    bs = 4 * KiB
    path = str(tmp_path / "leak.img")
    make_file(path, 16 * bs, {0: b"x" * 100, 5 * bs: b"y"})
    numbers = np.arange(16, dtype=np.uint64)

    def cycle() -> None:
        disk = vddk_ext.open_local(path)
        reader = disk.reader(bs, numbers, batch_bytes=8 * bs)
        for batch in reader:
            for _, view in batch:
                if view is not None:
                    bytes(view[:1])
            batch.zero.tolist()
            batch.blocks.tolist()
            batch.data
        disk.allocated_extents()
        reader.close()
        disk.close()
        try:
            vddk_ext.open_local(path + ".missing")
        except vddk_ext.DiskError:
            pass

    for _ in range(500):   # warm up allocator pools
        cycle()
    gc.collect()
    before = rss_bytes()
    for _ in range(10_000):
        cycle()
    gc.collect()
    assert rss_bytes() - before < 5 * MiB
    assert len(os.listdir("/proc/self/fd")) < 100


# ------------------------------------------------------------------ property


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    block_shift=st.integers(12, 15),
    nblocks=st.integers(1, 40),
    short=st.integers(0, 4095),
    writes=st.lists(st.tuples(st.integers(0, 1 << 21), st.binary(min_size=1, max_size=9000)),
                    max_size=8),
    picks=st.data(),
    batch_blocks=st.integers(1, 9),
    max_request=st.sampled_from([4096, 8192, 12288, 65536, 1 << 20]),
)
def test_property_matches_python_model(tmp_path, block_shift, nblocks, short, writes, picks,
                                       batch_blocks, max_request):
    bs = 1 << block_shift
    size = max(1, (nblocks - 1) * bs + (short if short else bs))
    model = bytearray(size)
    path = tmp_path / "p.img"
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in writes:
            offset %= size
            data = data[:size - offset]
            f.seek(offset)
            f.write(data)
            model[offset:offset + len(data)] = data
    assert path.read_bytes() == bytes(model)
    count = -(-size // bs)
    chosen = sorted(picks.draw(st.sets(st.integers(0, count - 1), max_size=count)))
    with vddk_ext.open_local(str(path)) as disk:
        reader = disk.reader(bs, np.array(chosen, dtype=np.uint64),
                             batch_bytes=batch_blocks * bs, max_request=max_request)
        got = []
        for batch in reader:
            assert batch.count <= batch_blocks
            for k, (number, view) in enumerate(batch):
                want = bytes(model[number * bs:(number + 1) * bs])
                is_zero = want == bytes(len(want))
                assert batch.zero[k] == is_zero
                assert bytes(batch.block(k)) == want
                assert view is None if is_zero else bytes(view) == want
                got.append(number)
        assert got == chosen
        assert reader.bytes_read == sum(len(model[b * bs:(b + 1) * bs]) for b in chosen)


# ------------------------------------------------------------------ block devices, import


@pytest.fixture
def loop_device(tmp_path):
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup")
    backing = tmp_path / "loop.img"
    make_file(backing, 2 * MiB, {4096: b"L" * 4096})
    proc = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"losetup failed: {proc.stderr.strip()}")
    device = proc.stdout.strip()
    yield device
    subprocess.run(["losetup", "-d", device], check=False)


def test_block_device(loop_device):
    with vddk_ext.open_local(loop_device, writable=True) as disk:
        assert disk.kind == "blockdev" and disk.capacity == 2 * MiB
        assert disk.allocated_extents() == [(0, 2 * MiB)]
        batch = next(disk.reader(4096, blocks(0, 1, 2)))
        assert list(batch.zero) == [1, 0, 1] and bytes(batch.block(1)) == b"L" * 4096
        disk.write_zeroes(4096, 4096)                  # BLKZEROOUT
        disk.pwrite(8192, b"M" * 4096)
        disk.write_zeroes(8192 + 100, 200)             # unaligned: zero buffers
        disk.flush()
        batch = next(disk.reader(4096, blocks(1, 2)))
        assert list(batch.zero) == [1, 0]
        assert bytes(batch.block(1)) == b"M" * 100 + bytes(200) + b"M" * (4096 - 300)
    with pytest.raises(vddk_ext.DiskError) as ei:
        vddk_ext.open_local(loop_device, writable=True, create_size=4096)
    assert ei.value.errno == errno.EINVAL


def test_api_version_checked_at_import(monkeypatch):
    from vddk_ext import _vddk_ext

    assert _vddk_ext.API_VERSION == 1 and vddk_ext.API_VERSION == 1
    monkeypatch.setattr(_vddk_ext, "API_VERSION", 2)
    monkeypatch.delitem(sys.modules, "vddk_ext")
    with pytest.raises(ImportError, match="API version 2"):
        importlib.import_module("vddk_ext")
    monkeypatch.undo()
    assert importlib.import_module("vddk_ext") is vddk_ext


def test_types_are_not_instantiable():
    for cls in (vddk_ext.Disk, vddk_ext.BlockReader, vddk_ext.Batch):
        with pytest.raises(TypeError):
            cls()
    assert issubclass(vddk_ext.DiskError, OSError)


# ------------------------------------------------------------------ direct writes


def direct_supported(path) -> bool:
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600))
        return True
    except OSError:
        return False
    finally:
        if os.path.exists(path):
            os.unlink(path)


@pytest.fixture
def direct_dir(tmp_path):
    if not direct_supported(tmp_path / "probe"):
        pytest.skip("the file system of tmp_path refuses O_DIRECT")
    return tmp_path


def aligned_chunks(block_size: int, chunks: list[bytes]) -> list[memoryview]:
    """`chunks` copied into one page-aligned buffer, one block apart (as a restore decodes
    them), as views of it."""
    import mmap

    buffer = memoryview(mmap.mmap(-1, block_size * len(chunks)))
    views = []
    for k, chunk in enumerate(chunks):
        buffer[k * block_size:k * block_size + len(chunk)] = chunk
        views.append(buffer[k * block_size:k * block_size + len(chunk)])
    return views


@pytest.mark.parametrize("layout", ["aligned", "bytes", "mixed"])
def test_direct_write_chunks_equal_buffered_writes(direct_dir, layout):
    """On a direct disk, write_chunks writes what write_blocks would, whatever the order of the
    blocks, a chunk at several blocks, a short last block, chunks in one aligned buffer
    (written from it), in buffers of their own (copied first) or both."""
    bs = 16 * KiB
    size = 40 * bs + 700
    rng = np.random.default_rng(9)
    chunks = [random_bytes(rng, bs) for _ in range(37)] + [random_bytes(rng, 700)]
    counts = [1] * 20 + [3] + [1] * 17
    order = np.concatenate([blocks(*range(5, 25)), blocks(0, 2, 4), blocks(*range(25, 40)),
                            blocks(1), blocks(40)])
    if layout == "aligned":
        data = aligned_chunks(bs, chunks)
    elif layout == "bytes":
        data = list(chunks)
    else:
        data = (aligned_chunks(bs, chunks[:18]) + list(chunks[18:30])
                + aligned_chunks(bs, chunks[30:]))
    with vddk_ext.open_local(str(direct_dir / "a.img"), writable=True, create_size=size,
                             direct=True) as disk:
        assert disk.direct
        disk.write_chunks(bs, order, np.array(counts, dtype=np.uint64), data)
        disk.flush()
    with vddk_ext.open_local(str(direct_dir / "b.img"), writable=True,
                             create_size=size) as disk:
        assert not disk.direct
        at = np.cumsum([0] + counts)
        for k, chunk in enumerate(chunks):
            disk.write_blocks(bs, order[at[k]:at[k + 1]], chunk)
    got = (direct_dir / "a.img").read_bytes()
    assert got == (direct_dir / "b.img").read_bytes()
    assert got[3 * bs:4 * bs] == bytes(bs) and got[40 * bs:] == chunks[-1]


def test_direct_writes_leave_the_page_cache_alone(direct_dir):
    """What a direct disk writes in whole aligned blocks is not in the page cache afterwards
    (no copy into it, nothing for the kernel to write back); a buffered disk's is."""
    bs = 64 * KiB
    chunks = [bytes([k + 1]) * bs for k in range(16)]
    resident = {}
    for direct in (True, False):
        path = direct_dir / f"{direct}.img"
        with vddk_ext.open_local(str(path), writable=True, create_size=16 * bs,
                                 direct=direct) as disk:
            disk.write_chunks(bs, blocks(*range(16)), np.ones(16, dtype=np.uint64),
                              aligned_chunks(bs, chunks))
            disk.flush()
        resident[direct] = resident_pages(path)
        assert path.read_bytes() == b"".join(chunks)
    assert resident == {True: 0, False: 16 * bs // 4096}


def test_reopen_is_a_second_handle_on_the_same_file(direct_dir):
    bs = 4 * KiB
    path = direct_dir / "r.img"
    disk = vddk_ext.open_local(str(path), writable=True, create_size=4 * bs, direct=True)
    other = disk.reopen()
    assert (other.path, other.capacity, other.kind, other.direct) == (disk.path, 4 * bs,
                                                                       "file", True)
    path.rename(direct_dir / "moved.img")  # the same file, whatever the path names now
    other.write_chunks(bs, blocks(1), np.ones(1, dtype=np.uint64),
                       aligned_chunks(bs, [b"o" * bs]))
    other.close()
    disk.write_blocks(bs, blocks(2), b"d" * bs)
    disk.close()
    assert (direct_dir / "moved.img").read_bytes() == (bytes(bs) + b"o" * bs + b"d" * bs
                                                       + bytes(bs))
    with pytest.raises(ValueError, match="closed"):
        disk.reopen()
    with vddk_ext.open_local(str(direct_dir / "moved.img")) as reader, reader.reopen() as again:
        assert not again.direct
        with pytest.raises(vddk_ext.DiskError):
            again.pwrite(0, b"x")


def test_direct_flag_waits_for_another_threads_write_without_the_gil(tmp_path):
    """Asking a disk whether it writes past the page cache waits for another thread's write on
    it (the handle's lock) with the GIL released: the process's other threads run meanwhile.
    (Held, a restore's writer asking stopped every thread for as long as the disk took.)"""
    bs, nblocks = 64 * KiB, 8192  # 512 MiB in one call: the lock is held for a while
    chunk = memoryview(bytes(range(256)) * (bs // 256))
    done, gaps = threading.Event(), []
    with vddk_ext.open_local(str(tmp_path / "a.img"), writable=True,
                             create_size=bs * nblocks) as disk:

        def write() -> None:
            disk.write_chunks(bs, np.arange(nblocks, dtype=np.uint64),
                              np.ones(nblocks, dtype=np.uint64), [chunk] * nblocks)
            done.set()

        def ask() -> None:
            while not done.is_set():
                disk.direct

        writer, asker = threading.Thread(target=write), threading.Thread(target=ask)
        started = last = time.perf_counter()
        writer.start()
        asker.start()
        while not done.is_set():  # this thread's longest wait for the GIL meanwhile
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
        took = time.perf_counter() - started
        writer.join()
        asker.join()
    if took < 0.1:
        pytest.skip(f"the write took {took:.3f} s: too short to tell")
    assert max(gaps) < took / 2, (max(gaps), took)


@pytest.mark.parametrize("fault, name", [("os.abort()", "SIGABRT"),
                                         ("ctypes.string_at(0)", "SIGSEGV")])
def test_on_fatal_signal_writes_its_line_and_exits_with_its_code(fault, name):
    program = ("import ctypes, os, vddk_ext\n"
               "vddk_ext.on_fatal_signal('error: stopped by ', ' here\\n', 7)\n" + fault)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"}
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env)
    assert (done.returncode, done.stderr) == (7, f"error: stopped by {name} here\n")


@pytest.mark.parametrize("args, fragment", [(("h", "t", 256), "exit_code must be 0-255"),
                                            (("h" * 2048, "t", 3), "head of the fatal-signal")])
def test_on_fatal_signal_refuses_what_it_cannot_keep(args, fragment):
    with pytest.raises(ValueError, match=fragment):
        vddk_ext.on_fatal_signal(*args)
