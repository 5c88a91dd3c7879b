"""forget + gc: chain consolidation keeps every remaining point byte-identical, gc reclaims what
nothing uses, and never a chunk a running backup is about to reference (the race behind
Proxmox's 2025 GC advisory), also with backups of several VMs in parallel processes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import vddk_ext

from helpers import MIB, DiskModel, cli, restore_bytes, write_extents
from repo_engine.backup.job import BackupOptions, backup_vm
from repo_engine.backup.source import ChangeReport, SourceDisk, VmSnapshot
from repo_engine.maintenance import tally
from repo_engine.maintenance.forget import forget_points
from repo_engine.maintenance.gc import _settle, gc, tally_drift
from repo_engine.maintenance.verify import verify
from repo_engine.repository.index import U64, Index
from repo_engine.repository.index_records import REF_KEY
from repo_engine.repository.repo import Repository


def init(capsys, path: Path, max_chain: int = 4) -> Path:
    result = cli(capsys, "init", path, "--block-size", "16KiB", "--max-chain", str(max_chain),
                 "--pack-size", "256KiB")
    assert result.code == 0, result.err
    return path


def backup(capsys, repo: Path, vm: str, model: DiskModel, extents=None, tmp: Path | None = None,
           key: str = "sda") -> str:
    args = ["backup", "image", repo, "--vm", vm, "--disk", f"{key}={model.path}", "--json"]
    if extents is not None:
        path = write_extents(tmp / f"ext-{os.urandom(4).hex()}.json", extents)
        args += ["--changed", f"{key}={path}"]
    result = cli(capsys, *args)
    assert result.code == 0, result.err
    return result.json()["point"]["id"]


def assert_clean(capsys, repo: Path) -> dict:
    result = cli(capsys, "verify", repo, "--json")
    doc = result.json()
    assert result.code == 0 and doc["ok"], doc["errors"]
    return doc


def test_random_forget_sequences_keep_every_point_byte_identical(tmp_path, capsys):
    rng = np.random.default_rng(5)
    repo = init(capsys, tmp_path / "repo")
    model = DiskModel(tmp_path / "sda.img", 2 * MIB + 7000, rng)
    model.random_changes(6)
    expected = {}
    for day in range(16):
        extents = model.random_changes(int(rng.integers(1, 4)), 150_000) if day else None
        if day == 9:  # a resize in the middle of a chain
            model.capacity += 40_000
            model.content += bytes(40_000)
            os.truncate(model.path, model.capacity)
            extents = extents + [[model.capacity - 40_000, 40_000]]
        expected[backup(capsys, repo, "vm", model, extents, tmp_path)] = model.copy_of_content()
    alive = list(expected)
    while len(alive) > 2:
        victims = list(rng.choice(alive, size=int(rng.integers(1, 4)), replace=False))
        assert cli(capsys, "forget", repo, *[v[:12] for v in victims]).code == 0
        alive = [p for p in alive if p not in victims]
        if rng.random() < 0.6:
            assert cli(capsys, "gc", repo, "--max-unused", "0").code == 0
        for point in alive:
            got = restore_bytes(capsys, repo, point[:12], "sda", tmp_path / "out.img")
            assert got == expected[point], point
        assert_clean(capsys, repo)
    full = cli(capsys, "gc", repo, "--full", "--json").json()
    assert full["recount"] == {"under_counted": 0, "over_counted": 0}
    # only the two remaining points' chunks are left in the index
    with Repository.open(repo) as r:
        live = set()
        for p in r.points():
            live |= set(np.unique(r.resolve(p, "sda")).tolist()) - {0}
        assert r.index.counters()["chunks"] == len(live)


def test_policy_forget_with_prune_and_protect(tmp_path, capsys):
    rng = np.random.default_rng(6)
    repo = init(capsys, tmp_path / "repo")
    model = DiskModel(tmp_path / "sda.img", 1 * MIB, rng)
    model.random_changes(4)
    expected = {}
    for day in range(6):
        extents = model.random_changes(2, 100_000) if day else None
        expected[backup(capsys, repo, "vm", model, extents, tmp_path)] = model.copy_of_content()
    ids = list(expected)
    assert cli(capsys, "protect", repo, ids[1][:12]).code == 0
    dry = cli(capsys, "forget", repo, "--keep-last", "2", "--dry-run", "--json").json()
    decided = {d["id"]: d for d in dry["decisions"]}
    assert decided[ids[1]]["reasons"] == ["protected"]
    assert [i for i in ids if not decided[i]["keep"]] == [ids[0], ids[2], ids[3]]
    listed = cli(capsys, "points", repo, "--json").json()["points"]
    assert len(listed) == 6, "dry run removed points"
    protected_forget = cli(capsys, "forget", repo, ids[1][:12])
    assert protected_forget.code == 2 and "protected" in protected_forget.err
    before = cli(capsys, "stats", repo, "--json").json()
    result = cli(capsys, "forget", repo, "--keep-last", "2", "--prune", "--json")
    assert result.code == 0, result.err
    assert sorted(result.json()["removed"]) == sorted([ids[0], ids[2], ids[3]])
    after = cli(capsys, "stats", repo, "--json").json()
    assert after["chunks"] < before["chunks"]
    for point in (ids[1], ids[4], ids[5]):
        assert restore_bytes(capsys, repo, point[:12], "sda", tmp_path / "o.img") == expected[point]
    assert cli(capsys, "unprotect", repo, ids[1][:12]).code == 0
    assert cli(capsys, "forget", repo, "--keep-last", "1").code == 0
    assert [p["id"] for p in cli(capsys, "points", repo, "--json").json()["points"]] == [ids[5]]
    assert_clean(capsys, repo)


class _GatedDevice:
    """A real image device whose close() waits for a gate: the backup has read, hashed and
    looked up every block (and may have deduplicated against old chunks) but not committed."""

    def __init__(self, path: Path, gate: threading.Event, reached: threading.Event) -> None:
        self._dev = vddk_ext.open_local(str(path))
        self.capacity, self.kind = self._dev.capacity, self._dev.kind
        self._gate, self._reached = gate, reached

    def reader(self, *args, **kwargs):
        return self._dev.reader(*args, **kwargs)

    def allocated_extents(self):
        return self._dev.allocated_extents()

    def close(self) -> None:
        self._reached.set()
        assert self._gate.wait(60)
        self._dev.close()


def test_backup_reusing_forgotten_parent_chunks_while_gc_runs(tmp_path, capsys):
    """Proxmox 2025: a backup reuses its parent's chunks (unchanged blocks through the parent's
    map, and changed blocks whose content equals a chunk only the forgotten points hold) while
    the parent is forgotten and gc runs. Nothing it references may be lost."""
    rng = np.random.default_rng(8)
    repo_path = init(capsys, tmp_path / "repo")
    model = DiskModel(tmp_path / "sda.img", 2 * MIB, rng)
    model.write(0, rng.integers(0, 256, 2 * MIB, dtype=np.uint8).tobytes())
    old_block = model.content[16384:32768]
    first = backup(capsys, repo_path, "vm", model)
    model.write(16384, rng.integers(0, 256, 16384, dtype=np.uint8).tobytes())
    second = backup(capsys, repo_path, "vm", model, [[16384, 16384]], tmp_path)
    # the next backup writes back block 1's old content (a chunk only `first` holds)
    model.write(16384, old_block)
    gate, reached = threading.Event(), threading.Event()
    disk = SourceDisk("sda", model.capacity, lambda: _GatedDevice(model.path, gate, reached),
                      allocated=lambda: ChangeReport(None),
                      changes=lambda cursor: ChangeReport(np.array([[16384, 16384]])))
    repo = Repository.open(repo_path)
    outcome = {}

    def run_backup():
        outcome["point"] = backup_vm(repo, VmSnapshot("vm", "image", [disk]), BackupOptions())

    def run_gc():
        outcome["gc"] = gc(repo, max_unused=0)

    worker = threading.Thread(target=run_backup)
    worker.start()
    assert reached.wait(30), "backup never reached its commit"
    forget_points(repo, [first, second])
    collector = threading.Thread(target=run_gc)
    collector.start()
    time.sleep(0.5)  # gc has made the candidates unfindable and waits for the backup
    assert collector.is_alive(), "gc did not wait for the running backup"
    gate.set()
    worker.join(30)
    collector.join(30)
    point = outcome["point"]
    assert outcome["gc"].candidates > 0 and outcome["gc"].resurrected > 0
    assert point.disks[0].kind == "full", "a delta on a forgotten parent must become full"
    report = verify(repo)
    assert report.ok, report.errors
    repo.close()
    got = restore_bytes(capsys, repo_path, point.id[:12], "sda", tmp_path / "out.img")
    assert got == model.content
    # and the next gc, with no backup running, reclaims nothing the point needs
    assert cli(capsys, "gc", repo_path, "--full").code == 0
    assert restore_bytes(capsys, repo_path, point.id[:12], "sda", tmp_path / "o2.img") == \
        model.content


WORKER = textwrap.dedent("""
    import hashlib, json, sys
    from pathlib import Path
    import numpy as np
    sys.path.insert(0, {tests!r})
    from helpers import DiskModel, MIB, write_extents
    from repo_engine.cli.main import run
    import contextlib, io

    repo, vm, rounds, seed, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    work = Path(out).parent
    rng = np.random.default_rng(seed)
    model = DiskModel(work / f"{{vm}}.img", 2 * MIB, rng)
    model.random_changes(5)
    results = {{}}
    for i in range(rounds):
        args = ["backup", "image", repo, "--vm", vm, "--disk", f"sda={{model.path}}", "--json"]
        if i:
            ext = model.random_changes(int(rng.integers(1, 4)), 150_000)
            args += ["--changed", f"sda={{write_extents(work / f'{{vm}}-{{i}}.json', ext)}}"]
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = run(args)
        assert code == 0, code
        point = json.loads(buf.getvalue())["point"]["id"]
        results[point] = hashlib.sha256(model.content).hexdigest()
        Path(out).write_text(json.dumps(results))
