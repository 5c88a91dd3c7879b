"""Pack files: immutable containers of compressed chunks, named by the BLAKE3 of their content.

Layout (little endian):

| part    | layout                                                                   |
|---------|--------------------------------------------------------------------------|
| header  | magic PACK (8), major u16, minor u16, reserved u32 — 16 bytes            |
| blobs   | the chunks' stored bytes, back to back                                   |
| trailer | one 60-byte entry per chunk: ref u64, id [32], offset u64, stored u32,   |
|         | raw u32, codec u8, 3 pad bytes                                           |
| footer  | magic PACK_TRAILER (8), count u32, major u16, reserved u16,              |
|         | trailer offset u64, BLAKE3 of the trailer entries [32] — 56 bytes        |

`ref` is the chunk's repository-wide reference number (block maps store refs, not ids); `id` is
the keyed BLAKE3 of the raw bytes and is the chunk's checksum: readers re-hash every chunk they
decompress. `codec` 0 = stored raw, 1 = zstd frame. A pack is built in a spool file of the store
(`Store.spool_dir`), sealed (`PackWriter.seal`: trailer, footer, name) and published durably as
the object `packs/<first two hex>/<name>.pack` (`SealedPack.publish`, `Store.put_file`; write
order: docs/FORMAT.md). Only publishing makes a FinishedPack, the one thing the index records:
so nothing indexes a pack that is not durable in the store.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import blake3
import numpy as np

from ..errors import DamageError
from .atomic import write_all
from .formats import PACK, PACK_TRAILER
from .safefile import FILE_MODE, checked_name
from .store import Store

HEADER = struct.Struct("<8sHHI")
ENTRY = struct.Struct("<Q32sQIIB3x")
FOOTER = struct.Struct("<8sIHHQ32s")
assert (HEADER.size, ENTRY.size, FOOTER.size) == (16, 60, 56)
WRITE_CHUNK = 4 << 20

CODEC_RAW, CODEC_ZSTD = 0, 1
# ids are V32, not S32: numpy strips trailing NUL bytes from S fields
ENTRY_DTYPE = np.dtype(
    {
        "names": ["ref", "id", "offset", "stored", "raw", "codec"],
        "formats": ["<u8", "V32", "<u8", "<u4", "<u4", "u1"],
        "offsets": [0, 8, 40, 48, 52, 56],
        "itemsize": ENTRY.size,
    }
)


@dataclass(frozen=True)
class PackEntry:
    ref: int
    chunk_id: bytes
    offset: int
    stored: int
    raw: int
    codec: int


@dataclass(frozen=True)
class FinishedPack:
    name: str
    size: int
    entries: list[PackEntry]


@dataclass(frozen=True)
class SealedPack:
    """A complete pack in its spool file, not published yet."""

    name: str
    size: int
    entries: list[PackEntry]
    spool: Path

    def publish(self, store: Store) -> FinishedPack:
        """Upload the pack durably (`Store.put_file`, which consumes the spool file); on
        failure the spool file is removed."""
        try:
            store.put_file(pack_object(self.name), self.spool)
        except BaseException:
            self.discard()
            raise
        return FinishedPack(self.name, self.size, self.entries)

    def discard(self) -> None:
        self.spool.unlink(missing_ok=True)


def read_spans(packs: np.ndarray, starts: np.ndarray, ends: np.ndarray, max_gap: int,
               max_request: int) -> list[tuple[int, int]]:
    """Cut chunks sorted by (pack, offset) into range reads: [first, stop) slices, each within
    one pack, with no gap over `max_gap` and spanning at most `max_request` bytes (or one
    chunk). The cuts at pack changes and gaps are found in numpy; a stretch between two of them
    is cut by size with one binary search per read (chunks of a pack do not overlap, so `ends`
    never falls within a stretch)."""
    cuts = np.flatnonzero((packs[1:] != packs[:-1]) | (starts[1:] - ends[:-1] > max_gap))
    edges = np.concatenate(([0], cuts + 1, [len(starts)])).tolist() if len(starts) else []
    spans: list[tuple[int, int]] = []
    for first, hi in zip(edges[:-1], edges[1:]):
        while first < hi:
            fits = int(np.searchsorted(ends[first:hi], starts[first] + max_request,
                                       side="right"))
            spans.append((first, first + max(1, fits)))
            first += max(1, fits)
    return spans


def pack_object(name: str) -> str:
    checked_name(name, 64, "pack")
    return f"packs/{name[:2]}/{name}.pack"


class PackWriter:
    """Appends chunk blobs to a spool file; `seal` completes it, `finish` also publishes it."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._tmp = store.spool_dir() / f"pack-{os.getpid()}-{os.urandom(6).hex()}.tmp"
        self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        self._hash = blake3.blake3()
        self._size = 0
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self.entries: list[PackEntry] = []
        self._write(HEADER.pack(PACK.magic, PACK.major, PACK.minor, 0))

    @property
    def size(self) -> int:
        return self._size

    def _write(self, data: bytes) -> None:
        """Buffer `data`; blobs go to the file and the hash a few MiB at a time (few syscalls,
        large BLAKE3 updates that release the GIL)."""
        self._pending.append(data)
        self._pending_bytes += len(data)
        self._size += len(data)
        if self._pending_bytes >= WRITE_CHUNK:
            self._drain()

    def _drain(self) -> None:
        data = b"".join(self._pending)
        self._pending, self._pending_bytes = [], 0
        self._hash.update(data)
        write_all(self._fd, data)

    def add(self, ref: int, chunk_id: bytes, blob: bytes, raw_len: int, codec: int) -> None:
        self.entries.append(PackEntry(ref, chunk_id, self._size, len(blob), raw_len, codec))
        self._write(blob)

    def finish(self) -> FinishedPack:
        """Seal the pack and publish it under its content name, durably."""
        return self.seal().publish(self._store)

    def seal(self) -> SealedPack:
        """Write trailer and footer and close the spool file. On failure (a full disk, say) the
        spool file is removed."""
        try:
            return self._seal()
        except BaseException:
            self.abort()
            raise

    def _seal(self) -> SealedPack:
        trailer = b"".join(
            ENTRY.pack(e.ref, e.chunk_id, e.offset, e.stored, e.raw, e.codec) for e in self.entries
        )
        trailer_offset = self._size
        self._write(trailer)
        self._write(
            FOOTER.pack(
                PACK_TRAILER.magic, len(self.entries), PACK_TRAILER.major, 0,
                trailer_offset, blake3.blake3(trailer).digest(),
            )
        )
        self._drain()
        os.close(self._fd)
        self._fd = -1
        return SealedPack(self._hash.hexdigest(), self._size, self.entries, self._tmp)

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._tmp.unlink(missing_ok=True)


