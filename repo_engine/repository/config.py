"""The repository config: the object `config`, a sealed JSON document (envelope.py, magic CONFIG).

Fields: `repo_id` (hex, 16 bytes), `chunk_key` (hex, 32 bytes: the BLAKE3 key of chunk ids;
empty in an encrypted repository, whose keyring holds it),
`block_size` (bytes, power of two, 16 KiB..4 MiB), `compression_level` (zstd, 1..19), `max_chain`
(maps per chain before a synthetic full; 1..1000 at init), `pack_size` (target pack bytes; up to
1 GiB at init), `created` (ISO time),
`shared` (many hosts write the repository, through its journal; such a config is written with
major version 2, which versions that know one writer refuse), `encryption` (empty, or
ENCRYPTION: every object is sealed (repository/crypto/); such a repository is always shared and
its config is written with major version 3, which versions without encryption refuse).

The config of an encrypted repository holds no secret and is read before the keys are: its
`digest` is bound in the keyring, so that a config changed in the store is refused once the
keyring is open.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import blake3

from ..errors import DamageError, NotARepository, UsageError
from .envelope import read_sealed, write_sealed
from .formats import CONFIG, ENCRYPTED_CONFIG, SHARED_CONFIG
from .safefile import CONFIG_MAX
from .store import ObjectMissing, Store

CONFIG_NAME = "config"

MIN_BLOCK, MAX_BLOCK = 16 * 1024, 4 * 1024 * 1024
DEFAULT_BLOCK = 64 * 1024
# zstd 1, as Proxmox Backup Server uses: bench/README.md measures 2.7 % more bytes than level 3
# for 10 % less backup time on a 2-core machine
DEFAULT_LEVEL = 1
MAX_LEVEL = 19
DEFAULT_MAX_CHAIN = 30
DEFAULT_PACK_SIZE = 32 * 1024 * 1024
# Bounds a new repository is made within (one read before they existed keeps its settings): a
# restore resolves up to max_chain maps, and a pack is written and repacked whole
MAX_MAX_CHAIN = 1000
MAX_PACK_SIZE = 1 << 30
ENCRYPTION = "aes-256-gcm"  # the one scheme (repository/crypto/cipher.py)


@dataclass(frozen=True)
class RepoConfig:
    repo_id: str
    chunk_key: str
    block_size: int = DEFAULT_BLOCK
    compression_level: int = DEFAULT_LEVEL
    max_chain: int = DEFAULT_MAX_CHAIN
    pack_size: int = DEFAULT_PACK_SIZE
    created: str = ""
    shared: bool = False
    encryption: str = ""

    @property
    def key_bytes(self) -> bytes:
        return bytes.fromhex(self.chunk_key)

    def validate(self) -> None:
        bs = self.block_size
        if bs & (bs - 1) or not MIN_BLOCK <= bs <= MAX_BLOCK:
            raise UsageError(f"block size {bs} must be a power of two from 16KiB to 4MiB")
        if not 1 <= self.compression_level <= MAX_LEVEL:
            raise UsageError(f"compression level {self.compression_level} must be 1..{MAX_LEVEL}")
        if self.max_chain < 1:
            raise UsageError(f"max chain {self.max_chain} must be at least 1")
        if not isinstance(self.shared, bool):
            raise UsageError(f"shared must be true or false, not {self.shared!r}")
        if self.pack_size < bs:
            raise UsageError(f"pack size {self.pack_size} must be at least the block size")
        self._validate_keys()

    def _validate_keys(self) -> None:
        if self.encryption not in ("", ENCRYPTION):
            raise UsageError(f"encryption {self.encryption!r} is not supported")
        if self.encryption and not (self.shared and self.chunk_key == ""):
            raise UsageError("an encrypted repository is shared and keeps no chunk key in its "
                             "config")
        if not self.encryption and len(self.key_bytes) != 32:
            raise ValueError("the chunk key is not 32 bytes")

    @property
    def digest(self) -> bytes:
        """BLAKE3 of the config as written (what an encrypted repository's keyring binds)."""
        return blake3.blake3(_payload(self)).digest()

    @classmethod
    def new(cls, **settings: int | bool | str) -> "RepoConfig":
        config = cls(
            repo_id=os.urandom(16).hex(),
            chunk_key="" if settings.get("encryption") else os.urandom(32).hex(),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **settings,
        )
        config.validate()
        config._check_new()
        return config

    def _check_new(self) -> None:
        if self.max_chain > MAX_MAX_CHAIN:
            raise UsageError(f"max chain {self.max_chain} must be 1..{MAX_MAX_CHAIN}")
        if self.pack_size > MAX_PACK_SIZE:
            raise UsageError(f"pack size {self.pack_size} must be at most 1GiB "
                             f"({MAX_PACK_SIZE} bytes)")


def _payload(config: RepoConfig) -> bytes:
    return json.dumps(asdict(config), sort_keys=True).encode()


def write_config(store: Store, config: RepoConfig) -> None:
    fmt = ENCRYPTED_CONFIG if config.encryption else SHARED_CONFIG if config.shared else CONFIG
    write_sealed(store, CONFIG_NAME, fmt, _payload(config), if_absent=True)


def read_config(store: Store) -> RepoConfig:
    what = f"{store.location}/{CONFIG_NAME}"
    try:
        payload = read_sealed(store, CONFIG_NAME, CONFIG, CONFIG_MAX)
    except ObjectMissing:
        raise NotARepository(f"{store.location} is not a repo-engine repository (no config file); "
                             f"to create one there: repo-engine init {store.location}") from None
    try:
        doc = json.loads(payload)
        config = RepoConfig(**{k: v for k, v in doc.items() if k in RepoConfig.__dataclass_fields__})
        config.validate()
    except (UsageError, TypeError, ValueError, AttributeError) as exc:
        raise DamageError(f"{what}: the config holds invalid settings ({exc})") from None
    return config
