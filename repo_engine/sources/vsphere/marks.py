"""The full-next mark: a restore wrote to a VM through VDDK, which CBT does not see, so the VM's
next backup must read everything, and an in-place restore from a point older than that write
cannot trust CBT either.

Kept in the repository's store as `sources/vsphere/vms/<instance uuid>.mark`: an envelope (magic
VM_MARK) holding JSON {"vm": NAME, "full_next": bool, "last_write": ISO time or null,
"why": TEXT}, replaced atomically. In an encrypted repository the JSON is sealed (kind "mark",
bound to the instance uuid) like a point manifest, so that it names no VM in the clear. A mark that cannot be read (damaged, not a regular file, or the
plain-JSON `.json` mark of earlier versions, a cleartext mark in an encrypted repository)
means a full read, to be safe.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass

from ...errors import RepoError
from ...repository.crypto.null import Sealer
from ...repository.envelope import Binding, read_sealed, write_sealed
from ...repository.formats import VM_MARK
from ...repository.points import now_iso
from ...repository.store import ObjectMissing, Store

MARK_MAX = 64 * 1024


@dataclass
class VmMark:
    vm: str
    full_next: bool = False
    last_write: str | None = None  # UNKNOWN: a restore may have written at any time
    why: str = ""

    def written_since(self, time: str) -> bool:
        """Whether a restore may have written to the VM after `time` (a point's time)."""
        return self.last_write == UNKNOWN or bool(self.last_write and self.last_write > time)


UNKNOWN = "unknown"  # the last write of a mark that could not be read


MARKS = "sources/vsphere/vms/"


def _name(vm_uuid: str, suffix: str = ".mark") -> str:
    safe = re.sub(r"[^0-9A-Za-z._-]", "_", vm_uuid).strip(".") or "_"
    return f"{MARKS}{safe}{suffix}"


def _binding(sealer: Sealer, vm_uuid: str) -> Binding:
    return Binding(sealer, "mark", vm_uuid.encode())


def load(store: Store, sealer: Sealer, vm_uuid: str) -> VmMark | None:
    try:
        doc = json.loads(read_sealed(store, _name(vm_uuid), VM_MARK, MARK_MAX,
                                     _binding(sealer, vm_uuid)))
        return VmMark(str(doc["vm"]), bool(doc["full_next"]), doc["last_write"], str(doc["why"]))
    except ObjectMissing:
        if store.exists(_name(vm_uuid, ".json")):
            return VmMark("?", True, UNKNOWN, "mark of an earlier version: full read to be safe")
        return None
    except (RepoError, ValueError, TypeError, KeyError):
        return VmMark("?", True, UNKNOWN, "unreadable mark: full read to be safe")


def _save(store: Store, sealer: Sealer, vm_uuid: str, mark: VmMark) -> None:
    write_sealed(store, _name(vm_uuid), VM_MARK, json.dumps(asdict(mark)).encode(),
                 binding=_binding(sealer, vm_uuid))
    store.delete([_name(vm_uuid, ".json")])   # an earlier version's mark, now replaced


def mark_written(store: Store, sealer: Sealer, vm_uuid: str, vm_name: str, why: str) -> None:
    """Before a restore writes to the VM: its next backup reads everything."""
    _save(store, sealer, vm_uuid, VmMark(vm_name, True, now_iso(), why))


def clear_full_next(store: Store, sealer: Sealer, vm_uuid: str) -> None:
    """After a backup that read everything was stored."""
    mark = load(store, sealer, vm_uuid)
    if mark is not None and mark.full_next:
        mark.full_next, mark.why = False, ""
        if mark.last_write == UNKNOWN:  # whatever was written, it was before now
            mark.last_write = now_iso()
        _save(store, sealer, vm_uuid, mark)


def reseal(store: Store, sealer: Sealer, stale: Callable[[str], bool]) -> int:
    """Write again, sealed with the current key, every mark `stale(object name)` says a key
    being retired seals (`key retire`); returns how many. A restore may mark its VM meanwhile,
    and a store offers no compare-and-swap to keep that mark from being overwritten with the
    one read before: so each resealed mark asks for a full read (one full read of that VM,
    never a backup that misses what a restore wrote) and counts as written when it is saved
    (an in-place restore from an earlier point compares every block instead of trusting CBT,
    never one that misses what a restore wrote after the mark was read)."""
    count = 0
    for info in store.list(MARKS):
        if not info.name.endswith(".mark") or not stale(info.name):
            continue
        vm_uuid = info.name[len(MARKS):-len(".mark")]
        mark = load(store, sealer, vm_uuid) or VmMark("?")
        mark.full_next = True
        mark.why = mark.why or "its mark was sealed again by 'key retire': full read to be safe"
        mark.last_write = now_iso()  # after any restore's mark this one may overwrite
        _save(store, sealer, vm_uuid, mark)
        count += 1
    return count
