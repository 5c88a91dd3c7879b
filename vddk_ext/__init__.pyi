from collections.abc import Iterator, Sequence
from os import PathLike
from types import TracebackType
from typing import Literal, Protocol

from typing_extensions import Buffer

API_VERSION: int

class DiskError(OSError):
    """An I/O error on a disk; errno is set and the message names the disk."""

class VixError(DiskError):
    """A VDDK call failed; the message names the disk and the VixDiskLib function."""
    code: int        # VIX_ERROR_CODE: the low 16 bits, e.g. 14011
    vix_error: int   # the full 64-bit VixError
    text: str        # VDDK's GetErrorText, "" when it has none

VIX_E_FAIL: int
VIX_E_INVALID_ARG: int
VIX_E_FILE_NOT_FOUND: int
VIX_E_NOT_SUPPORTED: int
VIX_E_HOST_TCP_CONN_LOST: int
VIX_E_DISK_OUTOFRANGE: int

class Batch:
    """Blocks read by one BlockReader.__next__; implements the buffer protocol (its data)."""
    @property
    def count(self) -> int: ...
    @property
    def blocks(self) -> memoryview: ...   # format 'Q'
    @property
    def zero(self) -> memoryview: ...     # format 'B', 1 where the block is all zero
    @property
    def data(self) -> memoryview: ...     # format 'B', count * block_size bytes, read-only
    def block(self, k: int, /) -> memoryview: ...
    def __iter__(self) -> Iterator[tuple[int, memoryview | None]]: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...

class BlockReader:
    @property
    def buffers_allocated(self) -> int: ...
    @property
    def bytes_read(self) -> int: ...
    def __iter__(self) -> BlockReader: ...
    def __next__(self) -> Batch: ...
    def close(self) -> None: ...

class Disk:
    @property
    def capacity(self) -> int: ...
    @property
    def kind(self) -> Literal["file", "blockdev", "vddk"]: ...
    @property
    def path(self) -> str: ...
    @property
    def transport(self) -> str | None: ...   # VDDK's transport mode; None for local disks
    @property
    def closed(self) -> bool: ...
    @property
    def direct(self) -> bool: ...   # aligned writes bypass the page cache (open_local(direct=))
    def allocated_extents(self) -> list[tuple[int, int]]: ...
    def reader(
        self,
        block_size: int,
        blocks: Buffer,
        *,
        batch_bytes: int = 4 << 20,
        max_request: int = 1 << 20,
    ) -> BlockReader: ...
    def write_blocks(self, block_size: int, blocks: Buffer, data: Buffer, /) -> None: ...
    # chunk i at the next counts[i] of blocks (uint64 arrays), all with the GIL released once;
    # on a direct disk each run of consecutive blocks is one aligned write
    def write_chunks(
        self, block_size: int, blocks: Buffer, counts: Buffer, chunks: Sequence[Buffer], /
    ) -> None: ...
    def pwrite(self, offset: int, data: Buffer, /) -> None: ...
    def write_zeroes(self, offset: int, length: int, /) -> None: ...
    def flush(self) -> None: ...
    # another handle on the same local file, writable and direct as this one (a thread each)
    def reopen(self) -> Disk: ...
    def close(self) -> None: ...
    def __enter__(self) -> Disk: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]: ...

def on_fatal_signal(head: str, tail: str, exit_code: int) -> None: ...

def open_local(
    path: str | PathLike[str],
    *,
    writable: bool = False,
    create_size: int | None = None,
    direct: bool = False,
) -> Disk: ...

def open_vddk(
    path: str,
    *,
    server: str | None = None,
    port: int = 443,
    nfc_port: int = 0,
    thumbprint: str | None = None,
    user: str | None = None,
    password: str | bytes | None = None,
    cookie: str | bytes | None = None,
    vmx_spec: str | None = None,
    snapshot_ref: str | None = None,
    transports: str | None = None,
    libdir: str | PathLike[str] | None = None,
    config_file: str | None = None,
    readonly: bool = True,
    single_link: bool = False,
    async_reads: bool = True,
    queue_depth: int = 16,   # async reads in flight per handle, 1-64
) -> Disk: ...
def vddk_init(libdir: str | PathLike[str] | None = None, *, config_file: str | None = None) -> None: ...
def vddk_exit() -> None: ...
def vddk_info() -> dict[str, object]: ...
class _AccessCall(Protocol):
    """VixDiskLib_PrepareForAccess / EndAccess around a backup (vCenter then does not migrate the
    VM): True when VDDK was called, False when the library lacks the pair (a no-op)."""

    def __call__(
        self,
        *,
        server: str,
        port: int = 443,
        thumbprint: str | None = None,
        user: str | None = None,
        password: str | bytes | None = None,
        cookie: str | bytes | None = None,
        vmx_spec: str | None = None,
        identity: str = "repo-engine",
        libdir: str | PathLike[str] | None = None,
        config_file: str | None = None,
    ) -> bool: ...

vddk_prepare_for_access: _AccessCall
vddk_end_access: _AccessCall

__all__ = [
    "API_VERSION", "Batch", "BlockReader", "Disk", "DiskError", "VixError", "open_local",
    "open_vddk", "vddk_end_access", "vddk_exit", "vddk_info", "vddk_init",
    "vddk_prepare_for_access",
    "VIX_E_FAIL", "VIX_E_INVALID_ARG", "VIX_E_FILE_NOT_FOUND", "VIX_E_NOT_SUPPORTED",
    "VIX_E_HOST_TCP_CONN_LOST", "VIX_E_DISK_OUTOFRANGE",
]
