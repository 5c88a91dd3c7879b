#!/usr/bin/env python3
"""How each command's cost grows with the scale of a repository: a curve per part.

    .venv/bin/python bench/scale.py [--parts points] [--work DIR] [--points 10000] [--vms 20]
                                    [--curve 100,1000,10000] [--repo-engine LABEL=CMD ...]
                                    [--out bench/out/scale.json]

Parts (more can be added to PARTS: one function building a repository per size on the curve and
one timing the commands on it):
- points: for each count on the curve, a repository of that many restore points of --vms VMs,
  made by real backups of a tiny image (4 blocks of 16 KiB; one block changed per point, given as
  `--changed` extents) run in this process through `backup_vm` (the backup code path; only the
  clock is set, so the points spread evenly over --days, about 1.5 years by default, the way a
  nightly schedule would place them). Then each command runs as its own process, the way a user
  runs it (start-up included): `points`, `points --json`, `show VM@latest`, `show ID`,
  `forget --dry-run` with a GFS policy, a backup that finds its parent, the history's first gc,
  `forget ID --prune` of one point, a daily `forget --prune` with a GFS policy (one point of
  each VM goes) and `forget --prune` with that policy. Wall seconds, CPU seconds, peak RSS and
  peak anonymous memory of each.
- chunks: for each chunk count on the curve (e.g. --curve 1000000,10000000), one repository grown
  to it by the bench-only loader (bench/bigrepo.py), then, on a copy with its index evicted from
  the page cache: backups of a new 4 GiB disk (all chunks new) and of the same disk again (all
  duplicates), forget of 1% of the points, gc, verify, scrub of 1% and rebuild-index.

Each --repo-engine build (default: this checkout's `repo-engine` next to the interpreter) gets a
fresh copy of each built repository, so builds compare side by side in one run. Root is not
needed. Prints one markdown table per part and the load average; raw figures go to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from run import TIME

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BLOCK = 16 * 1024
DISK_BLOCKS = 4
GFS = ["--keep-daily", "7", "--keep-weekly", "4", "--keep-monthly", "12", "--keep-yearly", "5"]
START = datetime(2025, 6, 1, 1, 0, tzinfo=timezone.utc)


@dataclass
class Timed:
    command: str
    seconds: float
    cpu_seconds: float
    maxrss_kb: int
    rc: int
    anon_kb: int = 0  # peak anonymous memory (RssAnon, sampled): the index's mapped file pages,
    # which %M counts too, are page cache the kernel reclaims; this is what an OOM kill is about


def measure(command: list[str], log: Path, timeout: float) -> Timed:
    """Run a command under GNU time: wall and CPU seconds, peak RSS (and, sampled, its peak
    anonymous memory). No `sync` around it (as bench/run.py does for backups): these commands
    write little, and a sync would time the other writers of a shared machine. Past `timeout` seconds the command is killed and
    reported as such (rc -9, the timeout as its wall time)."""
    stats = log.with_suffix(".time")
    with open(log, "w") as out:
        # run from the log directory: `python -m repo_engine` must not import a checkout that
        # happens to be the current directory instead of the build's
        proc = subprocess.Popen([TIME, "-f", "%e %U %S %M", "-o", str(stats), *command],
                                stdout=out, stderr=out, start_new_session=True, cwd=log.parent)
        deadline, anon = time.monotonic() + timeout, 0
        while (rc := proc.poll()) is None:
            if time.monotonic() > deadline:
                os.killpg(proc.pid, 9)
                proc.wait()
                return Timed(command[-1], timeout, 0.0, 0, -9)
            anon = max(anon, _anon_kb(proc.pid))
            time.sleep(0.02)
    wall, user, system, rss = stats.read_text().split()[-4:]
    return Timed(" ".join(command[-1:]), float(wall), round(float(user) + float(system), 2),
                 int(rss), rc, anon)


def _anon_kb(pid: int) -> int:
    """RssAnon (KiB) of the children of `pid` (GNU time's child: the command)."""
    total = 0
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        for child in children:
            for line in Path(f"/proc/{child}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    total += int(line.split()[1])
    except OSError:
        pass  # the command has just ended
    return total


# ---------------------------------------------------------------- points part

def point_times(count: int, vms: int, days: float) -> list[tuple[int, datetime]]:
    """(VM number, time) of each point, in backup order: every VM backs up once a round, rounds
    evenly spread over `days`, VMs a minute apart within a round."""
    rounds = -(-count // vms)
    step = timedelta(days=days) / max(rounds, 1)
    return [(i % vms, START + (i // vms) * step + timedelta(minutes=i % vms))
            for i in range(count)]


def build_points(path: Path, count: int, vms: int, days: float) -> dict:
    """A repository of `count` points made by real backups (`backup_vm`) of one tiny image per
    VM, one block rewritten and named in the change list before each backup. The backup takes
    its time from `job.now_iso`, which this replaces (the clock is the only thing not real)."""
    from repo_engine.backup import job
    from repo_engine.backup.job import BackupOptions, backup_vm
    from repo_engine.repository.repo import Repository
    from repo_engine.sources.image import ImageDisk, image_snapshot

    shutil.rmtree(path, ignore_errors=True)
    disks = path / "disks"
    disks.mkdir(parents=True)
    rng = np.random.default_rng(count)
    images = []
    for v in range(vms):
        image = disks / f"vm{v:03d}.img"
        image.write_bytes(rng.integers(0, 256, DISK_BLOCKS * BLOCK, np.uint8).tobytes())
        images.append(image)
    started = time.monotonic()
    repo = Repository.init(path / "repo", block_size=BLOCK)
    clock = job.now_iso
    try:
        for n, (v, when) in enumerate(point_times(count, vms, days)):
            block = n // vms % DISK_BLOCKS
            changed = disks / f"vm{v:03d}.json"
            with open(images[v], "r+b") as f:
                f.seek(block * BLOCK)
                f.write(rng.integers(0, 256, BLOCK, np.uint8).tobytes())
            changed.write_text(json.dumps([[block * BLOCK, BLOCK]]))
            stamp = when.isoformat(timespec="microseconds").replace("+00:00", "Z")
            job.now_iso = lambda stamp=stamp: stamp
            snapshot = image_snapshot(f"vm{v:03d}", [ImageDisk("sda", images[v], changed)])
            backup_vm(repo, snapshot, BackupOptions())
    finally:
        job.now_iso = clock
        repo.close()
    return {"points": count, "vms": vms, "build_s": round(time.monotonic() - started, 1)}


def points_commands(path: Path) -> list[tuple[str, list[str]]]:
    """The commands timed on a built repository, in order (the last five change it): the
    history's first gc (it reads the trailer of every pack the backups wrote), then, as gc has
    run, the one-point forget, the daily prune's share per VM, a daily prune with a GFS policy
    (a daily rule keeping all but each VM's oldest day: one point of each VM goes) and the GFS
    one, the first prune of a long history (most points go)."""
    repo = str(path / "repo")
    built = json.loads((path / "built.json").read_text())
    days = built["points"] // built["vms"]  # a VM's points: each of its own day
    listing = subprocess.run([sys.executable, "-m", "repo_engine", "points", repo, "--vm",
                              "vm000", "--json"], capture_output=True, text=True, check=True,
                             cwd=ROOT)
    some = json.loads(listing.stdout)["points"][0]["id"][:8]
    disk = f"sda={path / 'disks' / 'vm000.img'}"
    changed = f"sda={path / 'disks' / 'vm000.json'}"
    return [("points", ["points", repo]),
            ("points --json", ["points", repo, "--json"]),
            ("show VM@latest", ["show", repo, "vm000@latest"]),
            ("show ID", ["show", repo, some]),
            ("forget --dry-run (GFS)", ["forget", repo, *GFS, "--dry-run"]),
            ("backup (finds its parent)", ["backup", "image", repo, "--vm", "vm000",
                                           "--disk", disk, "--changed", changed]),
            ("gc (the first after the history's backups)", ["gc", repo]),
            ("forget ID --prune (one point)", ["forget", repo, some, "--prune"]),
            ("forget --prune (GFS, daily: each VM's oldest day goes)",
             ["forget", repo, "--keep-daily", str(days - 1), "--prune"]),
            ("forget --prune (GFS)", ["forget", repo, *GFS, "--prune"])]


DISK_DATA = 3 << 20  # bytes of data at the start, the middle and the end of a disk
DISK_CHANGE = 1 << 20


def build_disks(path: Path, gib: int) -> dict:
    """Part "disks" (--curve in GiB, e.g. 64,1024,65536). Two sparse images of `gib` GiB:
    `base.img` with DISK_DATA random bytes at its start, middle and end, and `changed.img`, the
    same with DISK_CHANGE bytes rewritten at a quarter of the disk (the extents in
    `changed.json`), and an empty repository (64 KiB blocks). A disk over 16 TiB needs --work on
    a filesystem that holds such a file (tmpfs: /dev/shm)."""
    from repo_engine.repository.repo import Repository

    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    started = time.monotonic()
    capacity = gib << 30
    rng = np.random.default_rng(gib)
    writes = [(offset, rng.integers(0, 256, DISK_DATA, np.uint8).tobytes())
              for offset in (0, capacity // 2, capacity - DISK_DATA)]
    change = (capacity // 4, rng.integers(0, 256, DISK_CHANGE, np.uint8).tobytes())
    for name, extra in (("base.img", []), ("changed.img", [change])):
        with open(path / name, "wb") as image:
            image.truncate(capacity)
            for offset, data in writes + extra:
                os.pwrite(image.fileno(), data, offset)
    (path / "changed.json").write_text(json.dumps([[change[0], DISK_CHANGE]]))
    Repository.init(path / "repo", block_size=64 * 1024).close()
    return {"gib": gib, "build_s": round(time.monotonic() - started, 1)}


def disks_commands(path: Path) -> list[tuple[str, list[str]]]:
    """A first backup, an incremental of the 1 MiB change, a first backup of the same image as
    another VM (all blocks duplicate), a diff of the two VMs' points (the change), a restore."""
    repo = str(path / "repo")
    base, changed = f"sda={path / 'base.img'}", f"sda={path / 'changed.img'}"
    return [("first backup", ["backup", "image", repo, "--vm", "v", "--disk", base]),
            ("incremental, 1 MiB changed", ["backup", "image", repo, "--vm", "v", "--disk",
                                            changed, "--changed",
                                            f"sda={path / 'changed.json'}"]),
            ("first backup, another VM (duplicate)", ["backup", "image", repo, "--vm", "w",
                                                      "--disk", base]),
            ("diff", ["diff", repo, "w@latest", "v@latest"]),
            ("restore (sparse target)", ["restore", repo, "v@latest", "--disk", "sda", "--to",
                                         str(path / "restored.img")])]


# ---------------------------------------------------------------- chunks part

CHUNKS_IMAGE = Path("/var/tmp/wl7/day0.img")


def build_chunks(path: Path, count: int, args: argparse.Namespace) -> dict:
    """A repository of `count` chunks: the one at --work/chunks-grown grown to `count` by the
    bench-only loader (bench/bigrepo.py: the real pack writer and index, synthetic 48-byte
    chunks, one restore point per 10,000), then copied to `path` (the grown one stays for the
    next size on the curve)."""
    from bigrepo import grow

    grown = args.work / "chunks-grown"
    started = time.monotonic()
    info = grow(grown, count, 10_000, args.vms)
    if info["chunks"] >= count + 10_000:  # grown for a larger size by an earlier run
        sys.exit(f"{grown} holds {info['chunks']} chunks, more than {count}: sizes go in "
                 "increasing order; use another --work for smaller ones")
    shutil.rmtree(path, ignore_errors=True)
    if args.in_place:  # too large to copy: the grown repository itself is timed (and changed)
        grown.rename(path)
    else:
        subprocess.run(["cp", "-a", str(grown), str(path)], check=True)
    info["index_bytes"] = (path / "index" / "data.mdb").stat().st_size
    return {**info, "build_s": round(time.monotonic() - started, 1)}


def chunks_commands(path: Path) -> list[tuple[str, list[str]]]:
    """A backup of a new 4 GiB disk (all its chunks new), the same disk as another VM (all its
    chunks duplicates), forget 1% of the points, gc, verify, scrub of 1% of the data and
    rebuild-index. Every point of the loader owns its chunks: forgetting 1% of the points
    leaves gc 1% of the chunks to drop. The copy's index is evicted from the page cache first,
    so the first backup starts as it would with an index larger than the free memory."""
    from bigrepo import evict, index_file

    evict(index_file(path))
    repo = str(path)
    points = sorted(p.stem for p in (path / "points").glob("*.point"))
    doomed = points[:max(1, len(points) // 100)]
    disk = f"sda={CHUNKS_IMAGE}"
    return [("backup, new 4 GiB disk (all new chunks)",
             ["backup", "image", repo, "--vm", "new", "--disk", disk]),
            ("backup, same disk again (all duplicates)",
             ["backup", "image", repo, "--vm", "dup", "--disk", disk]),
            (f"forget {len(doomed)} points (1%)", ["forget", repo, *doomed]),
            ("gc", ["gc", repo]),
            ("verify", ["verify", repo]),
            ("scrub --read-data-subset 1%", ["scrub", repo, "--read-data-subset", "1%"]),
            ("rebuild-index", ["rebuild-index", repo])]


# ---------------------------------------------------------------- driver

@dataclass
class Part:
    build: Callable[[Path, int, argparse.Namespace], dict]
    commands: Callable[[Path], list[tuple[str, list[str]]]]
    unit: str   # what the curve counts


PARTS = {
    "points": Part(lambda path, n, args: build_points(path, n, args.vms, args.days),
                   points_commands, "points"),
    "disks": Part(lambda path, n, args: build_disks(path, n), disks_commands, "GiB"),
    "chunks": Part(build_chunks, chunks_commands, "chunks"),
}


def run_part(name: str, part: Part, args: argparse.Namespace,
             builds: dict[str, list[str]]) -> dict:
    """Per size on the curve: build once, then per build a fresh copy, each command timed."""
    results: dict = {}
    for size in args.curve:
        built = args.work / f"{name}-{size}"
        marker = built / "built.json"
        if args.reuse and marker.exists():
            info = json.loads(marker.read_text())
        else:
            scratch = (args.build_dir or args.work) / built.name
            info = part.build(scratch, size, args)
            if scratch != built:
                shutil.rmtree(built, ignore_errors=True)
                shutil.move(scratch, built)
            marker.write_text(json.dumps(info))
        print(f"{name}: built {size} {part.unit} in {info['build_s']} s", file=sys.stderr)
        per_build = {}
        for label, command in ({} if args.build_only else builds).items():
            copy = built if args.in_place else args.work / f"{name}-{size}-{label}"
            if not args.in_place:
                shutil.rmtree(copy, ignore_errors=True)
                subprocess.run(["cp", "-a", str(built), str(copy)], check=True)
            timed = []
            for what, argv in part.commands(copy):
                log = args.work / "logs" / f"{name}-{size}-{label}-{len(timed)}.log"
                timed.append(replace(measure([*command, *argv], log, args.timeout),
                                     command=what))
            per_build[label] = [asdict(t) for t in timed]
            if not args.in_place:
                shutil.rmtree(copy)
        results[str(size)] = {"build": info, "runs": per_build}
        if not (args.keep or args.reuse):
            shutil.rmtree(built)
    return results


def table(name: str, part: Part, result: dict) -> str:
    sizes = [s for s in result if result[s]["runs"]]
    if not sizes:
        return f"### {name}: built " + ", ".join(
            f"{s} {part.unit} in {r['build']['build_s']} s" for s, r in result.items())
    labels = list(next(iter(result.values()))["runs"])
    head = ["command", "build"] + [f"{s} {part.unit}" for s in sizes]
    rows = []
    for i, row in enumerate(result[sizes[0]]["runs"][labels[0]]):
        for label in labels:
            cells = []
            for s in sizes:
                t = result[s]["runs"][label][i]
                cells.append(f"> {t['seconds']:.0f} s (killed)" if t["rc"] == -9 else
                             "FAILED" if t["rc"] else
                             f"{t['seconds']:.2f} s ({t['cpu_seconds']:.2f} cpu, "
                             f"{t['maxrss_kb'] // 1024} MiB, "
                             f"{t.get('anon_kb', 0) // 1024} MiB anon)")
            rows.append([row["command"], label] + cells)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    head = "wall seconds (CPU seconds, peak RSS, peak anonymous RSS)"
    return f"### {name}: {head}\n\n" + "\n".join(lines)


def parse_build(text: str) -> tuple[str, list[str]]:
    label, _, command = text.partition("=")
    if not command:
        raise argparse.ArgumentTypeError(f"--repo-engine {text!r}: expected LABEL=CMD")
    return label, command.split()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="points", help=f"any of {', '.join(PARTS)}")
    ap.add_argument("--work", type=Path, default=Path("/var/tmp/re-scale-bench"))
    ap.add_argument("--points", type=int, default=10_000, help="the largest point count")
    ap.add_argument("--curve", help="the point counts to measure (default: --points / 100, "
                                    "--points / 10, --points)")
    ap.add_argument("--vms", type=int, default=20)
    ap.add_argument("--days", type=float, default=548, help="time the points span")
    ap.add_argument("--repo-engine", dest="builds", action="append", type=parse_build,
                    metavar="LABEL=CMD", help="a build to time (repeatable); default: this "
                    "checkout's, next to the interpreter")
    ap.add_argument("--timeout", type=float, default=600,
                    help="seconds a command may take before it is killed (default 600)")
    ap.add_argument("--keep", action="store_true", help="keep the built repositories")
    ap.add_argument("--reuse", action="store_true", help="time the repositories a run with "
                    "--keep left in --work (same sizes) instead of building them again")
    ap.add_argument("--build-dir", type=Path, help="build the repositories here, then move "
                    "them to --work (e.g. /dev/shm: the same code paths without waiting for the "
                    "disk's fsyncs, which make a 10,000-point build take an hour on a busy disk)")
    ap.add_argument("--build-only", action="store_true", help="build (keep) and time nothing")
    ap.add_argument("--in-place", action="store_true", help="time the commands on the built "
                    "repository itself, not on a copy (one build; the repository is changed, "
                    "and for --parts chunks the grown one is moved there): for a size too large "
                    "to copy twice, such as 100 M chunks")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "scale.json")
    args = ap.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    if bad := [p for p in parts if p not in PARTS]:
        sys.exit(f"unknown parts: {bad}; parts: {', '.join(PARTS)}")
    args.curve = ([int(c) for c in args.curve.split(",")] if args.curve else
                  sorted({max(args.vms, args.points // 100), args.points // 10, args.points}))
    args.work = args.work.resolve()
    args.keep |= args.build_only | args.in_place
    if args.in_place and len(args.builds or []) > 1:
        sys.exit("--in-place times one build: the commands change the repository")
    (args.work / "logs").mkdir(parents=True, exist_ok=True)
    builds = dict(args.builds or [("this", [str(Path(sys.executable).with_name("repo-engine"))])])
    report: dict = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                             "host": platform.node(), "cpus": os.cpu_count(),
                             "builds": {k: " ".join(v) for k, v in builds.items()},
                             "vms": args.vms, "days": args.days, "curve": args.curve}}
    tables = []
    for name in parts:
        report[name] = run_part(name, PARTS[name], args, builds)
        tables.append(table(name, PARTS[name], report[name]))
    report["meta"]["loadavg"] = os.getloadavg()
    tables.append("load average at the end: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**report, "tables": tables}, indent=1))
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
