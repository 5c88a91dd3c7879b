"""Where a repository named by a location lives on this host, and the work that can start as soon
as a command knows which repository it will open, before the engine's modules are loaded (a few
hundred milliseconds): this module loads nothing heavy, so that a command calls `prepare` first.

What starts early is the unlocking of an encrypted repository's keys (crypto/ahead.py): its
scrypt, from the copy of the key slot that last opened the location on this host, when the
passphrase is at hand without asking anyone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from .crypto import ahead
from .crypto.null import Passphrase, asks
from .store import S3_SCHEME
CACHE_ENV = "REPO_ENGINE_CACHE_DIR"
ENCRYPTED_MARKS = "encrypted"  # a directory of the cache base, beside the repositories' caches


def is_remote(location: str) -> bool:
    """Whether `location` names object storage rather than a local directory."""
    return location.startswith(S3_SCHEME)


def cache_base(cache_dir: Path | None = None,
               environ: Mapping[str, str] | None = None) -> Path:
    """The directory under which this host keeps the caches of shared repositories."""
    environ = os.environ if environ is None else environ
    if cache_dir is not None:
        return cache_dir
    if environ.get(CACHE_ENV):
        return Path(environ[CACHE_ENV])
    xdg = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "repo-engine"


def _canonical(location: str) -> str:
    return location if is_remote(location) else os.path.abspath(location)


def unlock_hint(location: str, cache_dir: Path | None = None) -> Path:
    """Where this host keeps a copy of the key slot that last opened `location` with a
    passphrase (crypto/ahead.py)."""
    return ahead.hint_file(cache_base(cache_dir), _canonical(location))


def encrypted_mark(location: str, cache_dir: Path | None = None) -> Path:
    """The file that says this host found an encrypted repository at `location`: an
    unencrypted config there is refused (location.py), whatever repository id it claims."""
    return cache_base(cache_dir) / ENCRYPTED_MARKS / ahead.location_name(_canonical(location))


def prepare(location: str, cache_dir: Path | None = None,
            passphrase: Passphrase | None = None) -> Path:
    """Start what opening `location` will need and can be done now; returns the hint file of
    its passphrase (`unlock_hint`). Calling it again for the same location starts nothing
    more."""
    hint = unlock_hint(location, cache_dir)
    if passphrase is not None and not asks(passphrase):
        ahead.start(hint, passphrase)
    return hint
