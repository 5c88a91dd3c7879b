"""The full-next mark: a restore wrote to a VM through VDDK, which CBT does not see, so the VM's
next backup must read everything, and an in-place restore from a point older than that write
cannot trust CBT either.

Stored in the repository as `sources/vsphere/vms/<instance uuid>.json` (plain JSON, replaced
atomically): {"format": "repo-engine vsphere vm mark", "version": 1, "vm": NAME,
"full_next": bool, "last_write": ISO time or null, "why": TEXT}.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from ...repository.atomic import write_atomic
from ...repository.points import now_iso

FORMAT = "repo-engine vsphere vm mark"


@dataclass
class VmMark:
    vm: str
    full_next: bool = False
    last_write: str | None = None
    why: str = ""


def _path(repo_path: Path, vm_uuid: str) -> Path:
    safe = re.sub(r"[^0-9A-Za-z._-]", "_", vm_uuid)
    return repo_path / "sources" / "vsphere" / "vms" / f"{safe}.json"


def load(repo_path: Path, vm_uuid: str) -> VmMark | None:
    try:
        doc = json.loads(_path(repo_path, vm_uuid).read_text())
    except FileNotFoundError:
        return None
    if doc.get("format") != FORMAT or doc.get("version") != 1:
        return VmMark(vm="?", full_next=True, why="unreadable mark file: full read to be safe")
    return VmMark(doc.get("vm", "?"), bool(doc.get("full_next")), doc.get("last_write"),
                  doc.get("why", ""))


def _store(repo_path: Path, vm_uuid: str, mark: VmMark) -> None:
    path = _path(repo_path, vm_uuid)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"format": FORMAT, "version": 1, **asdict(mark)},
                                  indent=1).encode())


def mark_written(repo_path: Path, vm_uuid: str, vm_name: str, why: str) -> None:
    """Before a restore writes to the VM: its next backup reads everything."""
    _store(repo_path, vm_uuid, VmMark(vm_name, True, now_iso(), why))


def clear_full_next(repo_path: Path, vm_uuid: str) -> None:
    """After a backup that read everything was stored."""
    mark = load(repo_path, vm_uuid)
    if mark is not None and mark.full_next:
        mark.full_next, mark.why = False, ""
        _store(repo_path, vm_uuid, mark)
