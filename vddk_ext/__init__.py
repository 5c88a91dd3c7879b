"""vddk_ext: block I/O for disks, with the GIL released.

A thin layer over the C extension ``vddk_ext._vddk_ext``: it checks the
extension's API version at import, re-exports its names, and shuts VDDK down
(VixDiskLib_Exit) at interpreter exit when it was initialised. See README.md.
"""
import atexit as _atexit
import logging as _logging

from . import _vddk_ext

API_VERSION = 1

if getattr(_vddk_ext, "API_VERSION", None) != API_VERSION:
    raise ImportError(
        f"vddk_ext._vddk_ext has API version {getattr(_vddk_ext, 'API_VERSION', None)!r}, "
        f"this package needs {API_VERSION}; rebuild it with "
        "'python setup.py build_ext --inplace'"
    )

try:
    from ._vddk_ext import (
        Batch,
        BlockReader,
        Disk,
        DiskError,
        VixError,
        on_fatal_signal,
        open_local,
        open_vddk,
        vddk_end_access,
        vddk_exit,
        vddk_info,
        vddk_init,
        vddk_prepare_for_access,
    )
except ImportError as _exc:  # an extension built from older sources
    raise ImportError(f"vddk_ext._vddk_ext is older than this package ({_exc}); rebuild it "
                      "with 'python setup.py build_ext --inplace'") from None

# VixError.code values (VIX_ERROR_CODE) repo-engine tells apart; see VMWARE.md.
VIX_E_FAIL = 1
VIX_E_INVALID_ARG = 3
VIX_E_FILE_NOT_FOUND = 4
VIX_E_NOT_SUPPORTED = 6
VIX_E_HOST_TCP_CONN_LOST = 14011
VIX_E_DISK_OUTOFRANGE = 16007


def _exit_vddk() -> None:
    if vddk_info()["state"] != "initialised":
        return
    try:
        vddk_exit()
    except DiskError as exc:  # disks still open at exit: VDDK's Exit is skipped
        _logging.getLogger("repo_engine.vddk").warning("%s", exc.strerror)


_atexit.register(_exit_vddk)

__all__ = [
    "API_VERSION", "Batch", "BlockReader", "Disk", "DiskError", "VixError", "on_fatal_signal", "open_local",
    "open_vddk", "vddk_end_access", "vddk_exit", "vddk_info", "vddk_init",
    "vddk_prepare_for_access",
    "VIX_E_FAIL", "VIX_E_INVALID_ARG", "VIX_E_FILE_NOT_FOUND", "VIX_E_NOT_SUPPORTED",
    "VIX_E_HOST_TCP_CONN_LOST", "VIX_E_DISK_OUTOFRANGE",
]
