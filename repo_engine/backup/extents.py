"""Changed extents (the QueryChangedDiskAreas shape: byte `(offset, length)` runs) and their
widening to whole, aligned blocks — all in numpy, never per block in Python."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import UsageError

U64 = np.uint64


def as_extents(pairs: object) -> np.ndarray:
    """`(offset, length)` pairs as an (n, 2) int64 array, also when there are none."""
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


def parse_extents(doc: object, capacity: int, what: str) -> np.ndarray:
    """Validate a JSON-decoded list of [offset, length]; returns an (n, 2) int64 array."""
    if not isinstance(doc, list):
        raise UsageError(f"{what}: expected a JSON list of [offset, length] pairs")
    for i, item in enumerate(doc):
        if (not isinstance(item, list) or len(item) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in item)):
            raise UsageError(f"{what}: entry {i} is not an [offset, length] pair of integers")
        offset, length = item
        if offset < 0 or length < 0:
            raise UsageError(f"{what}: entry {i} {item} has a negative offset or length")
        if offset + length > capacity:
            raise UsageError(f"{what}: entry {i} {item} ends at {offset + length}, beyond the "
                             f"disk's capacity of {capacity} bytes")
    return as_extents(doc)


def load_extents(path: Path, capacity: int) -> np.ndarray:
    what = f"extents file {path}"
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{what} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{what} is not valid JSON ({exc})") from None
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
