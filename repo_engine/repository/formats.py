"""Every magic number and format version of the repository, in one place.

DO NOT MODIFY a magic or lower a version: files already written carry them. A reader refuses a file
whose major version it does not know; a minor version bump must stay readable by older readers.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import FormatError


@dataclass(frozen=True)
class FileFormat:
    """One on-disk format: an 8-byte magic and the (major, minor) version this code writes."""

    name: str
    magic: bytes
    major: int
    minor: int = 0
    also_reads: tuple[int, ...] = ()  # other major versions this code reads

    def __post_init__(self) -> None:
        assert len(self.magic) == 8, self.name

    def check_version(self, major: int, what: str) -> None:
        if major != self.major and major not in self.also_reads:
            raise FormatError(
                f"{what}: {self.name} format version {major} is not supported "
                f"(this repo-engine reads version {self.major}); upgrade repo-engine"
            )


CONFIG = FileFormat("config", b"REcfg\x00\x01\x1a", 1, also_reads=(2, 3))
# a repository many hosts write (`shared`) has a config of major version 2, so that a version of
# repo-engine that knows only one writer refuses it instead of writing around the journal
SHARED_CONFIG = FileFormat("config", b"REcfg\x00\x01\x1a", 2, also_reads=(1, 3))
# an encrypted repository (always shared) has major version 3, so that a version of repo-engine
# without encryption refuses it instead of writing cleartext into it
ENCRYPTED_CONFIG = FileFormat("config", b"REcfg\x00\x01\x1a", 3, also_reads=(1, 2))
POINT = FileFormat("restore point", b"REpnt\x00\x01\x1a", 1)
# 2: the map is cut in segments of a block range, read and written one at a time (blockmap.py)
BLOCK_MAP = FileFormat("block map", b"REmap\x00\x01\x1a", 2, also_reads=(1,))
# 1, read only: one frame for the whole disk; minor 1: the 7 bytes after the kind hold a salt
BLOCK_MAP_V1 = FileFormat("block map", b"REmap\x00\x01\x1a", 1)
PACK = FileFormat("pack", b"REpak\x00\x01\x1a", 1, also_reads=(2,))
PACK_TRAILER = FileFormat("pack trailer", b"REtrl\x00\x01\x1a", 1, also_reads=(2,))
# an encrypted repository's packs (sealed chunks, a trailer partly sealed) have major version 2
SEALED_PACK = FileFormat("pack", b"REpak\x00\x01\x1a", 2, also_reads=(1,))
SEALED_PACK_TRAILER = FileFormat("pack trailer", b"REtrl\x00\x01\x1a", 2, also_reads=(1,))
LOCK = FileFormat("lock", b"RElck\x00\x01\x1a", 1)
VM_MARK = FileFormat("vsphere vm mark", b"REvmk\x00\x01\x1a", 1)
# minor 1: the record gives the holder's lease duration (`seconds`); minor 2: the random name
# of the holder's cache (`cache`); records of 1.0 and 1.1 are read too
LEASE = FileFormat("lease", b"RElse\x00\x01\x1a", 1, 2)
JOURNAL = FileFormat("journal entry", b"REjnl\x00\x01\x1a", 1)
CHECKPOINT = FileFormat("journal checkpoint", b"REckp\x00\x01\x1a", 1, also_reads=(2,))
# a checkpoint holding quarantined chunks (`QUAR` records) has major version 2, so that a version
# of repo-engine that does not know the record asks to be upgraded instead of calling the
# checkpoint damaged; one without stays version 1, readable by every version
CHECKPOINT_QUARANTINE = FileFormat("journal checkpoint", b"REckp\x00\x01\x1a", 2,
                                   also_reads=(1,))
# the key records of an encrypted repository (repository/crypto/)
SLOT = FileFormat("key slot", b"REslt\x00\x01\x1a", 1)
KEYRING = FileFormat("keyring", b"REkrg\x00\x01\x1a", 1)
ID_FILTER = FileFormat("chunk id filter", b"REflt\x00\x01\x1a", 1)
INDEX_VERSION = 5  # 2: catalog records carry a check and a commit sequence; 3: sealed counts;
# 4: the unfindable table (refs taken out of deduplication: locality reads it); 5: its values
# are the checks of their keys
