"""How much memory this host can still give a command, and a refusal, up front and in one line,
of a request whose working set cannot fit: past it the kernel's OOM killer ends the process
half-way (a backup that held its snapshot and its lock), with no message at all.

What can be given is the kernel's estimate of memory available without swapping
(`MemAvailable`), or less when the process's control group is limited (cgroup v2 `memory.max`,
v1 `memory.limit_in_bytes`, minus what the group uses). Where none can be read (not Linux),
nothing is refused.
"""

from __future__ import annotations

from pathlib import Path

from .errors import UsageError
from .units import format_size

MEMINFO = Path("/proc/meminfo")
# (limit, usage) of the control group, v2 then v1; a v1 limit of "no limit" is some 2^63
CGROUP_FILES = ((Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current")),
                (Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
                 Path("/sys/fs/cgroup/memory/memory.usage_in_bytes")))


def available() -> int | None:
    """Bytes this process can still allocate without swapping or being killed; None when
    unknown."""
    found = [n for n in (_mem_available(), *map(_cgroup_room, CGROUP_FILES)) if n is not None]
    return min(found) if found else None


def _mem_available() -> int | None:
    try:
        for line in MEMINFO.read_text().splitlines():
            name, _, value = line.partition(":")
            if name == "MemAvailable":
                return int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room(files: tuple[Path, Path]) -> int | None:
    try:
        limit, usage = (f.read_text().strip() for f in files)
        return max(int(limit) - int(usage), 0)
    except (OSError, ValueError):  # no such group, or "max"
        return None


def require(nbytes: int, what: str, hint: str) -> None:
    """Refuse (usage error) `what`, which needs about `nbytes` of memory, when that is more than
    half what is available (the rest of the command needs some too); `hint` says how to ask
    for less."""
    room = available()
    if room is not None and nbytes > room // 2:
        raise UsageError(f"{what} needs about {format_size(nbytes)} of memory, more than half "
                         f"the {format_size(room)} available; {hint}")
