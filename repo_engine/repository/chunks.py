"""Chunk ids and chunk encoding: keyed BLAKE3 ids, zstd or raw storage, verified decoding."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import blake3
import zstandard

from ..errors import DamageError
from .packs import CODEC_RAW, CODEC_ZSTD

ZERO_REF = 0
T = TypeVar("T")
ChunkDecoder = Callable[[bytes | memoryview, int, int, bytes, memoryview | None],
                        bytes | memoryview | None]
# Store raw when zstd saves less than this share: decompressing for nothing costs restore time.
MIN_SAVING = 1 / 32


def _stored_form(data: bytes | memoryview, packed: bytes | memoryview
                 ) -> tuple[bytes | memoryview, int]:
    if len(packed) <= len(data) * (1 - MIN_SAVING):
        return packed, CODEC_ZSTD
    return bytes(data), CODEC_RAW  # a copy: `data` may be a view of a reused read buffer


class ChunkCodec:
    """Hashes, compresses and checks chunks; safe to share between threads."""

    def __init__(self, key: bytes, level: int) -> None:
        self._key = key
        self._level = level
        self._local = threading.local()

    def chunk_id(self, data: bytes | memoryview) -> bytes:
        return blake3.blake3(data, key=self._key).digest()

    def _of_thread(self, name: str, make: Callable[[], T]) -> T:
        """This thread's `name` (zstd's contexts are not shared between threads), made once."""
        made = getattr(self._local, name, None)
        if made is None:
            made = make()
            setattr(self._local, name, made)
        return made

    def _compressor(self) -> zstandard.ZstdCompressor:
        return self._of_thread("comp", lambda: zstandard.ZstdCompressor(level=self._level))

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        return self._of_thread("dec", zstandard.ZstdDecompressor)

    def encode(self, data: bytes | memoryview) -> tuple[bytes, int]:
        """Return (stored bytes, codec)."""
        return _stored_form(data, self._compressor().compress(data))

    def encode_many(self, chunks: list[memoryview]) -> list[tuple[bytes | memoryview, int]]:
        """`encode` for a batch in one call that holds the GIL released throughout (one GIL
        round trip per batch instead of one per chunk: less contention between workers). The
        compressed blobs are views of zstd's output buffer, not copies made under the GIL."""
        if not chunks:
            return []
        packed = self._compressor().multi_compress_to_buffer(chunks, threads=1)
        return [_stored_form(data, memoryview(packed[i])) for i, data in enumerate(chunks)]

    def decoder(self) -> ChunkDecoder:
        """`decode` for this thread as one call per chunk (blob, codec, raw length, chunk id,
        `into`), without a reason for a chunk that fails its checks (None: `decode` gives it).
        A restore decodes every chunk it writes: the per-chunk work of Python calls matters.
        Made once per thread: scrub and gc call `decode`, and so this, for every chunk."""
        return self._of_thread("decoder", self._new_decoder)

    def _new_decoder(self) -> ChunkDecoder:
        dctx, key, keyed_hash = self._decompressor(), self._key, blake3.blake3

        def decode(blob: bytes | memoryview, codec: int, raw_len: int, chunk_id: bytes,
                   into: memoryview | None) -> bytes | memoryview | None:
            try:
                if codec == CODEC_ZSTD:
                    data = _decompressed(dctx, blob, raw_len, into)
                elif codec == CODEC_RAW:
                    data = bytes(blob) if into is None or len(blob) > len(into) else \
                        _copied(blob, into)
                else:
                    return None
            except zstandard.ZstdError:
                return None
            if len(data) != raw_len or keyed_hash(data, key=key).digest() != chunk_id:
                return None
            return data
        return decode

    def decode(self, blob: bytes | memoryview, codec: int, raw_len: int, chunk_id: bytes,
               where: str, into: memoryview | None = None) -> bytes | memoryview:
        """Decompress and check the result against its id; DamageError names `where`. With
        `into` (writable, at least `raw_len` bytes) the chunk is decoded there, not into a
        buffer of its own, and the view of it returned."""
        data = self.decoder()(blob, codec, raw_len, chunk_id, into)
        if data is None:
            raise DamageError(f"{where}: {self._fault(blob, codec, raw_len)}")
        return data

    def _fault(self, blob: bytes | memoryview, codec: int, raw_len: int) -> str:
        """Why the chunk `decoder` refused is damaged."""
        if codec not in (CODEC_ZSTD, CODEC_RAW):
            return f"unknown chunk codec {codec}"
        if codec == CODEC_ZSTD:
            try:
                _decompressed(self._decompressor(), blob, raw_len, None)
            except zstandard.ZstdError as exc:
                return f"chunk does not decompress ({exc})"
        return "chunk content does not match its id (damaged data)"


def _decompressed(dctx: zstandard.ZstdDecompressor, blob: bytes | memoryview, raw_len: int,
                  into: memoryview | None) -> bytes | memoryview:
    size = zstandard.frame_content_size(blob)
    if size > raw_len:  # zstd would allocate what the frame claims, a terabyte if it says so
        raise zstandard.ZstdError(f"frame claims {size} bytes, more than the chunk's {raw_len}")
    if into is None or size != raw_len:
        # (a frame that does not say it holds raw_len bytes is damaged: decoded on its own,
        # it fails the length check)
        return dctx.decompress(blob, max_output_size=raw_len)
    out, got = into[:raw_len], 0
    with dctx.stream_reader(blob) as reader:
        while got < raw_len and (n := reader.readinto(out[got:])):
            got += n
    return out[:got]


def _copied(blob: bytes | memoryview, into: memoryview) -> memoryview:
    into[:len(blob)] = blob
    return into[:len(blob)]
