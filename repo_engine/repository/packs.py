"""Pack files: immutable containers of compressed chunks, named by the BLAKE3 of their content.

Major 1 (an unencrypted repository), little endian:

| part    | layout                                                                   |
|---------|--------------------------------------------------------------------------|
| header  | magic PACK (8), major u16 = 1, minor u16, reserved u32 — 16 bytes        |
| blobs   | the chunks' stored bytes, back to back                                   |
| trailer | one 60-byte entry per chunk: ref u64, id [32], offset u64, stored u32,   |
|         | raw u32, codec u8, 3 pad bytes                                           |
| footer  | magic PACK_TRAILER (8), count u32, major u16, reserved u16,              |
|         | trailer offset u64, BLAKE3 of the trailer entries [32] — 56 bytes        |

Major 2 (an encrypted repository): the chunks sealed as parts of the pack (crypto/seal.py: the
object key derived with kind "pack" from the data key of the header's epoch and its salt):

| part    | layout                                                                   |
|---------|--------------------------------------------------------------------------|
| header  | magic PACK (8), major u16 = 2, minor u16, reserved u32, epoch u32,       |
|         | salt [32] — 52 bytes                                                     |
| blobs   | per chunk AES-256-GCM(its stored bytes; nonce = the blob's offset in the |
|         | pack, associated data = kind "chunk", the chunk id, the epoch), tag last |
| table   | cleartext, one 28-byte entry per chunk: offset u64, stored u32 (the      |
|         | sealed blob's size), BLAKE3 (unkeyed, 16 bytes) of the sealed blob       |
| toc     | sealed: AES-256-GCM(one 48-byte entry per chunk: ref u64, id [32],       |
|         | raw u32, codec u8, 3 pad bytes; nonce = the toc's offset, associated     |
|         | data = kind "trailer", BLAKE3 of header and table [32], the epoch)       |
| footer  | as in major 1 with major 2; the BLAKE3 is of table and toc together      |

The table lets a scrub without the key check every stored byte (`check_stored`); refs, ids, raw
sizes and codecs are readable only with it. A blob moved to another offset, pack or chunk id,
the header or the table changed (the toc is bound to their hash; the
footer's reserved field must be 0), a pack of another repository (other keys): each
fails authentication. A cleartext (major 1) pack in an encrypted repository is refused as
tampering, a sealed one where the repository is not encrypted as a format it cannot read.

`ref` is the chunk's repository-wide reference number (block maps store refs, not ids); `id` is
the keyed BLAKE3 of the raw bytes and is the chunk's checksum: readers re-hash every chunk they
decompress. `codec` 0 = stored raw, 1 = zstd frame. `stored` (in the trailer, the index and the
journal) is the size of the blob in the pack; `PackKeys.open` turns a blob read at its offset
back into the codec's bytes. A pack is built in a spool file of the store
(`Store.spool_dir`), sealed (`PackWriter.seal`: trailer, footer, name) and published durably as
the object `packs/<first two hex>/<name>.pack` (`SealedPack.publish`, `Store.put_file`; write
order: docs/FORMAT.md). Only publishing makes a FinishedPack, the one thing the index records:
so nothing indexes a pack that is not durable in the store.
"""

from __future__ import annotations

import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import blake3
import numpy as np

from ..errors import DamageError, RepoError, TamperedError
from .atomic import spool_name, write_all
from .crypto.null import (NULL_SEALER, PART_HEADER_SIZE, PART_TAG_SIZE, PartOpener, PartSealer,
                          Sealer)
from .formats import PACK, PACK_TRAILER, SEALED_PACK, SEALED_PACK_TRAILER
from .safefile import FILE_MODE, checked_name
from .store import RangeReader, Store

HEADER = struct.Struct("<8sHHI")
ENTRY = struct.Struct("<Q32sQIIB3x")
FOOTER = struct.Struct("<8sIHHQ32s")
STORED = struct.Struct("<QI16s")  # major 2: the cleartext table's entry
SECRET = struct.Struct("<Q32sIB3x")  # major 2: the sealed toc's entry
assert (HEADER.size, ENTRY.size, FOOTER.size, STORED.size, SECRET.size) == (16, 60, 56, 28, 48)
CHECKSUM_SIZE = 16
SEALED_MAJOR = SEALED_PACK.major
WRITE_CHUNK = 4 << 20
OPENERS_KEPT = 4096  # the key headers of packs read lately (PackKeys)
# a stream of a pack whose key header is not known yet starts at the header when the header lies
# at most this many bytes before it (PackKeys.open_stream): passing over the gap costs less than
# a request of its own
HEADER_REACH = 256 << 10
TRAILER_AHEAD = 64 << 10  # read_trailer's first request: a small pack whole, a large one's start

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
STORED_DTYPE = np.dtype({"names": ["offset", "stored", "checksum"],
                         "formats": ["<u8", "<u4", "V16"], "offsets": [0, 8, 12],
                         "itemsize": STORED.size})
