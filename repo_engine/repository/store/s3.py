"""S3Store: a repository's objects as keys `PREFIX/NAME` in a bucket of an S3-compatible server.

Client: botocore (what boto3 is built on; the `s3` extra installs boto3, whose own layer, with
s3transfer, would cost every command a tenth of its start-up to import and is not used),
imported only when an `s3://` location is opened. Its own retries are
switched off; `_Requests.call` retries every request itself so the cap, the backoff and the final
message are ours:
- retried: HTTP 500/502/503/504, SlowDown and kin, connection refused/reset/closed, timeouts,
  an answer's TLS record damaged on its way, a range GET answered with another range;
  attempt n (from 0) first sleeps uniform(0, min(cap, base * 2**n)) ("full jitter");
- not retried: everything else, mapped to the store errors (404 ObjectMissing, 412 ObjectExists,
  403 StoreAuthError, NoSuchBucket StoreError naming the bucket).

What a put guarantees: S3 makes an object visible only once its PUT (or CompleteMultipartUpload)
succeeded, whole; `if_absent` sends `If-None-Match: *` so the server refuses (412) to replace a key.
A put retried after a lost answer may meet its own first attempt: `put` then compares the bytes
and counts an identical object as its own. `put_file` streams the spool file (each attempt reads
it again from the start), so memory does not grow with the pack size or the puts in flight.

Multipart uploads (put_file above `multipart_threshold`) are aborted when they fail; uploads left by
a process that died are listed by `pending_uploads` and removed by `abort_upload`.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import random
import re
import shutil
import ssl
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import botocore.config
import botocore.session
import botocore.exceptions as bexc
import urllib3.exceptions

from ..atomic import dead_spool_dirs, spool_dir_prefix
from . import (ObjectDamaged, ObjectExists, ObjectInfo, ObjectMissing, PendingUpload, RangeReader,
               ShortRead, StoreAuthError, StoreError, StoreUnreachable, TempFile, check_name,
               parse_s3_location)
from .s3_settings import MAX_PARTS, S3Settings, load_s3_settings

T = TypeVar("T")
DELETE_BATCH = 1000  # DeleteObjects takes at most 1000 keys
SKIP_PIECE = 1 << 20  # bytes of a streamed range read at once to be dropped
COMPARE_PIECE = 1 << 20  # bytes compared at a time when a put checks what the store holds
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_RETRY_STATUS = frozenset({500, 502, 503, 504})
_RETRY_CODES = frozenset({"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout",
                          "Throttling", "ThrottlingException"})
_AUTH_CODES = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied",
                         "InvalidToken", "ExpiredToken", "AuthorizationHeaderMalformed"})
_HEAD = "look up"  # the operation name of a HEAD request, in messages
# A TLS record damaged in an answer's body fails its check while the body is read: urllib3
# raises its SSLError (or ssl's), which botocore does not wrap; retried as a cut connection is
# (botocore's own SSLError is a failed handshake, a certificate: never retried).
_TRANSIENT = (bexc.ConnectionError, bexc.HTTPClientError, bexc.IncompleteReadError,
              urllib3.exceptions.SSLError, ssl.SSLError)
# failures of an answer's body: the server answered (its headers came), then the body was cut
_CUT = (bexc.ResponseStreamingError, bexc.IncompleteReadError, urllib3.exceptions.SSLError,
        ssl.SSLError)


class RangeNotHonoured(StoreError):
    """A ranged GET answered with other bytes than the range asked: retried (a proxy or cache
    may answer so once), then a store error, not damage: the object may well be intact."""


class UploadGone(StoreError):
    """A multipart upload no longer exists: completed, or aborted by someone else."""


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def _attempts(n: int) -> str:
    return "after 1 attempt" if n == 1 else f"after {n} attempts"


class _Requests:
    """One S3 client and the retry loop every request goes through."""

    def __init__(self, location: str, bucket: str, settings: S3Settings) -> None:
        self.location, self.bucket, self.settings = location, bucket, settings
        self.client = _client_for(location, settings)

    def call(self, op: str, name: str, fn: Callable[[], T]) -> T:
        """`fn()` retried on transient failures; any failure left becomes a store error."""
        s = self.settings
        started = time.monotonic()
        for attempt in range(s.max_attempts):
            try:
                return fn()
            except RangeNotHonoured as exc:
                if attempt + 1 == s.max_attempts:
                    raise RangeNotHonoured(f"{exc} ({_attempts(attempt + 1)})") from None
            except bexc.ClientError as exc:
                if not _retryable(exc) or attempt + 1 == s.max_attempts:
                    raise self._client_error(exc, op, name, attempt + 1, started) from None
            except _TRANSIENT as exc:
                if attempt + 1 == s.max_attempts or isinstance(exc, bexc.SSLError):
                    raise self._transport_error(exc, op, name, attempt + 1, started) from None
            time.sleep(random.uniform(0, min(s.backoff_cap, s.backoff_base * 2 ** attempt)))
        raise AssertionError("unreachable")

    def _client_error(self, exc: bexc.ClientError, op: str, name: str, attempts: int,
                      started: float) -> StoreError:
        code, status = _code(exc), _status(exc)
        where = f"{self.location}: {op} {name}" if name else f"{self.location}: {op}"
        endpoint = self.settings.endpoint_text
        if code == "NoSuchBucket":
            return StoreError(f"{self.location}: bucket {self.bucket!r} does not exist at "
                              f"{endpoint}; create it or correct the location")
        if code == "NoSuchUpload":
            return UploadGone(f"{where}: the multipart upload was aborted meanwhile (a cleanup "
                              "of stale uploads?); run the command again")
        if code == "NoSuchKey" or (code == "404" and op == _HEAD):
            return ObjectMissing(f"{where}: the object is missing")  # HEAD has no error body
        if code in ("PreconditionFailed", "412"):
            return ObjectExists(f"{where}: the object already exists")
        if code in ("InvalidRange", "416"):
            return ShortRead(f"{where}: the object is shorter than the range read")
        if code in _AUTH_CODES or status in (401, 403):
            return StoreAuthError(
                f"{self.location}: {endpoint} refused the credentials or denied access ({code}); "
                "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the S3 settings file, and "
                "that they may use this bucket")
        detail = one_line(exc.response.get("Error", {}).get("Message") or code)
        if _retryable(exc):
            return StoreError(f"{where}: {endpoint} kept failing ({code}, HTTP {status}: "
                              f"{detail}) {_attempts(attempts)} in "
                              f"{time.monotonic() - started:.1f} s; try again later")
        if code.isdigit():  # no S3 error document: something else answers there
            return StoreError(f"{where}: {endpoint} answered HTTP {status} without an S3 error; "
                              "check that the endpoint is an S3 server")
        return StoreError(f"{where}: {endpoint} answered {code} (HTTP {status}): {detail}")

    def _transport_error(self, exc: Exception, op: str, name: str, attempts: int,
                         started: float) -> StoreError:
        endpoint = self.settings.endpoint_text
        tail = f"{_attempts(attempts)} in {time.monotonic() - started:.1f} s"
        if isinstance(exc, bexc.SSLError):  # not retried: a certificate does not heal
            return StoreUnreachable(f"{self.location}: TLS with {endpoint} failed: "
                                    f"{one_line(exc)}; check the ca_bundle / verify_tls settings")
        if isinstance(exc, _CUT):  # reachable: an unreachable endpoint is not the problem
            return StoreError(f"{self.location}: {op} {name}: {endpoint} answered but kept "
                              f"failing to send the answer whole, cut midway ({type(exc).__name__}"
                              f", {tail}); check the server's storage and network, and try again")
        if isinstance(exc, (bexc.ReadTimeoutError, bexc.ConnectTimeoutError)):
            return StoreUnreachable(f"{self.location}: {endpoint} did not answer {op} {name} in "
                                    f"time ({tail}); check the endpoint and the network")
        return StoreUnreachable(f"{self.location}: cannot reach the S3 endpoint {endpoint} "
                                f"({type(exc).__name__}, {tail}); check the endpoint setting "
                                "(--endpoint, AWS_ENDPOINT_URL) and that the server is up")


def _make_client(s: S3Settings) -> Any:
    # Checksums only where the API requires them (botocore's default since 1.36 adds a CRC32 to
    # every upload, in aws-chunked framing on TLS, which some S3-compatible servers refuse),
    # and the payload left out of the signature (signing it costs a SHA-256 pass over every
    # upload, a third of the client's work of sending a pack): every object this store holds
    # carries its own BLAKE3 check, verified on every read, so a body changed on its way is
    # refused by its reader whatever the transport.
    config = botocore.config.Config(
        region_name=s.region, s3={"addressing_style": s.style, "payload_signing_enabled": False},
        request_checksum_calculation="when_required", response_checksum_validation="when_required",
        retries={"total_max_attempts": 1}, connect_timeout=s.connect_timeout,
        read_timeout=s.read_timeout, max_pool_connections=max(10, 2 * s.multipart_concurrency))
    verify: bool | str = s.ca_bundle if (s.ca_bundle and s.verify_tls) else s.verify_tls
    if not s.verify_tls:  # asked for in the settings: no warning on every request
        warnings.filterwarnings("ignore", category=urllib3.exceptions.InsecureRequestWarning)
    # keys not given: botocore's own chain (environment, AWS_PROFILE's files, ...), as boto3's
    return botocore.session.Session().create_client(
        "s3", region_name=s.region, endpoint_url=s.endpoint, verify=verify, config=config,
        aws_access_key_id=s.access_key_id, aws_secret_access_key=s.secret_access_key,
        aws_session_token=s.session_token)


def _client_for(location: str, s: S3Settings) -> Any:
    """`_make_client`, its refusals (a bad AWS_PROFILE, a bad endpoint) made store errors."""
    try:
        return _make_client(s)
    except (bexc.BotoCoreError, ValueError) as exc:
        raise StoreError(f"{location}: cannot set up the S3 client for {s.endpoint_text}: "
                         f"{one_line(exc)}") from None


def _code(exc: bexc.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "")) or str(_status(exc))


def _status(exc: bexc.ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _counted(fn: Callable[[], T]) -> tuple[Callable[[], T], list[int]]:
    """`fn` and a list that grows by one per call: how many attempts a request took."""
    calls: list[int] = []

    def once() -> T:
        calls.append(1)
        return fn()
    return once, calls


def _multipart_etag(parts: list[dict[str, Any]]) -> str:
    """The ETag S3 gives an object completed from `parts`: MD5 of the parts' MD5s, "-", count."""
    digests = b"".join(bytes.fromhex(p["ETag"].strip('"')) for p in parts)
    return f"{hashlib.md5(digests).hexdigest()}-{len(parts)}"


