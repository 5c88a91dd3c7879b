"""Parsing and formatting of byte sizes and durations as users write them."""

from __future__ import annotations

import re

from .errors import UsageError

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(i?B?)\s*$", re.IGNORECASE)
_POWERS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5}


def parse_size(text: str | int) -> int:
    """Parse '64KiB', '4M', '1048576' into bytes (binary multiples)."""
    if isinstance(text, int):
        return text
    match = _SIZE_RE.match(text)
    if not match:
        raise UsageError(f"not a size: {text!r} (examples: 65536, 64KiB, 4MiB)")
    number, unit = int(match.group(1)), match.group(2).upper()
    return number * (1024 ** _POWERS[unit])


def format_size(n: float) -> str:
    """Human-readable binary size: 1.5 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
