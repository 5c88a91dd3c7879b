#!/usr/bin/env python3
"""The machine's floor for each phase of a backup and a restore, and repo-engine against it.

    python3 bench/floor.py --work DIR [--days N] [--repo-engine CMD ...] [--python PY]
                           [--parts full,incremental,restore] [--rounds N] [--scratch DIR]

On a bench/workload.py work dir, times (wall seconds, each command followed by `sync`):
  read      `cat` of the image (page cache); for a restore, of the whole repository, cold
  hash      `b3sum` of the data (Debian package b3sum: BLAKE3 on all cores, mmap)
  compress  `zstd -T2 -1 -c` of the data; for a restore, two `zstd -d` side by side
  write     `dd conv=fsync` of the data's zstd -1 output; for a restore, of the data itself
  start-up  `PY -c 'import numpy, blake3, zstandard, lmdb'`: the interpreter and the libraries
            any backup needs (the slowest imports of `-X importtime -c 'import repo_engine.cli'`
            are printed below the table)
where the data is what the operation must hash, compress and store: day 0's non-zero 64 KiB
blocks (full backup), the last day's changed extents (incremental), the last day's non-zero
blocks (restore), each copied into one file untimed. The floors are measured twice, after the
engines ran, and each phase keeps its faster round; CPU seconds are printed too. Each
`--repo-engine` command (several are run side by side, interleaved) makes a day 0 full backup, days 1..N incrementals and two cold
restores of day N (in ABBA order; its repository dropped from the page cache, timed until
durable); every time is printed as a multiple of the floor: the sum of the phases (serial) and
the overlapped floor (start-up + max(read + hash + compress, write)), which a perfect pipeline
could reach. `--parts` limits the operations measured and reported (the day 0 full backup
always runs: the incrementals need it); `--scratch` is where the repositories and the floors'
data go (default WORK/bench-floor; the work dir is then written to); `--rounds` cold
restores per build (default 2).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from run import MIB, RepoEngine, evict, measure, parse_json_output, warm

IMPORTS = "import numpy, blake3, zstandard, lmdb"
CPU_PHASES = ("read", "hash", "compress")
BLOCK = 64 * 1024
FLOOR_ROUNDS = 2
PARTS = ("full", "incremental", "restore")
DATA = {"full": "day 0's non-zero 64 KiB blocks", "incremental": "the last day's changed extents",
        "restore": "the last day's non-zero blocks"}


@dataclass
class Floor:
    """(wall seconds, CPU seconds) per phase of one operation's floor."""
    phases: dict[str, tuple[float, float]] = field(default_factory=dict)

    def wall(self, phase: str) -> float:
        return self.phases[phase][0] if phase in self.phases else 0.0

    @property
    def serial(self) -> float:
        return sum(wall for wall, _ in self.phases.values())

    @property
    def overlapped(self) -> float:
        cpu = sum(self.wall(p) for p in CPU_PHASES)
        return self.wall("start-up") + max(cpu, self.wall("write"))

    @property
    def cpu(self) -> float:
        """CPU seconds of all phases: on a loaded machine this varies far less than wall time."""
        return sum(cpu for _, cpu in self.phases.values())


def timed(cmd: list[str] | str) -> tuple[float, float]:
    """(wall seconds of a command plus its trailing sync, its CPU seconds); a shell string runs
    under sh -c."""
    argv = ["sh", "-c", cmd] if isinstance(cmd, str) else cmd
    m = measure(argv, keep_stdout=False)
    if m.rc != 0:
        sys.exit(f"floor: {argv} failed with rc={m.rc}")
    return m.seconds, m.cpu_seconds


def q(path: Path) -> str:
    return shlex.quote(str(path))


def startup(python: str) -> tuple[float, float]:
    return min(timed([python, "-c", IMPORTS]) for _ in range(3))


