"""The vSphere source's per-VM full-read marks live in the repository's store, sealed: whatever
is found under a mark's name (damage, a FIFO, a symlink, an earlier version's plain JSON) means a
full read, never a hang, a followed link or a trusted CBT."""

from __future__ import annotations

import json
import os
import threading

from repo_engine.repository.crypto.null import NULL_SEALER
from repo_engine.repository.crypto.seal import ObjectSealer
from repo_engine.repository.formats import VM_MARK
from repo_engine.repository.store.local import LocalStore
from repo_engine.sources.vsphere.marks import UNKNOWN, clear_full_next, load, mark_written

MARK = "sources/vsphere/vms/uuid-1.mark"


def _load_in_time(store: LocalStore):
    """load() in a thread: a mark that blocks the reader fails the test instead of hanging it."""
    out = []
    reader = threading.Thread(target=lambda: out.append(load(store, NULL_SEALER, "uuid-1")),
                              daemon=True)
    reader.start()
    reader.join(10)
    assert out, "loading the mark hung"
    return out[0]


def test_a_mark_is_sealed_and_cleared_after_a_full_read(tmp_path):
    store = LocalStore(tmp_path)
    assert load(store, NULL_SEALER, "uuid-1") is None
    mark_written(store, NULL_SEALER, "uuid-1", "web1", "a restore wrote to the VM")
    assert (tmp_path / MARK).read_bytes()[:8] == VM_MARK.magic
    mark = load(store, NULL_SEALER, "uuid-1")
    assert mark.vm == "web1" and mark.full_next and mark.last_write
    clear_full_next(store, NULL_SEALER, "uuid-1")
    mark = load(store, NULL_SEALER, "uuid-1")
    assert not mark.full_next and mark.vm == "web1" and mark.last_write


def test_a_damaged_mark_means_a_full_read(tmp_path):
    store = LocalStore(tmp_path)
    mark_written(store, NULL_SEALER, "uuid-1", "web1", "w")
    clear_full_next(store, NULL_SEALER, "uuid-1")
    data = bytearray((tmp_path / MARK).read_bytes())
    data[30] ^= 1
    (tmp_path / MARK).write_bytes(bytes(data))
    mark = _load_in_time(store)
    assert mark.full_next and mark.written_since("9999-12-31T00:00:00Z")  # CBT not trusted
    clear_full_next(store, NULL_SEALER, "uuid-1")  # a full read: writes before it are seen
    mark = load(store, NULL_SEALER, "uuid-1")
    assert not mark.full_next and mark.last_write != UNKNOWN
    assert mark.written_since("2000-01-01T00:00:00Z") and not mark.written_since("9999-01-01")


def test_a_fifo_or_a_symlink_under_a_marks_name_means_a_full_read(tmp_path):
    store = LocalStore(tmp_path)
    (tmp_path / MARK).parent.mkdir(parents=True)
    os.mkfifo(tmp_path / MARK)
    assert _load_in_time(store).full_next
    os.unlink(tmp_path / MARK)
    outside = tmp_path / "outside.mark"
    (tmp_path / "other").mkdir()
    other = LocalStore(tmp_path / "other")
    mark_written(other, NULL_SEALER, "uuid-1", "web1", "w")
    clear_full_next(other, NULL_SEALER, "uuid-1")   # a valid mark saying "trust CBT"
    outside.write_bytes((tmp_path / "other" / MARK).read_bytes())
    os.symlink(outside, tmp_path / MARK)
    assert _load_in_time(store).full_next   # never followed


def test_an_earlier_versions_json_mark_means_a_full_read_until_replaced(tmp_path):
    store = LocalStore(tmp_path)
    legacy = tmp_path / "sources/vsphere/vms/uuid-1.json"
    legacy.parent.mkdir(parents=True)
    legacy.write_text(json.dumps({"format": "repo-engine vsphere vm mark", "version": 1,
                                  "vm": "web1", "full_next": False}))
    assert load(store, NULL_SEALER, "uuid-1").full_next   # its content is not trusted
    clear_full_next(store, NULL_SEALER, "uuid-1")
    assert not legacy.exists() and not load(store, NULL_SEALER, "uuid-1").full_next


def test_a_mark_in_an_encrypted_repository_is_sealed_to_its_vm(tmp_path):
    """Encrypted, a mark names no VM in the clear; one moved from another VM's name, or a
    cleartext one (planted, or written before marks were sealed), means a full read."""
    store, sealer = LocalStore(tmp_path), ObjectSealer({1: bytes(range(32))}, 1)
    mark_written(store, sealer, "uuid-1", "web1-secret-name", "a restore wrote to the VM")
    assert b"web1-secret-name" not in (tmp_path / MARK).read_bytes()
    clear_full_next(store, sealer, "uuid-1")
    mark = load(store, sealer, "uuid-1")
    assert (mark.vm, mark.full_next) == ("web1-secret-name", False)
    moved = tmp_path / "sources/vsphere/vms/uuid-2.mark"
    moved.write_bytes((tmp_path / MARK).read_bytes())
    assert load(store, sealer, "uuid-2").full_next
    mark_written(store, NULL_SEALER, "uuid-1", "web1", "w")
    clear_full_next(store, NULL_SEALER, "uuid-1")   # a cleartext mark saying "trust CBT"
    assert load(store, sealer, "uuid-1").full_next