SECRET_DTYPE = np.dtype({"names": ["ref", "id", "raw", "codec"],
                         "formats": ["<u8", "V32", "<u4", "u1"], "offsets": [0, 8, 40, 44],
                         "itemsize": SECRET.size})


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
    """Appends chunk blobs to a spool file, sealed through `sealer` (the null one of an
    unencrypted repository writes major 1); `seal` completes it, `finish` also publishes it."""

    def __init__(self, store: Store, sealer: Sealer = NULL_SEALER) -> None:
        self._store = store
        self._sealed = sealer.encrypted  # the format's major version only
        self._parts = sealer.parts("pack")
        self._checksums: list[bytes] = []
        self._tmp = store.spool_dir() / spool_name("pack")
        self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        self._hash = blake3.blake3()
        self._size = 0
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self.entries: list[PackEntry] = []
        fmt = SEALED_PACK if self._sealed else PACK
        self._header = HEADER.pack(fmt.magic, fmt.major, fmt.minor, 0) + self._parts.header
        self._write(self._header)

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
        """Append a chunk's stored bytes (the codec's output), sealed at its offset."""
        if self._sealed:
            blob = self._parts.seal(self._size, "chunk", chunk_id, blob)
            self._checksums.append(blake3.blake3(blob).digest(length=CHECKSUM_SIZE))
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
        trailer_offset = self._size
        trailer = self._sealed_trailer() if self._sealed else b"".join(
            ENTRY.pack(e.ref, e.chunk_id, e.offset, e.stored, e.raw, e.codec) for e in self.entries
        )
        trailer_fmt = SEALED_PACK_TRAILER if self._sealed else PACK_TRAILER
        self._write(trailer)
        self._write(
            FOOTER.pack(
                trailer_fmt.magic, len(self.entries), trailer_fmt.major, 0,
                trailer_offset, blake3.blake3(trailer).digest(),
            )
        )
        self._drain()
        os.close(self._fd)
        self._fd = -1
        return SealedPack(self._hash.hexdigest(), self._size, self.entries, self._tmp)

    def _sealed_trailer(self) -> bytes:
        """Major 2: the cleartext table, then the toc sealed after it, bound to the header and
        the table."""
        table = b"".join(STORED.pack(e.offset, e.stored, checksum)
                         for e, checksum in zip(self.entries, self._checksums))
        toc = b"".join(SECRET.pack(e.ref, e.chunk_id, e.raw, e.codec) for e in self.entries)
        return table + self._parts.seal(self._size + len(table), "trailer",
                                        _toc_name(self._header, table), toc)

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class _Layout:
    """Where a pack's parts are, from its header and footer, checked against its size."""

    major: int
    head: bytes  # the header; in major 2 with the key header (epoch and salt) last
    count: int
    blobs: int  # where the blob area starts
    trailer: int  # and ends: where the trailer starts
    digest: bytes  # BLAKE3 of the trailer

    @property
    def table_size(self) -> int:
        return self.count * (STORED.size if self.major == SEALED_MAJOR else ENTRY.size)


def _blobs_start(sealed: bool) -> int:
    return HEADER.size + (PART_HEADER_SIZE if sealed else 0)


def _trailer_size(count: int, sealed: bool) -> int:
    """Table, toc and its tag (major 2), or the entries (major 1), of `count` chunks."""
    return count * (STORED.size + SECRET.size) + PART_TAG_SIZE if sealed else count * ENTRY.size


def blob_bytes(size: int, count: int, sealed: bool) -> int:
    """The bytes of a pack of `size` bytes and `count` chunks that are its chunks' blobs (their
    `stored` sizes add up to it): what is left but header, trailer and footer of the format
    (`sealed`: major 2)."""
    return size - _blobs_start(sealed) - _trailer_size(count, sealed) - FOOTER.size


