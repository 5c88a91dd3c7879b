"""A passphrase's key derived ahead, while the repository is being opened.

Unlocking a passphrase slot runs scrypt (about half a second, by design) and can only start once
the slot was read from the store, which first needs the store's client loaded and a few
requests answered: run one after the other, a command waits for both. The scrypt call releases
the GIL, so it can run on another core meanwhile, if its inputs are known in advance: a host
that opened the repository with a passphrase keeps a copy of the slot that opened (a slot
holds no secret: its salt, scrypt parameters and wrapped key are in the store for anyone who
can read it) in its cache base, under a name derived from the location, and the next command
whose passphrase is at hand without asking (a file or the environment, never a prompt) starts
deriving at once from that copy.

Nothing is trusted from the copy: it is read with the slot's own checks (checksum, scrypt
bounds), and a derived key is used only by `ScryptParams.derive` for exactly the parameters,
salt and passphrase of a slot read from the store. A copy that is stale (the slot was replaced),
damaged or belongs to another repository costs one derivation's CPU time, nothing else.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING

import blake3

from ...errors import RepoError
from ..atomic import write_atomic
from ..safefile import DIR_MODE, read_limited
from .null import MAX_SLOT_SIZE

if TYPE_CHECKING:
    from .slots import ScryptParams

DIRECTORY = "unlock"
_pending: dict[tuple, Future] = {}  # by (scrypt parameters, salt, passphrase)
_lock = threading.Lock()


def location_name(location: str) -> str:
    """A file name for `location` (32 hex digits) among this host's notes of locations."""
    # a local path may hold bytes that are not UTF-8 (as surrogates): its bytes, as the OS has them
    return blake3.blake3(os.fsencode(location)).hexdigest()[:32]


def hint_file(base: Path, location: str) -> Path:
    """Where this host keeps the copy of the slot that last opened `location`."""
    return base / DIRECTORY / f"{location_name(location)}.slot"


def start(hint: Path, passphrase: Callable[[], bytes]) -> None:
    """Derive, in the background, the key of the slot copied at `hint` (if any) for
    `passphrase`, which must not ask anyone. A failure here is silent: the unlock then runs as
    it would without a copy, and reports what is wrong itself."""
    record = _copy(hint)
    if record is None:
        return
    from .slots import decode_slot  # loads cryptography: only a host with a copy gets here

    try:
        slot, secret = decode_slot(record, str(hint)), passphrase()
    except RepoError:
        return
    key = (slot.kdf, slot.salt, secret)
    if slot.kdf is None or key in _pending:  # started already: the command, then the opening
        return
    done: Future = Future()
    try:
        threading.Thread(target=_derive, args=(done, *key), name="derive-ahead",
                         daemon=True).start()
    except RuntimeError:  # no thread to be had: the unlock derives, as without a copy
        return
    with _lock:
        _pending.setdefault(key, done)


def _copy(hint: Path) -> bytes | None:
    """The record at `hint`, read as the engine reads its own files (a regular file, not through
    a symlink, never blocking, bounded); None when there is none to read."""
    try:
        return read_limited(hint, MAX_SLOT_SIZE)
    except (OSError, RepoError):
        return None


def _derive(done: Future, params: ScryptParams, salt: bytes, secret: bytes) -> None:
    try:
        done.set_result(params.compute(secret, salt))
    except BaseException as exc:  # noqa: BLE001 - the unlock that takes it derives again
        done.set_exception(exc)


def take(params: "ScryptParams", salt: bytes, passphrase: bytes) -> Future | None:
    """The derivation started ahead for these inputs, if one was (each is used once)."""
    with _lock:
        return _pending.pop((params, salt, passphrase), None)


def remember(hint: Path, slot_record: bytes) -> None:
    """Keep `slot_record` (an encoded slot that opened the repository) as the copy at `hint`;
    best effort: a cache that cannot be written only loses the head start."""
    if _copy(hint) == slot_record:
        return
    try:
        # the cache base owner-only when it is made here, as for a repository's cache
        hint.parent.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        hint.parent.mkdir(mode=DIR_MODE, exist_ok=True)
        write_atomic(hint, slot_record)
    except OSError:
        pass
