"""The envelope every small metadata file is stored in: magic, version, length, payload, checksum.

Layout (little endian):

| offset | size | field                                   |
|--------|------|-----------------------------------------|
| 0      | 8    | magic (formats.py)                      |
| 8      | 2    | major version                           |
| 10     | 2    | minor version                           |
| 12     | 4    | flags (0)                               |
| 16     | 8    | payload length N                        |
| 24     | N    | payload                                 |
| 24+N   | 32   | BLAKE3 of bytes [0, 24+N)               |
"""

from __future__ import annotations

import struct

import blake3

from ..errors import DamageError, FormatError
from .formats import FileFormat
from .store import Store

HEADER = struct.Struct("<8sHHIQ")
assert HEADER.size == 24
CHECKSUM_SIZE = 32


def seal(fmt: FileFormat, payload: bytes) -> bytes:
    head = HEADER.pack(fmt.magic, fmt.major, fmt.minor, 0, len(payload))
    body = head + payload
    return body + blake3.blake3(body).digest()


def unseal(fmt: FileFormat, data: bytes, what: str) -> bytes:
    """Check magic, version, length and checksum; return the payload."""
    if len(data) < HEADER.size + CHECKSUM_SIZE:
        raise DamageError(f"{what}: truncated {fmt.name} file ({len(data)} bytes)")
    magic, major, _minor, _flags, length = HEADER.unpack_from(data)
    if magic != fmt.magic:
        raise FormatError(f"{what}: not a {fmt.name} file (bad magic)")
    fmt.check_version(major, what)
    end = HEADER.size + length
    if len(data) != end + CHECKSUM_SIZE:
        raise DamageError(f"{what}: {fmt.name} file has the wrong length (truncated or extended)")
    if blake3.blake3(data[:end]).digest() != data[end:]:
        raise DamageError(f"{what}: {fmt.name} checksum mismatch (file is damaged)")
    return data[HEADER.size:end]


def write_sealed(store: Store, name: str, fmt: FileFormat, payload: bytes, *,
                 if_absent: bool = False) -> None:
    store.put(name, seal(fmt, payload), if_absent=if_absent)


def read_sealed(store: Store, name: str, fmt: FileFormat, limit: int) -> bytes:
    """The checked payload of the sealed object `name`, which may be at most `limit` bytes long
    (a missing, oversized or, in a directory, non-regular object is damage)."""
    return unseal(fmt, store.get(name, limit=limit), f"{store.location}/{name}")
