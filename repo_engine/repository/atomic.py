"""Durable file writes: every file the repository keeps is written through here.

Write order (docs/FORMAT.md, "Write and read ordering"): data goes to a temporary file in the
destination's directory, is fsynced, renamed over the final name, and the directory is fsynced, so a
crash leaves either the old state or the complete new file, never a torn one. Files are created
owner-only (safefile.FILE_MODE).
"""

from __future__ import annotations

import os
from pathlib import Path

from .safefile import FILE_MODE


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(final: Path) -> Path:
    return final.with_name(f".tmp-{os.getpid()}-{os.urandom(4).hex()}-{final.name}")


def write_all(fd: int, data: bytes) -> None:
    """os.write until all of `data` is written (a write may take only part of it)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def write_atomic(final: Path, data: bytes, *, overwrite: bool = True) -> None:
    """Write `data` to `final` durably and atomically."""
    tmp = temp_name(final)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    publish(tmp, final, overwrite=overwrite)


def publish(tmp: Path, final: Path, *, overwrite: bool = True) -> None:
    """Rename an fsynced temporary file to its final name and make the rename durable."""
    try:
        if overwrite:
            os.replace(tmp, final)
        else:
            os.link(tmp, final)
            tmp.unlink()
    except FileExistsError:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)
