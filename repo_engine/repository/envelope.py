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
from pathlib import Path

import blake3

from ..errors import DamageError, FormatError
from .atomic import write_atomic
from .formats import FileFormat
from .safefile import read_limited

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


def write_sealed(path: Path, fmt: FileFormat, payload: bytes, *, overwrite: bool = True) -> None:
    write_atomic(path, seal(fmt, payload), overwrite=overwrite)


def read_sealed(path: Path, fmt: FileFormat, limit: int) -> bytes:
    """The checked payload of the sealed file `path`, which may be at most `limit` bytes long
    (safefile.py: a symlink, FIFO, device or oversized file is damage)."""
    try:
        data = read_limited(path, limit)
    except FileNotFoundError:
        raise DamageError(f"{path}: {fmt.name} file is missing") from None
    return unseal(fmt, data, str(path))