def _streaming_error(exc: OSError | http.client.HTTPException, endpoint: str) -> Exception:
    """What botocore makes of a socket's failure while a body is read (urllib3 wraps it; a
    body read from the socket directly has it wrapped here): a timeout or a connection lost
    midway, both retried by `_Requests.call`."""
    if isinstance(exc, TimeoutError):
        return bexc.ReadTimeoutError(endpoint_url=endpoint, error=exc)
    return bexc.ResponseStreamingError(error=exc)


def _check_range(where: str, answer: dict[str, Any], first: int, last: int) -> None:
    """Refuse (closing its body) an answer to `Range: bytes=first-last` that is not that range:
    a 200 (the Range ignored: the whole object) or a 206 naming another range. A range that
    ends early is accepted where the object ends (a truncated object: the caller's ShortRead)."""
    status = answer["ResponseMetadata"]["HTTPStatusCode"]
    got = answer.get("ContentRange", "")
    match = _CONTENT_RANGE.fullmatch(got)
    if status == 206 and match and int(match[1]) == first:
        end, total = int(match[2]), match[3]
        if end == last or (end < last and total.isdigit() and end == int(total) - 1):
            return
    answer["Body"].close()
    came = f"Content-Range {got!r}" if got else "no Content-Range"
    raise RangeNotHonoured(f"{where}: asked the range bytes={first}-{last}, the answer is HTTP "
                           f"{status} with {came}: the server (or a proxy or cache in front of "
                           "it) does not honour Range requests")


