"""S3 range reads meeting a misbehaving server or network: a range GET answered with another
range (or the whole object), answers cut at every attempt, a TLS record damaged on its way, an
empty range; and a restore's memory cap when a damaged pack's runs are read alone. An
HTTP-aware proxy in front of the test SeaweedFS server (tests/s3server.py) rewrites answers and
a TCP proxy damages a TLS record, so each test shows what the store or a restore makes of one
precise misbehaviour."""

from __future__ import annotations

import os
import socket
import tempfile
import threading
from collections.abc import Callable

import numpy as np
import pytest

from repo_engine.errors import RepoError
from repo_engine.repository.repo import Repository
from repo_engine.repository.store import StoreError
from repo_engine.repository.store.s3 import S3Store
from repo_engine.repository.store.s3_settings import MIB, S3Settings
from repo_engine.restore.restorer import RestoreDamaged, restore_disk
from restore_helpers import backup_image
from s3server import ACCESS_KEY, SECRET_KEY
from test_restore_s3 import DISK, S3Repo

FAST = dict(access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY, max_attempts=4,
            backoff_base=0.01, backoff_cap=0.05, connect_timeout=2.0, read_timeout=10.0)

# (request head, answer head, answer body) -> (bytes sent to the client, close afterwards)
AnswerRule = Callable[[bytes, bytes, bytes], tuple[bytes, bool]]


class _Listener:
    """A local listener serving each connection it accepts in a thread (`_serve`)."""

    def __init__(self, scheme: str) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"{scheme}://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        raise NotImplementedError


class HttpProxy(_Listener):
    """Forwards each request of a keep-alive client connection to the server (one upstream
    connection per request) and relays the answer, after `on_answer` (set by a test) rewrote
    it: for the next `ranges_left` range GETs of packs, then plain forwarding."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.on_answer: AnswerRule | None = None
        self.requests: list[bytes] = []
        self.ranges_left = 1  # range GETs of packs the rules apply to
        self._lock = threading.Lock()
        super().__init__("http")

    def _rule(self, head: bytes) -> AnswerRule | None:
        """The rule for request `head`: a GET of a pack's range while `ranges_left` lasts."""
        with self._lock:
            if not (head.startswith(b"GET") and b"/packs/" in head.split(b"\r\n")[0]
                    and _header(head, b"range") and self.ranges_left):
                return None
            self.ranges_left -= 1
            return self.on_answer

    def _serve(self, client: socket.socket) -> None:
        reader = client.makefile("rb")
        try:
            while True:
                head, body = _read_message(reader, request=True)
                if head is None:
                    return
                with self._lock:
                    self.requests.append(head)
                on_answer = self._rule(head)
                answer_head, answer_body = _exchange(self.target, head + body)
                out, close = ((on_answer(head, answer_head, answer_body)) if on_answer
                              else (answer_head + answer_body, False))
                client.sendall(out)
                if close:
                    return
        except OSError:
            return
        finally:
            client.close()


