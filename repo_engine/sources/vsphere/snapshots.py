"""Our snapshots: created with a fixed name prefix, always removed, leftovers cleaned up."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .errors import VSphereError, connection_broke, extended, fault_text

PREFIX = "repo-engine-"
log = logging.getLogger("repo_engine.vsphere")


@dataclass
class Held:
    """A snapshot we made: the object, its moref, the consistency reached and why."""

    snap: Any
    name: str
    consistency: str
    notes: list[str] = field(default_factory=list)

    @property
    def moref(self) -> str:
        return str(self.snap._moId)


def wait(task: Any) -> Any:
    """Wait for a vSphere task; returns its result (a fault is raised as is)."""
    from pyVim.task import WaitForTask

    WaitForTask(task)
    return task.info.result


def _tree(items: Any) -> Iterator[Any]:
    for item in items or []:
        yield item
        yield from _tree(item.childSnapshotList)


def ours(vm: Any) -> list[Any]:
    """Snapshot tree entries of ours (name starts with PREFIX)."""
    info = vm.snapshot
    if info is None:
        return []
    return [t for t in _tree(info.rootSnapshotList) if t.name.startswith(PREFIX)]


def remove(vm: Any, snap: Any) -> None:
    """Remove one snapshot and consolidate when vCenter asks for it."""
    wait(snap.RemoveSnapshot_Task(removeChildren=False))
    if vm.runtime.consolidationNeeded:
        wait(vm.ConsolidateVMDisks_Task())


def remove_leftovers(vm: Any) -> list[str]:
    """Remove snapshots a crashed run of ours left behind; returns their names."""
    removed = []
    vm_name = vm.name
    for tree in reversed(ours(vm)):   # children first
        try:
            remove(vm, tree.snapshot)
        except Exception as exc:  # noqa: BLE001 - a vim fault: say which snapshot
            if connection_broke(exc):
                raise
            raise VSphereError(f"cannot remove the leftover snapshot {tree.name!r} of "
                               f"{vm_name}: {fault_text(exc)}") from None
        removed.append(tree.name)
    return removed


def _create(vm: Any, name: str, quiesce: bool) -> Any:
    task = vm.CreateSnapshot_Task(name=name, description="repo-engine backup; removed when done",
                                  memory=False, quiesce=quiesce)
    return wait(task)


def _find(vm: Any, name: str) -> Any | None:
    return next((t.snapshot for t in ours(vm) if t.name == name), None)


def create(vm: Any, purpose: str, quiesce: bool) -> Held:
    """A snapshot named PREFIX+purpose+time; quiesced if asked, crash-consistent when the guest
    cannot quiesce."""
    from pyVmomi import vim

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    name = f"{PREFIX}{purpose}-{stamp}"
    vm_name = vm.name
    notes = []
    try:
        if quiesce:
            try:
                return Held(_create(vm, name, True), name, "file")
            except (vim.fault.ApplicationQuiesceFault, vim.fault.FilesystemQuiesceFault) as exc:
                notes.append(f"the guest could not quiesce ({fault_text(exc)}): "
                             "crash-consistent snapshot")
                log.warning("%s: %s", vm_name, notes[-1])
        else:
            notes.append("quiescing not requested: crash-consistent snapshot")
        return Held(_create(vm, name, False), name, "crash", notes)
    except BaseException as exc:
        if connection_broke(exc):   # nothing more can be asked: the caller says what is left
            raise
        leftover = _safe_find(vm, name)   # interrupted while vCenter was creating it
        if leftover is not None:
            _safe_remove(vm, leftover, name, vm_name)
        if isinstance(exc, vim.fault.VimFault):
            raise VSphereError(f"cannot snapshot {vm_name}: {fault_text(exc)}") from None
        raise


def _safe_find(vm: Any, name: str) -> Any | None:
    try:
        return _find(vm, name)
    except Exception:  # noqa: BLE001 - best effort during error handling
        return None


def _safe_remove(vm: Any, snap: Any, name: str, vm_name: str) -> str | None:
    """Remove, returning an error text instead of raising (we are already unwinding)."""
    try:
        remove(vm, snap)
        return None
    except Exception as exc:  # noqa: BLE001
        why = "the connection was lost" if connection_broke(exc) else fault_text(exc)
        text = (f"could not remove snapshot {name!r} of {vm_name}: {why}; "
                "the next run removes it")
        log.error("%s", text)
        return text


@contextmanager
def held(vm: Any, purpose: str, quiesce: bool) -> Iterator[Held]:
    """Create our snapshot; remove it however the block ends (errors, Ctrl-C included). An
    error of the block comes out saying whether the snapshot was removed; after a lost
    connection nothing more is asked of it and the snapshot is left for the next run."""
    vm_name = vm.name
    snapshot = create(vm, purpose, quiesce)
    try:
        yield snapshot
    except BaseException as exc:
        if connection_broke(exc):
            failure = (f"snapshot {snapshot.name!r} of {vm_name} is left: the next run removes "
                       "it (or delete it in vSphere)")
        else:
            failure = _removed_anyway(vm, snapshot, vm_name)
        if isinstance(exc, Exception):
            raise extended(exc, failure or f"snapshot {snapshot.name!r} was removed") from None
        raise
    failure = _removed_anyway(vm, snapshot, vm_name)
    if failure:   # the work succeeded: do not hide the leftover
        raise VSphereError(f"the {purpose} itself completed, but {failure}")


def _removed_anyway(vm: Any, snapshot: Held, vm_name: str) -> str | None:
    """_safe_remove, finished even through a second Ctrl-C."""
    try:
        return _safe_remove(vm, snapshot.snap, snapshot.name, vm_name)
    except KeyboardInterrupt:
        return _safe_remove(vm, snapshot.snap, snapshot.name, vm_name)