def read_trailer(store: Store, name: str) -> np.ndarray:
    """Read and check the trailer of pack object `name`; returns an ENTRY_DTYPE array."""
    what = f"{store.location}/{name}"
    size = store.size(name)
    if size < HEADER.size + FOOTER.size:
        raise DamageError(f"{what}: pack is truncated ({size} bytes)")
    magic, major, _minor, _ = HEADER.unpack(store.get_range(name, 0, HEADER.size))
    if magic != PACK.magic:
        raise DamageError(f"{what}: not a pack file (bad magic)")
    PACK.check_version(major, what)
    footer = store.get_range(name, size - FOOTER.size, FOOTER.size)
    fmagic, count, fmajor, _, toff, digest = FOOTER.unpack(footer)
    if fmagic != PACK_TRAILER.magic:
        raise DamageError(f"{what}: pack footer is damaged or the pack is truncated")
    PACK_TRAILER.check_version(fmajor, what)
    if toff + count * ENTRY.size + FOOTER.size != size:
        raise DamageError(f"{what}: pack trailer does not fit the file size")
    trailer = store.get_range(name, toff, count * ENTRY.size)
    if blake3.blake3(trailer).digest() != digest:
        raise DamageError(f"{what}: pack trailer checksum mismatch")
    entries = np.frombuffer(trailer, dtype=ENTRY_DTYPE)
    ends = entries["offset"].astype(np.int64) + entries["stored"]
    if count and (entries["offset"].min() < HEADER.size or ends.max() > toff):
        raise DamageError(f"{what}: pack trailer points outside the blob area")
    return entries