def import_report(python: str) -> str:
    """The ten slowest cumulative imports of `import repo_engine.cli` (-X importtime, µs)."""
    err = subprocess.run([python, "-X", "importtime", "-c", "import repo_engine.cli"],
                         capture_output=True, text=True, check=True).stderr
    rows = []
    for line in err.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            rows.append((int(parts[1]), parts[2].strip()))
    rows.sort(reverse=True)
    return ", ".join(f"{name} {us / 1000:.1f} ms" for us, name in rows[:10])


def cpu_floor(source: Path, data: Path, scratch: Path, start: tuple[float, float]) -> Floor:
    """read of `source`, hash + compress of `data` (its bytes that need it), write+fsync of the
    zstd -1 output: all from the page cache."""
    warm(source)
    warm(data)
    packed = scratch / "packed.zst"
    subprocess.run(["zstd", "-q", "-f", "-T2", "-1", str(data), "-o", str(packed)], check=True)
    phases = {"start-up": start,
              "read": timed(f"cat {q(source)} > /dev/null"),
              "hash": timed(["b3sum", "--no-names", str(data)]),
              "compress": timed(f"zstd -q -T2 -1 -c {q(data)} > /dev/null"),
              "write": timed(f"dd if={q(packed)} of={q(scratch / 'written')} bs=1M conv=fsync "
                             "status=none")}
    (scratch / "written").unlink()
    packed.unlink()
    return Floor(phases)


def restore_floor(data: Path, repo: Path, scratch: Path, start: tuple[float, float]) -> Floor:
    """Cold read of the repository; decompress (two `zstd -d` side by side), hash and
    write+fsync of `data`, the image's non-zero blocks."""
    halves = [scratch / "half0.zst", scratch / "half1.zst"]
    half = data.stat().st_size // 2 // MIB
    for k, out in enumerate(halves):
        count = "" if k else f"count={half}"
        subprocess.run(f"dd if={q(data)} bs=1M skip={half * k} {count} status=none | "
                       f"zstd -q -1 -T2 -c > {q(out)}", shell=True, check=True)
    evict(repo)
    phases = {"start-up": start,
              "read": timed(f"find {q(repo)} -type f -print0 | xargs -0 cat > /dev/null"),
              "compress": timed(f"zstd -q -d -c {q(halves[0])} > /dev/null & "
                                f"zstd -q -d -c {q(halves[1])} > /dev/null; wait"),
              "hash": timed(["b3sum", "--no-names", str(data)])}
    warm(data)
    phases["write"] = timed(f"dd if={q(data)} of={q(scratch / 'restored')} bs=1M "
                            "conv=fsync status=none")
    for p in [*halves, scratch / "restored"]:
        p.unlink()
    return Floor(phases)


