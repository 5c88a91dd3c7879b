"""Block maps: which chunk each block of a disk holds at one restore point.

A map (the object `maps/<first two hex>/<name>.map`, named by the BLAKE3 of its sealed bytes) is an
envelope (envelope.py, magic BLOCK_MAP) whose payload is (in an encrypted repository sealed as
kind "map" with an empty name: a sealed object cannot carry its own hash in its associated data,
and the name, the BLAKE3 of the stored bytes, binds them to it already):

| offset | size | field                                                                |
|--------|------|----------------------------------------------------------------------|
| 0      | 1    | kind: 0 FULL, 1 DELTA                                                |
| 1      | 7    | salt: 0 (minor version 0), or random (minor 1; readers ignore it)    |
| 8      | 8    | nblocks: the disk's block count at this point                        |
| 16     | 8    | count: entries (FULL: nblocks)                                       |
| 24     | ...  | zstd frame of: FULL refs u64[nblocks]; DELTA blocks u64[count] (strictly |
|        |      | increasing, < nblocks) then refs u64[count]                          |

A salted map is the same content under another name: a shared repository writes one when gc has
doomed (planned or swept) the unsalted name (docs/FORMAT.md, "Journal").

Ref 0 is ZERO (an all-zero block, never stored). A DELTA applies on top of its parent's resolved map
resized to `nblocks` (blocks past the parent's end start as ZERO).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

import blake3
import numpy as np
import zstandard

from ..errors import DamageError
from .crypto.null import NULL_SEALER, Sealer
from .envelope import Binding, seal, unseal
from .config import MIN_BLOCK
from .formats import BLOCK_MAP, SALTED_BLOCK_MAP
from .points import MAX_CAPACITY
from .safefile import MAP_MAX, checked_name
from .store import Store

FULL, DELTA = 0, 1
HEAD = struct.Struct("<B7xQQ")  # as read: the salt is skipped
SALTED_HEAD = struct.Struct("<B7sQQ")  # as written
SALT_SIZE = 7
assert HEAD.size == SALTED_HEAD.size == 24
U64 = np.dtype("<u8")
# a zstd block regenerates at most 128 KiB from at least 4 bytes (3-byte header, 1 RLE byte): a
# header claiming more entries than the frame can hold is damage, caught before allocating them
MAX_RATIO = (128 << 10) // 4
MAX_BLOCKS = MAX_CAPACITY // MIN_BLOCK


@dataclass(frozen=True)
class BlockMap:
    kind: int
    nblocks: int
    blocks: np.ndarray | None  # DELTA only
    refs: np.ndarray

    @classmethod
    def full(cls, refs: np.ndarray) -> "BlockMap":
        return cls(FULL, len(refs), None, refs.astype(U64, copy=False))

    @classmethod
    def delta(cls, nblocks: int, blocks: np.ndarray, refs: np.ndarray) -> "BlockMap":
        return cls(DELTA, nblocks, blocks.astype(U64, copy=False), refs.astype(U64, copy=False))

    def apply(self, base: np.ndarray | None, *, consume: bool = False) -> np.ndarray:
        """The resolved map after this one: FULL replaces, DELTA patches a copy of the base
        resized to `nblocks`. With `consume` the caller gives up the base and this map, whose
        arrays are then reused instead of copied."""
        if self.kind == FULL:
            return self.refs if consume and self.refs.flags.writeable else self.refs.copy()
        base = base if base is not None else np.zeros(0, U64)
        out = fit(base, self.nblocks) if consume else resize(base, self.nblocks)
        out[self.blocks] = self.refs
        return out


def resize(refs: np.ndarray, nblocks: int) -> np.ndarray:
    """A copy of `refs` cut or zero-extended to `nblocks`."""
    out = np.zeros(nblocks, dtype=U64)
    keep = min(nblocks, len(refs))
    out[:keep] = refs[:keep]
    return out


def fit(refs: np.ndarray, nblocks: int) -> np.ndarray:
    """`refs` itself when it has `nblocks` entries and may be written, else a resized copy."""
    if len(refs) == nblocks and refs.flags.writeable:
        return refs
    return resize(refs, nblocks)


def delta_between(parent: np.ndarray, child: np.ndarray) -> BlockMap:
    """The DELTA that turns `parent` into `child` (entries where they differ)."""
    base = resize(parent, len(child))
    changed = np.flatnonzero(base != child).astype(U64)
    return BlockMap.delta(len(child), changed, child[changed])


def encode(bmap: BlockMap, salt: bytes = b"", sealer: Sealer | None = None) -> bytes:
    arrays = [bmap.refs] if bmap.kind == FULL else [bmap.blocks, bmap.refs]
    # streamed from the arrays' own memory: a large disk's full map is not copied first
    compressor = zstandard.ZstdCompressor(level=3).compressobj()
    parts = [compressor.compress(memoryview(np.ascontiguousarray(a, dtype=U64)).cast("B"))
             for a in arrays]
    body = b"".join(parts) + compressor.flush()
    fmt = SALTED_BLOCK_MAP if salt else BLOCK_MAP
    return seal(fmt, SALTED_HEAD.pack(bmap.kind, salt, bmap.nblocks, len(bmap.refs)) + body,
                _binding(sealer))


def _binding(sealer: Sealer | None) -> Binding | None:
    return None if sealer is None else Binding(sealer, "map", b"")


def decode(payload: bytes, what: str) -> BlockMap:
    kind, nblocks, count = HEAD.unpack_from(payload)
    if (kind not in (FULL, DELTA) or (kind == FULL and count != nblocks) or count > nblocks
            or nblocks > MAX_BLOCKS):
        raise DamageError(f"{what}: block map header is inconsistent")
    width = 1 if kind == FULL else 2
    if count * width * U64.itemsize > (len(payload) - HEAD.size) * MAX_RATIO:
        raise DamageError(f"{what}: block map header claims {count} entries, more than its "
                          "body can hold")
    # decompressed straight into the array: a full map of a large disk is not copied twice
    body = np.empty(count * width, dtype=U64)
    try:
        got = _read_into(memoryview(payload)[HEAD.size:], memoryview(body).cast("B"))
    except zstandard.ZstdError as exc:
        raise DamageError(f"{what}: block map does not decompress ({exc})") from None
    if got != body.nbytes:
        raise DamageError(f"{what}: block map body has the wrong length")
    arrays = body.reshape(width, count)
    if kind == FULL:
        return BlockMap.full(arrays[0])
    blocks = arrays[0]
    if count and (blocks[-1] >= nblocks or np.any(np.diff(blocks.astype(np.int64)) <= 0)):
        raise DamageError(f"{what}: delta block numbers are unsorted or out of range")
    return BlockMap.delta(nblocks, blocks, arrays[1])


def _read_into(frame: memoryview, out: memoryview) -> int:
    """Decompress `frame` into `out`; returns the bytes the frame holds (more than `out` holds
    counts as one more, so a longer frame is caught)."""
    with zstandard.ZstdDecompressor().stream_reader(frame) as reader:
        got = 0
        while got < len(out):
            n = reader.readinto(out[got:])
            if n == 0:
                return got
            got += n
        return got + len(reader.read(1))


def map_object(name: str) -> str:
    checked_name(name, 64, "block map")
    return f"maps/{name[:2]}/{name}.map"


def write_map(store: Store, bmap: BlockMap, *, salted: bool = False,
              doomed: Callable[[str], bool] | None = None, sealer: Sealer = NULL_SEALER) -> str:
    """Store a map durably under its content name; returns the name. `salted`, or when
    `doomed(name)` says that gc may delete the object of that name: under a new, random name
    (minor version 1)."""
    data = encode(bmap, os.urandom(SALT_SIZE) if salted else b"", sealer)
    name = blake3.blake3(data).hexdigest()
    if not salted and doomed is not None and doomed(name):
        return write_map(store, bmap, salted=True, sealer=sealer)
    if not store.exists(map_object(name)):
        store.put(map_object(name), data)
    return name


def read_map(store: Store, name: str, sealer: Sealer = NULL_SEALER) -> BlockMap:
    what = f"{store.location}/{map_object(name)}"
    data = store.get(map_object(name), limit=MAP_MAX)
    if blake3.blake3(data).hexdigest() != name:
        raise DamageError(f"{what}: block map content does not match its name (damaged)")
    return decode(unseal(BLOCK_MAP, data, what, _binding(sealer)), what)
