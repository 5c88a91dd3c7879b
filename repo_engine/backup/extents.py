"""Changed extents (the QueryChangedDiskAreas shape: byte `(offset, length)` runs) and their
widening to whole, aligned blocks — all in numpy, never per block in Python."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..memory import require
from ..units import format_size

U64 = np.uint64


def as_extents(pairs: object) -> np.ndarray:
    """`(offset, length)` pairs as an (n, 2) int64 array, also when there are none."""
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


# VMware's QueryChangedDiskAreas result as pyVmomi's JSON encoder writes it (the `_vimtype` tags
# are optional; a disk is covered by one result or by the list of successive calls' results)
DISK_CHANGE_INFO = "vim.VirtualMachine.DiskChangeInfo"
DISK_CHANGE_EXTENT = "vim.VirtualMachine.DiskChangeInfo.DiskChangeExtent"
SHAPES = ("[[offset, length], ...] or VMware's DiskChangeInfo {startOffset, length, "
          "changedArea: [{start, length}, ...]} (or a list of them)")


# A change list is read whole, then decoded into Python lists: past this a file (/dev/zero, a
# wrong path) is refused before it takes every byte of memory. 1 GiB holds some 40 million
# [offset, length] pairs, every other MiB of a 64 TiB disk changed (README, --changed).
CHANGES_MAX = 1 << 30
# What decoding costs beyond the text itself (held twice, as bytes and as str), measured on
# CPython 3.11: an [offset, length] list with its integers some 200 bytes, a DiskChangeInfo
# extent's dict some 500. A file of the most compact pairs takes 25 times its size.
PAIR_COST, OBJECT_COST = 200, 512


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_extent(offset: int, length: int, capacity: int, what: str, label: str) -> None:
    if offset < 0 or length < 0:
        raise UsageError(f"{what}: {label} [{offset}, {length}] has a negative offset or length")
    if offset + length > capacity:
        raise UsageError(f"{what}: {label} [{offset}, {length}] ends at {offset + length}, "
                         f"beyond the disk's capacity of {capacity} bytes")


def _pairs(doc: list, capacity: int, what: str) -> list[list[int]]:
    for i, item in enumerate(doc):
        if not isinstance(item, list) or len(item) != 2 or not all(map(_is_int, item)):
            raise UsageError(f"{what}: entry {i} is not an [offset, length] pair of integers")
        _check_extent(item[0], item[1], capacity, what, f"entry {i}")
    return doc


def _field(obj: dict, name: str, what: str, label: str) -> int:
    value = obj.get(name)
    if not _is_int(value) or value < 0:
        raise UsageError(f"{what}: {label}: {name} is missing or not a non-negative integer "
                         f"(expected {SHAPES})")
    return value


def _object(obj: object, vimtype: str, what: str, label: str) -> dict:
    """`obj` as a dict whose `_vimtype`, if any, is `vimtype`."""
    if not isinstance(obj, dict):
        raise UsageError(f"{what}: {label} is not an object (expected {SHAPES})")
    found = obj.get("_vimtype", vimtype)
    if found != vimtype:
        raise UsageError(f"{what}: {label}: _vimtype is {str(found)[:80]!r}, expected {vimtype}")
    return obj


def _change_area(area: object, span: tuple[int, int], capacity: int, what: str,
                 label: str) -> list[int]:
    area = _object(area, DISK_CHANGE_EXTENT, what, label)
    offset, length = _field(area, "start", what, label), _field(area, "length", what, label)
    _check_extent(offset, length, capacity, what, label)
    if offset < span[0] or offset + length > span[1]:
        raise UsageError(f"{what}: {label} [{offset}, {length}] lies outside the range "
                         f"[{span[0]}, {span[1]}) its DiskChangeInfo covers")
    return [offset, length]


def _change_info(info: object, capacity: int, what: str,
                 label: str) -> tuple[list[list[int]], tuple[int, int]]:
    """One DiskChangeInfo: its changed areas, and the byte range [start, end) it covers."""
    info = _object(info, DISK_CHANGE_INFO, what, label)
    start = _field(info, "startOffset", what, label)
    span = (start, start + _field(info, "length", what, label))
    areas = info.get("changedArea", [])
    if not isinstance(areas, list):
        raise UsageError(f"{what}: {label}: changedArea is not a list")
    return [_change_area(area, span, capacity, what, f"{label} changedArea {j}")
            for j, area in enumerate(areas)], span


def _change_infos(infos: list, capacity: int, what: str) -> list[list[int]]:
    """Successive DiskChangeInfo results; together they must cover the whole disk, since what
    they leave out is not known to be unchanged."""
    pairs: list[list[int]] = []
    covered: list[list[int]] = []
    for i, info in enumerate(infos):
        areas, span = _change_info(info, capacity, what, f"DiskChangeInfo {i}")
        pairs += areas
        covered.append([min(end, capacity) for end in span])   # a span may run past the end
    starts, ends = merge_ranges(*np.array(covered, dtype=np.int64).reshape(-1, 2).T)
    if capacity and not (len(starts) == 1 and starts[0] == 0 and ends[0] >= capacity):
        gap = 0 if not len(starts) or starts[0] > 0 else int(ends[0])
        raise UsageError(f"{what}: the DiskChangeInfo results do not cover the disk (nothing "
                         f"is known from byte {gap} of {capacity}): query QueryChangedDiskAreas "
                         "again from startOffset + length until the capacity is reached")
    return pairs


def parse_extents(doc: object, capacity: int, what: str) -> np.ndarray:
    """Validate a JSON-decoded change list (see SHAPES); returns an (n, 2) int64 array."""
    if isinstance(doc, dict):
        return as_extents(_change_infos([doc], capacity, what))
    if isinstance(doc, list) and doc and isinstance(doc[0], dict):
        return as_extents(_change_infos(doc, capacity, what))
    if isinstance(doc, list):
        return as_extents(_pairs(doc, capacity, what))
    raise UsageError(f"{what}: expected {SHAPES}")


def _read_capped(path: Path, what: str) -> bytes:
    """The bytes of `path`, refused past CHANGES_MAX without reading more than that: a regular
    file by its size, a stream (a pipe, /dev/zero) once it gave one byte more."""
    with open(path, "rb") as f:
        info = os.fstat(f.fileno())
        too_large = stat.S_ISREG(info.st_mode) and info.st_size > CHANGES_MAX
        data = b"" if too_large else f.read(CHANGES_MAX + 1)
    if too_large or len(data) > CHANGES_MAX:
        raise UsageError(f"{what} is larger than {format_size(CHANGES_MAX)}, the most a change "
                         "list may be")
    return data


def _decoding_cost(data: bytes) -> int:
    return 2 * len(data) + PAIR_COST * data.count(b"[") + OBJECT_COST * data.count(b"{")


def _decoded(data: bytes, what: str) -> object:
    """The JSON document in `data`, refused before decoding when it would not fit in memory."""
    require(_decoding_cost(data), f"decoding {what}",
            "merge its nearby extents into fewer, or back up without it (the disk is then read "
            "whole and only new data stored)")
    return json.loads(data.decode())


def load_extents(path: Path, capacity: int) -> np.ndarray:
    what = f"extents file {path}"
    try:
        doc = _decoded(_read_capped(path, what), what)
    except FileNotFoundError:
        raise UsageError(f"{what} does not exist") from None
    except OSError as exc:
        raise UsageError(f"{what} cannot be read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{what} is not valid JSON ({exc})") from None
    except ValueError:  # Python's guard against integers of thousands of digits
        raise UsageError(f"{what} holds a number of thousands of digits, which no offset or "
                         "length has") from None
    except RecursionError:
        raise UsageError(f"{what} is nested too deeply to be a change list "
                         f"(expected {SHAPES})") from None
    return parse_extents(doc, capacity, what)


def merge_ranges(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort and merge half-open ranges [start, end); empty ones vanish."""
    keep = ends > starts
    starts, ends = starts[keep], ends[keep]
    if not len(starts):
        return starts, ends
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], ends[order]
    reach = np.maximum.accumulate(ends)
    new_run = np.empty(len(starts), dtype=bool)
    new_run[0] = True
    new_run[1:] = starts[1:] > reach[:-1]
    run_ids = np.cumsum(new_run) - 1
    merged_ends = np.zeros(run_ids[-1] + 1, dtype=ends.dtype)
    np.maximum.at(merged_ends, run_ids, ends)
    return starts[new_run], merged_ends


