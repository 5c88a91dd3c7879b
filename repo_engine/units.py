"""Parsing and formatting of the quantities users read and write: sizes, rates, ratios, counts
and durations; whether a text they gave can be written out, and how a stored one is shown.

One unit system everywhere: binary (IEC) multiples, `KiB`, `MiB`, `GiB`, and rates in `MiB/s`.
Durations spell minutes `min` and months `mo`; a bare `m` is refused because `6m` reads as six
months to some and six minutes to others.
"""

from __future__ import annotations

import re

from .errors import UsageError

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(i?B?)\s*$", re.IGNORECASE)
_POWERS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5}
MIB = 1024 * 1024


# Python refuses to read an integer of more than 4,300 digits (a ValueError, its guard against
# quadratic conversions); no count or size a user means has more than this many
MAX_DIGITS = 20


def parse_size(text: str | int) -> int:
    """Parse '64KiB', '4M', '1048576' into bytes (binary multiples)."""
    if isinstance(text, int):
        return text
    match = _SIZE_RE.match(text)
    if not match or len(match.group(1)) > MAX_DIGITS:
        raise UsageError(f"not a size: {cut(text)!r} (examples: 65536, 64KiB, 4MiB)")
    number, unit = int(match.group(1)), match.group(2).upper()
    return number * (1024 ** _POWERS[unit])


_INT_RE = re.compile(r"\s*([-+]?)(\d+)\s*")


def capped_int(text: str | int, option: str, low: int, high: int) -> int:
    """An integer option from `low` to `high`: a text of too many digits is refused before
    Python converts it (see MAX_DIGITS)."""
    number = text if isinstance(text, int) else _whole_number(text)
    if number is None or not low <= number <= high:
        raise UsageError(f"{option}: {cut(str(text))!r} is not a whole number from {low} to "
                         f"{high}")
    return number


def _whole_number(text: str) -> int | None:
    match = _INT_RE.fullmatch(text)
    return int(match[1] + match[2]) if match and len(match[2]) <= MAX_DIGITS else None


# an error line names what it refused: a value longer than this (a 1 MB argument, a path of
# 4,096 characters) is shown by its head and its length (and the line cuts any word of twice
# this, a value no message cut)
SHOWN_MAX = 100


def cut(text: str, limit: int = SHOWN_MAX) -> str:
    """`text`, or its first `limit` characters and how many there were."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def format_size(n: float) -> str:
    """Human-readable binary size: 1.5 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def mib_per_s(n_bytes: float, seconds: float) -> float:
    """A rate in MiB/s, rounded to 0.1 (0 when no time passed)."""
    return round(n_bytes / seconds / MIB, 1) if seconds > 0 else 0.0


def format_rate(n_bytes: float, seconds: float) -> str:
    return f"{mib_per_s(n_bytes, seconds)} MiB/s"


def ratio(a: float, b: float) -> float | None:
    """a / b rounded to 0.001; None when b is 0 (there is nothing to compare with)."""
    return round(a / b, 3) if b else None


def format_ratio(value: float | None) -> str:
    """`2.5x`, or `-` for a ratio that has no meaning (nothing stored)."""
    return "-" if value is None else f"{value:g}x"


def plural(n: int, word: str, many: str | None = None) -> str:
    """`1 point`, `2 points`; `many` for irregular plurals (`1 VM`, `2 VMs` need none)."""
    return f"{n} {word if n == 1 else many or word + 's'}"


_BARE_M = re.compile(r"\d\s*m(?![a-z])", re.IGNORECASE)


def refuse_bare_m(text: str, option: str, example: str) -> None:
    """A duration unit `m` could mean minutes or months: ask for `min` or `mo`."""
    if _BARE_M.search(text):
        raise UsageError(f"{option} {text!r}: 'm' is ambiguous; write 'min' for minutes or 'mo' "
                         f"for months (e.g. {example})")


_SECONDS_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(min|s|h|d)")
_SECONDS = {"s": 1, "min": 60, "h": 3600, "d": 86400}
# the longest duration taken (100 years): a time this far from now is still a date
MAX_SECONDS = 36500 * 86400


def parse_seconds(text: str, option: str = "duration") -> float:
    """`90s`, `30min`, `2h`, `1h30min`, `1d` -> seconds."""
    clean = text.strip().lower()
    refuse_bare_m(clean, option, "30min")
    if not clean or _SECONDS_RE.sub("", clean).strip():
        raise UsageError(f"{option}: not a duration: {text!r} (examples: 90s, 30min, 2h, 1h30min)")
    seconds = sum(float(n) * _SECONDS[u] for n, u in _SECONDS_RE.findall(clean))
    if seconds > MAX_SECONDS:
        raise UsageError(f"{option}: {text!r} is too long; the longest is 36500d (100 years)")
    return seconds


# what would break a line of a text listing or drive the terminal: C0, DEL and C1 characters,
# and the line and paragraph separators (line breaks to str.splitlines and JavaScript)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def control_character(text: str) -> str | None:
    """The first control character of `text` (a line break, an escape, ...); None for none."""
    found = _CONTROL.search(text)
    return found[0] if found else None


def shown(text: str) -> str:
    """`text` as a line of a text listing shows it: its control characters as \\xNN (\\uNNNN)
    escapes (a name stored before they were refused at input must not break the listing's
    lines)."""
    return _CONTROL.sub(_escaped, text)


def _escaped(found: re.Match[str]) -> str:
    code = ord(found[0])
    return f"\\x{code:02x}" if code <= 0xff else f"\\u{code:04x}"


def is_text(value: str, *, ascii: bool = False) -> bool:
    """Whether `value` is text that can be written out: no surrogates (Python's stand-ins for
    the bytes of an argument or variable that are not UTF-8); with `ascii`, ASCII alone."""
    try:
        value.encode("ascii" if ascii else "utf-8")
    except UnicodeEncodeError:
        return False
    return True
