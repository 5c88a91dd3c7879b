#!/usr/bin/env python3
"""Bench-only bulk loader: grows a repository to N chunks through the real pack writer and index.

    .venv/bin/python bench/bigrepo.py grow REPO --chunks 10000000 [--per-point 10000] [--vms 20]
    .venv/bin/python bench/bigrepo.py run [--evict REPO] [--stats FILE] -- CMD ...
    .venv/bin/python bench/bigrepo.py scans REPO [--rows N]
    .venv/bin/python bench/bigrepo.py searches REPO [--batches N]
    .venv/bin/python bench/bigrepo.py locality REPO [--count N] [--read-only] [--warm]
    .venv/bin/python bench/bigrepo.py as-version-3 REPO

`grow` creates REPO (16 KiB blocks, 4 MiB packs) if it does not exist, then adds chunks until the
index counts at least --chunks. The chunks are synthetic: 48 random bytes each (incompressible,
stored raw), so 100 M chunks take about 12 GB of packs instead of the 1.6 TB of 16 KiB blocks.
They go through the code a backup uses: `PackWriter.add`, `Repository.commit_pack` (the pack
published durably, then `Index.commit_pack`: ids, places, counters, one transaction per pack).
Every --per-point new chunks make one restore point of its own (VMs in turn), a full block map
of those chunks committed with `Repository.commit_point`, so the reference counts are real and
gc, verify, scrub and rebuild-index have real work; at the end the id filter is brought up to
date and saved, as a backup leaves it (repository/idfilter.py). Growing is incremental and
resumable: a later run (or a run after a kill) continues from what the index holds (1 M -> 10 M
-> 100 M grows the same repository); refs are never reused, so a killed run only leaves chunks
no point names and perhaps a pack file not indexed, which gc reclaims. Not a repo-engine API: a
real repository never holds such chunks.

`run` runs one command the way bench/scale.py times it, after evicting REPO's index from the
page cache (posix_fadvise DONTNEED: the next lookups read the disk, as when the index is larger
than the free memory); it writes the command's major page faults and bytes read from the
filesystem (wait4's rusage), and the index pages resident after it (mincore), to --stats.

`scans` reads the first --rows rows of `refs` and of `ids` in key order as verify does
(`tally.batches`), the index evicted first, once with LMDB's read-ahead off and once on.
`searches` times verify's look-up of `ids` entries in the sorted refs (`RefTable.find`, then
the id fingerprints compared) over the first --batches batches of `ids`, in hash order and
sorted first (`blockmap.find_sorted` with SORT_FIRST out of reach, then at 0), twice.

`locality` times the look-ups of stored ids as a backup of a disk seen before makes them, the
index evicted before each step: one by one through `ids` (`IndexReader.dedup_ref`, the path
before locality) against batches of LOOKUP_BATCH ids in a read transaction each, as the
pipeline asks (`locality.dedup_refs`), in two orders: the refs of one run (a disk backed up
once, read again) and "the same disk again" after DAYS incrementals: every day CHANGED_SHARE
of the blocks, in runs of geometric length (mean 8), were stored again at consecutive refs
after the disk's own (`disk_again_refs`). `--read-only` opens the index without writing (as
read-only media): an index of version 3 has no `unfindable` table, so the look-ups by locality
read its `quarantine` table (keyed by ref as well) instead, which is only valid because the
step first checks that `gcq`, `quarantine` and `plans` are empty: nothing was ever taken out of
deduplication. `as-version-3` sets the index's version back to 3 and drops its `unfindable`
table, refusing unless the table is empty (the same state an index of version 3 is in), so
that an older build can run on it beside this one.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import lmdb
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from repo_engine.maintenance import tally  # noqa: E402
from repo_engine.repository import blockmap  # noqa: E402
from repo_engine.repository.blockmap import BlockMap  # noqa: E402
from repo_engine.repository.idfilter import FILE  # noqa: E402
from repo_engine.repository import index as index_module  # noqa: E402
from repo_engine.repository.formats import INDEX_VERSION  # noqa: E402
from repo_engine.repository.index import U64, Index, IndexReader  # noqa: E402
from repo_engine.repository.locality import dedup_refs  # noqa: E402
from repo_engine.repository.packs import CODEC_RAW  # noqa: E402
from repo_engine.repository.points import DiskRecord, PointRecord  # noqa: E402
from repo_engine.repository.repo import Repository  # noqa: E402

BLOCK = 16 * 1024
PACK_SIZE = 4 << 20
CHUNK_BYTES = 48
LOOKUP_BATCH = 256  # ids per filter question: a 4 MiB batch of the pipeline at 16 KiB blocks
START = 1_600_000_000  # the first point's time; one point a minute after it
DAYS = 7  # `locality`: incrementals between the first backup and the one timed
CHANGED_SHARE = 0.02  # of the blocks, a day, in runs of mean length CHANGED_RUN
CHANGED_RUN = 8


def grow(path: Path, chunks: int, per_point: int, vms: int) -> dict:
    """Add points of `per_point` fresh chunks until the index counts `chunks` (see above)."""
    started = time.monotonic()
    repo = (Repository.open(path) if (path / "config").exists() else
            Repository.init(path, block_size=BLOCK, pack_size=PACK_SIZE))
    try:
        made = grow_open(repo, chunks, per_point, vms)
        counters = repo.index.counters()
    finally:
        repo.close()
    return {"chunks": counters["chunks"], "packs": counters["packs"], "points": made,
            "grow_s": round(time.monotonic() - started, 1)}


def grow_open(repo: Repository, chunks: int, per_point: int, vms: int) -> int:
    """`grow` in an open repository (a shared one too: its packs, refs and points go through
    the journal); returns the points it holds."""
    started = time.monotonic()
    made = len(repo.index.points_records())
    while repo.index.counters()["chunks"] < chunks:
        refs = _add_chunks(repo, per_point)
        add_point(repo, made, refs, vms)
        made += 1
        if made % 100 == 0:
            print(f"{repo.index.counters()['chunks']:,} chunks, {made} points, "
                  f"{time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    with repo.index.reader() as reader:  # the id filter a backup leaves, saved at close
        reader.surely_absent([bytes(32)])
    return made


def _add_chunks(repo: Repository, count: int) -> np.ndarray:
    """`count` fresh chunks of random bytes in packs (the last one committed partly full)."""
    # a shared repository claims a range of many refs at a time: the first `count` are used
    refs = np.array(repo.reserve_refs(count)[:count], dtype=np.uint64)
    data = np.random.default_rng().bytes(count * CHUNK_BYTES)
    chunk_id = repo.codec.chunk_id
    writer = repo.pack_writer()
    for i, ref in enumerate(refs.tolist()):
        blob = data[i * CHUNK_BYTES:(i + 1) * CHUNK_BYTES]
        writer.add(ref, chunk_id(blob), blob, CHUNK_BYTES, CODEC_RAW)
        if writer.size >= PACK_SIZE:
            repo.commit_pack(writer)
            writer = repo.pack_writer()
    repo.commit_pack(writer)
    return refs


def add_point(repo: Repository, number: int, refs: np.ndarray, vms: int) -> None:
    when = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime(START + number * 60))
    disk = DiskRecord("sda", len(refs) * BLOCK, BLOCK, repo.write_map(BlockMap.full(refs)),
                      "full", None, 1)
    repo.commit_point(PointRecord(id=f"{number:016x}", vm=f"vm{number % vms:03d}", time=when,
                                  source="bench", disks=[disk]))


def index_file(repo: Path) -> Path:
    return repo / "index" / "data.mdb"


def evict(path: Path) -> None:
    """Drop a file's pages from the page cache (written pages are flushed first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_bytes(path: Path) -> int:
    """Bytes of `path` in the page cache (fincore, util-linux)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


# `run --no-readahead`: a repo-engine command run by its own build's interpreter with the index
# mapped as one over half the available memory is (MDB_NORDAHEAD), whatever its size
NO_READAHEAD = ("import sys; from repo_engine.repository import index; "
                "index.readahead_pays = lambda path: False; "
                "from repo_engine.cli.main import run; sys.exit(run(sys.argv[1:]))")


def without_readahead(command: list[str]) -> list[str]:
    """`repo-engine ARGS` (a venv's script) as its venv's python running NO_READAHEAD (`-P`:
    the build the venv holds, never a `repo_engine` in the working directory)."""
    return [str(Path(command[0]).parent / "python"), "-P", "-c", NO_READAHEAD, *command[1:]]


def run(command: list[str], evict_repo: Path | None, stats: Path | None) -> int:
    """Run `command`; note its major faults, filesystem reads and the index's resident pages."""
    if evict_repo is not None:
        evict(index_file(evict_repo))
    started = time.monotonic()
    proc = subprocess.Popen(command)
    _pid, status, usage = os.wait4(proc.pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    if stats is not None:
        figures = {"command": command, "rc": rc, "seconds": round(time.monotonic() - started, 2),
                   "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
                   "major_faults": usage.ru_majflt, "read_bytes": usage.ru_inblock * 512,
                   "load": os.getloadavg()[0]}
        if evict_repo is not None:
            figures["index_bytes"] = index_file(evict_repo).stat().st_size
            figures["index_resident"] = resident_bytes(index_file(evict_repo))
        with open(stats, "a") as out:
            out.write(json.dumps(figures) + "\n")
    return rc


def _io() -> tuple[int, int]:
    """(major page faults, bytes read from storage) of this process so far."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return resource.getrusage(resource.RUSAGE_SELF).ru_majflt, int(fields["read_bytes"])


def _timed(what: str, count: int, work: Callable[[], object]) -> dict:
    faults, read = _io()
    started, cpu = time.monotonic(), time.process_time()
    work()
    seconds = time.monotonic() - started
    faults2, read2 = _io()
    return {"what": what, "count": count, "seconds": round(seconds, 3),
            "cpu_s": round(time.process_time() - cpu, 3), "per_s": round(count / seconds),
            "major_faults": faults2 - faults, "read_mib": round((read2 - read) / 2**20, 1)}


def lookups(path: Path, count: int, cold: bool) -> list[dict]:
    """The index's own cost in a backup, apart from reading, hashing and compressing: `count`
    look-ups (`IndexReader.dedup_ref`, as the backup pipeline calls it) of new ids, of ids
    stored together (a disk backed up before: refs in sequence) and of ids picked at random,
    then `count` new chunks inserted (`Repository.commit_pack`, 4 MiB packs). With `cold`, the
    index is evicted from the page cache before each step (the repository is opened afresh for
    each: pages a process has mapped stay resident)."""
    with _opened(path, False) as repo:
        top = repo.index.meta_u64("next_ref")
        rng = np.random.default_rng(7)
        with repo.index.reader() as reader:
            run_ids = _ids_of(reader, np.arange(top // 2, top // 2 + count, dtype=np.uint64))
            random_ids = _ids_of(reader, rng.choice(np.arange(1, top, dtype=np.uint64), count))
    new_ids = [bytes(i) for i in rng.integers(0, 256, (count, 32), np.uint8)]
    rows = []
    for what, ids in (("look-ups, new ids", new_ids),
                      ("look-ups, stored ids in sequence", run_ids),
                      ("look-ups, stored ids at random", random_ids)):
        with _opened(path, cold) as repo, repo.index.reader() as reader:
            rows.append(_timed(what, len(ids), lambda r=reader, ids=ids:
                               [r.dedup_ref(i) for i in ids]))
    (index_file(path).parent / FILE).unlink(missing_ok=True)
    with _opened(path, cold) as repo:
        rows.append(_timed("id filter: built from the index", 1,
                           lambda: _surely_absent(repo, new_ids[:1])))
    with _opened(path, cold) as repo:
        rows.append(_timed("id filter: loaded from its file", 1,
                           lambda: _surely_absent(repo, new_ids[:1])))
        rows.append(_timed("look-ups, new ids, id filter first", len(new_ids),
                           lambda: _surely_absent(repo, new_ids)))
    with _opened(path, cold) as repo:
        rows.append(_timed("inserts, new ids", count, lambda: _add_chunks(repo, count)))
    return rows


def scans(path: Path, rows: int) -> list[dict]:
    """See the module docstring."""
    out = []
    for table in ("refs", "ids"):
        for readahead in (False, True):
            evict(index_file(path))
            env = lmdb.open(str(path / "index"), max_dbs=32, readonly=True, lock=False,
                            readahead=readahead, map_size=1 << 40)
            try:
                db = env.open_db(table.encode(), create=False)
                with env.begin() as txn:
                    out.append(_timed(f"scan of {table}, read-ahead {'on' if readahead else 'off'}",
                                      rows, lambda txn=txn, db=db: _scan(txn, db, rows)))
            finally:
                env.close()
    return out


def _scan(txn: lmdb.Transaction, db: object, rows: int) -> None:
    for batch, _ in enumerate(tally.batches(txn, db), 1):
        if batch * tally.ROWS >= rows:
            return


def searches(path: Path, count: int) -> list[dict]:
    """See the module docstring."""
    out = []
    with _opened(path, False) as repo, repo.index.env.begin() as txn:
        table = tally.read_ref_table(txn, repo.index, prints=True)
        got = []
        for keys, values in tally.batches(txn, repo.index.ids):
            got.append((np.frombuffer(bytes(keys), "V32"), np.frombuffer(bytes(values), "<u8")))
            if len(got) == count:
                break
        rows = sum(len(refs) for _, refs in got)
        sort_first = blockmap.SORT_FIRST
        try:
            for label, first in [("hash order", 1 << 62), ("sorted first", 0)] * 2:
                blockmap.SORT_FIRST = first
                out.append(_timed(f"look-ups of ids entries in the refs, {label}", rows,
                                  lambda: _check_ids(table, got)))
        finally:
            blockmap.SORT_FIRST = sort_first
    return out


def disk_again_refs(base: int, top: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """The refs a disk of `count` blocks maps to after DAYS incrementals (see the docstring):
    the first backup's run from `base`, every day's changed runs at consecutive refs after
    it."""
    refs = np.arange(base, base + count, dtype=np.uint64)
    later = base + count
    for _day in range(DAYS):
        starts = np.sort(rng.choice(count, int(count * CHANGED_SHARE / CHANGED_RUN), False))
        for start, length in zip(starts.tolist(), rng.geometric(1 / CHANGED_RUN, len(starts))):
            run = refs[start:start + int(length)]
            run[:] = np.arange(later, later + len(run), dtype=np.uint64)
            later += len(run)
    assert later < top
    return refs


def locality(path: Path, count: int, cold: bool, read_only: bool,
             no_readahead: bool) -> list[dict]:
    """See the module docstring. The ids of each step are read (warm) before the index is
    evicted for it. `no_readahead`: the index mapped as one over half the available memory."""
    pays = index_module.readahead_pays
    if no_readahead:
        index_module.readahead_pays = lambda _path: False
    try:
        return _locality(path, count, cold, read_only)
    finally:
        index_module.readahead_pays = pays


def _locality(path: Path, count: int, cold: bool, read_only: bool) -> list[dict]:
    with _index(path, read_only) as index:
        top = index.meta_u64("next_ref")
    rows = []
    steps = [(order, how) for order in ("ref order", "same disk again")
             for how in ("by locality, in batches", "one by one through ids")]
    for step, (order, path_name) in enumerate(steps):
        # each step's ids from refs of their own (an eighth of the refs apart): pages one step
        # read, even a cache below this machine's, never serve another
        base = top * (step + 2) // 8
        with _index(path, read_only) as index, index.reader() as reader:
            ids = _ids_of(reader, np.arange(base, base + count, dtype=np.uint64)
                          if order == "ref order" else
                          disk_again_refs(base, top, count, np.random.default_rng(7)))
        work = _by_locality if path_name.startswith("by locality") else _one_by_one
        if cold:
            evict(index_file(path))
        with _index(path, read_only) as index:
            found: list[int] = []
            row = _timed(f"look-ups of stored ids, {order}: {path_name}", len(ids),
                         lambda i=index, f=found, w=work, ids=ids: f.append(w(i, ids)))
            row["found"] = found[0]
            rows.append(row)
    return rows


def _one_by_one(index: Index, ids: list[bytes]) -> int:
    with index.reader() as reader:
        return sum(reader.dedup_ref(i)[0] is not None for i in ids)


def _by_locality(index: Index, ids: list[bytes]) -> int:
    found = 0
    for start in range(0, len(ids), LOOKUP_BATCH):
        with index.reader() as reader:  # a transaction a batch, as the pipeline's workers
            refs, _ = dedup_refs(reader, ids[start:start + LOOKUP_BATCH])
        found += sum(ref is not None for ref in refs)
    return found


@contextmanager
def _index(path: Path, read_only: bool) -> Iterator[Index]:
    """The index alone; `read_only`: not written (see the docstring for version 3)."""
    index = Index(path / "index", read_only=read_only, scans=False)
    try:
        if index.unfindable is None:
            with index.env.begin() as txn:
                for db in (index.gcq, index.quarantine, index.plans):
                    assert db is None or not txn.stat(db)["entries"], "a ref may be doomed"
            index.unfindable = index.quarantine  # empty, keyed by ref as `unfindable` is
        yield index
    finally:
        index.env.close()


def as_version_3(path: Path) -> dict:
    """See the module docstring."""
    env = lmdb.open(str(path / "index"), max_dbs=32, map_size=1 << 40)
    try:
        with env.begin(write=True) as txn:
            meta = env.open_db(b"meta", txn=txn)
            assert U64.unpack(txn.get(b"version", db=meta))[0] in (3, INDEX_VERSION)
            table = env.open_db(b"unfindable", txn=txn)
            assert not txn.stat(table)["entries"], "refs are unfindable: not a version 3 state"
            txn.drop(table, delete=True)
            txn.put(b"version", U64.pack(3), db=meta)
    finally:
        env.close()
    return {"version": 3}


def _check_ids(table: tally.RefTable, batches: list[tuple[np.ndarray, np.ndarray]]) -> None:
    for ids, refs in batches:
        pos, found = table.find(refs)
        assert (found & (table.id_prints[pos] == tally.fingerprints(ids))).all()


def _surely_absent(repo: Repository, ids: list[bytes]) -> None:
    """As the backup pipeline looks ids up: the filter over a batch, LMDB for the rest."""
    with repo.index.reader() as reader:
        for start in range(0, len(ids), LOOKUP_BATCH):
            batch = ids[start:start + LOOKUP_BATCH]
            absent = reader.surely_absent(batch)
            for chunk_id, skip in zip(batch, absent.tolist()):
                if not skip:
                    reader.dedup_ref(chunk_id)


@contextmanager
def _opened(path: Path, cold: bool) -> Iterator[Repository]:
    if cold:
        evict(index_file(path))
    repo = Repository.open(path)
    try:
        yield repo
    finally:
        repo.close()


def _ids_of(reader: IndexReader, refs: np.ndarray) -> list[bytes]:
    return [i for i in map(reader.chunk_id_of, refs.tolist()) if i is not None]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    g = sub.add_parser("grow", help="grow REPO to --chunks chunks")
    g.add_argument("repo", type=Path)
    g.add_argument("--chunks", type=int, required=True)
    g.add_argument("--per-point", type=int, default=10_000)
    g.add_argument("--vms", type=int, default=20)
    lk = sub.add_parser("lookups", help="time the index's look-ups and inserts on REPO")
    lk.add_argument("repo", type=Path)
    lk.add_argument("--count", type=int, default=125_000,
                    help="look-ups of each kind (default: the non-zero blocks of a 4 GiB "
                         "workload disk at 16 KiB)")
    lk.add_argument("--warm", action="store_true", help="do not evict the index first")
    sc = sub.add_parser("scans", help="time scans of refs and ids, read-ahead off and on")
    sc.add_argument("repo", type=Path)
    sc.add_argument("--rows", type=int, default=10_000_000)
    se = sub.add_parser("searches", help="time verify's look-ups of ids in the sorted refs")
    se.add_argument("repo", type=Path)
    se.add_argument("--batches", type=int, default=40)
    lo = sub.add_parser("locality", help="time look-ups of stored ids, by id and by locality")
    lo.add_argument("repo", type=Path)
    lo.add_argument("--count", type=int, default=125_000)
    lo.add_argument("--warm", action="store_true", help="do not evict the index first")
    lo.add_argument("--read-only", action="store_true", help="never write the index")
    lo.add_argument("--no-readahead", action="store_true",
                    help="map the index without read-ahead whatever its size")
    v3 = sub.add_parser("as-version-3", help="set an index with nothing unfindable to version 3")
    v3.add_argument("repo", type=Path)
    r = sub.add_parser("run", help="run a command, index evicted, and note its I/O")
    r.add_argument("--evict", type=Path, metavar="REPO")
    r.add_argument("--stats", type=Path)
    r.add_argument("--no-readahead", action="store_true",
                   help="map the index without read-ahead (CMD is a repo-engine script)")
    r.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    if args.what == "grow":
        print(json.dumps(grow(args.repo, args.chunks, args.per_point, args.vms)))
        return
    rows = {"lookups": lambda: lookups(args.repo, args.count, not args.warm),
            "scans": lambda: scans(args.repo, args.rows),
            "searches": lambda: searches(args.repo, args.batches),
            "locality": lambda: locality(args.repo, args.count, not args.warm, args.read_only,
                                         args.no_readahead),
            "as-version-3": lambda: [as_version_3(args.repo)]}.get(args.what)
    if rows is not None:
        for row in rows():
            print(json.dumps(row))
        return
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    sys.exit(run(without_readahead(command) if args.no_readahead else command, args.evict,
                 args.stats))


if __name__ == "__main__":
    main()