def _layout(head: bytes, footer: bytes, size: int, what: str) -> _Layout:
    """Check a pack's header (HEADER.size + PART_HEADER_SIZE bytes or the whole pack) and
    footer; every count and offset is bounded by `size` before anything is read with them."""
    major = _major(head, what)
    sealed = major == SEALED_MAJOR
    blobs = _blobs_start(sealed)
    if size < blobs + FOOTER.size:
        raise DamageError(f"{what}: pack is truncated ({size} bytes)")
    fmagic, count, fmajor, reserved, toff, digest = FOOTER.unpack(footer)
    if fmagic != PACK_TRAILER.magic:
        raise DamageError(f"{what}: pack footer is damaged or the pack is truncated")
    PACK_TRAILER.check_version(fmajor, what)
    end = toff + _trailer_size(count, sealed) + FOOTER.size
    if fmajor != major or not blobs <= toff or end != size:
        raise DamageError(f"{what}: pack trailer does not fit the file size")
    if sealed and reserved:  # the rest of a sealed pack's header and footer is authenticated
        raise DamageError(f"{what}: pack footer is damaged (reserved field {reserved})")
    return _Layout(major, bytes(head[:blobs]), count, blobs, toff, digest)


def _major(head: bytes, what: str) -> int:
    """The major version of the pack whose header is `head`, a version this code reads."""
    magic, major, _minor, _ = HEADER.unpack_from(head)
    if magic != PACK.magic:
        raise DamageError(f"{what}: not a pack file (bad magic)")
    PACK.check_version(major, what)
    return major


def _toc_name(header: bytes, table: bytes) -> bytes:
    """What a major 2 toc is bound to (the name in its associated data): the BLAKE3 of the
    pack's header and cleartext table, so that neither changes unnoticed."""
    return blake3.blake3(header + table).digest()


def _check_places(offsets: np.ndarray, stored: np.ndarray, layout: _Layout, what: str) -> None:
    ends = offsets.astype(np.int64) + stored
    if len(offsets) and (offsets.min() < layout.blobs or ends.max() > layout.trailer):
        raise DamageError(f"{what}: pack trailer points outside the blob area")


def _refuse_cleartext(major: int, encrypted: bool, what: str) -> None:
    if major != SEALED_MAJOR and encrypted:
        raise TamperedError(f"{what}: a cleartext pack in an encrypted repository; it was "
                            "planted or tampered with (run 'repo-engine scrub')")


def read_trailer(store: Store, name: str, sealer: Sealer = NULL_SEALER) -> np.ndarray:
    """Read and check the trailer of pack object `name` (a sealed one opened with `sealer`);
    returns an ENTRY_DTYPE array. The first request reads the pack's start and learns its size:
    a pack of up to TRAILER_AHEAD bytes (a small backup's) costs that one request."""
    what = f"{store.location}/{name}"
    start, size = store.get_start(name, TRAILER_AHEAD)
    if size < HEADER.size + FOOTER.size:
        raise DamageError(f"{what}: pack is truncated ({size} bytes)")

    def part(offset: int, length: int) -> bytes:
        if offset + length <= len(start):
            return start[offset:offset + length]
        return store.get_range(name, offset, length)

    head = part(0, min(HEADER.size + PART_HEADER_SIZE, size - FOOTER.size))
    layout = _layout(head, part(size - FOOTER.size, FOOTER.size), size, what)
    _refuse_cleartext(layout.major, sealer.encrypted, what)
    trailer = part(layout.trailer, size - FOOTER.size - layout.trailer)
    if blake3.blake3(trailer).digest() != layout.digest:
        raise DamageError(f"{what}: pack trailer checksum mismatch")
    if layout.major != SEALED_MAJOR:
        entries = np.frombuffer(trailer, dtype=ENTRY_DTYPE)
    else:
        entries = _open_toc(trailer, layout, sealer, what)
    _check_places(entries["offset"], entries["stored"], layout, what)
    return entries


def _open_toc(trailer: bytes, layout: _Layout, sealer: Sealer, what: str) -> np.ndarray:
    """A major 2 trailer's table and opened toc, as ENTRY_DTYPE rows."""
    table = trailer[:layout.table_size]
    parts = sealer.parts_opener("pack", layout.head[HEADER.size:], what)
    toc = parts.open(layout.trailer + len(table), "trailer", _toc_name(layout.head, table),
                     trailer[len(table):], f"{what} trailer")
    clear = np.frombuffer(table, dtype=STORED_DTYPE)
    secret = np.frombuffer(toc, dtype=SECRET_DTYPE)
    entries = np.zeros(layout.count, dtype=ENTRY_DTYPE)
    for field in ("ref", "id", "raw", "codec"):
        entries[field] = secret[field]
    entries["offset"], entries["stored"] = clear["offset"], clear["stored"]
    return entries


@dataclass(frozen=True)
class StoredCheck:
    """What `check_stored` found in one pack: its chunks, and those whose stored bytes do not
    match the checksum of the cleartext table (offset -> why)."""

    chunks: int
    damaged: dict[int, str]