def nonzero_file(image: Path, out: Path) -> int:
    """Copy the image's non-zero 64 KiB blocks into one file (the bytes a backup hashes,
    compresses and stores, and a restore writes); returns its size."""
    blocks = np.memmap(image, dtype=np.uint64, mode="r").reshape(-1, BLOCK // 8)
    total = 0
    with open(out, "wb") as dst:
        for start in range(0, len(blocks), 4096):
            part = blocks[start:start + 4096]
            keep = part[part.any(axis=1)]
            dst.write(keep.tobytes())
            total += keep.nbytes
    return total


def changed_file(image: Path, extents: Path, out: Path) -> int:
    """Copy the changed extents of `image` into one file; returns its size."""
    total = 0
    with open(image, "rb") as src, open(out, "wb") as dst:
        for off, length in json.loads(extents.read_text()):
            dst.write(os.pread(src.fileno(), length, off))
            total += length
    return total


@dataclass
class EngineRun:
    label: str
    command: list[str]
    full: float = 0.0
    incr: list[float] = field(default_factory=list)
    restores: list[float] = field(default_factory=list)
    cpu: dict[str, list[float]] = field(default_factory=dict)   # CPU seconds per operation
    ok: bool = True
    notes: list[str] = field(default_factory=list)


def run_engines(engines: list[EngineRun], work: Path, days: int, root: Path,
                rounds: int) -> None:
    """Every engine: init, day 0 full, days 1..N incremental, `rounds` cold restores
    of day N (interleaved per step, the order rotated each step)."""
    current = root / "current.img"
    tools = {e.label: RepoEngine(root / e.label, current, e.command) for e in engines}
    for e in engines:
        tools[e.label].root.mkdir(parents=True)
        for cmd in tools[e.label].init():
            subprocess.run(cmd, check=True, capture_output=True)
    for day in range(days + 1):
        subprocess.run(["cp", "--sparse=always", str(work / f"day{day}.img"), str(current)],
                       check=True)
        warm(current)
        extents = work / f"day{day}.extents.json" if day else None
        for e in engines[day % len(engines):] + engines[:day % len(engines)]:
            m = measure(tools[e.label].backup(day, extents))
            if m.rc != 0:
                e.ok = False
                e.notes.append(f"backup day {day} rc={m.rc}")
                continue
            if day == 0:
                e.full = m.seconds
            else:
                e.incr.append(m.seconds)
            e.cpu.setdefault("incremental" if day else "full", []).append(m.cpu_seconds)
            print(f"  {e.label:10s} day {day}: {m.seconds:6.2f} s "
                  f"(engine {parse_json_output(m.stdout)['backup'].get('seconds', '?')} s)",
                  file=sys.stderr)
    expected = work / f"day{days}.img"
    for order in range(rounds):   # ABBA: each engine restores first in turn
        for e in engines[::-1] if order % 2 == 0 else engines:
            restore_once(e, tools[e.label], days, expected)


def restore_once(e: EngineRun, tool: RepoEngine, day: int, expected: Path) -> None:
    out_dir = tool.root / "restore"
    out_dir.mkdir()
    cmd, restored, _ = tool.restore(day, out_dir)
    evict(tool.repo)
    m = measure(cmd)
    e.restores.append(m.seconds)
    e.cpu.setdefault("restore", []).append(m.cpu_seconds)
    same = subprocess.run(["cmp", "-s", str(restored), str(expected)]).returncode == 0
    if m.rc != 0 or not same:
        e.ok = False
        e.notes.append(f"restore rc={m.rc} identical={same}")
    print(f"  {e.label:10s} restore: {m.seconds:6.2f} s", file=sys.stderr)
    shutil.rmtree(out_dir)


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages (the machine may be shared: read figures with it)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def report(floors: dict[str, Floor], engines: list[EngineRun], loads: dict[str, str],
           sizes: dict[str, int]) -> str:
    """The floors' table, then each command's times against its operation's floor (the
    operations that have one)."""
    phases = ["start-up", "read", "hash", "compress", "write"]
    lines = ["| operation | " + " | ".join(phases) + " | floor (sum) | floor (overlapped) | "
             "floor CPU s | load avg |", "|---|" + "---|" * (len(phases) + 4)]
    for op, fl in floors.items():
        cells = [f"{fl.wall(p):.2f}" if p in fl.phases else "—" for p in phases]
        lines.append(f"| {op} floor | " + " | ".join(cells)
                     + f" | {fl.serial:.2f} | {fl.overlapped:.2f} | {fl.cpu:.2f} | {loads[op]} |")
    lines += ["", "| command | operation | s | × floor sum | × floor overlapped | CPU s | "
              "× floor CPU | status |", "|---|---|---|---|---|---|---|---|"]
    for e in engines:
        for op, times in (("full", [e.full]), ("incremental", e.incr), ("restore", e.restores)):
            if op not in floors:
                continue
            fl = floors[op]
            secs = statistics.mean(times) if times else float("nan")
            cpu = statistics.mean(e.cpu.get(op, [float("nan")]))
            lines.append(f"| {e.label} | {op} | {secs:.2f} | {secs / fl.serial:.2f}× | "
                         f"{secs / fl.overlapped:.2f}× | {cpu:.2f} | {cpu / fl.cpu:.2f}× | "
                         + ("ok" if e.ok else "FAILED: " + "; ".join(e.notes)) + " |")
    rounds = len(engines[0].restores)
    lines += ["", f"incremental = mean over days 1..N; restore = mean of {rounds} cold restores; "
              f"load average (1, 5, 15 min) after the engines ran: {loads['engines']}; floor "
              "data (hashed, compressed, written): "
              + ", ".join(f"{op} {sizes[op] / MIB:.1f} MiB ({DATA[op]})" for op in floors) + "."]
    return "\n".join(lines)


def measure_floors(work: Path, days: int, repo: Path, scratch: Path, python: str,
                   loads: dict[str, str], parts: list[str]
                   ) -> tuple[dict[str, Floor], dict[str, int]]:
    """The floor of each operation of `parts`, FLOOR_ROUNDS times: per phase the fastest round
    (the floor is what the machine can do; a shared machine's load only ever adds). Also the
    data sizes."""
    data = {"full": scratch / "full.bin", "incremental": scratch / "changed.bin",
            "restore": scratch / "restore.bin"}
    make = {"full": lambda: nonzero_file(work / "day0.img", data["full"]),
            "incremental": lambda: changed_file(work / f"day{days}.img",
                                                work / f"day{days}.extents.json",
                                                data["incremental"]),
            "restore": lambda: nonzero_file(work / f"day{days}.img", data["restore"])}
    sizes = {op: make[op]() for op in parts}
    measure = {"full": lambda start: cpu_floor(work / "day0.img", data["full"], scratch, start),
               "incremental": lambda start: cpu_floor(data["incremental"], data["incremental"],
                                                      scratch, start),
               "restore": lambda start: restore_floor(data["restore"], repo, scratch, start)}
    floors: dict[str, Floor] = {}
    for _ in range(FLOOR_ROUNDS):
        start = startup(python)
        rounds = {op: measure[op](start) for op in parts}
        for op, fl in rounds.items():
            best = floors.setdefault(op, fl)
            best.phases = {p: min(best.phases[p], fl.phases[p]) for p in fl.phases}
            loads[op] = (loads[op] + " / " if op in loads else "") + loadavg()
    return floors, sizes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="directory made by bench/workload.py")
    ap.add_argument("--days", type=int, help="default: all days in the work dir's manifest")
    ap.add_argument("--repo-engine", action="append", default=[], metavar="[LABEL=]CMD",
                    help="repo-engine command (shell-split); repeat to compare builds side by side")
    ap.add_argument("--python", help="interpreter repo-engine runs on (default: the `python` next "
                    "to the first --repo-engine command)")
    ap.add_argument("--parts", default=",".join(PARTS), help="operations to measure and report, "
                    "any of full,incremental,restore (the day 0 full backup always runs)")
    ap.add_argument("--scratch", type=Path, help="where the repositories and the floors' data "
                    "go, emptied first (default: WORK/bench-floor)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "floor.md")
    ap.add_argument("--rounds", type=int, default=2, help="cold restores per build (ABBA order)")
    args = ap.parse_args()
    parts = [p for p in PARTS if p in args.parts.split(",")]
    if not parts or set(args.parts.split(",")) - set(PARTS):
        ap.error(f"--parts: a comma-separated list of {', '.join(PARTS)}")
    work = args.work.resolve()
    days = args.days if args.days is not None else json.loads((work / "manifest.json").read_text())["days"]
    root = (args.scratch or work / "bench-floor").resolve()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    engines = []
    for k, spec in enumerate(args.repo_engine or ["repo-engine"]):
        label, _, cmd = spec.partition("=") if "=" in spec.split()[0] else (f"engine{k}", "", spec)
        engines.append(EngineRun(label, shlex.split(cmd)))
    python = args.python or str(Path(shutil.which(engines[0].command[0]) or sys.executable).parent
                                / "python")
    loads: dict[str, str] = {}
    run_engines(engines, work, days, root, args.rounds if "restore" in parts else 0)
    loads["engines"] = loadavg()
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        floors, sizes = measure_floors(work, days, root / engines[0].label / "repo", Path(tmp),
                                       python, loads, parts)
    text = report(floors, engines, loads, sizes)
    text += "\n\n`import repo_engine.cli`, slowest cumulative imports: " + import_report(python)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
