"""A repository's location, as a user writes it, opened or created as a `Repository`.

A location is a local directory or `s3://BUCKET/PREFIX`, a prefix of a bucket on an
S3-compatible server (store/; its endpoint and credentials come from `settings`, see
store/s3_settings.py). Where the host's local files (the LMDB cache of the index and catalog,
the lock files) live:

- a local repository of one writer keeps them in its own directory, as it always has;
- a shared repository (every `s3://` one, and a local one made with `init --shared`, which many
  hosts may write, e.g. over NFS) keeps them in this host's cache directory `BASE/<repo_id>`,
  created owner-only, where BASE is the first of: the `cache_dir` argument (`--cache-dir`),
  `$REPO_ENGINE_CACHE_DIR`, `$XDG_CACHE_HOME/repo-engine`, `~/.cache/repo-engine`. The cache is
  named by the repository's id so that one base never mixes two repositories' caches.

A repository in object storage is always shared: an `s3://` config that says otherwise is damage.
An encrypted repository (`init` with `encryption`) is always shared too, local or not: its index
and catalog then live in the store only as sealed journal entries, and this host's cleartext
cache stays in the cache directory, never in the repository. Its keys are unlocked with a
passphrase when it is opened (crypto/access.py). The cache directory of an encrypted repository
holds the file ENCRYPTED_MARK, and the cache base a mark for its location (opening.py,
`encrypted_mark`), made when this host first reads its config: a config swapped in the store for
an unencrypted one (which would make this host read planted cleartext and write cleartext) is
refused when either mark is there, also when it claims another repository id.
`init` refuses a prefix that holds any object, and opening a prefix that holds objects but no
config says it is not a repository (rather than that nothing is there).

An encrypted repository can also be opened without its passphrase (`open_stored`, for
`scrub --no-key` on a host that must not hold the key, e.g. the storage host): that gives its
config and a store that refuses every write, and no key slot is read, no index or cache touched,
no plaintext reachable; what it checks are the stored bytes (checksums) only.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DamageError, NotARepository, RepoError, TamperedError, UsageError
from .config import CONFIG_NAME, ENCRYPTION, RepoConfig, read_config
from .crypto.null import Passphrase
from .opening import CACHE_ENV, cache_base, encrypted_mark, is_remote, prepare
from .repo import Repository, check_repository_directory, new_directory
from .safefile import DIR_MODE
from .store import ObjectExists, Store, open_store
from .store.local import LocalStore

if TYPE_CHECKING:
    from .crypto.manage import KeyManager

ENCRYPTED_MARK = "encrypted"
# a recovery private key file that opens an encrypted repository without a KDF: its PEM and
# where it was read, or None when none was given
KeyFile = Callable[[], "tuple[bytes, str] | None"]


def cache_directory(repo_id: str, cache_dir: Path | None = None) -> Path:
    """This host's local directory for the shared repository `repo_id` (`Repository.create` and
    `attach` make it, owner-only); its base is made owner-only here when missing (the base of
    the default rule is the user's own cache)."""
    base = cache_base(cache_dir)
    try:
        base.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    except OSError as exc:  # the base is named by a setting: say which one to change
        reason = "not a directory" if exc.errno == errno.EEXIST else exc.strerror.lower()
        raise RepoError(f"cannot keep this host's cache of shared repositories in {base} "
                        f"({reason}); name a writable directory with --cache-dir or "
                        f"${CACHE_ENV}") from None
    return base / repo_id


def open_repository(location: str, *, settings: Any = None, cache_dir: Path | None = None,
                    rebuilding: bool = False, passphrase: Passphrase | None = None,
                    key_file: KeyFile | None = None) -> Repository:
    """The repository at `location` (with `settings` for an `s3://` one; None: from the
    environment and the settings file). `rebuilding`: for rebuild-index, which replaces this
    host's cache without opening it (it may be damaged). `passphrase`: asked for the
    passphrase of an encrypted repository (None: such a repository is refused); `key_file`:
    asked first for a recovery key file that opens it instead (None from it: none given)."""
    # a no-op when the command did it already; nothing to derive when a key file opens it
    hint = prepare(location, cache_dir, passphrase if key_file is None else None)
    store, config = _store_and_config(location, settings, cache_dir)
    local = cache_directory(config.repo_id, cache_dir) if config.shared else Path(location)
    keys = _closing_on_error(store, _open_keys, store, config, passphrase, local, key_file, hint)
    return _closing_on_error(store, partial(Repository.attach, claim=not rebuilding, **keys),
                             store, local, config)


def open_key_manager(location: str, *, settings: Any = None,
                     cache_dir: Path | None = None) -> KeyManager:
    """The keys of the encrypted repository at `location`, for the key commands (which open
    nothing else of it); an unencrypted repository has none."""
    store, config = _store_and_config(location, settings, cache_dir)
    if not config.encryption:
        store.close()
        raise RepoError(f"{location} is not encrypted: it has no keys to manage (a repository "
                        "is encrypted when it is created: repo-engine init --encryption)")
    from .crypto.manage import KeyManager  # an unencrypted repository never loads it
    return KeyManager(store, config.digest)


def _store_and_config(location: str, settings: Any,
                      cache_dir: Path | None) -> tuple[Store, RepoConfig]:
    """The store at `location` and the config it holds, refused when this host knows the
    repository as encrypted and the config says otherwise."""
    store = open_store(location, settings)
    config = _closing_on_error(store, _remote_config if is_remote(location) else _local_config,
                               store)
    _closing_on_error(store, _refuse_downgrade, config, store.location, cache_dir)
    if config.encryption:
        _closing_on_error(store, _remember_encrypted, encrypted_mark(store.location, cache_dir))
    return store, config


@dataclass(frozen=True)
class StoredRepository:
    """An encrypted repository opened without its key: its config and a store that reads only."""

    store: Store
    config: RepoConfig

    @property
    def location(self) -> str:
        return self.store.location

    def close(self) -> None:  # contextlib.closing(open_stored(...)) closes it
        self.store.close()


class _ReadOnlyStore:
    """A store whose writes are refused (RepoError): a repository opened without its key."""

    WRITES = frozenset({"put", "put_file", "delete", "abort_upload", "spool_dir"})

    def __init__(self, inner: Store) -> None:
        self._inner = inner
        self.location = inner.location

    def __getattr__(self, name: str) -> Any:
        if name in self.WRITES:
            raise RepoError(f"{self.location} was opened without its key, which allows no "
                            "change to it; open it with its passphrase")
        return getattr(self._inner, name)


def open_stored(location: str, *, settings: Any = None,
                cache_dir: Path | None = None) -> StoredRepository:
    """The encrypted repository at `location` without its key (the module docstring); an
    unencrypted one is refused (UsageError: it needs no key to be checked whole), as tampering
    when this host's cache (under `cache_dir`) knows it as encrypted."""
    store = open_store(location, settings)
    config = _closing_on_error(store, _remote_config if is_remote(location) else _local_config,
                               store)
    _closing_on_error(store, _refuse_downgrade, config, store.location, cache_dir)
    if not config.encryption:
        store.close()
        raise UsageError(f"{location} is not encrypted: every check of it needs no key, so run "
                         "'repo-engine scrub' without --no-key")
    return StoredRepository(_ReadOnlyStore(store), config)  # type: ignore[arg-type]


def init_repository(location: str, *, settings: Any = None, cache_dir: Path | None = None,
                    shared: bool = False, parents: bool = False,
                    passphrase: bytes | Passphrase | None = None, kdf: Any = None,
                    **config_settings: int) -> Repository:
    """Create a repository at `location`: a new or empty local directory (shared when asked), or
    an empty `s3://` prefix (always shared); encrypted with `passphrase` when one is given (then
    always shared; `kdf`: the scrypt parameters of its slot, None: the default). A callable
    `passphrase` is asked only once the location is known to be usable (a user at a terminal
    types nothing for a location that is then refused); a directory made for the repository is
    removed again when it fails."""
    remote = is_remote(location)
    if not (remote or shared or passphrase is not None):
        return Repository.init(Path(location), parents=parents, **config_settings)
    config = RepoConfig.new(shared=True, encryption=ENCRYPTION if passphrase is not None else "",
                            **config_settings)
    made: Path | None = None
    if remote:
        store = open_store(location, settings)
        _closing_on_error(store, _refuse_used_prefix, store)
    else:
        made = None if Path(location).exists() else Path(location)
        new_directory(Path(location), parents)
        store = LocalStore(Path(location))
    try:
        secret = passphrase() if callable(passphrase) else passphrase
    except BaseException:
        store.close()
        if made is not None:
            made.rmdir()
        raise
    return _closing_on_error(store, _create, store, config, cache_dir, secret, kdf)


def _closing_on_error(store: Store, fn: Any, *args: Any) -> Any:
    """`fn(*args)`; the store closed when it fails (nobody else holds it then)."""
    try:
        return fn(*args)
    except BaseException:
        store.close()
        raise


def _local_config(store: Store) -> RepoConfig:
    check_repository_directory(Path(store.location))
    return read_config(store)


def _remote_config(store: Store) -> RepoConfig:
    """The config of a repository in object storage, which must say it is shared."""
    try:
        config = read_config(store)
    except NotARepository:
        if _first_object(store) is None:
            raise NotARepository(f"there is no repository at {store.location} (nothing is stored "
                                 f"under it); to create one: repo-engine init "
                                 f"{store.location}") from None
        raise NotARepository(f"{store.location} holds objects but no repository config: it is "
                             "not a repo-engine repository (check the bucket and prefix)") from None
    if not config.shared:
        raise DamageError(f"{store.location}/{CONFIG_NAME} describes a repository of one local "
                          "writer, but a repository in object storage is always shared: the "
                          "config is damaged or was copied there from a local repository")
    return config


def _first_object(store: Store) -> str | None:
    return next((info.name for info in store.list("")), None)


def _refuse_used_prefix(store: Store) -> None:
    found = _first_object(store)
    if found == CONFIG_NAME:
        raise UsageError(f"{store.location} already holds a repository; use it, or choose "
                         "another prefix for a new one")
    if found is not None:
        raise UsageError(f"{store.location} already holds objects (e.g. {found!r}); a new "
                         "repository needs an empty prefix: choose another one")


def _create(store: Store, config: RepoConfig, cache_dir: Path | None,
            passphrase: bytes | None, kdf: Any) -> Repository:
    """A new shared repository; its config is written only if no other init got there first,
    after the keys of an encrypted one."""
    local = cache_directory(config.repo_id, cache_dir)
    keys: dict[str, Any] = {}
    if config.encryption:
        from .crypto.access import create_keys  # an unencrypted repository never loads it
        assert passphrase is not None
        made = create_keys(store, config.digest, passphrase, **({"params": kdf} if kdf else {}))
        keys = {"sealer": made.sealer, "chunk_key": made.chunk_key}
        _remember_encrypted(local / ENCRYPTED_MARK)
        _remember_encrypted(encrypted_mark(store.location, cache_dir))
    try:
        return Repository.create(store, local, config, **keys)
    except ObjectExists:
        raise UsageError(f"{store.location} already holds a repository: another init created "
                         "one there meanwhile") from None


def _open_keys(store: Store, config: RepoConfig, passphrase: Passphrase | None,
               local: Path, key_file: KeyFile | None = None,
               hint: Path | None = None) -> dict[str, Any]:
    """The sealer and chunk key of an encrypted repository (nothing for another one), which
    this host's cache `local` remembers is encrypted."""
    if not config.encryption:
        return {}
    pem = key_file() if key_file is not None else None
    if passphrase is None and pem is None:
        raise RepoError(f"{store.location} is encrypted: its passphrase is needed to open it")
    from .crypto.access import open_keys  # an unencrypted repository never loads it
    keys = open_keys(store, config.digest, passphrase, pem, hint)
    _remember_encrypted(local / ENCRYPTED_MARK)
    return {"sealer": keys.sealer, "chunk_key": keys.chunk_key}


def _remember_encrypted(mark: Path) -> None:
    mark.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    mark.touch(mode=0o600)


def _refuse_downgrade(config: RepoConfig, location: str, cache_dir: Path | None) -> None:
    """Refuse an unencrypted config where this host found an encrypted repository: in the
    repository of that id (its cache's mark) or at that location (a config with a new id)."""
    if config.encryption:
        return
    cache = cache_base(cache_dir) / config.repo_id
    if (cache / ENCRYPTED_MARK).exists():
        raise TamperedError(f"{location}/{CONFIG_NAME} says the repository is not encrypted, but "
                            f"this host knows it as encrypted (cache {cache}): the config was "
                            "replaced in the store; restore it from a copy")
    mark = encrypted_mark(location, cache_dir)
    if mark.exists():
        raise TamperedError(f"{location}/{CONFIG_NAME} is the config of an unencrypted "
                            f"repository, but this host found an encrypted one there (mark "
                            f"{mark}): the config was replaced in the store; restore it from a "
                            f"copy, or delete the mark if you replaced the repository yourself")