def check_stored(data: bytes, name: str, what: str) -> StoredCheck:
    """Check the whole bytes `data` of sealed pack `name` without any key: its content name,
    header, footer, trailer checksum, and every blob against its checksum in the table.
    DamageError when the pack as a whole is damaged (a cleartext pack is: TamperedError)."""
    if len(data) < HEADER.size + FOOTER.size:
        raise DamageError(f"{what}: pack is truncated ({len(data)} bytes)")
    layout = _layout(data, data[-FOOTER.size:], len(data), what)
    _refuse_cleartext(layout.major, True, what)
    view = memoryview(data)
    trailer = view[layout.trailer:len(data) - FOOTER.size]
    if blake3.blake3(trailer).digest() != layout.digest:
        raise DamageError(f"{what}: pack trailer checksum mismatch")
    table = np.frombuffer(trailer[:layout.table_size], dtype=STORED_DTYPE)
    _check_places(table["offset"], table["stored"], layout, what)
    damaged = {}
    for offset, stored, checksum in zip(table["offset"].tolist(), table["stored"].tolist(),
                                        table["checksum"].tolist()):
        if blake3.blake3(view[offset:offset + stored]).digest(length=CHECKSUM_SIZE) != checksum:
            damaged[offset] = (f"{what}: the chunk at offset {offset} ({stored} bytes) does not "
                               "match its checksum (damaged or tampered with)")
    if not damaged and blake3.blake3(data).hexdigest() != name:
        raise DamageError(f"{what}: the pack's bytes do not hash to its name (damaged or "
                          "tampered with)")
    return StoredCheck(len(table), damaged)


class PackKeys:
    """Opens the blobs read from packs: in an encrypted repository with each pack's part opener
    (its key header read once, kept for the OPENERS_KEPT packs read last); in another one a blob
    is its stored bytes already. Safe to share between threads."""

    def __init__(self, store: Store, sealer: Sealer) -> None:
        self._store, self._sealer = store, sealer
        self._openers: dict[str, PartSealer] = {}
        self._lock = threading.Lock()
        self._null = None if sealer.encrypted else sealer.parts_opener("pack", b"", "pack")

    def opener(self, name: str) -> PartSealer:
        """The part opener of pack `name` (DamageError when its header is damaged)."""
        opener = self._null or self._openers.get(name)
        if opener is None:
            opener = self._read(name)
            self._keep(name, opener)
        return opener

    def open(self, name: str, offset: int, chunk_id: bytes, blob: bytes | memoryview,
             what: str) -> bytes | memoryview:
        """The stored bytes of the chunk `chunk_id` whose blob `blob` was read at `offset` of
        pack `name` (TamperedError, naming `what`, when it fails authentication)."""
        return self.opener(name).open(offset, "chunk", chunk_id, blob, what)

    def chunk_opener(self, name: str) -> PartOpener:
        """`open` of the chunks of pack `name` as one call each, without a reason for those
        that fail (None): `open` gives it (DamageError here when its header is damaged)."""
        return self.opener(name).opener("chunk")

    def open_stream(self, name: str, offset: int, length: int) -> RangeReader:
        """Bytes [offset, offset + length) of pack `name`, to be read front to back. When the
        pack's key header is not known yet and lies at most HEADER_REACH bytes before `offset`,
        the same request reads it first (one request instead of two; on object storage each
        costs a round trip). A header that does not come or does not parse is left for
        `opener` to read and report."""
        obj, start = pack_object(name), HEADER.size + PART_HEADER_SIZE
        if (self._null is not None or name in self._openers
                or not 0 <= offset - start <= HEADER_REACH):
            return self._store.open_range(obj, offset, length)
        stream = self._store.open_range(obj, 0, offset + length)
        try:
            opener = self._parsed(obj, stream.read(start))
            stream.skip(offset - start)
        except RepoError:
            stream.close()
            return self._store.open_range(obj, offset, length)
        except BaseException:
            stream.close()
            raise
        self._keep(name, opener)
        return stream

    def _keep(self, name: str, opener: PartSealer) -> None:
        with self._lock:
            if len(self._openers) >= OPENERS_KEPT:
                self._openers.clear()
            self._openers[name] = opener

    def _read(self, name: str) -> PartSealer:
        obj = pack_object(name)
        return self._parsed(obj, self._store.get_range(obj, 0, HEADER.size + PART_HEADER_SIZE))

    def _parsed(self, obj: str, head: bytes) -> PartSealer:
        what = f"{self._store.location}/{obj}"
        _refuse_cleartext(_major(head, what), True, what)
        return self._sealer.parts_opener("pack", head[HEADER.size:], what)
