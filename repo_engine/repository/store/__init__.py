"""The store: where the repository's bytes live, as immutable named objects.

The repository format (config, packs, maps, points) is written against the `Store` protocol
below and never learns whether its objects are files in a directory (`local.LocalStore`) or keys
in an S3-compatible bucket (`s3.S3Store`, imported only when a location asks for it).

Object names are `/`-separated relative names, the repository layout of docs/FORMAT.md:
`config`, `packs/xx/<64 hex>.pack`, `maps/xx/<64 hex>.map`, `points/<16 hex>.point`,
`sources/...`. A store interprets nothing in a name beyond refusing one that could escape its
home (`check_name`). What a store guarantees (docs/FORMAT.md, "Store"):

- `put` and `put_file` are atomic and durable when they return: an object is either absent or
  whole under its name, never partial; with `if_absent` an existing object is kept (ObjectExists);
- `put_many` puts a batch, each object atomic as `put`'s and all durable when it returns (a
  failure or crash may leave any of them there or not): a local directory makes them durable
  together, with one round of fsyncs instead of a round per object;
- `get` reads a whole object, refusing one larger than the caller's bound; `get_range` returns
  exactly the bytes asked or fails (ObjectMissing, ShortRead); `open_range` reads a range front
  to back in pieces (`RangeReader`: one request on S3, read as it arrives, `read` or
  `read_into` a buffer of the caller's), with the same guarantees for each piece;
- `list` yields every object under a prefix, in any order; `delete` removes a batch, a missing
  name being no error;
- `pending_uploads` lists the uploads begun and never finished (a process that died
  mid-upload, or one still sending), `abort_upload` removes one's parts: gc decides which are
  stale, on its own clock (the server's `Initiated` time is of another clock). A store whose
  unfinished writes are files beside the objects (a local directory's temporary files) has no
  uploads: it reports them through `list(..., temps=)` instead, and `delete` takes their names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from ...errors import DamageError, RepoError, UsageError
from ...units import is_text


class StoreError(RepoError):
    """The store refused or failed an operation; the message names the location (exit code 1)."""


class ObjectDamaged(StoreError, DamageError):
    """An object is not what its name promises: not a regular file, larger than its format
    allows, shorter than a read needs (exit code 3)."""

    exit_code = 3


class ObjectMissing(ObjectDamaged):
    """A named object a reader needs is gone (exit code 3)."""


class ShortRead(ObjectDamaged):
    """An object ends before the byte range a reader asked for: it is truncated (exit code 3)."""


class ObjectExists(StoreError):
    """`put(..., if_absent=True)` found the name taken; the object there is left as it was."""


class StoreUnreachable(StoreError):
    """The store cannot be reached (connection refused, DNS, timeout after retries)."""


class StoreAuthError(StoreError):
    """The store refused the credentials or denied access."""


@dataclass(frozen=True)
class ObjectInfo:
    name: str
    size: int


@dataclass(frozen=True)
class PendingUpload:
    """A multipart upload begun and neither completed nor aborted."""

    name: str
    upload_id: str
    initiated: datetime  # of the server's clock


@dataclass(frozen=True)
class TempFile:
    """A temporary file of a write not finished (atomic.temp_name): its writer is at work, or
    was killed before its rename."""

    name: str  # as an object's name (`maps/ab/.tmp-...`): what `delete` takes
    modified: float  # its mtime, in seconds since the epoch


class RangeReader:
    """Bytes [offset, offset + length) of an object, read front to back: `read(n)` returns the
    next `n` bytes exactly (or fails as `get_range` does), `skip(n)` passes over `n`. A store
    provides `_fetch` and `_fetch_into`; skipping is free here (a store reading at any offset cheaply: a file),
    a store whose reads are requests streams one request and reads what it skips."""

    def __init__(self, offset: int, length: int) -> None:
        self.position, self.end = offset, offset + length

    def read(self, n: int) -> bytes:
        data = self._fetch(self._within(n))
        self.position += n
        return data

    def read_into(self, view: memoryview) -> None:
        """`read(len(view))` into `view`, a buffer the caller reuses: a store that can fill
        it from the source directly spares allocating and faulting in a fresh buffer for every
        piece."""
        self._within(len(view))
        self._fetch_into(view)
        self.position += len(view)

    def skip(self, n: int) -> None:
        self.position += self._within(n)

    def _fetch(self, n: int) -> bytes:
        """The `n` bytes at `position`."""
        raise NotImplementedError

    def _fetch_into(self, view: memoryview) -> None:
        """The `len(view)` bytes at `position`, into `view`."""
        raise NotImplementedError

    def _within(self, n: int) -> int:
        if not 0 <= n <= self.end - self.position:
            raise ValueError(f"{n} bytes at {self.position} lie outside the range read, which "
                             f"ends at {self.end}")
        return n

    def close(self) -> None:
        pass

    def __enter__(self) -> "RangeReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Store(Protocol):
    location: str  # for messages: a path or s3://bucket/prefix
    leaves_temps: bool  # an unfinished write is a file beside the objects (`list(..., temps=)`)
    # a read is a request that waits on the network: reads are worth issuing together
    reads_wait: bool

    def put(self, name: str, data: bytes | memoryview, *, if_absent: bool = False) -> None: ...

    def put_many(self, items: Sequence[tuple[str, bytes | memoryview]]) -> None: ...

    def put_file(self, name: str, path: Path, *, if_absent: bool = False) -> None: ...

    def spool_dir(self) -> Path: ...

    def get(self, name: str, *, limit: int) -> bytes: ...

    def get_range(self, name: str, offset: int, length: int) -> bytes: ...

    # the first `length` bytes of `name` (all of it when shorter) and its size, with one request
    def get_start(self, name: str, length: int) -> tuple[bytes, int]: ...

    def open_range(self, name: str, offset: int, length: int) -> RangeReader: ...

    def size(self, name: str) -> int: ...

    def exists(self, name: str) -> bool: ...

    def list(self, prefix: str, skipped: list[str] | None = None,
             temps: list[TempFile] | None = None) -> Iterator[ObjectInfo]: ...

    def names(self, prefix: str, skipped: list[str] | None = None,
              temps: list[TempFile] | None = None) -> Iterator[str]: ...

    def delete(self, names: Iterable[str]) -> None: ...

    def pending_uploads(self) -> Iterator[PendingUpload]: ...

    def abort_upload(self, upload: PendingUpload) -> None: ...

    def close(self) -> None: ...


_FORBIDDEN = ("..", "//", "\0", "\\")


def check_name(name: str, *, prefix: bool = False) -> str:
    """`name` when a store may use it: relative, non-empty (a list `prefix` may be empty), with no
    `..`, `//`, NUL or backslash. A name is built from checked hex names, so a bad one is a bug or
    tampering: StoreError, never a path outside the store."""
    bad = (not isinstance(name, str) or name.startswith("/") or (not name and not prefix)
           or any(part in name for part in _FORBIDDEN))
    if bad:
        raise StoreError(f"{name!r} is not a valid object name (relative, '/'-separated, no "
                         "'..', '//', NUL or backslash)")
    return name


class BadLocation(StoreError, UsageError):
    """A location that is neither a directory nor a well-formed `s3://BUCKET/PREFIX`: what the
    user typed, refused before any connection (exit code 2)."""


S3_SCHEME = "s3://"
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
# what a URL starts with (`ftp://`, `s3:/`, `S3:`): never taken for a directory of that name
_URL_LIKE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:/|[sS]3:")


def parse_s3_location(location: str) -> tuple[str, str]:
    """(bucket, prefix) of `s3://BUCKET/PREFIX`; the prefix has no leading or trailing `/`."""
    bucket, _, prefix = location.removeprefix(S3_SCHEME).partition("/")
    prefix = prefix.strip("/")
    if not _BUCKET.fullmatch(bucket):
        raise BadLocation(f"{location}: {bucket!r} is not a bucket name (3 to 63 lowercase "
                          "letters, digits, '.' and '-'); the location is s3://BUCKET/PREFIX")
    try:
        if prefix:
            check_name(prefix)
    except StoreError as exc:
        raise BadLocation(f"{location}: the prefix {exc}; the location is "
                          "s3://BUCKET/PREFIX") from None
    if not is_text(prefix):  # object keys are UTF-8
        raise BadLocation(f"{location}: the prefix {prefix!r} is not UTF-8 text")
    return bucket, prefix


def check_location(location: str) -> None:
    """Refuse a malformed location (BadLocation) before anything is opened: an `s3://` one
    with a bad bucket or prefix, or one that looks like a URL of another kind."""
    if location.startswith(S3_SCHEME):
        parse_s3_location(location)
    elif _URL_LIKE.match(location):
        raise BadLocation(f"{location} is neither a directory nor s3://BUCKET/PREFIX; write "
                          f"s3://BUCKET/PREFIX, or ./{location} for a directory of that name")


def open_store(location: str, settings: Any = None) -> Store:
    """The store at `location`: `s3://BUCKET/PREFIX` is an S3-compatible bucket (its settings,
    endpoint and credentials, from `settings`), anything else a local directory."""
    check_location(location)
    if location.startswith(S3_SCHEME):
        try:
            from . import s3
        except ImportError as exc:
            raise StoreError(f"cannot open {location}: S3 support is not installed ({exc}); "
                             "install repo-engine with the 's3' extra") from None
        return s3.S3Store(location, settings)
    from .local import LocalStore

    return LocalStore(Path(location))