def _retryable(exc: bexc.ClientError) -> bool:
    return _status(exc) in _RETRY_STATUS or _code(exc) in _RETRY_CODES


class S3Store:
    """The Store protocol on an S3-compatible bucket (see the module docstring)."""

    leaves_temps = False  # an unfinished write is a multipart upload, never an object
    reads_wait = True  # each read is a request

    def __init__(self, location: str, settings: S3Settings | None = None) -> None:
        self.bucket, self.prefix = parse_s3_location(location)
        self.location = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.settings = settings if settings is not None else load_s3_settings()
        if self.settings.access_key_id is None:
            raise StoreAuthError(f"{self.location}: no S3 credentials; set AWS_ACCESS_KEY_ID and "
                                 "AWS_SECRET_ACCESS_KEY, or put them in the S3 settings file")
        self._requests = _Requests(self.location, self.bucket, self.settings)
        self._client = self._requests.client
        self._spool: Path | None = None

    # -- names -------------------------------------------------------------------------------

    def _key(self, name: str, *, prefix: bool = False) -> str:
        check_name(name, prefix=prefix)
        return f"{self.prefix}/{name}" if self.prefix else name

    def _name(self, key: str) -> str:
        return key[len(self.prefix) + 1:] if self.prefix else key

    def _call(self, op: str, name: str, fn: Callable[[], T]) -> T:
        return self._requests.call(op, name, fn)

    # -- writes ------------------------------------------------------------------------------

    def put(self, name: str, data: bytes | memoryview, *, if_absent: bool = False) -> None:
        body = bytes(data)
        self._put_object(name, lambda: io.BytesIO(body), if_absent)

    def put_many(self, items: Sequence[tuple[str, bytes | memoryview]]) -> None:
        """`put` of each (name, data), a few at once (each is durable when its PUT answers)."""
        pool = ThreadPoolExecutor(self.settings.multipart_concurrency)
        try:
            for _ in pool.map(lambda item: self.put(*item), items):
                pass
        finally:  # after a failure, puts not begun are not sent
            pool.shutdown(cancel_futures=True)

    def _put_object(self, name: str, open_body: Callable[[], BinaryIO], if_absent: bool) -> None:
        """One PutObject of the bytes `open_body()` reads; each attempt (and the check after a
        lost first attempt) opens them afresh, from the start."""
        args = {"Bucket": self.bucket, "Key": self._key(name)}
        if if_absent:
            args["IfNoneMatch"] = "*"

        def attempt() -> None:
            with open_body() as body:
                self._client.put_object(Body=body, **args)
        once, attempts = _counted(attempt)
        try:
            self._call("put", name, once)
        except ObjectExists:
            # A retry may have met the object its own lost first attempt wrote.
            if len(attempts) == 1 or not self._holds(name, open_body):
                raise

    def _holds(self, name: str, open_body: Callable[[], BinaryIO]) -> bool:
        """Whether object `name` holds exactly the bytes `open_body()` reads, compared a piece
        at a time (a pack is not read into memory whole)."""
        key = self._key(name)

        def once() -> bool:
            answer = self._client.get_object(Bucket=self.bucket, Key=key)
            with open_body() as body, closing(answer["Body"]) as stored:  # closing(): see get
                for piece in iter(lambda: stored.read(COMPARE_PIECE), b""):
                    if body.read(len(piece)) != piece:
                        return False
                return body.read(1) == b""
        try:
            return self._call("get", name, once)
        except ObjectMissing:
            return False

    def put_file(self, name: str, path: Path, *, if_absent: bool = False) -> None:
        """Upload the spool file `path` as `name` (in parts above the threshold), then delete it.
        A single PUT streams the file: memory stays bounded however many run at once."""
        size = path.stat().st_size
        if size <= self.settings.multipart_threshold:
            self._put_object(name, lambda: open(path, "rb"), if_absent)
        else:
            if if_absent and self.exists(name):  # spare the upload; the complete is conditional
                raise ObjectExists(f"{self.location}: put {name}: the object already exists")
            self._multipart(name, path, size, if_absent)
        path.unlink()

    def _multipart(self, name: str, path: Path, size: int, if_absent: bool) -> None:
        key = self._key(name)
        upload_id = self._call("start multipart upload of", name, lambda: self._client
                               .create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"])
        try:
            parts = self._upload_parts(name, key, upload_id, path, size)
            self._complete(name, key, upload_id, parts, if_absent)
        except BaseException:
            self._abort_quietly(key, upload_id)
            raise

    def _complete(self, name: str, key: str, upload_id: str, parts: list[dict[str, Any]],
                  if_absent: bool) -> None:
        args = {"Bucket": self.bucket, "Key": key, "UploadId": upload_id,
                "MultipartUpload": {"Parts": parts}}
        if if_absent:
            args["IfNoneMatch"] = "*"
        once, attempts = _counted(lambda: self._client.complete_multipart_upload(**args))
        try:
            self._call("complete multipart upload of", name, once)
        except (ObjectExists, UploadGone):
            # A retry after a lost answer finds the upload gone (NoSuchUpload) or, with
            # if_absent, the object it completed (412): the object's ETag tells whose it is.
            if len(attempts) == 1 or self._etag(name) != _multipart_etag(parts):
                raise

    def _etag(self, name: str) -> str | None:
        try:
            return self._head(name)["ETag"].strip('"')
        except ObjectMissing:
            return None

    def _head(self, name: str) -> dict[str, Any]:
        key = self._key(name)
        return self._call(_HEAD, name, lambda: self._client.head_object(Bucket=self.bucket,
                                                                        Key=key))

    def _upload_parts(self, name: str, key: str, upload_id: str, path: Path,
                      size: int) -> list[dict[str, Any]]:
        part_size = max(self.settings.multipart_part_size, -(-size // MAX_PARTS))
        offsets = range(0, size, part_size)
        fd = os.open(path, os.O_RDONLY)
        try:
            def upload(number_offset: tuple[int, int]) -> dict[str, Any]:
                number, offset = number_offset
                body = os.pread(fd, min(part_size, size - offset), offset)
                etag = self._call(f"upload part {number} of", name, lambda: self._client
                                  .upload_part(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                               PartNumber=number, Body=body)["ETag"])
                return {"PartNumber": number, "ETag": etag}
            pool = ThreadPoolExecutor(self.settings.multipart_concurrency)
            try:
                return list(pool.map(upload, enumerate(offsets, start=1)))
            finally:  # after a failure, parts not begun are not sent
                pool.shutdown(cancel_futures=True)
        finally:
            os.close(fd)

    def _abort_quietly(self, key: str, upload_id: str) -> None:
        """Abort after a failure; if even that fails, `pending_uploads` finds it later."""
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except (bexc.BotoCoreError, bexc.ClientError):
            pass

    def spool_dir(self) -> Path:
        """A private local directory for packs being built, removed by `close`; those that
        this host's killed processes left beside it go when it is made."""
        if self._spool is None:
            self._spool = Path(tempfile.mkdtemp(prefix=spool_dir_prefix(),
                                                dir=self.settings.spool_dir))
            for left in dead_spool_dirs(self._spool.parent):
                shutil.rmtree(left, ignore_errors=True)
        return self._spool

    def delete(self, names: Iterable[str]) -> None:
        keys = [self._key(n) for n in names]
        for start in range(0, len(keys), DELETE_BATCH):
            batch = [{"Key": k} for k in keys[start:start + DELETE_BATCH]]
            answer = self._call("delete", f"{len(batch)} objects", lambda: self._client
                                .delete_objects(Bucket=self.bucket,
                                                Delete={"Objects": batch, "Quiet": True}))
            failed = [e for e in answer.get("Errors", []) if e.get("Code") != "NoSuchKey"]
            if failed:
                first = failed[0]
                raise StoreError(f"{self.location}: delete {self._name(first['Key'])} failed "
                                 f"({first.get('Code')}: {one_line(first.get('Message', ''))}); "
                                 f"{len(failed)} of {len(batch)} in the batch failed")

    # -- reads -------------------------------------------------------------------------------

    def get(self, name: str, *, limit: int) -> bytes:
        key = self._key(name)

        def once() -> bytes:
            answer = self._client.get_object(Bucket=self.bucket, Key=key)
            # closing(): the body's own `with` yields the raw urllib3 stream, whose errors (a
            # connection reset mid-answer) botocore does not wrap: they would escape the retries
            with closing(answer["Body"]) as body:
                if answer["ContentLength"] > limit:
                    raise ObjectDamaged(f"{self.location}: {name} holds {answer['ContentLength']}"
                                        f" bytes, more than the {limit} its format allows")
                return body.read()
        return self._call("get", name, once)

    def get_start(self, name: str, length: int) -> tuple[bytes, int]:
        key, byte_range = self._key(name), f"bytes=0-{max(length, 1) - 1}"

        def once() -> tuple[bytes, int]:
            answer = self._client.get_object(Bucket=self.bucket, Key=key, Range=byte_range)
            with closing(answer["Body"]) as body:  # closing(): see get
                data = body.read()
            # "bytes 0-N/SIZE"; a server that ignores the range sends the whole object
            total = answer.get("ContentRange", "").rpartition("/")[2]
            return data[:length], int(total) if total.isdigit() else len(data)
        try:
            return self._call("get", name, once)
        except ShortRead:  # no byte 0 to start at: the object is empty
            return b"", 0

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise StoreError(f"{self.location}: get {name}: bad range {offset}+{length}")
        if length == 0:
            if self.size(name) < offset:
                raise ShortRead(f"{self.location}: get {name}: the object ends before {offset}")
            return b""
        key, last = self._key(name), offset + length - 1

        def once() -> bytes:
            answer = self._client.get_object(Bucket=self.bucket, Key=key,
                                             Range=f"bytes={offset}-{last}")
            _check_range(f"{self.location}: get {name}", answer, offset, last)
            with closing(answer["Body"]) as body:  # closing(): see get
                return body.read()
        data = self._call(f"get bytes {offset}-{last} of", name, once)
        if len(data) != length:
            raise ShortRead(f"{self.location}: get {name}: {len(data)} bytes at {offset} where "
                            f"{length} were asked; the object is truncated")
        return data

    def open_range(self, name: str, offset: int, length: int) -> RangeReader:
        if offset < 0 or length < 0:
            raise StoreError(f"{self.location}: get {name}: bad range {offset}+{length}")
        return _StreamedRange(self, name, offset, length)

    def size(self, name: str) -> int:
        return int(self._head(name)["ContentLength"])

    def exists(self, name: str) -> bool:
        try:
            self.size(name)
        except ObjectMissing:
            return False
        return True

    def list(self, prefix: str, skipped: list[str] | None = None,
             temps: list[TempFile] | None = None) -> Iterator[ObjectInfo]:
        """Every object under `prefix` (a bucket holds only objects: nothing is ever skipped,
        and an unfinished write is a multipart upload, no temporary file)."""
        key_prefix = self._key(prefix, prefix=True)
        token: dict[str, str] = {}
        while True:
            args = {"Bucket": self.bucket, "Prefix": key_prefix,
                    "MaxKeys": self.settings.list_page_size, **token}
            page = self._call("list", prefix or "(all)",
                              lambda: self._client.list_objects_v2(**args))
            for item in page.get("Contents", []):
                yield ObjectInfo(self._name(item["Key"]), int(item["Size"]))
            if not page.get("IsTruncated"):
                return
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def names(self, prefix: str, skipped: list[str] | None = None,
              temps: list[TempFile] | None = None) -> Iterator[str]:
        """The names `list` gives (a listing carries the sizes anyway)."""
        return (info.name for info in self.list(prefix, skipped, temps))

    # -- multipart leftovers -----------------------------------------------------------------

    def pending_uploads(self) -> Iterator[PendingUpload]:
        """Multipart uploads under this store's prefix that were neither completed nor aborted."""
        key_prefix = self._key("", prefix=True)
        marker: dict[str, str] = {}
        while True:
            args = {"Bucket": self.bucket, "Prefix": key_prefix, **marker}
            page = self._call("list multipart uploads", "",
                              lambda: self._client.list_multipart_uploads(**args))
            for item in page.get("Uploads", []):
                yield PendingUpload(self._name(item["Key"]), item["UploadId"], item["Initiated"])
            if not page.get("IsTruncated"):
                return
            marker = {"KeyMarker": page["NextKeyMarker"],
                      "UploadIdMarker": page["NextUploadIdMarker"]}

    def abort_upload(self, upload: PendingUpload) -> None:
        key = self._key(upload.name)
        try:
            self._call("abort multipart upload of", upload.name, lambda: self._client
                       .abort_multipart_upload(Bucket=self.bucket, Key=key,
                                               UploadId=upload.upload_id))
        except UploadGone:
            pass  # already gone: completed or aborted by someone else

    def close(self) -> None:
        if self._spool is not None:
            shutil.rmtree(self._spool, ignore_errors=True)
            self._spool = None
        self._client.close()


class _StreamedRange(RangeReader):
    """A range read with one GET, its pieces taken from the answer as they arrive; a GET that
    fails midway (a reset connection) is sent again, through the store's retries, for the part
    not read yet."""

    def __init__(self, store: S3Store, name: str, offset: int, length: int) -> None:
        super().__init__(offset, length)
        self._store, self._name, self._key = store, name, store._key(name)
        self._body: Any = None

    def _fetch(self, n: int) -> bytes:
        if not n:  # no request: `bytes=P-(P-1)` is no range, refused (416)
            return b""
        data = self._store._call(self._op(), self._name, partial(self._take, n))
        if len(data) != n:
            self._ends_early(n)
        return data

    def skip(self, n: int) -> None:
        """Read and drop: the answer holds the bytes skipped."""
        left = self._within(n)
        while left:
            self.read(min(SKIP_PIECE, left))
            left -= min(SKIP_PIECE, left)

    def _fetch_into(self, view: memoryview) -> None:
        if not view:  # no request, as `_fetch`
            return
        got = self._store._call(self._op(), self._name, partial(self._take_into, view))
        if got != len(view):
            self._ends_early(len(view))

    def _op(self) -> str:
        """The request's operation, in messages: the range it asks."""
        return f"get bytes {self.position}-{self.end - 1} of"

    def _ends_early(self, n: int) -> None:
        self.close()
        raise ShortRead(f"{self._store.location}: get {self._name}: the object ends before "
                        f"byte {self.position + n}; it is truncated")

    def _answer(self) -> Any:
        """The open answer; a GET from the current position when none is open."""
        if self._body is None:
            answer = self._store._client.get_object(
                Bucket=self._store.bucket, Key=self._key,
                Range=f"bytes={self.position}-{self.end - 1}")
            _check_range(f"{self._store.location}: get {self._name}", answer, self.position,
                         self.end - 1)
            self._body = answer["Body"]
        return self._body

    def _take_into(self, view: memoryview) -> int:
        """`_take` into `view`: the bytes go from the socket into it, through the HTTP
        response's own `readinto` (one copy; botocore's `read` makes a new buffer for each
        piece). The connection goes back to the pool once the answer was read whole."""
        body = self._answer()
        raw = getattr(body, "_raw_stream", None)
        fp = getattr(raw, "_fp", None)
        if not isinstance(fp, http.client.HTTPResponse):  # another HTTP stack: `read`, a copy
            data = self._take(len(view))
            view[:len(data)] = data
            return len(data)
        got = 0
        try:
            while got < len(view):
                piece = fp.readinto(view[got:])
                if not piece:
                    if fp.length:  # the answer ends before its Content-Length: cut midway
                        raise http.client.IncompleteRead(b"", fp.length)
                    break
                got += piece
        except (OSError, http.client.HTTPException) as exc:
            self.close()  # the next attempt asks again from where this one stopped
            raise _streaming_error(exc, self._store.settings.endpoint_text) from exc
        except BaseException:
            self.close()
            raise
        if fp.isclosed():  # read to its end: the connection is free for the next request
            raw.release_conn()
        return got

    def _take(self, n: int) -> bytes:
        """Up to `n` bytes from the answer (fewer only where it ends), asking from the current
        position when no answer is open."""
        self._answer()
        pieces, got = [], 0
        try:
            while got < n and (piece := self._body.read(n - got)):
                pieces.append(piece)
                got += len(piece)
        except BaseException:
            self.close()  # the next attempt asks again from where this one stopped
            raise
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def close(self) -> None:
        if self._body is not None:
            self._body.close()
            self._body = None
