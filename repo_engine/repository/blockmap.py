"""Block maps: which chunk each block of a disk holds at one restore point.

Design: a map is read and written in block ranges, never held whole. A disk of 64 TiB at 64 KiB
blocks has 2^30 blocks, 8 GiB of refs: no command may hold that. A map is therefore cut into
segments of a fixed block range (2^20 blocks, 8 MiB of refs), each compressed on its own with its
own checksum and stored front to back; a range no entry falls in (a FULL map's all-ZERO range, a
DELTA's unchanged range) is not stored at all, so a mostly empty disk's map is small on disk and
costs nothing to skip. A reader streams a map front to back, and resolving a chain streams its
maps in lockstep, one range at a time: the resolved refs of one range are all a command holds
(`resolve_windows`). In an encrypted repository a map's payload is sealed whole (envelope flag
SEALED): a reader reads and opens its compressed bytes at once, then decompresses one segment at
a time as above. In memory a map is a `BlockMap` whose FULL refs may be sparse (the blocks and
refs of its non-ZERO entries), so a backup holds what it read, not the disk.

A map (the object `maps/<first two hex>/<name>.map`, named by the BLAKE3 of its sealed bytes) is an
envelope (envelope.py, magic BLOCK_MAP). Major version 2 (written) has the payload:

| offset | size | field                                                                   |
|--------|------|-------------------------------------------------------------------------|
| 0      | 1    | kind: 0 FULL, 1 DELTA                                                   |
| 1      | 7    | salt: 0, or random (a new name for the same content; readers ignore it) |
| 8      | 8    | nblocks: the disk's block count at this point                           |
| 16     | 8    | count: entries stored (sum of the segments' entries)                    |
| 24     | 4    | segment shift s: a segment covers blocks [i << s, (i + 1) << s)         |
| 28     | 4    | segments stored                                                         |
| 32     | ...  | segments, by increasing index i:                                        |
|        | 8    |   i                                                                     |
|        | 8    |   entries: FULL the segment's block count; DELTA its changed blocks    |
|        | 8    |   frame length L                                                        |
|        | 16   |   BLAKE3 of the frame, first 16 bytes                                   |
|        | L    |   zstd frame: FULL refs u64[entries]; DELTA blocks u64[entries]         |
|        |      |   (strictly increasing, in the segment) then refs u64[entries]         |

A FULL segment whose refs are all ZERO is not stored; a DELTA segment without entries neither.
Major version 1 (read only) is one frame for the whole disk: header kind, salt, nblocks, count
(24 bytes) then the zstd frame of FULL refs u64[nblocks] or DELTA blocks u64[count] then refs.

Ref 0 is ZERO (an all-zero block, never stored). A DELTA applies on top of its parent's resolved map
resized to `nblocks` (blocks past the parent's end start as ZERO).
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import blake3
import numpy as np
import zstandard

from ..errors import DamageError, FormatError
from .config import MIN_BLOCK
from .crypto.null import NULL_SEALER, Sealer
from .envelope import CHECKSUM_SIZE, HEADER, SEALED, Binding, seal, unseal
from .formats import BLOCK_MAP, BLOCK_MAP_V1
from .points import MAX_CAPACITY
from .safefile import MAP_MAX, checked_name
from .store import Store

FULL, DELTA = 0, 1
HEAD = struct.Struct("<B7xQQ")  # version 1, as read: the salt is skipped
HEAD2 = struct.Struct("<B7sQQII")  # kind, salt, nblocks, count, segment shift, segments
SEGMENT = struct.Struct("<QQQ16s")  # index, entries, frame length, BLAKE3[:16] of the frame
SALT_SIZE = 7
SEGMENT_SHIFT = 20  # the windows commands see are of the map segments' size
SEGMENT_BLOCKS = 1 << SEGMENT_SHIFT
MIN_SHIFT, MAX_SHIFT = 3, 24  # what a reader accepts (small ones serve tests)
U64 = np.dtype("<u8")
# a zstd block regenerates at most 128 KiB from at least 4 bytes (3-byte header, 1 RLE byte): a
# header claiming more entries than the frame can hold is damage, caught before allocating them
MAX_RATIO = (128 << 10) // 4
MAX_BLOCKS = MAX_CAPACITY // MIN_BLOCK
READ_AHEAD = 4 << 20  # bytes a streamed map is read by
BATCH_BYTES = 16 << 20  # bytes of maps a MapBatch holds before it writes them (memory)


@dataclass(frozen=True)
class BlockMap:
    kind: int
    nblocks: int
    # DELTA: the changed blocks; FULL: None (refs holds every block) or the blocks of the
    # non-ZERO refs (sparse: a backup builds a FULL map from what it read, not the disk)
    blocks: np.ndarray | None
    refs: np.ndarray

    @classmethod
    def full(cls, refs: np.ndarray) -> "BlockMap":
        return cls(FULL, len(refs), None, refs.astype(U64, copy=False))

    @classmethod
    def sparse_full(cls, nblocks: int, blocks: np.ndarray, refs: np.ndarray) -> "BlockMap":
        """A FULL map whose sorted `blocks` hold `refs` (ZERO entries may be among them)."""
        keep = refs != 0
        return cls(FULL, nblocks, blocks[keep].astype(U64), refs[keep].astype(U64))

    @classmethod
    def delta(cls, nblocks: int, blocks: np.ndarray, refs: np.ndarray) -> "BlockMap":
        return cls(DELTA, nblocks, blocks.astype(U64, copy=False), refs.astype(U64, copy=False))

    def segments(self, shift: int = SEGMENT_SHIFT) -> Iterator[tuple[int, np.ndarray | None,
                                                                  np.ndarray]]:
        """(index, blocks, refs) of each segment that holds an entry: FULL (blocks None) the
        segment's refs, all of them; DELTA its entries."""
        size = 1 << shift
        if self.kind == FULL and self.blocks is None:
            for index in range(-(-self.nblocks // size)):
                window = self.refs[index * size:(index + 1) * size]
                if window.any():
                    yield index, None, window
            return
        assert self.blocks is not None
        owner = self.blocks >> np.uint64(shift)
        cuts = np.flatnonzero(owner[1:] != owner[:-1]) + 1
        for lo, hi in zip(np.concatenate(([0], cuts)), np.concatenate((cuts, [len(owner)]))):
            if lo == hi:
                continue
            index = int(owner[lo])
            blocks, refs = self.blocks[lo:hi], self.refs[lo:hi]
            if self.kind == DELTA:
                yield index, blocks, refs
                continue
            window = np.zeros(min(size, self.nblocks - (index << shift)), U64)
            window[(blocks - np.uint64(index << shift)).astype(np.int64)] = refs
            yield index, None, window


def resize(refs: np.ndarray, nblocks: int) -> np.ndarray:
    """A copy of `refs` cut or zero-extended to `nblocks`."""
    out = np.zeros(nblocks, dtype=U64)
    keep = min(nblocks, len(refs))
    out[:keep] = refs[:keep]
    return out


def delta_between(parent: np.ndarray, child: np.ndarray) -> BlockMap:
    """The DELTA that turns `parent` into `child` (entries where they differ)."""
    base = resize(parent, len(child))
    changed = np.flatnonzero(base != child).astype(U64)
    return BlockMap.delta(len(child), changed, child[changed])


def nonzero_entries(windows: Iterator[tuple[int, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """(blocks, refs) of the non-ZERO entries of resolved windows (`resolve_windows`)."""
    blocks, refs = [np.zeros(0, U64)], [np.zeros(0, U64)]
    for first, window in windows:
        at = np.flatnonzero(window)
        blocks.append(at.astype(U64) + np.uint64(first))
        refs.append(window[at])
    return np.concatenate(blocks), np.concatenate(refs)


# -- bytes ------------------------------------------------------------------------------------
def encode(bmap: BlockMap, salt: bytes = b"", shift: int = SEGMENT_SHIFT,
           sealer: Sealer | None = None) -> bytes:
    """The sealed bytes (version 2) of `bmap`, built segment by segment; the payload sealed by
    `sealer` in an encrypted repository."""
    parts: list[bytes] = []
    count = 0
    for index, blocks, refs in bmap.segments(shift):
        compressor = zstandard.ZstdCompressor(level=3).compressobj()
        arrays = [refs] if blocks is None else [blocks, refs]
        frame = b"".join([compressor.compress(memoryview(np.ascontiguousarray(a, U64)).cast("B"))
                          for a in arrays] + [compressor.flush()])
        parts += [SEGMENT.pack(index, len(refs), len(frame), _digest(frame)), frame]
        count += len(refs)
    head = HEAD2.pack(bmap.kind, salt.ljust(SALT_SIZE, b"\0"), bmap.nblocks, count, shift,
                      len(parts) // 2)
    return seal(BLOCK_MAP, head + b"".join(parts), _binding(sealer))


def _binding(sealer: Sealer | None) -> Binding | None:
    return None if sealer is None else Binding(sealer, "map", b"")


def _digest(frame: bytes | memoryview) -> bytes:
    return blake3.blake3(frame).digest()[:16]


def decode(payload: bytes, what: str) -> BlockMap:
    """A version 1 payload, checked."""
    kind, nblocks, count = HEAD.unpack_from(payload)
    _check_head(kind, nblocks, count, what)
    if kind == FULL and count != nblocks:
        raise DamageError(f"{what}: block map header is inconsistent")
    width = 1 if kind == FULL else 2
    arrays = _decompress(memoryview(payload)[HEAD.size:], count, width, what)
    if kind == FULL:
        return BlockMap.full(arrays[0])
    _check_blocks(arrays[0], 0, nblocks, what)
    return BlockMap.delta(nblocks, arrays[0], arrays[1])


def _check_head(kind: int, nblocks: int, count: int, what: str) -> None:
    if kind not in (FULL, DELTA) or count > nblocks or nblocks > MAX_BLOCKS:
        raise DamageError(f"{what}: block map header is inconsistent")


def _decompress(frame: memoryview, count: int, width: int, what: str) -> np.ndarray:
    """`width` arrays of `count` u64 from one zstd frame, exactly (rows of the result)."""
    if count * width * U64.itemsize > len(frame) * MAX_RATIO:
        raise DamageError(f"{what}: block map header claims {count} entries, more than its "
                          "body can hold")
    # decompressed straight into the array: a large map is not copied twice
    body = np.empty(count * width, dtype=U64)
    try:
        got = _read_into(frame, memoryview(body).cast("B"))
    except zstandard.ZstdError as exc:
        raise DamageError(f"{what}: block map does not decompress ({exc})") from None
    if got != body.nbytes:
        raise DamageError(f"{what}: block map body has the wrong length")
    return body.reshape(width, count)


def _check_blocks(blocks: np.ndarray, lo: int, hi: int, what: str) -> None:
    # neighbours compared as stored (u64), without a signed copy and its differences: a
    # forget checks thousands of small segments
    if len(blocks) and (blocks[0] < lo or blocks[-1] >= hi
                        or bool((blocks[1:] <= blocks[:-1]).any())):
        raise DamageError(f"{what}: delta block numbers are unsorted or out of range")


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


# -- streamed reading -------------------------------------------------------------------------
@dataclass
class Segment:
    """One stored segment of a map, decompressed only when `load`ed."""

    index: int
    entries: int
    load: Callable[[], tuple[np.ndarray | None, np.ndarray]]  # (DELTA blocks or None, refs)


@dataclass
class MapStream:
    """A map read front to back: its header, then its segments (`segments_at`, once)."""

    kind: int
    nblocks: int
    shift: int | None  # None: a version 1 map, held whole (`whole`), cut at any segment size
    segments: Iterator[Segment]
    whole: BlockMap | None = None

    def segments_at(self, shift: int) -> Iterator[Segment]:
        if self.whole is not None:
            return _loaded(self.whole, shift)
        if shift != self.shift:
            raise DamageError(f"a block map in segments of 2^{self.shift} blocks where segments "
                              f"of 2^{shift} are read: the map is damaged")
        return self.segments


class _Payload:
    """Sequential reads of a payload already in memory and checked (a sealed map, opened)."""

    def __init__(self, payload: bytes) -> None:
        self.payload, self.pos, self.body_end = payload, 0, len(payload)

    def read(self, n: int, what: str) -> bytes:
        if n > self.body_end - self.pos:
            raise DamageError(f"{what}: block map is truncated")
        self.pos += n
        return self.payload[self.pos - n:self.pos]

    def finish(self, what: str) -> None:
        pass


class _Source:
    """Sequential reads of a stored object, read ahead in large ranges and hashed on the way:
    at the end (`finish`) its checksum and its name (the BLAKE3 of all its bytes) are
    checked."""

    def __init__(self, store: Store, obj: str, size: int, name: str, first: bytes) -> None:
        self.store, self.obj, self.size, self.name = store, obj, size, name
        self.body_end = size - CHECKSUM_SIZE
        self.pos = 0  # bytes of the object handed out
        # read ahead: bytes from pos on are buffer[start:]; `first` came with the object's size
        self.buffer, self.start = first, 0
        self.hasher = blake3.blake3()

    def whole(self) -> bytes:
        """Every byte of the object (read from the start: none handed out yet)."""
        rest = self.size - len(self.buffer)
        return self.buffer + (self.store.get_range(self.obj, len(self.buffer), rest) if rest
                              else b"")

    def named(self) -> bool:
        """Whether the object's bytes hash to its name (all of them read again from the start;
        what `read` hands out next is not changed)."""
        hasher = blake3.blake3()
        for offset in range(0, self.size, READ_AHEAD):
            hasher.update(self.store.get_range(self.obj, offset,
                                               min(READ_AHEAD, self.size - offset)))
        return hasher.hexdigest() == self.name

    def read(self, n: int, what: str) -> bytes:
        if n > self.size - self.pos:
            raise DamageError(f"{what}: block map is truncated")
        if len(self.buffer) - self.start < n:
            ahead = self.pos + len(self.buffer) - self.start
            more = min(max(n, READ_AHEAD), self.size - ahead)
            self.buffer = self.buffer[self.start:] + self.store.get_range(self.obj, ahead, more)
            self.start = 0
        data = self.buffer[self.start:self.start + n]  # copies n bytes, not the buffer's rest
        self.start += n
        self.hasher.update(data)
        self.pos += n
        return data

    def finish(self, what: str) -> None:
        checksum = self.hasher.copy().digest()
        if self.read(CHECKSUM_SIZE, what) != checksum:
            raise DamageError(f"{what}: block map checksum mismatch (file is damaged)")
        if self.hasher.hexdigest() != self.name:
            raise DamageError(f"{what}: block map content does not match its name (damaged)")


def open_map(store: Store, name: str, sealer: Sealer = NULL_SEALER) -> MapStream:
    """Stream map `name`: its header now, its segments as they are iterated (each checked
    before it is used; the whole object's checksum and name once the last one is read). A
    sealed map (or any map where `sealer` is a repository's) is read and opened whole first:
    the envelope refuses a cleartext map planted in an encrypted repository and the reverse."""
    obj = map_object(name)
    what = f"{store.location}/{obj}"
    first, size = store.get_start(obj, READ_AHEAD)  # a small map whole, with one request
    if size > MAP_MAX:
        raise DamageError(f"{what}: block map is larger than any map can be ({size} bytes)")
    source = _Source(store, obj, size, name, first)
    head = source.read(HEADER.size, what) if size >= HEADER.size + CHECKSUM_SIZE else b""
    if not head:
        raise DamageError(f"{what}: truncated block map file ({size} bytes)")
    magic, major, _minor, flags, length = HEADER.unpack_from(head)
    if magic != BLOCK_MAP.magic:  # a map object is only ever one of ours
        raise DamageError(f"{what}: not a block map file (bad magic): the map is damaged")
    try:
        BLOCK_MAP.check_version(major, what)
    except FormatError:  # a newer repo-engine's map, unless its bytes are not its name's
        if not source.named():
            raise DamageError(f"{what}: block map content does not match its name "
                              "(damaged)") from None
        raise
    if size != HEADER.size + length + CHECKSUM_SIZE:
        raise DamageError(f"{what}: block map file has the wrong length (truncated or extended)")
    if major == BLOCK_MAP_V1.major or flags & SEALED or sealer.encrypted:
        payload = _checked(source.whole(), name, what, sealer)
        if major == BLOCK_MAP_V1.major:
            bmap = decode(payload, what)
            return MapStream(bmap.kind, bmap.nblocks, None, iter(()), bmap)
        return _segmented(_Payload(payload), what)
    if length < HEAD2.size:
        raise DamageError(f"{what}: block map header is truncated")
    return _segmented(source, what)


def _segmented(source: _Source | _Payload, what: str) -> MapStream:
    """A version 2 map from its payload's start on."""
    if source.body_end - source.pos < HEAD2.size:
        raise DamageError(f"{what}: block map header is truncated")
    kind, _salt, nblocks, count, shift, nsegs = HEAD2.unpack(source.read(HEAD2.size, what))
    _check_head(kind, nblocks, count, what)
    if not MIN_SHIFT <= shift <= MAX_SHIFT or nsegs > -(-nblocks >> shift):
        raise DamageError(f"{what}: block map header is inconsistent")
    return MapStream(kind, nblocks, shift,
                     _stream_segments(source, what, kind, nblocks, count, shift, nsegs))


def _checked(data: bytes, name: str, what: str, sealer: Sealer) -> bytes:
    """The payload of a map read whole: named by its bytes, its envelope checked (and opened
    when sealed)."""
    if blake3.blake3(data).hexdigest() != name:
        raise DamageError(f"{what}: block map content does not match its name (damaged)")
    return unseal(BLOCK_MAP, data, what, _binding(sealer))


def _loaded(bmap: BlockMap, shift: int) -> Iterator[Segment]:
    for index, blocks, refs in bmap.segments(shift):
        yield Segment(index, len(refs), lambda b=blocks, r=refs: (b, r))


def _stream_segments(source: _Source | _Payload, what: str, kind: int, nblocks: int,
                     count: int, shift: int, nsegs: int) -> Iterator[Segment]:
    last, total = -1, 0
    for _ in range(nsegs):
        index, entries, length, digest = SEGMENT.unpack(source.read(SEGMENT.size, what))
        lo = index << shift
        span = min(1 << shift, nblocks - lo) if index > last and lo < nblocks else 0
        if not span or not (entries == span if kind == FULL else 0 < entries <= span):
            raise DamageError(f"{what}: block map segment {index} is out of order or range")
        if length > source.body_end - source.pos:
            raise DamageError(f"{what}: block map is truncated")
        frame = source.read(length, what)
        if _digest(frame) != digest:
            raise DamageError(f"{what}: block map segment {index} checksum mismatch (damaged)")
        last, total = index, total + entries
        yield Segment(index, entries, lambda f=frame, e=entries, lo=lo, span=span:
                      _load_segment(f, kind, e, lo, span, what))
    if total != count or source.pos != source.body_end:
        raise DamageError(f"{what}: block map body has the wrong length")
    source.finish(what)


def _load_segment(frame: bytes, kind: int, entries: int, lo: int, span: int,
                  what: str) -> tuple[np.ndarray | None, np.ndarray]:
    arrays = _decompress(memoryview(frame), entries, 1 if kind == FULL else 2, what)
    if kind == FULL:
        return None, arrays[0]
    _check_blocks(arrays[0], lo, lo + span, what)
    return arrays[0], arrays[1]


def resolve_windows(chain: list[MapStream], near: np.ndarray | None = None,
                    shift: int = SEGMENT_SHIFT) -> Iterator[tuple[int, np.ndarray]]:
    """The resolved refs of a chain (its FULL base first, then each DELTA) as (first block,
    refs) windows of one segment's range, in block order; a window that no map of the chain
    stores a segment of is all ZERO and not yielded; with `near` (sorted block numbers) only
    the windows that hold one of them. The maps are streamed in lockstep: one segment of each
    is in memory at a time (the others' bytes are read and checked, not decompressed)."""
    only = None if near is None else sorted_unique(near >> np.uint64(shift))
    streams = [m.segments_at(shift) for m in chain]
    heads: list[Segment | None] = [next(s, None) for s in streams]
    nblocks = chain[-1].nblocks
    while True:
        live = [h.index for h in heads if h is not None]
        if not live:
            return
        index = min(live)
        first = index << shift
        wanted = first < nblocks and (only is None or bool(holds(only, np.array([index], U64))[0]))
        window = np.zeros(min(1 << shift, max(nblocks - first, 0)), U64) if wanted else None
        for k, (bmap, head) in enumerate(zip(chain, heads)):
            if window is not None and bmap.nblocks - first < len(window):
                window[max(bmap.nblocks - first, 0):] = 0  # cut by a smaller disk: ZERO after
            if head is None or head.index != index:
                continue
            if window is not None:
                blocks, refs = head.load()
                if blocks is None:
                    window[:len(refs)] = refs[:len(window)]
                else:
                    inside = blocks < np.uint64(first + len(window))
                    window[(blocks[inside] - np.uint64(first)).astype(np.int64)] = refs[inside]
            heads[k] = next(streams[k], None)
        if window is not None:
            yield first, window


def zip_windows(nblocks: int, *streams: Iterator[tuple[int, np.ndarray]]
                ) -> Iterator[tuple[int, list[np.ndarray]]]:
    """The windows below `nblocks` that any of `streams` (of `resolve_windows`, or of (first,
    anything) to ask for a window) yields, each with every stream's refs there cut or
    zero-extended to the window's length (ZERO where a stream yields none)."""
    heads = [next(s, None) for s in streams]
    while any(h is not None for h in heads):
        first = min(h[0] for h in heads if h is not None)
        length = min(SEGMENT_BLOCKS, nblocks - first)
        if length <= 0:
            return
        out = []
        for k, head in enumerate(heads):
            if head is not None and head[0] == first:
                out.append(head[1] if len(head[1]) == length else resize(head[1], length))
                heads[k] = next(streams[k], None)
            else:
                out.append(np.zeros(length, U64))
        yield first, out


def window_starts(blocks: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(first block, empty) of each window that holds one of sorted `blocks`: asks
    `zip_windows` for those windows."""
    for index in sorted_unique(blocks >> np.uint64(SEGMENT_SHIFT)):
        yield int(index) << SEGMENT_SHIFT, np.zeros(0, U64)


# -- objects ----------------------------------------------------------------------------------
def map_object(name: str) -> str:
    checked_name(name, 64, "block map")
    return f"maps/{name[:2]}/{name}.map"


def write_map(store: Store, bmap: BlockMap, *, salted: bool = False,
              doomed: Callable[[str], bool] | None = None, sealer: Sealer = NULL_SEALER) -> str:
    """Store a map durably under its content name; returns the name. `salted`, or when
    `doomed(name)` says that gc may delete the object of that name: under a new, random name
    (a salt in the header)."""
    name, data = encoded_map(bmap, salted=salted, doomed=doomed, sealer=sealer)
    if not store.exists(map_object(name)):
        store.put(map_object(name), data)
    return name


def encoded_map(bmap: BlockMap, *, salted: bool = False,
                doomed: Callable[[str], bool] | None = None,
                sealer: Sealer = NULL_SEALER) -> tuple[str, bytes]:
    """The name and stored bytes of a map (`write_map` says which name)."""
    data = encode(bmap, os.urandom(SALT_SIZE) if salted else b"", sealer=sealer)
    name = blake3.blake3(data).hexdigest()
    if not salted and doomed is not None and doomed(name):
        return encoded_map(bmap, salted=True, sealer=sealer)
    return name, data


class MapBatch:
    """Maps stored together: `add` names a map as `write_map` would and holds its bytes, `write`
    makes every map held durable at once (Store.put_many), before anything naming them is
    committed. A map stored already is not held. Past BATCH_BYTES held, `add` writes the
    batch so far, so memory stays bounded. Threads may add at once."""

    def __init__(self, store: Store, sealer: Sealer,
                 doomed: Callable[[str], bool] | None) -> None:
        self.store, self.sealer, self.doomed = store, sealer, doomed
        self._held: dict[str, bytes] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def add(self, bmap: BlockMap) -> str:
        name, data = encoded_map(bmap, doomed=self.doomed, sealer=self.sealer)
        if not self.store.exists(map_object(name)):
            with self._lock:
                self._bytes += len(data) if self._held.setdefault(name, data) is data else 0
                full = self._bytes >= BATCH_BYTES
            if full:
                self.write()
        return name

    def write(self) -> None:
        with self._lock:
            held, self._held, self._bytes = self._held, {}, 0
        if held:
            self.store.put_many([(map_object(name), data) for name, data in held.items()])


def read_map(store: Store, name: str, sealer: Sealer = NULL_SEALER) -> BlockMap:
    """Map `name` in memory: a FULL map as its non-ZERO entries (sparse), streamed."""
    stream = open_map(store, name, sealer)
    shift = stream.shift or SEGMENT_SHIFT
    if stream.kind == FULL:
        blocks, refs = nonzero_entries(resolve_windows([stream], shift=shift))
        return BlockMap.sparse_full(stream.nblocks, blocks, refs)
    parts = [s.load() for s in stream.segments_at(shift)]
    blocks = np.concatenate([b for b, _ in parts if b is not None] or [np.zeros(0, U64)])
    refs = np.concatenate([r for _, r in parts] or [np.zeros(0, U64)])
    return BlockMap.delta(stream.nblocks, blocks, refs)


def map_refs(store: Store, name: str, sealer: Sealer = NULL_SEALER) -> np.ndarray:
    """The distinct non-ZERO refs map `name` holds, streamed (what reference counts count)."""
    stream = open_map(store, name, sealer)
    parts = [unique_nonzero(segment.load()[1])
             for segment in stream.segments_at(stream.shift or SEGMENT_SHIFT)]
    return unique_nonzero(np.concatenate(parts)) if parts else np.zeros(0, U64)


def unique_nonzero(refs: np.ndarray) -> np.ndarray:
    """The distinct non-ZERO values of `refs`, sorted."""
    return sorted_unique(np.sort(refs[refs != 0]))  # zeros out first: a sparse disk sorts little


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """The distinct values of sorted `values`."""
    # not np.unique: it imports numpy.ma (8 ms, every backup) only to ask if values is masked
    return values[np.concatenate(([True], values[1:] != values[:-1]))] if len(values) else values


def holds(sorted_values: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Which of `values` are in `sorted_values` (np.isin without importing numpy.ma, and
    without sorting a large set again for each batch looked up in it)."""
    return find_sorted(sorted_values, values)[1]


# From this many keys on, a table outgrows the CPU's caches: a binary search for each of keys in
# random order misses the cache on most of its steps, while keys in ascending order walk the
# lines the previous search loaded (2^17 random keys in a table of 100 M: 277 ms, sorted first
# 73 ms; at 10 M, 165 and 29 ms). verify looks the `ids` table's refs up in hash order.
SORT_FIRST = 1 << 20


def find_sorted(sorted_keys: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position in `sorted_keys`, found) of each of `keys`: a binary search each, in
    ascending order of the keys when the table is large."""
    if not len(sorted_keys):
        return np.zeros(len(keys), np.int64), np.zeros(len(keys), bool)
    if len(sorted_keys) < SORT_FIRST or not (keys[1:] < keys[:-1]).any():
        return _found(sorted_keys, keys)
    order = np.argsort(keys)
    pos, found = np.empty(len(keys), np.int64), np.empty(len(keys), bool)
    pos[order], found[order] = _found(sorted_keys, keys[order])
    return pos, found


def _found(sorted_keys: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pos = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return pos, sorted_keys[pos] == keys
