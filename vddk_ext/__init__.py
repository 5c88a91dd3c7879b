"""vddk_ext: block I/O for disks, with the GIL released.

A thin layer over the C extension ``vddk_ext._vddk_ext``: it checks the
extension's API version at import and re-exports its names. See README.md.
"""
from . import _vddk_ext

API_VERSION = 1

if getattr(_vddk_ext, "API_VERSION", None) != API_VERSION:
    raise ImportError(
        f"vddk_ext._vddk_ext has API version {getattr(_vddk_ext, 'API_VERSION', None)!r}, "
        f"this package needs {API_VERSION}; rebuild it with "
        "'python setup.py build_ext --inplace'"
    )

from ._vddk_ext import Batch, BlockReader, Disk, DiskError, open_local  # noqa: E402

__all__ = ["API_VERSION", "Batch", "BlockReader", "Disk", "DiskError", "open_local"]