def ranges_to_blocks(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """All block numbers in merged, sorted ranges [start, end), as one sorted u64 array."""
    lengths = (ends - starts).astype(np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=U64)
    offsets = np.repeat(starts.astype(np.int64) - np.concatenate(([0], np.cumsum(lengths)[:-1])),
                        lengths)
    return (np.arange(total, dtype=np.int64) + offsets).astype(U64)


def extents_to_blocks(extents: np.ndarray, block_size: int) -> np.ndarray:
    """Widen byte extents to the sorted, unique blocks they touch."""
    extents = as_extents(extents)
    nonempty = extents[extents[:, 1] > 0]
    first = nonempty[:, 0] // block_size
    last = (nonempty[:, 0] + nonempty[:, 1] + block_size - 1) // block_size
    return ranges_to_blocks(*merge_ranges(first, last))


def blocks_to_extents(blocks: np.ndarray, block_size: int, capacity: int) -> list[list[int]]:
    """Merge sorted block numbers into byte extents clipped to the capacity."""
    if not len(blocks):
        return []
    b = blocks.astype(np.int64)
    breaks = np.flatnonzero(np.diff(b) != 1)
    starts = b[np.concatenate(([0], breaks + 1))]
    ends = b[np.concatenate((breaks, [len(b) - 1]))] + 1
    return [[int(s) * block_size, min(int(e) * block_size, capacity) - int(s) * block_size]
            for s, e in zip(starts, ends)]
