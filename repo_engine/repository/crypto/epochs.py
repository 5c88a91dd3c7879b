"""The key epoch a stored object is sealed under, read from its first bytes without any key
(`key retire` looks for what an old epoch still seals: maintenance/retire.py).

Every format of the repository starts with magic [8], major u16, minor u16, flags u32. A sealed
pack (major 2) and a sealed checkpoint (flag SEALED) carry their key header (epoch u32, salt)
right after those 16 bytes; every other sealed object is an envelope (flag SEALED) whose sealed
payload starts with the epoch after the envelope's 24-byte header.
"""

from __future__ import annotations

import struct

from ..envelope import HEADER as ENVELOPE_HEADER
from ..envelope import SEALED
from ..formats import CHECKPOINT, PACK, SEALED_PACK
from ..store import ObjectMissing, Store

_START = struct.Struct("<8sHHI")  # magic, major, minor, flags
_EPOCH = struct.Struct("<I")
_KEY_HEADER_AT = {PACK.magic: _START.size, CHECKPOINT.magic: _START.size}
_READ = ENVELOPE_HEADER.size + _EPOCH.size


def stored_epoch(store: Store, name: str) -> int | None:
    """The epoch object `name` is sealed under; None when it is not sealed (or is gone, or too
    short to be: a scrub's business)."""
    try:  # get_start reads afresh: a manifest or a mark is replaced under the same name
        head, _size = store.get_start(name, _READ)
    except ObjectMissing:
        return None
    if len(head) < _READ:
        return None
    magic, major, _minor, flags = _START.unpack_from(head)
    sealed = major == SEALED_PACK.major if magic == PACK.magic else bool(flags & SEALED)
    if not sealed:
        return None
    return _EPOCH.unpack_from(head, _KEY_HEADER_AT.get(magic, ENVELOPE_HEADER.size))[0]
