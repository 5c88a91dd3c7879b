"""The interface of a sealer, and the null sealer of an unencrypted repository, which passes
bytes through unchanged with an empty header, so that code above never asks whether a repository
is encrypted. Kept apart from seal.py so that an unencrypted repository never loads the
cryptography library.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from ...errors import FormatError

Passphrase = Callable[[], bytes]  # asked for only when an encrypted repository needs it


def asks(passphrase: Passphrase) -> bool:
    """Whether calling `passphrase` may ask someone for it (a prompt) rather than read it: a
    source tells with its `asks` attribute; any other callable is taken to ask."""
    return bool(getattr(passphrase, "asks", True))

MAX_SLOT_SIZE = 64 << 10  # bytes a key slot record may hold (keystore.py, ahead.py)
PART_HEADER_SIZE = 36  # what a sealed object's key header holds: epoch u32, salt [32] (seal.py)
PART_TAG_SIZE = 16  # what sealing adds to a part: its AES-GCM tag (seal.py)


class PartSealer(Protocol):
    header: bytes  # written after the object's own header; b"" when unencrypted

    def seal(self, position: int, kind: str, name: bytes, data: bytes) -> bytes: ...

    def open(self, position: int, kind: str, name: bytes, sealed: bytes, what: str) -> bytes: ...

    def opener(self, kind: str) -> PartOpener: ...


# opens one part of a kind (position, name, sealed bytes): its bytes, or None when it fails
# authentication (`PartSealer.open` then says why). One call per part with the per-kind work
# done once: a restore opens every chunk it writes.
PartOpener = Callable[[int, bytes, bytes | memoryview], bytes | memoryview | None]


class Sealer(Protocol):
    encrypted: bool  # for the format's flag field only
    part_overhead: int  # bytes a sealed part adds to its plaintext
    sealed_epochs: frozenset[int]  # the key epochs sealed under so far, and the next one's

    def sealed_size(self, size: int) -> int: ...

    def seal(self, kind: str, name: bytes, plaintext: bytes) -> bytes: ...

    def open(self, kind: str, name: bytes, sealed: bytes, what: str) -> bytes: ...

    def parts(self, kind: str) -> PartSealer: ...

    def parts_opener(self, kind: str, header: bytes, what: str) -> PartSealer: ...

    def avoid(self, retired: set[int]) -> None: ...


class NullSealer:
    """The sealer of an unencrypted repository: bytes pass through unchanged."""

    encrypted = False
    part_overhead = 0
    sealed_epochs: frozenset[int] = frozenset()

    def sealed_size(self, size: int) -> int:
        return size

    def seal(self, kind: str, name: bytes, plaintext: bytes) -> bytes:
        return bytes(plaintext)

    def open(self, kind: str, name: bytes, sealed: bytes, what: str) -> bytes:
        return sealed

    def parts(self, kind: str) -> PartSealer:
        return _NullParts()

    def parts_opener(self, kind: str, header: bytes, what: str) -> PartSealer:
        if header:
            raise FormatError(f"{what}: the {kind} is encrypted but the repository was opened "
                              "without its keys")
        return _NullParts()

    def avoid(self, retired: set[int]) -> None:
        pass


NULL_SEALER = NullSealer()


class _NullParts:
    header = b""

    def seal(self, position: int, kind: str, name: bytes, data: bytes) -> bytes:
        return bytes(data)

    def open(self, position: int, kind: str, name: bytes, sealed: bytes, what: str) -> bytes:
        return sealed

    def opener(self, kind: str) -> PartOpener:
        return _unsealed


def _unsealed(position: int, name: bytes, sealed: bytes | memoryview) -> bytes | memoryview:
    return sealed
