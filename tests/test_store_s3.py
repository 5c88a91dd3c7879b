"""S3Store against a real SeaweedFS server (tests/s3server.py): the Store contract, multipart
uploads, one-line errors for a wrong endpoint, bad credentials, a missing bucket and a timeout,
and retries through a fault-injecting proxy (tests/s3proxy.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import tracemalloc
from dataclasses import replace
from pathlib import Path

import pytest

from repo_engine.errors import DamageError
from repo_engine.repository.atomic import SPOOL_DIR, host_id
from repo_engine.repository.store import (BadLocation, ObjectExists, ObjectInfo, StoreAuthError,
                                          StoreError, StoreUnreachable, open_store)
from repo_engine.repository.store import s3
from repo_engine.repository.store.s3 import S3Store
from repo_engine.repository.store.s3_settings import MIB, S3Settings
from s3proxy import FaultProxy
from s3server import ACCESS_KEY, SECRET_KEY, admin_client, free_ports, start_server
from store_contract import StoreContract

# Small pages, parts and backoffs, so paging, multipart and retries show in a few seconds.
FAST = dict(access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY, max_attempts=4,
            backoff_base=0.01, backoff_cap=0.05, connect_timeout=2.0, read_timeout=10.0,
            list_page_size=7, multipart_threshold=6 * MIB, multipart_part_size=5 * MIB)


@pytest.fixture(autouse=True)
def spool_in_tmp_path(tmp_path, monkeypatch):
    """Spool directories (the temp dir's by default) under the test's own directory."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def settings_for(endpoint: str, **changes) -> S3Settings:
    return S3Settings(endpoint=endpoint, **{**FAST, **changes})


@pytest.fixture
def store(seaweedfs, s3_bucket):
    s = S3Store(f"s3://{s3_bucket}/repo", settings_for(seaweedfs.endpoint))
    yield s
    s.close()


@pytest.fixture
def proxy(seaweedfs):
    p = FaultProxy(seaweedfs.ports["s3.port"])
    yield p
    p.close()


def one_line_error(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text and "Traceback" not in text
    return text


class TestS3StoreContract(StoreContract):
    """The contract every store keeps (tests/store_contract.py), plus what only a bucket shows:
    paging, empty objects, prefixes of one bucket kept apart. Each test on a fresh bucket."""

    def test_contract_put_empty_object(self, store):
        store.put("locks/x.lock", b"")
        assert store.get("locks/x.lock", limit=0) == b""
        assert store.size("locks/x.lock") == 0

    def test_contract_list_by_prefix_paged(self, store):
        names = {f"packs/{i % 3:02x}/{i:064x}.pack": i for i in range(20)}
        names["points/0000000000000001.point"] = 3
        for name, size in names.items():
            store.put(name, b"x" * size)
        listed = list(store.list("packs/"))  # 20 objects in pages of 7
        assert sorted(listed, key=lambda o: o.name) == [
            ObjectInfo(n, s) for n, s in sorted(names.items()) if n.startswith("packs/")]
        assert {o.name for o in store.list("")} == set(names)
        assert {o.name for o in store.list("packs/01/")} == {n for n in names if "/01/" in n}
        assert list(store.list("maps/")) == []

    def test_contract_prefix_isolates_stores(self, store, seaweedfs, s3_bucket):
        other = S3Store(f"s3://{s3_bucket}/other", settings_for(seaweedfs.endpoint))
        other.put("config", b"other")
        store.put("config", b"mine")
        assert [o.name for o in store.list("")] == ["config"]
        assert store.get("config", limit=10) == b"mine"
        other.close()


class TestMultipart:
    def big_file(self, store, size: int) -> tuple[Path, bytes]:
        data = os.urandom(size)
        path = store.spool_dir() / "big.tmp"
        path.write_bytes(data)
        return path, data

    def test_big_file_goes_in_parts_byte_equal(self, store, seaweedfs):
        path, data = self.big_file(store, 12 * MIB + 3)  # threshold 6 MiB: parts 5, 5, 2 MiB
        store.put_file("packs/ff/big.pack", path, if_absent=True)
        assert store.get("packs/ff/big.pack", limit=len(data)) == data
        assert store.get_range("packs/ff/big.pack", 5 * MIB - 2, 4) == data[5 * MIB - 2:5 * MIB + 2]
        head = admin_client(seaweedfs).head_object(Bucket=store.bucket,
                                                   Key="repo/packs/ff/big.pack")
        assert head["ETag"].strip('"').endswith("-3")  # a multipart ETag: 3 parts
        assert list(store.pending_uploads()) == []

    def test_lost_race_aborts_the_upload(self, store, monkeypatch):
        """The name appears between the existence check and the completion: the conditional
        completion refuses (412), the upload is aborted, the object there is untouched."""
        store.put("packs/ff/race.pack", b"the winner")
        monkeypatch.setattr(store, "exists", lambda name: False)
        path, _ = self.big_file(store, 7 * MIB)
        with pytest.raises(ObjectExists):
            store.put_file("packs/ff/race.pack", path, if_absent=True)
        assert store.get("packs/ff/race.pack", limit=100) == b"the winner"
        assert list(store.pending_uploads()) == []

    def test_upload_aborted_meanwhile(self, store, monkeypatch):
        """A cleanup of stale uploads aborts one still running: the put fails with one line
        saying so (exit 1, no damage), and nothing is left."""
        upload_parts = store._upload_parts

        def then_cleanup(*args):
            parts = upload_parts(*args)
            for pending in store.pending_uploads():
                store.abort_upload(pending)
            return parts
        monkeypatch.setattr(store, "_upload_parts", then_cleanup)
        path, _ = self.big_file(store, 7 * MIB)
        with pytest.raises(StoreError) as excinfo:
            store.put_file("packs/ff/p.pack", path)
        assert excinfo.value.exit_code == 1 and not isinstance(excinfo.value, DamageError)
        assert one_line_error(excinfo).endswith(
            "complete multipart upload of packs/ff/p.pack: the multipart upload was aborted "
            "meanwhile (a cleanup of stale uploads?); run the command again")
        assert not store.exists("packs/ff/p.pack") and list(store.pending_uploads()) == []

    def test_stale_uploads_are_listed_and_aborted(self, store, seaweedfs):
        """An upload left by a process that died: found under the store's prefix only."""
        admin = admin_client(seaweedfs)
        admin.create_multipart_upload(Bucket=store.bucket, Key="repo/packs/00/dead.pack")
        admin.create_multipart_upload(Bucket=store.bucket, Key="elsewhere/x")
        pending = list(store.pending_uploads())
        assert [p.name for p in pending] == ["packs/00/dead.pack"]
        store.abort_upload(pending[0])
        store.abort_upload(pending[0])  # twice: already gone is fine
        assert list(store.pending_uploads()) == []


class TestErrors:
    def test_unreachable_endpoint(self, s3_bucket):
        port = free_ports(1)[0]
        store = S3Store(f"s3://{s3_bucket}/r", settings_for(f"http://127.0.0.1:{port}",
                                                           max_attempts=2))
        with pytest.raises(StoreUnreachable) as excinfo:
            store.get("config", limit=10)
        text = one_line_error(excinfo)
        assert f"cannot reach the S3 endpoint http://127.0.0.1:{port}" in text
        assert "after 2 attempts" in text and excinfo.value.exit_code == 1

    def test_not_an_s3_endpoint(self, seaweedfs, s3_bucket):
        """An HTTP server that is not S3 (the SeaweedFS master's port): an error, one line."""
        store = S3Store(f"s3://{s3_bucket}/r", settings_for(
            f"http://127.0.0.1:{seaweedfs.ports['master.port']}", max_attempts=1))
        with pytest.raises(StoreError) as excinfo:
            store.put("config", b"x")
        assert f"127.0.0.1:{seaweedfs.ports['master.port']}" in one_line_error(excinfo)

    @pytest.mark.parametrize("keys", [(ACCESS_KEY, "wrong-secret"), ("nosuchkey", SECRET_KEY)])
    def test_bad_credentials(self, seaweedfs, s3_bucket, keys):
        store = S3Store(f"s3://{s3_bucket}/r", settings_for(
            seaweedfs.endpoint, access_key_id=keys[0], secret_access_key=keys[1]))
        for call in (lambda: store.put("config", b"x"), lambda: list(store.list(""))):
            with pytest.raises(StoreAuthError) as excinfo:
                call()
            text = one_line_error(excinfo)
            assert "refused the credentials or denied access" in text
            assert "AWS_SECRET_ACCESS_KEY" in text
            assert keys[1] not in text

    def test_no_credentials(self, seaweedfs, s3_bucket):
        with pytest.raises(StoreAuthError, match="no S3 credentials; set AWS_ACCESS_KEY_ID"):
            S3Store(f"s3://{s3_bucket}/r", settings_for(
                seaweedfs.endpoint, access_key_id=None, secret_access_key=None))

    def test_missing_bucket(self, seaweedfs):
        store = S3Store("s3://no-such-bucket-here/r", settings_for(seaweedfs.endpoint))
        for call in (lambda: store.put("config", b"x"), lambda: store.get("config", limit=9),
                     lambda: list(store.list(""))):
            with pytest.raises(StoreError) as excinfo:
                call()
            assert one_line_error(excinfo) == (
                f"s3://no-such-bucket-here/r: bucket 'no-such-bucket-here' does not exist at "
                f"{seaweedfs.endpoint}; create it or correct the location")

    @pytest.mark.parametrize("location", ["s3://", "s3://B/x", "s3://a/x", "s3://ok-bucket/a/../b"])
    def test_bad_location(self, location):
        with pytest.raises(BadLocation, match="not a (bucket|valid object) name") as excinfo:
            S3Store(location, settings_for("http://127.0.0.1:1"))
        assert excinfo.value.exit_code == 2

    def test_tls_certificate_checked(self, seaweedfs, s3_bucket):
        """The server's self-signed certificate: refused by default (one line, not retried),
        trusted through ca_bundle, or unchecked with verify_tls = false."""
        store = S3Store(f"s3://{s3_bucket}/r", settings_for(seaweedfs.tls_endpoint))
        with pytest.raises(StoreUnreachable) as excinfo:
            store.put("config", b"x")
        text = one_line_error(excinfo)
        assert text.startswith(f"s3://{s3_bucket}/r: TLS with {seaweedfs.tls_endpoint} failed: ")
        assert "CERTIFICATE_VERIFY_FAILED" in text and text.endswith(
            "; check the ca_bundle / verify_tls settings")
        for changes in ({"ca_bundle": str(seaweedfs.certificate)}, {"verify_tls": False}):
            store = S3Store(f"s3://{s3_bucket}/r", settings_for(seaweedfs.tls_endpoint, **changes))
            store.put("config", b"over TLS")
            assert store.get("config", limit=8) == b"over TLS"
            buffer = memoryview(bytearray(3))
            with store.open_range("config", 5, 3) as reader:
                reader.read_into(buffer)
            assert buffer == b"TLS"

    def test_timeout(self, proxy, s3_bucket):
        store = S3Store(f"s3://{s3_bucket}/r", settings_for(proxy.endpoint, read_timeout=0.5,
                                                            max_attempts=2))
        proxy.arm("hang", 2)
        with pytest.raises(StoreUnreachable) as excinfo:
            store.put("config", b"x")
        text = one_line_error(excinfo)
        assert f"{proxy.endpoint} did not answer put config in time (after 2 attempts" in text
        assert proxy.served == 2


class TestRetries:
    @pytest.mark.parametrize("kind", ["503", "reset"])
    def test_transient_faults_are_retried(self, proxy, s3_bucket, kind):
        store = S3Store(f"s3://{s3_bucket}/r", settings_for(proxy.endpoint))
        for i in range(6):
            proxy.arm(kind, 3)  # one fewer than max_attempts
            store.put(f"maps/00/{i:064x}.map", b"m%d" % i, if_absent=True)
        proxy.arm(kind, 3)
        assert store.get("maps/00/" + "0" * 64 + ".map", limit=10) == b"m0"
        proxy.arm(kind, 3)
        assert len(list(store.list("maps/"))) == 6
        assert proxy.served == 8 * 3

    def test_retries_are_capped(self, proxy, s3_bucket):
        store = S3Store(f"s3://{s3_bucket}/r", settings_for(proxy.endpoint))
        proxy.arm("503", 4)
        with pytest.raises(StoreError) as excinfo:
            store.put("config", b"x")
        text = one_line_error(excinfo)
        assert text.startswith(f"s3://{s3_bucket}/r: put config: {proxy.endpoint} kept failing "
                               "(SlowDown, HTTP 503: Please reduce your request rate.) after 4 "
                               "attempts in ")
        assert text.endswith("; try again later") and proxy.served == 4
        assert not store.exists("config")

    def test_multipart_parts_are_retried(self, proxy, s3_bucket):
        store = S3Store(f"s3://{s3_bucket}/r", settings_for(proxy.endpoint,
                                                            multipart_concurrency=1))
        data = os.urandom(11 * MIB)
        path = store.spool_dir() / "p"
        path.write_bytes(data)
        proxy.arm("reset", 2)
        store.put_file("packs/00/p.pack", path)
        assert store.get("packs/00/p.pack", limit=len(data)) == data
        assert proxy.served == 2

    @pytest.mark.parametrize("kind", ["503", "reset"])
    def test_a_range_read_cut_midway_goes_on_from_where_it_stopped(self, proxy, s3_bucket, kind):
        """A long range read whose connection is cut midway (far more is left than socket
        buffers hold), then faults on the requests that follow (4 attempts in all, the
        default cap): it asks again for the rest only, and returns every byte in order."""
        store = S3Store(f"s3://{s3_bucket}/r", settings_for(proxy.endpoint))
        data = os.urandom(40 * MIB)
        path = store.spool_dir() / "p"
        path.write_bytes(data)
        store.put_file("packs/00/q.pack", path)
        with store.open_range("packs/00/q.pack", 7, len(data) - 14) as reader:
            got = [reader.read(MIB)]
            proxy.arm(kind, 2)  # cuts the open answer; the next 2 requests fail too
            reader.skip(3 * MIB)
            got.append(reader.read(len(data) - 14 - 4 * MIB))
        assert got == [data[7:7 + MIB], data[7 + 4 * MIB:len(data) - 7]]
        assert proxy.served == 2

    @pytest.mark.parametrize("kind", ["503", "reset"])
    def test_a_range_read_into_a_buffer_cut_midway_goes_on_from_where_it_stopped(
            self, proxy, s3_bucket, kind):
        """As above, the pieces read into one buffer: the piece being read when the answer
        is cut is read again whole, from where the piece starts."""
        store = S3Store(f"s3://{s3_bucket}/r", settings_for(proxy.endpoint))
        data = os.urandom(24 * MIB)
        store.put("packs/00/b.pack", data)
        buffer = memoryview(bytearray(8 * MIB))
        with store.open_range("packs/00/b.pack", 5, len(data) - 10) as reader:
            reader.read_into(buffer[:MIB])
            got = [bytes(buffer[:MIB])]
            proxy.arm(kind, 2)
            reader.read_into(buffer)
            got.append(bytes(buffer))
        assert got == [data[5:5 + MIB], data[5 + MIB:5 + 9 * MIB]]
        assert proxy.served == 2

    def test_ranges_read_into_a_buffer_to_their_end_reuse_the_connection(self, proxy,
                                                                         s3_bucket):
        store = S3Store(f"s3://{s3_bucket}/r", settings_for(proxy.endpoint))
        data = os.urandom(3 * MIB)
        store.put("packs/00/c.pack", data)
        buffer = memoryview(bytearray(MIB))
        before = proxy.accepted
        for start in range(0, len(data), MIB):
            with store.open_range("packs/00/c.pack", start, MIB) as reader:
                reader.read_into(buffer)
            assert buffer == data[start:start + MIB]
        assert proxy.accepted - before == 0  # the put's connection, back in the pool each time

    def test_a_body_without_the_http_response_below_is_read_and_copied(self, store,
                                                                        monkeypatch):
        """Should botocore's body stop carrying http.client's response, `read_into` reads
        through the body's own `read` (a copy) and still returns every byte."""
        data = os.urandom(3 * MIB)
        store.put("packs/00/d.pack", data)
        answer = s3._StreamedRange._answer

        class Body:  # botocore's body, minus what lies below it
            def __init__(self, body) -> None:
                self.read, self.close = body.read, body.close

        def opaque(reader):
            if not isinstance(reader._body, Body):
                reader._body = Body(answer(reader))
            return reader._body

        monkeypatch.setattr(s3._StreamedRange, "_answer", opaque)
        buffer = memoryview(bytearray(2 * MIB))
        with store.open_range("packs/00/d.pack", 1, len(data) - 1) as reader:
            reader.read_into(buffer)
            got = bytes(buffer)
            reader.read_into(buffer[:MIB - 1])
        assert got + bytes(buffer[:MIB - 1]) == data[1:]

    def test_failed_part_aborts_the_upload(self, proxy, s3_bucket, monkeypatch):
        """A part that fails past the retry cap: the upload is aborted (nothing pending), no
        object appears, the spool file stays for the caller."""
        store = S3Store(f"s3://{s3_bucket}/r", settings_for(proxy.endpoint,
                                                            multipart_concurrency=1))
        upload_parts = store._upload_parts

        def parts_failing(*args):
            proxy.arm("503", 4)  # every attempt of the first part
            return upload_parts(*args)
        monkeypatch.setattr(store, "_upload_parts", parts_failing)
        path = store.spool_dir() / "p"
        path.write_bytes(os.urandom(11 * MIB))
        with pytest.raises(StoreError, match="upload part 1 of packs/00/p.pack: .* kept failing"):
            store.put_file("packs/00/p.pack", path)
        assert proxy.served == 4 and path.exists()
        assert not store.exists("packs/00/p.pack")
        assert list(store.pending_uploads()) == []

    @pytest.mark.parametrize("if_absent", [True, False])
    def test_lost_reply_of_a_multipart_completion(self, proxy, s3_bucket, monkeypatch, if_absent):
        """The completion's answer is lost: its retry meets 412 (if_absent) or a completed
        upload; the object's ETag shows it is this upload's, so the put succeeds."""
        store = S3Store(f"s3://{s3_bucket}/r", settings_for(proxy.endpoint))
        upload_parts = store._upload_parts

        def then_lose_the_next_reply(*args):
            parts = upload_parts(*args)
            proxy.arm("lost-reply", 1)  # the completion's connection
            return parts
        monkeypatch.setattr(store, "_upload_parts", then_lose_the_next_reply)
        data = os.urandom(7 * MIB)
        path = store.spool_dir() / "p"
        path.write_bytes(data)
        store.put_file("packs/00/p.pack", path, if_absent=if_absent)
        assert proxy.served == 1 and not path.exists()
        assert store.get("packs/00/p.pack", limit=len(data)) == data
        assert list(store.pending_uploads()) == []

    def test_lost_reply_of_a_conditional_put(self, proxy, s3_bucket):
        """The server stored the object but the answer was lost: the retry meets 412 on the
        object the first attempt wrote, which is the put's own success; a different object
        there is still ObjectExists."""
        store = S3Store(f"s3://{s3_bucket}/r", settings_for(proxy.endpoint))
        proxy.arm("lost-reply", 1)
        store.put("points/0000000000000002.point", b"manifest", if_absent=True)
        assert proxy.served == 1
        assert store.get("points/0000000000000002.point", limit=100) == b"manifest"
        proxy.arm("lost-reply", 1)
        with pytest.raises(ObjectExists):
            store.put("points/0000000000000002.point", b"another", if_absent=True)


    @pytest.mark.parametrize("fault, count", [("reset", 2), ("lost-reply", 1)])
    def test_put_file_retried_streams_the_whole_file_again(self, proxy, s3_bucket, fault, count):
        """A single PUT streams the spool file. An attempt cut off ("reset") is sent again from
        the file's start, never from where it stopped; one whose answer was lost meets 412 on
        its own object, which is compared piece by piece to the last byte: the put succeeded.
        A file that differs from the object in its last byte still meets ObjectExists."""
        store = S3Store(f"s3://{s3_bucket}/r", settings_for(proxy.endpoint))
        data = os.urandom(5 * MIB)  # below the multipart threshold
        path = store.spool_dir() / "p"
        path.write_bytes(data)
        proxy.arm(fault, count)
        store.put_file("packs/00/p.pack", path, if_absent=True)
        assert proxy.served == count and not path.exists()
        assert store.get("packs/00/p.pack", limit=len(data)) == data
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
        proxy.arm(fault, count)
        with pytest.raises(ObjectExists):
            store.put_file("packs/00/p.pack", path, if_absent=True)
        assert proxy.served == 2 * count


def test_put_file_streams_the_spool_file(store):
    """put_file below the multipart threshold does not read the file into memory: several
    packs upload at once during a backup, each would cost its size."""
    size = 5 * MIB
    path = store.spool_dir() / "p"
    path.write_bytes(os.urandom(size))
    store.put("config", b"warm")  # the client's set-up is not what is measured
    tracemalloc.start()
    try:
        store.put_file("packs/00/p.pack", path)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < size // 2, peak
    assert store.size("packs/00/p.pack") == size

def test_volume_server_restarts_during_puts_and_gets(tmp_path):
    """On a server of its own: its volume server is killed, as a crash would, and restarted a
    second later while puts and gets go on; every put lands, every object reads back whole."""
    server = start_server(tmp_path, separate_volume=True)
    try:
        admin_client(server).create_bucket(Bucket="restarts")
        store = S3Store("s3://restarts/r", settings_for(server.endpoint))
        written = {f"packs/00/{i:064x}.pack": os.urandom(1000 + i) for i in range(12)}
        for i, (name, data) in enumerate(written.items()):
            if i == 4:
                server.kill_volume()
                restart = threading.Timer(1.0, server.start_volume)
                restart.start()
            store.put(name, data, if_absent=True)
            assert store.get(name, limit=len(data)) == data
        restart.join()
        assert server.volume.poll() is None  # the restart really happened
        for name, data in written.items():
            assert store.get(name, limit=len(data)) == data
        assert {o.name for o in store.list("packs/")} == set(written)
    finally:
        server.stop()


def test_open_store_maps_s3_locations(seaweedfs, s3_bucket):
    store = open_store(f"s3://{s3_bucket}/some/prefix/", settings_for(seaweedfs.endpoint))
    assert isinstance(store, S3Store) and store.location == f"s3://{s3_bucket}/some/prefix"
    store.put("config", b"c")
    assert admin_client(seaweedfs).get_object(
        Bucket=s3_bucket, Key="some/prefix/config")["Body"].read() == b"c"
    store.close()


def test_close_removes_the_spool(store):
    spool = store.spool_dir()
    (spool / "leftover").write_bytes(b"x")
    store.close()
    assert not spool.exists()


def test_a_new_spool_removes_those_this_hosts_killed_processes_left(store, tmp_path):
    """A process killed while it spooled a pack leaves its private spool directory in the
    temp dir: the next one made on this host removes it, never a live process's or another
    host's (a temp dir shared over the network)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = tmp_path / f"{SPOOL_DIR}{host_id()}-{dead.pid}-abc"
    live = tmp_path / f"{SPOOL_DIR}{host_id()}-{os.getppid()}-abc"
    other = tmp_path / f"{SPOOL_DIR}{'0' * 16}-{dead.pid}-abc"
    earlier = tmp_path / f"{SPOOL_DIR}abc"  # an earlier version's: no host, no pid
    for path in (left, live, other, earlier):
        path.mkdir()
        (path / "pack.tmp").write_bytes(b"half of a pack")
    spool = store.spool_dir()
    assert spool.name.startswith(f"{SPOOL_DIR}{host_id()}-{os.getpid()}-")
    assert sorted(p.name for p in tmp_path.glob(f"{SPOOL_DIR}*")) == sorted(
        p.name for p in (live, other, earlier, spool))


def test_settings_repr_hides_secrets():
    text = repr(replace(settings_for("http://h:1"), session_token="tok-secret"))
    assert SECRET_KEY not in text and "tok-secret" not in text and ACCESS_KEY in text



@pytest.mark.parametrize("tls", [False, True])
def test_uploads_carry_no_checksum_the_api_does_not_require(seaweedfs, s3_bucket, tmp_path, tls):
    """Some S3-compatible servers refuse the CRC32 (and, on TLS, the aws-chunked framing) that
    botocore adds to every upload by default: the store sends them only where the API requires
    one (a batched delete), its objects carrying their own checks; for the same reason no
    upload's body is hashed into its signature (botocore's default on plain HTTP, and on TLS
    without a checksum)."""
    settings = (settings_for(seaweedfs.tls_endpoint, ca_bundle=str(seaweedfs.certificate))
                if tls else settings_for(seaweedfs.endpoint))
    store = S3Store(f"s3://{s3_bucket}/repo", settings)
    sent: dict[str, dict[str, str]] = {}

    def record(request, **_) -> None:  # a handler that returns something answers the request
        sent.setdefault(request.method + " " + request.url.split("?")[0].rsplit("/", 1)[-1],
                        {k.lower(): v for k, v in request.headers.items()})
    store._client.meta.events.register("before-send.s3", record)
    try:
        store.put("small", b"x" * 1000)
        spool = store.spool_dir() / "pack"
        spool.write_bytes(os.urandom(3 * MIB))
        store.put_file("big", spool)
        assert store.get("big", limit=4 * MIB) and store.get("small", limit=1000) == b"x" * 1000
        store.delete(["small", "big"])
    finally:
        store.close()
    uploads = {name: headers for name, headers in sent.items() if name.startswith("PUT")}
    assert set(uploads) == {"PUT small", "PUT big"}, sent.keys()
    for name, headers in uploads.items():
        assert not [h for h in headers if h.startswith("x-amz-checksum-")
                    or h == "x-amz-trailer"], (name, headers)
        assert "aws-chunked" not in headers.get("content-encoding", ""), (name, headers)
        assert headers["x-amz-content-sha256"] == b"UNSIGNED-PAYLOAD", (name, headers)
