"""vddk_ext's VDDK backend against the fake libvixDiskLib (tests/fake_vddk), in this process.

VDDK is initialised once per process, so everything here uses the full variant of the fake;
tests of the other variants and of loading run in subprocesses (test_vddk_loading.py).
"""
from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import fake_vddk
import vddk_ext

KiB = 1024
MiB = 1024 * KiB
CHUNK = 64 * KiB   # QueryAllocatedBlocks' 128-sector granularity


@pytest.fixture(scope="session")
def libs(tmp_path_factory):
    libs = fake_vddk.build(tmp_path_factory.getbasetemp())
    vddk_ext.vddk_init(str(libs["full"]))   # on the main thread, before any test starts threads
    return libs


@pytest.fixture
def fake(libs, tmp_path, monkeypatch):
    f = fake_vddk.Fake(libs["full"], tmp_path / "datastores")
    f.env(monkeypatch)
    return f


def make_disk(fake, size: int, writes: dict[int, bytes], path: str = "vm/disk.vmdk") -> bytes:
    """A sparse backing file; returns its content (b"" above 1 GiB)."""
    file = fake.disk_file("ds1", path)
    with open(file, "wb") as f:
        f.truncate(size)
        for offset, data in writes.items():
            f.seek(offset)
            f.write(data)
    return file.read_bytes() if size <= 1 << 30 else b""


def random_writes(rng, size: int, count: int) -> dict[int, bytes]:
    out = {}
    for _ in range(count):
        length = int(rng.integers(1, 300 * KiB))
        offset = int(rng.integers(0, size - length))
        out[offset] = rng.integers(1, 256, length, dtype=np.uint8).tobytes()
    return out


def open_disk(fake, path: str = "[ds1] vm/disk.vmdk", **kw) -> vddk_ext.Disk:
    return vddk_ext.open_vddk(path, **fake.kwargs(**kw))