def _read_message(reader, request: bool) -> tuple[bytes | None, bytes]:
    """One HTTP message's head (with its blank line) and its Content-Length body."""
    lines = []
    while True:
        line = reader.readline()
        if not line:
            return None, b""
        lines.append(line)
        if line in (b"\r\n", b"\n"):
            break
    head = b"".join(lines)
    length = 0
    for line in lines[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length":
            length = int(value.strip())
    if request and b"expect: 100-continue" in head.lower():
        raise OSError("no 100-continue through this proxy: write through the server directly")
    return head, reader.read(length) if length else b""


def _exchange(target: tuple[str, int], request: bytes) -> tuple[bytes, bytes]:
    with socket.create_connection(target) as upstream:
        upstream.sendall(request)
        head, body = _read_message(upstream.makefile("rb"), request=False)
    assert head is not None
    return head, body


def _header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def _without_header(head: bytes, name: bytes) -> bytes:
    return b"\r\n".join(line for line in head.split(b"\r\n")
                        if line.partition(b":")[0].strip().lower() != name)


@pytest.fixture
def http_proxy(seaweedfs):
    p = HttpProxy(seaweedfs.ports["s3.port"])
    yield p
    p.close()


@pytest.fixture
def stores(seaweedfs, s3_bucket, http_proxy, tmp_path, monkeypatch):
    """(a store writing to the server directly, a store reading through the proxy)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    location = f"s3://{s3_bucket}/r"
    direct = S3Store(location, S3Settings(endpoint=seaweedfs.endpoint, **FAST))
    proxied = S3Store(location, S3Settings(endpoint=http_proxy.endpoint, **FAST))
    yield direct, proxied
    direct.close()
    proxied.close()


def whole_object_answer(data: bytes) -> AnswerRule:
    """A server (or a cache in front of it) that ignores Range: `200 OK` and the whole object."""
    def rule(_request: bytes, head: bytes, _body: bytes) -> tuple[bytes, bool]:
        head = _without_header(_without_header(head, b"content-range"), b"content-length")
        head = head.replace(b"HTTP/1.1 206 Partial Content", b"HTTP/1.1 200 OK", 1)
        return head[:-2] + b"Content-Length: %d\r\n\r\n" % len(data) + data, False
    return rule


def other_range_answer(data: bytes) -> AnswerRule:
    """A server (or a cache) that answers `206` with the right length but another range: the
    one starting at byte 0, as its Content-Range says."""
    def rule(_request: bytes, head: bytes, body: bytes) -> tuple[bytes, bool]:
        head = _without_header(head, b"content-range")
        head = head[:-2] + b"Content-Range: bytes 0-%d/%d\r\n\r\n" % (len(body) - 1, len(data))
        return head + data[:len(body)], False
    return rule


def whole_object_from(store: S3Store) -> AnswerRule:
    """`whole_object_answer` of whatever object the request names, read from `store`."""
    def rule(request: bytes, head: bytes, body: bytes) -> tuple[bytes, bool]:
        key = request.split(b" ")[1].decode().split("?")[0].split("/", 2)[2]
        name = key.split("/", 1)[1]  # the store's prefix off
        return whole_object_answer(store.get(name, limit=1 << 30))(request, head, body)
    return rule



ANSWERS = {"200, whole object": whole_object_answer, "206, another range": other_range_answer}


@pytest.mark.parametrize("answer", ANSWERS)
@pytest.mark.parametrize("how", ["read_into", "read", "get_range"])
def test_a_range_answer_that_is_not_the_range_asked_is_never_taken_for_it(stores, http_proxy,
                                                                        answer, how):
    """A range GET answered with other bytes than those asked (a server or cache that ignores
    Range, or answers another range, as its status and Content-Range say) is a failed
    request, retried or refused; the reader never hands those bytes out as the range's."""
    direct, proxied = stores
    data = os.urandom(3 * MIB)
    direct.put("packs/00/a.pack", data)
    http_proxy.on_answer = ANSWERS[answer](data)
    buffer = memoryview(bytearray(MIB))
    try:
        if how == "get_range":
            got = proxied.get_range("packs/00/a.pack", 1000, MIB)
        else:
            with proxied.open_range("packs/00/a.pack", 1000, MIB) as reader:
                got = reader.read(MIB) if how == "read" else (reader.read_into(buffer), buffer)[1]
    except StoreError as exc:
        assert exc.exit_code == 1 and "range" in str(exc)  # refused, naming what is wrong
        return
    assert bytes(got) == data[1000:1000 + MIB]


@pytest.mark.parametrize("answer", ANSWERS)
@pytest.mark.parametrize("how", ["read_into", "read", "get_range"])
def test_a_range_never_answered_as_asked_fails_naming_the_range_not_damage(
        stores, http_proxy, answer, how):
    """Every attempt answered with another range than asked: after the retries, one store
    error naming the object and the range, saying Range is not honoured (exit 1, not damage,
    not "truncated")."""
    direct, proxied = stores
    data = os.urandom(3 * MIB)
    direct.put("packs/00/a.pack", data)
    http_proxy.on_answer, http_proxy.ranges_left = ANSWERS[answer](data), 100
    with pytest.raises(StoreError) as raised:
        if how == "get_range":
            proxied.get_range("packs/00/a.pack", 1000, MIB)
        else:
            with proxied.open_range("packs/00/a.pack", 1000, MIB) as reader:
                reader.read(MIB) if how == "read" else reader.read_into(memoryview(bytearray(MIB)))
    assert http_proxy.ranges_left == 100 - FAST["max_attempts"]
    message = str(raised.value)
    assert raised.value.exit_code == 1 and "\n" not in message, message
    assert f"packs/00/a.pack: asked the range bytes=1000-{1000 + MIB - 1}" in message, message
    assert "does not honour Range" in message and "truncated" not in message, message


def test_restore_through_a_server_that_ignores_range_once_is_not_pack_damage(
        seaweedfs, s3_bucket, http_proxy, tmp_path, monkeypatch):
    """One answer of the whole object to a range GET: the restore retries (or stops with a
    store error); it does not report an intact pack as damaged data and send the user to
    `scrub --repair`."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    s3 = S3Repo(tmp_path, s3_bucket, seaweedfs, http_proxy)
    image = tmp_path / "a.img"
    data = np.random.default_rng(11).integers(0, 256, DISK, dtype=np.uint8).tobytes()
    image.write_bytes(data)
    with Repository(s3.store(), s3.config, s3.local) as repo:
        point = backup_image(repo, "a", image)
    http_proxy.on_answer = whole_object_from(s3.store())
    try:
        with Repository(s3.store(through_proxy=True), s3.config, s3.local) as repo:
            restore_disk(repo, point, "sda", tmp_path / "out.img")
    except RestoreDamaged as exc:
        pytest.fail(f"an intact repository reported damaged: {exc}")
    except RepoError as exc:
        assert exc.exit_code == 1 and "range" in str(exc)
        return
    assert (tmp_path / "out.img").read_bytes() == data


@pytest.mark.parametrize("offset", [5, 10])
def test_an_empty_range_within_the_object_reads_as_empty(stores, offset):
    """`open_range` of 0 bytes inside (or at the end of) an object: reading its 0 bytes is no
    damage, as `get_range` of 0 bytes there is not, and as a directory store reads it (no
    request `Range: bytes=5-4`, which the server refuses with 416)."""
    direct, _ = stores
    direct.put("packs/00/z.pack", b"0123456789")
    assert direct.get_range("packs/00/z.pack", offset, 0) == b""
    with direct.open_range("packs/00/z.pack", offset, 0) as reader:
        reader.read_into(memoryview(bytearray(0)))
        assert reader.read(0) == b""


def cut_answer(keep: int) -> AnswerRule:
    """The answer's head as the server sent it (its Content-Length), then only `keep` bytes of
    its body, then the connection closed: what a server sends when it cannot read the rest of
    the object after answering (a volume gone), or a Content-Length that lies."""
    def rule(_request: bytes, head: bytes, body: bytes) -> tuple[bytes, bool]:
        return head + body[:keep], True
    return rule


@pytest.mark.parametrize("how", ["read_into", "read"])
def test_answers_cut_at_every_attempt_are_not_an_unreachable_endpoint(stores, http_proxy, how):
    """Every attempt is answered (206, headers, the first 100 bytes) and cut: the endpoint is
    reachable and the error says which object could not be read whole, not "cannot reach the
    S3 endpoint ... check the endpoint setting and that the server is up"."""
    direct, proxied = stores
    direct.put("packs/00/a.pack", os.urandom(3 * MIB))
    http_proxy.on_answer, http_proxy.ranges_left = cut_answer(100), 100
    buffer = memoryview(bytearray(MIB))
    with pytest.raises(RepoError) as raised:
        with proxied.open_range("packs/00/a.pack", 1000, MIB) as reader:
            reader.read_into(buffer) if how == "read_into" else reader.read(MIB)
    assert http_proxy.ranges_left == 100 - FAST["max_attempts"]
    message = str(raised.value)
    assert "packs/00/a.pack" in message and "cannot reach" not in message, message
    assert f"get bytes 1000-{1000 + MIB - 1} of packs/00/a.pack" in message, message
    assert "answered but kept failing to send the answer whole" in message, message


class FlipProxy(_Listener):
    """A TCP proxy in front of the server's TLS port that flips one bit of the server's
    stream `at` bytes into the next `count` connections: the TLS record holding it fails its
    MAC check at the client (what a corrupting network path looks like through TLS)."""

    def __init__(self, port: int, count: int, at: int) -> None:
        self.target, self.count, self.at, self.flipped = ("127.0.0.1", port), count, at, 0
        self._lock = threading.Lock()
        super().__init__("https")

    def _serve(self, client: socket.socket) -> None:
        with self._lock:
            at, self.count = (self.at if self.count else None), max(0, self.count - 1)
        upstream = socket.create_connection(self.target)
        threading.Thread(target=self._pump, args=(client, upstream, None), daemon=True).start()
        self._pump(upstream, client, at)

    def _pump(self, source: socket.socket, sink: socket.socket, at: int | None) -> None:
        seen = 0
        try:
            while chunk := source.recv(65536):
                if at is not None and seen <= at < seen + len(chunk):
                    i = at - seen
                    chunk = chunk[:i] + bytes([chunk[i] ^ 0x40]) + chunk[i + 1:]
                    self.flipped += 1
                seen += len(chunk)
                sink.sendall(chunk)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass


@pytest.mark.parametrize("how", ["read", "skip", "get_range"])
def test_a_tls_record_damaged_on_its_way_is_retried_by_read_and_skip_too(
        seaweedfs, s3_bucket, tmp_path, monkeypatch, how):
    """An answer whose TLS record fails its MAC is retried by `read`, `skip` (which a restore
    uses for the gaps between runs, and for a pack's key header) and `get_range` (a run read
    alone) as by `read_into`: urllib3's SSLError, which botocore does not wrap, does not escape
    the retries as an internal error. The same request, read one way or the other, meets the
    same fault the same way."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    location = f"s3://{s3_bucket}/r"
    data = os.urandom(3 * MIB)
    direct = S3Store(location, S3Settings(endpoint=seaweedfs.endpoint, **FAST))
    direct.put("packs/00/a.pack", data)
    flip = FlipProxy(seaweedfs.ports["s3.port.https"], count=1, at=400_000)
    tls = S3Store(location, S3Settings(endpoint=flip.endpoint, verify_tls=False, **FAST))
    buffer = memoryview(bytearray(10))
    try:
        if how == "get_range":  # a run read alone, after damage met in its request
            assert tls.get_range("packs/00/a.pack", 0, MIB) == data[:MIB]
        with tls.open_range("packs/00/a.pack", 0, 2 * MIB) as reader:
            if how in ("read", "get_range"):
                assert reader.read(MIB) == data[:MIB]
            else:
                reader.skip(MIB)
                reader.read_into(buffer)
                assert buffer == data[MIB:MIB + 10]
        assert flip.flipped == 1
    finally:
        flip.close()
        tls.close()
        direct.close()


def test_runs_read_alone_after_damage_stay_under_the_memory_cap(tmp_path):
    """A pack whose end falls inside a run: that run, and those after it, are read alone (one
    request each); the request's buffer is let go then, or the bytes held would reach twice
    the bytes the budget took for the request (its largest run). A cap of one run, one
    request at a time: the bytes held (the reader's buffer, as the test store counts it, and
    what the store returned and is still referenced) stay under it."""
    from helpers import DiskModel
    from repo_engine.repository.config import read_config
    from repo_engine.repository.store.local import LocalStore
    from repo_engine.restore.plan import ReadSettings
    from repo_engine.repository.packs import pack_object
    from restore_helpers import WatchedStore, pack_of_block

    kib = 1 << 10
    rng = np.random.default_rng(5)
    model = DiskModel(tmp_path / "a.img", 2 * MIB, rng)
    model.write(0, rng.integers(0, 256, 2 * MIB, dtype=np.uint8).tobytes())
    with Repository.init(tmp_path / "repo", block_size=16 * kib, pack_size=MIB) as repo:
        point = backup_image(repo, "a", model.path)
        name = pack_object(pack_of_block(repo, point, 0))
        data = repo.store.get(name, limit=1 << 30)
        repo.store.delete([name])
        repo.store.put(name, data[:len(data) // 2 + 40 * kib])  # the end inside a run
    cap = 64 * kib
    store = LocalStore(tmp_path / "repo")
    with Repository(WatchedStore(store), read_config(store), tmp_path / "repo") as repo, \
            pytest.raises(RestoreDamaged):
        restore_disk(repo, point, "sda", tmp_path / "out.img",
                     reads=ReadSettings(in_flight=1, max_request=MIB, max_read=cap, memory=cap))
    assert 0 < repo.store.most_held <= cap