""")


def test_parallel_backups_of_several_vms_with_forget_gc_loops(tmp_path, capsys):
    repo = init(capsys, tmp_path / "repo", max_chain=3)
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).parent)))
    procs = []
    for n, vm in enumerate(("alpha", "beta", "gamma")):
        out = tmp_path / f"{vm}.json"
        procs.append((out, subprocess.Popen(
            [sys.executable, str(script), str(repo), vm, "7", str(n), str(out)],
            stderr=subprocess.PIPE)))
    loops = 0
    while any(p.poll() is None for _, p in procs) or loops < 2:
        assert cli(capsys, "forget", repo, "--keep-last", "2").code == 0
        result = cli(capsys, "gc", repo, "--max-unused", "0", "--json")
        assert result.code == 0, result.err
        loops += 1
    for _, proc in procs:
        assert proc.wait() == 0, proc.stderr.read().decode()[-2000:]
    expected = {}
    for out, _ in procs:
        expected.update(json.loads(out.read_text()))
    assert loops >= 2
    assert_clean(capsys, repo)
    assert cli(capsys, "forget", repo, "--keep-last", "2", "--prune").code == 0
    points = cli(capsys, "points", repo, "--json").json()["points"]
    assert len(points) == 6
    for point in points:
        data = restore_bytes(capsys, repo, point["id"][:12], "sda", tmp_path / "o.img")
        assert hashlib.sha256(data).hexdigest() == expected[point["id"]], point["id"]
    full = cli(capsys, "gc", repo, "--full", "--json").json()
    assert full["recount"] == {"under_counted": 0, "over_counted": 0}


@pytest.mark.parametrize("in_table", [lambda ref: True, lambda ref: False, lambda ref: ref % 2],
                         ids=["table-holds-all", "table-holds-none", "table-holds-odd"])
@pytest.mark.parametrize("old, new, drift", [
    ([], [], (0, 0)),                                      # an empty repository
    ([(1, 1), (3, 1), (5, 2)], [(1, 2), (2, 1), (5, 2)], (2, 1)),
    ([(4, 1)], [], (0, 1)),
    ([], [(4, 1)], (1, 0)),
    ([(r, 1) for r in range(0, 40, 2)], [(r, 2 - r % 2) for r in range(20)], (20, 10)),
])
def test_tally_drift(tmp_path, monkeypatch, in_table, old, new, drift):
    """The kept refcount rows (`old`) against a recount (`new`): refs counted too low, among
    them those with no row, and too high, among them those no map holds; whether the refs
    table holds a counted ref or not (the index misses it), read in batches of 3 rows."""
    monkeypatch.setattr(tally, "ROWS", 3)
    index = Index(tmp_path / "index", create=True)
    with index.write() as txn:
        for ref, count in old:
            index.put_sealed(txn, "refcount", REF_KEY.pack(ref), U64.pack(count))
    refs = np.array(sorted({ref for ref, _ in old + new if in_table(ref)}), np.uint64)
    counted = tally.Tally(tally.RefTable(refs, *(np.zeros(0, np.int64),) * 3))
    for ref, count in new:
        counted.add(np.array([ref], np.uint64), count)
    with index.env.begin() as txn:
        found = tally_drift(index, txn, counted)
    index.close()
    assert (found["under_counted"], found["over_counted"]) == drift


@pytest.mark.parametrize("seed", range(6))
def test_dead_maps_settled_in_one_batch_count_as_one_by_one(tmp_path, seed):
    """Dead maps sharing refs, each owing its own number of decrements, settled in one batch
    (their decrements summed per ref): every count ends as decrementing map by map leaves it,
    a ref reaching 0 is queued, and a sum that would take a count below 0 is damage (the counts
    are distrusted and that count is left as it was)."""
    rng = np.random.default_rng(seed)
    index = Index(tmp_path / "index", create=True)
    maps = [(bytes([m]) * 32, np.unique(rng.integers(1, 40, int(rng.integers(1, 30)))).astype(
        np.uint64), int(rng.integers(1, 4))) for m in range(int(rng.integers(2, 8)))]
    owed_by_ref: dict[int, int] = {}
    for _, refs, owed in maps:
        for ref in refs.tolist():
            owed_by_ref[ref] = owed_by_ref.get(ref, 0) + owed
    short = int(rng.choice(list(owed_by_ref))) if seed % 2 else None  # one count too low
    counts = {ref: owed + int(rng.integers(0, 2)) for ref, owed in owed_by_ref.items()}
    if short is not None:
        counts[short] = owed_by_ref[short] - 1
    with index.write() as txn:
        txn.put(b"counts", U64.pack(1), db=index.meta)
        for ref, count in counts.items():
            index.put_sealed(txn, "refcount", REF_KEY.pack(ref), U64.pack(count))
        for key, _, owed in maps:
            index.put_sealed(txn, "deadmaps", key, U64.pack(owed))
    assert _settle(index, [(key, refs) for key, refs, _ in maps]) == len(maps)
    with index.env.begin() as txn:
        for ref, count in counts.items():
            left = count if ref == short else count - owed_by_ref[ref]
            raw = index.get_sealed(txn, "refcount", REF_KEY.pack(ref))
            assert (U64.unpack(raw)[0] if raw else 0) == left, ref
            if ref != short:
                assert (txn.get(REF_KEY.pack(ref), db=index.gcq) is not None) == (left == 0)
        assert not list(txn.cursor(db=index.deadmaps))
    assert index.counts_valid() == (short is None)
    index.close()


def test_gc_drops_the_chunks_a_crashed_backup_indexed_and_keeps_counted_ones(tmp_path, capsys):
    """A backup that died after its packs were indexed and before its point: its chunks have no
    count, and gc (the step that queues refs without a count in the packs indexed since its
    last run) drops them, pack and all, while every chunk a point uses stays."""
    repo_path = init(capsys, tmp_path / "repo")
    model = DiskModel(tmp_path / "disk.img", 2 * MIB, np.random.default_rng(5))
    model.random_changes(8)
    backup(capsys, repo_path, "web", model)
    with Repository.open(repo_path) as repo:
        writer = repo.pack_writer()
        refs = list(repo.reserve_refs(40))
        for ref in refs:  # the crashed backup's chunks, indexed without a count
            blob = os.urandom(1000)
            writer.add(ref, repo.codec.chunk_id(blob), blob, len(blob), 0)
        repo.commit_pack(writer)
        assert not repo.index.missing_refs(np.array(refs, np.uint64)).size
    with Repository.open(repo_path) as repo:
        report = gc(repo)
    assert report.chunks_dropped == 40 and report.packs_deleted >= 1
    with Repository.open(repo_path) as repo:
        assert repo.index.missing_refs(np.array(refs, np.uint64)).tolist() == refs
    assert_clean(capsys, repo_path)
    assert restore_bytes(capsys, repo_path, "web@latest", "sda",
                         tmp_path / "r.img") == model.copy_of_content()