def read_everything(disk, block_size: int, **kw) -> bytes:
    n = -(-disk.capacity // block_size)
    out = bytearray()
    for batch in disk.reader(block_size, np.arange(n, dtype=np.uint64), **kw):
        for k in range(batch.count):
            out += batch.block(k)
    return bytes(out)


def data_extents_rounded(path, capacity: int) -> list[tuple[int, int]]:
    """The file's SEEK_DATA extents widened to 64 KiB chunks (the tail chunk counts whole)."""
    fd = os.open(path, os.O_RDONLY)
    chunks: set[int] = set()
    try:
        pos = 0
        while pos < capacity:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), capacity)
            chunks.update(range(data // CHUNK, -(-hole // CHUNK)))
            pos = hole
    finally:
        os.close(fd)
    if capacity % CHUNK:
        chunks.add(capacity // CHUNK)
    out: list[list[int]] = []
    for c in sorted(chunks):
        start, end = c * CHUNK, min((c + 1) * CHUNK, capacity)
        if out and out[-1][0] + out[-1][1] == start:
            out[-1][1] += end - start
        else:
            out.append([start, end - start])
    return [tuple(e) for e in out]


def trace_lines(path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


# ------------------------------------------------------------------ reading


@pytest.mark.parametrize("block_size", [4 * KiB, 64 * KiB, 1 * MiB])
@pytest.mark.parametrize("async_reads", [True, False])
def test_read_equals_backing_file(fake, block_size, async_reads):
    size = 5 * MiB + 3 * 512   # not a multiple of any block size: a short last block
    content = make_disk(fake, size, random_writes(np.random.default_rng(block_size), size, 12))
    with open_disk(fake, async_reads=async_reads) as disk:
        assert disk.kind == "vddk" and disk.capacity == size and disk.transport == "nbdssl"
        assert disk.path == "[ds1] vm/disk.vmdk"
        assert read_everything(disk, block_size) == content
        # sparse picks, zero flags
        picks = np.unique(np.array([0, 3, 4, 9, size // block_size], dtype=np.uint64))
        picks = picks[picks <= size // block_size]
        for batch in disk.reader(block_size, picks):
            for k, (number, view) in enumerate(batch):
                expected = content[number * block_size:(number + 1) * block_size]
                assert batch.zero[k] == (not any(expected))
                assert (bytes(view) if view is not None else bytes(len(expected))) == expected


def test_requests_capped_at_2_mib_and_sector_units(fake, monkeypatch, tmp_path):
    trace = tmp_path / "trace"
    monkeypatch.setenv("FAKE_VDDK_TRACE", str(trace))
    size = 20 * MiB
    content = make_disk(fake, size, {0: b"\1" * size})
    with open_disk(fake) as disk:
        assert read_everything(disk, 1 * MiB, max_request=16 * MiB, batch_bytes=16 * MiB) == content
    reads = [(int(t[1]), int(t[2])) for t in trace_lines(trace) if t[0] == "read"]
    assert max(n for _, n in reads) == 4096   # 2 MiB in sectors
    assert sum(n for _, n in reads) * 512 == size
    assert [s for s, _ in reads] == sorted(s for s, _ in reads)


def close_counts(trace) -> dict[str, int]:
    """The fake's per-handle counters from the trace's last "close" line."""
    line = [t for t in trace_lines(trace) if t[0] == "close"][-1]
    return {k: int(v) for k, v in (item.split("=") for item in line[1:])}


@pytest.mark.parametrize("queue_depth", [None, 4, 1])
def test_async_reads_overlap_up_to_the_queue_depth(fake, monkeypatch, tmp_path, queue_depth):
    """Every read of a batch is in flight at once, up to the queue depth, whether the blocks
    are one contiguous run or scattered; slow reads (5 ms each) still give the right bytes."""
    trace = tmp_path / "trace"
    monkeypatch.setenv("FAKE_VDDK_TRACE", str(trace))
    size = 20 * MiB
    content = make_disk(fake, size, {0: np.random.default_rng(4).integers(
        0, 256, size, dtype=np.uint8).tobytes()})
    fake.env(monkeypatch, "slow_read_ms=5")
    depth = queue_depth or 16
    kw = {} if queue_depth is None else {"queue_depth": queue_depth}
    with open_disk(fake, **kw) as disk:
        # one run of 20 requests of 1 MiB in one batch
        assert read_everything(disk, 64 * KiB, batch_bytes=32 * MiB) == content
    counts = close_counts(trace)
    assert counts == {"read_async": 20, "wait": -(-20 // depth), "max_in_flight": depth}
    with open_disk(fake, **kw) as disk:
        # the backup pipeline's shape: 4 MiB batches of scattered 64 KiB blocks (64 requests)
        picks = np.arange(0, size // (64 * KiB), 2, dtype=np.uint64)
        got = {n: bytes(v) for batch in disk.reader(64 * KiB, picks) for n, v in batch}
    assert got == {int(n): content[int(n) * 64 * KiB:(int(n) + 1) * 64 * KiB] for n in picks}
    counts = close_counts(trace)
    assert counts["read_async"] == len(picks) and counts["max_in_flight"] == depth
    assert counts["wait"] == sum(-(-n // depth) for n in (64, 64, 32))   # 3 batches
    reads = [t for t in trace_lines(trace) if t[0] == "read"]
    assert len(reads) == 20 + len(picks)


def test_queue_depth_is_checked_and_unused_without_async_reads(fake, monkeypatch, tmp_path):
    content = make_disk(fake, 4 * MiB, {5: b"sync"})
    for bad in (0, 65, -1):
        with pytest.raises(ValueError, match="queue_depth must be 1-64"):
            open_disk(fake, queue_depth=bad)
    trace = tmp_path / "trace"
    monkeypatch.setenv("FAKE_VDDK_TRACE", str(trace))
    with open_disk(fake, async_reads=False, queue_depth=8) as disk:
        assert read_everything(disk, 64 * KiB, batch_bytes=4 * MiB) == content
    assert close_counts(trace) == {"read_async": 0, "wait": 0, "max_in_flight": 0}


@pytest.mark.parametrize("faults, code, failed", [
    ("read_fail=5:14011", 14011, 5),        # the 5th read of a wave of 16 completes in error
    ("read_async_fail=3:1", 1, 3),          # the 3rd ReadAsync is refused at once
])
def test_error_mid_pipeline_drains_and_reports(fake, monkeypatch, tmp_path, faults, code,
                                               failed):
    """A failed request fails the batch with its own VixError, after every request already
    in flight was waited for (the fake aborts a Close with requests pending); no request is
    issued after the failure, and the handle stays usable."""
    trace = tmp_path / "trace"
    monkeypatch.setenv("FAKE_VDDK_TRACE", str(trace))
    size = 20 * MiB
    content = make_disk(fake, size, {0: np.random.default_rng(6).integers(
        0, 256, size, dtype=np.uint8).tobytes()})
    fake.env(monkeypatch, f"{faults},slow_read_ms=1")
    with open_disk(fake) as disk:
        with pytest.raises(vddk_ext.VixError) as ei:
            read_everything(disk, 64 * KiB, batch_bytes=32 * MiB)
        offset = (failed - 1) * MiB
        assert ei.value.code == code
        assert (f"cannot read 1048576 bytes at offset {offset} of [ds1] vm/disk.vmdk: "
                f"VixDiskLib_ReadAsync: {TEXTS[code]} (VIX error {code})") in str(ei.value)
        reads = [t for t in trace_lines(trace) if t[0] == "read"]
        # a completion error: the whole first wave was drained; a refused submission: only
        # the requests submitted before it
        assert len(reads) == (16 if "read_fail" in faults else failed - 1)
        assert read_everything(disk, 64 * KiB, batch_bytes=32 * MiB) == content
    counts = close_counts(trace)
    assert counts["max_in_flight"] == 16


def test_local_vmdk_without_server(fake):
    """VDDK's local mode: no connection parameters, a file path, transport "file"."""
    content = make_disk(fake, 1 * MiB, {5000: b"local"})
    file = fake.disk_file("ds1", "vm/disk.vmdk")
    with vddk_ext.open_vddk(str(file), libdir=str(fake.libdir)) as disk:
        assert disk.transport == "file"
        assert read_everything(disk, 64 * KiB) == content


# ------------------------------------------------------------------ writing


def test_writes_land_in_backing_file(fake):
    size = 3 * MiB + 512
    model = bytearray(make_disk(fake, size, {100: b"x" * 5000}))
    rng = np.random.default_rng(3)
    with open_disk(fake, readonly=False) as disk:
        data = rng.integers(0, 256, 64 * KiB, dtype=np.uint8).tobytes()
        disk.write_blocks(64 * KiB, np.array([0, 2, 5], dtype=np.uint64), data)
        for b in (0, 2, 5):
            model[b * 64 * KiB:(b + 1) * 64 * KiB] = data
        tail = bytes(512) + bytes(64 * KiB - 512)   # last block: 512 real bytes, zero padded
        disk.write_blocks(64 * KiB, np.array([size // (64 * KiB)], dtype=np.uint64), tail)
        model[size - 512:] = bytes(512)
        big = rng.integers(0, 256, 5 * MiB // 2, dtype=np.uint8).tobytes()[:2 * MiB + 4096]
        disk.pwrite(512, big)
        model[512:512 + len(big)] = big
        disk.write_zeroes(1 * MiB, 300 * KiB)
        model[1 * MiB:1 * MiB + 300 * KiB] = bytes(300 * KiB)
        disk.flush()
        assert read_everything(disk, 64 * KiB) == bytes(model)
        with pytest.raises(vddk_ext.DiskError, match="whole sectors") as ei:
            disk.pwrite(100, b"abc")
        assert ei.value.errno == errno.EINVAL
    assert fake.disk_file("ds1", "vm/disk.vmdk").read_bytes() == bytes(model)


def test_read_only_disk_refuses_writes(fake):
    make_disk(fake, 1 * MiB, {})
    with open_disk(fake) as disk, pytest.raises(vddk_ext.DiskError, match="read-only"):
        disk.pwrite(0, bytes(512))


# ------------------------------------------------------- allocated extents


def test_allocated_extents_match_backing_file(fake):
    size = 9 * MiB + 7 * 512
    writes = random_writes(np.random.default_rng(5), size, 10)
    writes[size - 100] = b"end"
    make_disk(fake, size, writes)
    with open_disk(fake) as disk:
        got = disk.allocated_extents()
    assert got == data_extents_rounded(fake.disk_file("ds1", "vm/disk.vmdk"), size)


def test_allocated_extents_of_empty_disk_is_the_partial_tail_only(fake):
    make_disk(fake, 2 * MiB, {})
    with open_disk(fake) as disk:
        assert disk.allocated_extents() == []
    make_disk(fake, 2 * MiB + 1024, {}, path="vm/odd.vmdk")
    with open_disk(fake, "[ds1] vm/odd.vmdk") as disk:
        assert disk.allocated_extents() == [(2 * MiB, 1024)]


def test_query_allocated_blocks_is_split_at_512ki_chunks(fake, monkeypatch, tmp_path):
    trace = tmp_path / "trace"
    monkeypatch.setenv("FAKE_VDDK_TRACE", str(trace))
    size = 32 * 1024 * MiB + 3 * CHUNK + 1024   # 512 Ki chunks + 3 + a partial one
    make_disk(fake, size, {10 * MiB: b"a", 32 * 1024 * MiB + CHUNK + 5: b"b"})
    with open_disk(fake) as disk:
        got = disk.allocated_extents()
    assert got == [(10 * MiB, CHUNK), (32 * 1024 * MiB + CHUNK, CHUNK),
                   (32 * 1024 * MiB + 3 * CHUNK, 1024)]
    queries = [t[1:] for t in trace_lines(trace) if t[0] == "query"]
    assert queries == [["0", str(512 * 1024 * 128), "128"],
                       [str(512 * 1024 * 128), str(3 * 128), "128"]]


def test_query_not_supported_falls_back_to_whole_disk(fake, monkeypatch, caplog):
    make_disk(fake, 1 * MiB, {})
    fake.env(monkeypatch, "query_fail=6")
    with caplog.at_level(logging.INFO, "repo_engine.vddk"), open_disk(fake) as disk:
        assert disk.allocated_extents() == [(0, 1 * MiB)]
    assert any("QueryAllocatedBlocks is not supported" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ errors

TEXTS = {1: "Unknown error", 3: "One of the parameters was invalid", 4: "The file was not found",
         6: "The operation is not supported",
         14011: "The network connection to the host was lost",
         16007: "The sector is out of range of the disk"}


@pytest.mark.parametrize("faults, call, function, code", [
    ("connect_fail=3", "open", "ConnectEx", 3),
    ("open_fail=4", "open", "Open", 4),
    ("info_fail=1", "open", "GetInfo", 1),
    ("read_fail=2:14011", "read", "ReadAsync", 14011),
    ("read_fail=1:16007", "read_sync", "Read", 16007),
    ("drop_after=3", "read", "ReadAsync", 14011),
    ("drop_after=1", "read_sync", "Read", 14011),
    ("extra_sectors=256", "read", "ReadAsync", 16007),
    ("write_fail=1:6", "write", "Write", 6),
    ("flush_fail=1", "flush", "Flush", 1),
    ("query_fail=3", "extents", "QueryAllocatedBlocks", 3),
    ("close_fail=1", "close", "Close", 1),
])
def test_every_vix_error_raises_with_its_text(fake, monkeypatch, faults, call, function, code):
    make_disk(fake, 8 * MiB, {0: b"\1" * (8 * MiB)})
    fake.env(monkeypatch, faults)
    with pytest.raises(vddk_ext.VixError) as ei:
        disk = open_disk(fake, readonly=call not in ("write", "flush"),
                         async_reads=call != "read_sync")
        try:
            if call.startswith("read"):
                read_everything(disk, 64 * KiB, max_request=1 * MiB)
            elif call == "write":
                disk.pwrite(0, bytes(4096))
            elif call == "flush":
                disk.flush()
            elif call == "extents":
                disk.allocated_extents()
        finally:
            disk.close()
    exc = ei.value
    assert isinstance(exc, vddk_ext.DiskError) and isinstance(exc, OSError)
    assert exc.code == code and exc.vix_error == code and exc.text == TEXTS[code]
    assert f"VixDiskLib_{function}: {TEXTS[code]} (VIX error {code})" in str(exc)
    assert "[ds1] vm/disk.vmdk" in str(exc)
    assert exc.errno == {3: errno.EINVAL, 4: errno.ENOENT, 6: errno.EOPNOTSUPP,
                         14011: errno.ECONNRESET, 16007: errno.ERANGE}.get(code, errno.EIO)


LIKELY_CAUSE = ("; the likely cause: the server's certificate thumbprint does not match the one "
                "given ({}), or the user name or password is wrong; check the thumbprint with: "
                "openssl s_client -connect vc.test:443 </dev/null | openssl x509 -noout "
                "-fingerprint -sha1")


@pytest.mark.parametrize("where, faults", [("ConnectEx", "login_at_connect=1"), ("Open", None)])
def test_wrong_thumbprint_or_login_names_the_likely_cause(fake, monkeypatch, tmp_path, where,
                                                          faults):
    """VDDK reports a certificate that does not match the thumbprint, and a refused login, as
    VIX_E_FAIL "Unknown error", from ConnectEx (vCenter) or Open: the message names both."""
    make_disk(fake, 1 * MiB, {})
    fake.env(monkeypatch, faults)
    wrong = "00:" * 19 + "00"
    with pytest.raises(vddk_ext.VixError) as ei:
        open_disk(fake, thumbprint=wrong)
    assert ei.value.code == vddk_ext.VIX_E_FAIL
    assert (f"VixDiskLib_{where}: Unknown error (VIX error 1)" + LIKELY_CAUSE.format(wrong)) \
        in str(ei.value)
    (tmp_path / "pw").write_text("right\n")
    monkeypatch.setenv("FAKE_VDDK_PASSWORD_FILE", str(tmp_path / "pw"))
    with pytest.raises(vddk_ext.VixError, match=f"VixDiskLib_{where}: .*or the user name or "
                                                "password is wrong"):
        open_disk(fake, password="wrong")
    fake.env(monkeypatch, "connect_fail=3" if where == "ConnectEx" else "open_fail=4")
    with pytest.raises(vddk_ext.VixError, match=f"VixDiskLib_{where}") as ei:
        open_disk(fake, password="right")
    assert "likely cause" not in str(ei.value)   # other errors: no guess


def test_wrong_password_fails_at_open(fake, monkeypatch, tmp_path):
    make_disk(fake, 1 * MiB, {})
    (tmp_path / "pw").write_text("right\n")
    monkeypatch.setenv("FAKE_VDDK_PASSWORD_FILE", str(tmp_path / "pw"))
    with pytest.raises(vddk_ext.VixError):
        open_disk(fake, password="wrong")
    open_disk(fake, password="right").close()
    open_disk(fake, password=b"right").close()


def test_missing_disk_and_unknown_datastore(fake):
    make_disk(fake, 1 * MiB, {})
    for path in ("[ds1] vm/other.vmdk", "[nods] vm/disk.vmdk"):
        with pytest.raises(vddk_ext.VixError, match="The file was not found") as ei:
            open_disk(fake, path)
        assert ei.value.errno == errno.ENOENT


def test_unknown_code_and_high_bits(fake, monkeypatch):
    make_disk(fake, 1 * MiB, {0: b"x"})
    fake.env(monkeypatch, "read_fail=1:0x500004e21")   # extra bits above VIX_ERROR_CODE 20001
    with open_disk(fake) as disk, pytest.raises(vddk_ext.VixError) as ei:
        read_everything(disk, 64 * KiB)
    assert ei.value.code == 20001 and ei.value.vix_error == 0x500004E21
    assert ei.value.text == "" and "VDDK gave no description (VIX error 20001)" in str(ei.value)


def test_usage_errors_before_any_vddk_call(fake):
    with pytest.raises(vddk_ext.DiskError, match="thumbprint .* is required"):
        open_disk(fake, thumbprint=None)
    with pytest.raises(vddk_ext.DiskError, match="vmx_spec .* is required"):
        open_disk(fake, vmx_spec=None)
    with pytest.raises(vddk_ext.DiskError, match="password or cookie is required"):
        open_disk(fake, password=None)
    with pytest.raises(ValueError, match="port"):
        open_disk(fake, port=0)
    with pytest.raises(TypeError, match="password must be str or bytes"):
        open_disk(fake, password=123)
    with pytest.raises(ValueError, match="NUL"):
        open_disk(fake, password="a\0b")


def test_session_cookie_credentials(fake):
    make_disk(fake, 1 * MiB, {0: b"c"})
    with open_disk(fake, password=None, cookie="vmware_soap_session=abc") as disk:
        assert disk.capacity == 1 * MiB


def test_other_libdir_after_init_is_refused(fake, libs):
    with pytest.raises(vddk_ext.DiskError, match="already initialised from"):
        vddk_ext.open_vddk("[ds1] vm/disk.vmdk", **fake.kwargs(libdir=str(libs["noquery"])))


def test_exit_refused_while_a_disk_is_open(fake):
    make_disk(fake, 1 * MiB, {})
    with open_disk(fake):
        with pytest.raises(vddk_ext.DiskError, match="still open"):
            vddk_ext.vddk_exit()
    assert vddk_ext.vddk_info()["state"] == "initialised"


# ------------------------------------------------- PrepareForAccess / EndAccess

ACCESS_KEYS = ("libdir", "server", "thumbprint", "user", "password", "vmx_spec")


def access_kwargs(fake, **overrides) -> dict[str, object]:
    kw = {k: v for k, v in fake.kwargs().items() if k in ACCESS_KEYS}
    kw.update(overrides)
    return kw


def trace_text(path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_prepare_then_end_access_gates_open(fake, monkeypatch, tmp_path):
    make_disk(fake, 1 * MiB, {})
    trace = tmp_path / "trace"
    monkeypatch.setenv("FAKE_VDDK_TRACE", str(trace))
    monkeypatch.setenv("FAKE_VDDK_REQUIRE_PREPARE", "1")
    kw = access_kwargs(fake, vmx_spec="moref=vm-101")
    assert vddk_ext.vddk_info()["functions"]["PrepareForAccess"] is True
    with pytest.raises(vddk_ext.VixError) as info:
        open_disk(fake, vmx_spec="moref=vm-101")
    assert info.value.code == vddk_ext.VIX_E_FAIL
    assert vddk_ext.vddk_prepare_for_access(**kw) is True
    with open_disk(fake, vmx_spec="moref=vm-101") as disk:
        assert disk.capacity == 1 * MiB
    assert vddk_ext.vddk_end_access(**kw) is True
    with pytest.raises(vddk_ext.VixError):
        open_disk(fake, vmx_spec="moref=vm-101")
    calls = [line.split()[0] for line in trace_text(trace)]
    assert [c for c in calls if c in ("prepare", "end_access", "open")] == [
        "open", "prepare", "open", "end_access", "open"]
    assert "prepare moref=vm-101 repo-engine" in trace_text(trace)


def test_end_access_without_prepare_and_own_identity(fake, monkeypatch, tmp_path):
    trace = tmp_path / "trace"
    monkeypatch.setenv("FAKE_VDDK_TRACE", str(trace))
    kw = access_kwargs(fake, vmx_spec="moref=vm-102", identity="nightly")
    assert vddk_ext.vddk_end_access(**kw) is True
    assert trace_text(trace) == ["end_access moref=vm-102 nightly"]
    # a session cookie instead of a password works too
    assert vddk_ext.vddk_prepare_for_access(**access_kwargs(
        fake, vmx_spec="moref=vm-102", password=None, cookie="c00kie")) is True
    assert vddk_ext.vddk_end_access(**access_kwargs(
        fake, vmx_spec="moref=vm-102", password=None, cookie="c00kie")) is True


def test_access_errors(fake, monkeypatch):
    kw = access_kwargs(fake, vmx_spec="moref=vm-103")
    monkeypatch.setenv("FAKE_VDDK_FAULTS", "prepare_fail=14011,end_access_fail=3")
    with pytest.raises(vddk_ext.VixError, match="VixDiskLib_PrepareForAccess") as info:
        vddk_ext.vddk_prepare_for_access(**kw)
    assert info.value.code == vddk_ext.VIX_E_HOST_TCP_CONN_LOST
    assert info.value.errno == errno.ECONNRESET and "moref=vm-103" in str(info.value)
    with pytest.raises(vddk_ext.VixError, match="VixDiskLib_EndAccess") as info:
        vddk_ext.vddk_end_access(**kw)
    assert info.value.code == vddk_ext.VIX_E_INVALID_ARG
    monkeypatch.delenv("FAKE_VDDK_FAULTS")
    with pytest.raises(vddk_ext.VixError) as info:   # as vCenter: a wrong thumbprint
        vddk_ext.vddk_prepare_for_access(**dict(kw, thumbprint="00:11"))
    assert info.value.code == vddk_ext.VIX_E_FAIL
    assert str(info.value).endswith(LIKELY_CAUSE.format("00:11"))
    with pytest.raises(vddk_ext.VixError, match="VixDiskLib_EndAccess: .*likely cause"):
        vddk_ext.vddk_end_access(**dict(kw, thumbprint="00:11"))
    with pytest.raises(vddk_ext.VixError) as info:   # not "moref=..."
        vddk_ext.vddk_prepare_for_access(**dict(kw, vmx_spec="vm-103"))
    assert info.value.code == vddk_ext.VIX_E_INVALID_ARG
    with pytest.raises(vddk_ext.DiskError, match="thumbprint .* is required") as info:
        vddk_ext.vddk_prepare_for_access(**dict(kw, thumbprint=None))
    assert info.value.errno == errno.EINVAL and not isinstance(info.value, vddk_ext.VixError)
    with pytest.raises(vddk_ext.DiskError, match="password or cookie is required"):
        vddk_ext.vddk_end_access(**dict(kw, password=None))
    with pytest.raises(TypeError, match="server"):
        vddk_ext.vddk_prepare_for_access(**{k: v for k, v in kw.items() if k != "server"})
    with pytest.raises(TypeError):
        vddk_ext.vddk_prepare_for_access("vc.test")   # keyword-only
    with pytest.raises(vddk_ext.DiskError, match="already initialised from"):
        vddk_ext.vddk_prepare_for_access(**dict(kw, libdir=str(fake.libdir.parent / "noaccess")))


# ------------------------------------------------------------------ logging


def test_vddk_log_reaches_python_logging(fake, caplog, monkeypatch):
    make_disk(fake, 1 * MiB, {})
    with caplog.at_level(logging.INFO, "repo_engine.vddk"):
        open_disk(fake).close()
        with pytest.raises(vddk_ext.VixError):
            open_disk(fake, thumbprint="AA")
    messages = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    assert ("repo_engine.vddk", logging.INFO,
            "VixDiskLib: opened [ds1] vm/disk.vmdk (nbdssl, read-only)") in messages
    assert any(level == logging.WARNING and "SSL Verification failed" in m
               for _, level, m in messages)
    assert all(not m.endswith("\n") for _, _, m in messages)


# -------------------------------------------------------------- concurrency


def test_concurrent_threads_on_one_handle(fake, monkeypatch):
    """Readers, writes and flushes from 8 threads on one handle: the fake aborts the whole
    process if two threads ever enter the handle at once."""
    size = 4 * MiB
    content = make_disk(fake, size, random_writes(np.random.default_rng(9), size, 8))
    fake.env(monkeypatch, "slow_read_ms=1")
    errors: list[BaseException] = []
    with open_disk(fake, readonly=False) as disk:
        def work(i: int) -> None:
            try:
                for _ in range(3):
                    assert read_everything(disk, 64 * KiB, max_request=128 * KiB) == content
                    disk.allocated_extents()
                    disk.pwrite(size - 512, content[-512:])
                    disk.flush()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors


def test_concurrent_opens_and_closes_are_serialised(fake, monkeypatch):
    content = make_disk(fake, 256 * KiB, {7: b"z"})
    fake.env(monkeypatch, "slow_open_ms=2")
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(5):
                with open_disk(fake) as disk:
                    assert read_everything(disk, 64 * KiB) == content
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_fake_aborts_when_two_threads_enter_one_handle(fake, tmp_path):
    """The guard the tests above rely on: calling the fake directly from two threads aborts."""
    make_disk(fake, 1 * MiB, {})
    code = f"""
import ctypes, threading
lib = ctypes.CDLL({str(fake.libdir / 'lib64' / 'libvixDiskLib.so.8')!r})
LOG = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_void_p)
log = LOG(lambda fmt, ap: None)
assert lib.VixDiskLib_InitEx(6, 0, log, log, log, None, None) == 0
conn, h = ctypes.c_void_p(), ctypes.c_void_p()
assert lib.VixDiskLib_ConnectEx(None, 1, None, None, ctypes.byref(conn)) == 0
assert lib.VixDiskLib_Open(conn, {str(fake.disk_file('ds1', 'vm/disk.vmdk'))!r}.encode(), 4,
                           ctypes.byref(h)) == 0
buf = ctypes.create_string_buffer(512)
lib.VixDiskLib_Read.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_char_p]
def spin():
    for _ in range(200000):
        lib.VixDiskLib_Read(h, 0, 1, buf)
ts = [threading.Thread(target=spin) for _ in range(4)]
[t.start() for t in ts]; [t.join() for t in ts]
"""
    env = dict(os.environ, FAKE_VDDK_FAULTS="slow_read_ms=1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode < 0 and "entered by two threads at once" in r.stderr


# ------------------------------------------------------------------ leaks


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_no_leak_over_10000_open_read_close_cycles(fake):
    content = make_disk(fake, 256 * KiB, {1000: b"q" * 70000})
    blocks = np.array([0, 1, 3], dtype=np.uint64)
    kw = fake.kwargs()

    def cycle() -> None:
        disk = vddk_ext.open_vddk("[ds1] vm/disk.vmdk", **kw)
        for batch in disk.reader(64 * KiB, blocks):
            assert bytes(batch.block(1)) == content[64 * KiB:128 * KiB]
        disk.allocated_extents()
        disk.close()

    for _ in range(1000):
        cycle()
    before = rss_bytes()
    for _ in range(10000):
        cycle()
    grown = rss_bytes() - before
    assert grown < 2 * MiB, f"RSS grew by {grown} bytes over 10,000 cycles"
