"""scrub --no-key: check the stored bytes of an encrypted repository without its key.

A host that must not hold the key (the storage host, an offsite copy's keeper) can still find
damage: every object of an encrypted repository carries checksums of its stored (sealed) bytes.
Checked, each object whole, in worker threads (BLAKE3 releases the GIL):

- a pack (major 2): its bytes against its content name, header, footer, the trailer's checksum,
  and every chunk's sealed blob against its checksum in the cleartext table (packs.check_stored),
  so damage is named down to the chunk's offset;
- a block map, a point manifest, a journal entry: the envelope's magic, version, length and
  checksum (envelope.py); a checkpoint: its magic, version and the BLAKE3 footer over every
  byte before it (checkpoint.py); each hashed in pieces, so a large one costs no memory.

A pack is read whole (bounded: larger than any pack can be is damage, not read).

- a key slot, a keyring generation's record and its copy: the envelope, as above (their sealed
  content needs the key; a damaged keyring record is read from the other one meanwhile).

Neither the index nor any
cache is opened, and no lock or lease is written: the objects checked are immutable, and one
deleted by a gc meanwhile is counted as gone, not as damage. Authenticity (that the bytes are the
repository's own and whole chunks of the right ids) needs the key: `scrub` with it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import blake3

from ..errors import DamageError, RepoError
from ..repository.config import MAX_BLOCK
from ..repository.envelope import CHECKSUM_SIZE
from ..repository.envelope import HEADER as ENVELOPE
from ..repository.crypto.keyring import KEYRING_PREFIX
from ..repository.formats import BLOCK_MAP, CHECKPOINT, JOURNAL, KEYRING, POINT, SLOT, FileFormat
from ..repository.location import StoredRepository
from ..repository.packs import check_stored
from ..repository.store import ObjectInfo, ObjectMissing, Store
from ..units import mib_per_s

READ_STEP = 8 << 20  # a map or checkpoint is hashed in reads of this size (it can be large)
KINDS = ("keys", "packs", "maps", "points", "journal")


@dataclass
class StoredScrubReport:
    """What `scrub --no-key` checked and found: `damaged` holds one line per damaged object or
    chunk, each naming it."""

    objects: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    chunks_checked: int = 0
    bytes_read: int = 0
    gone: int = 0  # listed, then deleted before it was read (a gc meanwhile)
    skipped: list[str] = field(default_factory=list)  # not regular objects: never read
    seconds: float = 0.0
    mib_per_s: float = 0.0
    damaged: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damaged


@dataclass(frozen=True)
class _Checked:
    kind: str
    size: int
    chunks: int = 0
    damaged: tuple[str, ...] = ()
    gone: bool = False


def scrub_stored(repo: StoredRepository, *, workers: int = 2) -> StoredScrubReport:
    """Check every pack, map, manifest, journal entry and checkpoint of `repo` (module
    docstring), `workers` objects at a time."""
    started = time.monotonic()
    report = StoredScrubReport()
    # a pack ends with the chunk that took it past the pack size (a block at most, stored raw
    # or as a zstd frame barely larger); the margin is generous
    largest = 2 * (repo.config.pack_size + MAX_BLOCK)
    with ThreadPoolExecutor(workers) as pool:
        pending: deque[Future[_Checked]] = deque()
        for kind, info in _listed(repo.store, report.skipped):
            pending.append(pool.submit(_check, repo.store, kind, info, largest))
            while len(pending) >= workers * 2:  # a bounded number in flight: a listing can be long
                _collect(report, pending.popleft().result())
        for future in pending:
            _collect(report, future.result())
    report.seconds = round(time.monotonic() - started, 3)
    report.mib_per_s = mib_per_s(report.bytes_read, report.seconds)
    return report


def _listed(store: Store, skipped: list[str]) -> Iterator[tuple[str, ObjectInfo]]:
    for kind in KINDS:
        for info in store.list(f"{kind}/", skipped):
            yield kind, info


def _collect(report: StoredScrubReport, checked: _Checked) -> None:
    if checked.gone:
        report.gone += 1
        return
    report.objects[checked.kind] += 1
    report.chunks_checked += checked.chunks
    report.bytes_read += checked.size
    report.damaged.extend(checked.damaged)


def _check(store: Store, kind: str, info: ObjectInfo, largest_pack: int) -> _Checked:
    what = f"{store.location}/{info.name}"
    try:
        if kind == "keys":
            _check_key_record(store, info, what)
            return _Checked(kind, info.size)
        if kind != "packs":
            _check_summed(store, info, what, _FORMATS[kind] if kind != "journal" or
                          not info.name.endswith(".ckpt") else CHECKPOINT)
            return _Checked(kind, info.size)
        if info.size > largest_pack:
            raise DamageError(f"{what}: {info.size} bytes, more than any pack of this "
                              f"repository can be ({largest_pack}); not read")
        found = check_stored(store.get(info.name, limit=info.size), _pack_name(info.name), what)
        return _Checked(kind, info.size, found.chunks, tuple(found.damaged.values()))
    except ObjectMissing:
        return _Checked(kind, 0, gone=True)
    except RepoError as exc:
        return _Checked(kind, info.size, damaged=(str(exc),))


_FORMATS: dict[str, FileFormat] = {"maps": BLOCK_MAP, "points": POINT, "journal": JOURNAL}


def _check_key_record(store: Store, info: ObjectInfo, what: str) -> None:
    if info.name.startswith(KEYRING_PREFIX):
        try:
            _check_summed(store, info, what, KEYRING)
        except DamageError as exc:
            raise DamageError(f"{exc}; the generation's other record is read instead: run "
                              "'repo-engine key rotate' to write both anew") from None
    elif info.name.endswith(".slot"):
        _check_summed(store, info, what, SLOT)
    else:
        raise DamageError(f"{what}: not a key slot or keyring record")


def _pack_name(obj: str) -> str:
    """The content name of pack object `packs/xx/<name>.pack` (for another name the name check
    reports it)."""
    return obj.rsplit("/", 1)[-1].removesuffix(".pack")


def _check_summed(store: Store, info: ObjectInfo, what: str, fmt: FileFormat) -> None:
    """An object whose last CHECKSUM_SIZE bytes are the BLAKE3 of every byte before them: an
    envelope (whose length field must fit the size) or a checkpoint; its magic and version
    checked, hashed in reads of READ_STEP bytes (a block map or a checkpoint can be large)."""
    if info.size < ENVELOPE.size + CHECKSUM_SIZE:
        raise DamageError(f"{what}: truncated {fmt.name} ({info.size} bytes)")
    end = info.size - CHECKSUM_SIZE
    digest = blake3.blake3()
    for offset in range(0, end, READ_STEP):
        data = store.get_range(info.name, offset, min(READ_STEP, end - offset))
        if offset == 0:
            _check_head(data, info.size, fmt, what)
        digest.update(data)
    if digest.digest() != store.get_range(info.name, end, CHECKSUM_SIZE):
        raise DamageError(f"{what}: {fmt.name} checksum mismatch (damaged or tampered with)")


def _check_head(head: bytes, size: int, fmt: FileFormat, what: str) -> None:
    magic, major, _minor, _flags, length = ENVELOPE.unpack_from(head)
    if magic != fmt.magic:
        raise DamageError(f"{what}: not a {fmt.name} (bad magic)")
    fmt.check_version(major, what)
    if fmt is not CHECKPOINT and ENVELOPE.size + length + CHECKSUM_SIZE != size:
        raise DamageError(f"{what}: {fmt.name} has the wrong length (truncated or extended)")
