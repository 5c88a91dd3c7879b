"""The store: where the repository's bytes live, as immutable named objects.

Object names are `/`-separated relative names (`config`, `packs/xx/<64 hex>.pack`, ...). A store
interprets nothing in a name beyond refusing one that is empty, absolute, or contains `..`, `//`,
NUL or a backslash (`check_name`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ...errors import DamageError, RepoError


class StoreError(RepoError):
    """The store refused or failed an operation; the message names the location (exit code 1)."""


class ObjectDamaged(StoreError, DamageError):
    """An object is not what its name promises: larger than its format allows, shorter than a
    read needs (exit code 3)."""

    exit_code = 3


class ObjectMissing(ObjectDamaged):
    """A named object a reader needs is gone (exit code 3)."""


class ShortRead(ObjectDamaged):
    """An object ends before the byte range a reader asked for (exit code 3)."""


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


class Store(Protocol):
    location: str  # for messages: a path or s3://bucket/prefix

    def put(self, name: str, data: bytes | memoryview, *, if_absent: bool = False) -> None: ...

    def put_file(self, name: str, path: Path, *, if_absent: bool = False) -> None: ...

    def spool_dir(self) -> Path: ...

    def get(self, name: str, *, limit: int) -> bytes: ...

    def get_range(self, name: str, offset: int, length: int) -> bytes: ...

    def size(self, name: str) -> int: ...

    def exists(self, name: str) -> bool: ...

    def list(self, prefix: str, skipped: list[str] | None = None) -> Iterator[ObjectInfo]: ...

    def delete(self, names: Iterable[str]) -> None: ...

    def close(self) -> None: ...


_FORBIDDEN = ("..", "//", "\0", "\\")


def check_name(name: str, *, prefix: bool = False) -> str:
    """`name` when a store may use it: relative, non-empty (a list `prefix` may be empty), with no
    `..`, `//`, NUL or backslash; otherwise StoreError."""
    bad = (not isinstance(name, str) or name.startswith("/") or (not name and not prefix)
           or any(part in name for part in _FORBIDDEN))
    if bad:
        raise StoreError(f"{name!r} is not a valid object name (relative, '/'-separated, no "
                         "'..', '//', NUL or backslash)")
    return name


def open_store(location: str, settings: Any = None) -> Store:
    """The store at `location`: `s3://BUCKET/PREFIX` is an S3-compatible bucket (endpoint and
    credentials from `settings`), anything else a local directory."""
    if location.startswith("s3://"):
        try:
            from . import s3
        except ImportError as exc:
            raise StoreError(f"cannot open {location}: S3 support is not installed ({exc}); "
                             "install repo-engine with the 's3' extra") from None
        return s3.S3Store(location, settings)
    from .local import LocalStore

    return LocalStore(Path(location))
