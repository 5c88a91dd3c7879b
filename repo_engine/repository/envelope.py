"""The envelope every small metadata file is stored in: magic, version, length, payload, checksum.

Layout (little endian):

| offset | size | field                                   |
|--------|------|-----------------------------------------|
| 0      | 8    | magic (formats.py)                      |
| 8      | 2    | major version                           |
| 10     | 2    | minor version                           |
| 12     | 4    | flags: bit 0 SEALED (else 0)            |
| 16     | 8    | payload length N                        |
| 24     | N    | payload                                 |
| 24+N   | 32   | BLAKE3 of bytes [0, 24+N)               |

In an encrypted repository the payload of a point manifest or a block map is a sealed object
(crypto/seal.py) and flag SEALED is set; its `Binding` (the repository's sealer, the object's kind
and the name its ciphertext is bound to) seals and opens it. The checksum stays over the stored
bytes, so that a scrub without the keys checks them. A cleartext object where a sealed one
belongs is refused as tampering (an attacker who can write the store could otherwise plant one),
a sealed one in a repository opened without keys as a format the reader cannot read.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import blake3

from ..errors import DamageError, FormatError, TamperedError
from .crypto.null import Sealer
from .formats import FileFormat
from .store import Store

HEADER = struct.Struct("<8sHHIQ")
assert HEADER.size == 24
CHECKSUM_SIZE = 32
SEALED = 1


@dataclass(frozen=True)
class Binding:
    """How an envelope's payload is sealed: with `sealer` (a null one: not at all), as an object
    of `kind` named `name` (its associated data)."""

    sealer: Sealer
    kind: str
    name: bytes


def seal(fmt: FileFormat, payload: bytes, binding: Binding | None = None) -> bytes:
    flags = 0
    if binding is not None and binding.sealer.encrypted:
        payload, flags = binding.sealer.seal(binding.kind, binding.name, payload), SEALED
    head = HEADER.pack(fmt.magic, fmt.major, fmt.minor, flags, len(payload))
    body = head + payload
    return body + blake3.blake3(body).digest()


def unseal(fmt: FileFormat, data: bytes, what: str, binding: Binding | None = None) -> bytes:
    """Check magic, version, length and checksum, and open a payload `binding` sealed; return
    the payload."""
    flags, payload = _checked(fmt, data, what)
    if binding is None:
        return payload
    if not binding.sealer.encrypted and flags & SEALED:
        raise FormatError(f"{what}: the {fmt.name} is encrypted, but the repository's config "
                          "says it is not: the config was replaced in the store")
    if binding.sealer.encrypted and not flags & SEALED:
        raise TamperedError(f"{what}: a cleartext {fmt.name} in an encrypted repository; it was "
                            "planted or tampered with (run 'repo-engine scrub')")
    return binding.sealer.open(binding.kind, binding.name, payload, what)


def _checked(fmt: FileFormat, data: bytes, what: str) -> tuple[int, bytes]:
    # a short file that does not begin as one of ours is some other file, not a cut one
    if not fmt.magic.startswith(data[:len(fmt.magic)]):
        raise FormatError(f"{what}: not a {fmt.name} file (bad magic)")
    if len(data) < HEADER.size + CHECKSUM_SIZE:
        raise DamageError(f"{what}: truncated {fmt.name} file ({len(data)} bytes)")
    _magic, major, _minor, flags, length = HEADER.unpack_from(data)
    fmt.check_version(major, what)
    end = HEADER.size + length
    if len(data) != end + CHECKSUM_SIZE:
        raise DamageError(f"{what}: {fmt.name} file has the wrong length (truncated or extended)")
    if blake3.blake3(data[:end]).digest() != data[end:]:
        raise DamageError(f"{what}: {fmt.name} checksum mismatch (file is damaged)")
    return flags, data[HEADER.size:end]


def write_sealed(store: Store, name: str, fmt: FileFormat, payload: bytes, *,
                 if_absent: bool = False, binding: Binding | None = None) -> None:
    store.put(name, seal(fmt, payload, binding), if_absent=if_absent)


def read_sealed(store: Store, name: str, fmt: FileFormat, limit: int,
                binding: Binding | None = None) -> bytes:
    """The checked payload of the sealed object `name`, which may be at most `limit` bytes long
    (a missing, oversized or, in a directory, non-regular object is damage)."""
    return unseal(fmt, store.get(name, limit=limit), f"{store.location}/{name}", binding)
