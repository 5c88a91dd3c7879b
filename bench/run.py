#!/usr/bin/env python3
"""Benchmark repo-engine against peer backup tools on a bench/workload.py work dir.

    python3 bench/run.py --work DIR [--tools repo-engine,repo-engine-shared,repo-engine-encrypted,repo-engine-keyfile,restic,...]
                         [--days 7] [--out bench/out/results.json]
                         [--repo-engine before=/tmp/old/.venv/bin/repo-engine --repo-engine after=repo-engine]

Steps run in order (day 0 full backup, days 1..N incremental, restore of day N);
within each step every tool runs once, so tools are interleaved. Prints one
markdown table; raw measurements go to --out. Several `--repo-engine LABEL=CMD` run every
repo-engine tool once per build, as TOOL@LABEL, side by side in the same steps.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_TOOLS = "repo-engine,benji,restic,borg,borg-fixed,casync,cat,b3sum,zstd"
MIB = 1024 * 1024
TIME = "/usr/bin/time"   # GNU time (Debian package `time`)
# Python tools run with their byte code cached, as an installed package's is (a shell that sets
# PYTHONDONTWRITEBYTECODE would make every run compile the tool's modules again)
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


# ---------------------------------------------------------------- measuring

@dataclass
class Measure:
    seconds: float          # command wall time + the `sync` after it
    sync_seconds: float
    rchar: int              # bytes read via read(2)-like syscalls, child and its descendants
    maxrss_kb: int          # GNU time %M: max RSS of the command (not of this Python parent)
    rc: int
    cpu_seconds: float = 0.0   # user + system CPU of the command and its children
    stdout: str = field(repr=False, default="")


def measure(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None,
            log: Path | None = None, keep_stdout: bool = True) -> Measure:
    """Run cmd under /usr/bin/time, timing it plus a trailing sync; read /proc io before reaping.

    The small `time` process forks the command, so the command's ru_maxrss does not start
    from this Python process's RSS (exec keeps the pre-exec high-water mark)."""
    subprocess.run(["sync"], check=True)
    rss_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-rss-{os.getpid()}"
    log_f = open(log, "w") if log else subprocess.DEVNULL
    out = subprocess.PIPE if keep_stdout else subprocess.DEVNULL
    try:
        start = time.perf_counter()
        proc = subprocess.Popen([TIME, "-f", "%M", "-o", str(rss_file), *cmd], env=env, cwd=cwd,
                                stdout=out, stderr=log_f)
        stdout = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)   # zombie: /proc/PID/io still readable
        ended = time.perf_counter()
        rchar = read_rchar(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.stdout:
            proc.stdout.close()
        subprocess.run(["sync"], check=True)
        synced = time.perf_counter()
    finally:
        if log:
            log_f.close()
    if log and stdout:
        with open(log, "a") as f:
            f.write("\n--- stdout ---\n" + stdout[-20000:])
    maxrss = rss_file.read_text().split()[-1]   # "Command exited with non-zero status N" may precede it
    rss_file.unlink()
    return Measure(synced - start, synced - ended, rchar, int(maxrss), proc.returncode,
                   usage.ru_utime + usage.ru_stime, stdout)


def read_rchar(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def du_bytes(path: Path) -> int:
    out = subprocess.run(["du", "-sb", str(path)], check=True, capture_output=True, text=True).stdout
    return int(out.split()[0])


def warm(path: Path) -> None:
    """Put an image in the page cache (untimed)."""
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)


def evict(path: Path) -> None:
    """Drop every file under `path` from the page cache (POSIX_FADV_DONTNEED after a sync), so a
    restore reads its repository cold without dropping the whole machine's caches."""
    subprocess.run(["sync"], check=True)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def files_equal(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


# ---------------------------------------------------------------- tools

class Tool:
    """A backup tool: init (untimed), backup per day, restore of the last day."""
    name = ""
    binary = ""
    baseline = False

    def __init__(self, root: Path, image: Path, command: list[str] | None = None) -> None:
        self.root = root                      # private dir: repo/, restore/, caches
        self.repo = root / "repo"
        self.image = image                    # the fixed path each day's image is staged at
        self.command = command or [self.binary]

    def missing(self) -> str | None:
        return None if shutil.which(self.command[0]) else "not installed"

    def version(self) -> str:
        try:
            r = subprocess.run(self.command + ["--version"], capture_output=True, text=True, timeout=30)
            return (r.stdout or r.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return "?"

    def restored_path(self, out_dir: Path) -> Path:
        """Where tools that restore by original path put the image under out_dir."""
        return out_dir / self.image.relative_to("/")

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def init(self) -> list[list[str]]:
        return []

    def backup(self, day: int, extents: Path | None) -> list[str]:
        raise NotImplementedError

    def restore(self, day: int, out_dir: Path) -> tuple[list[str], Path, Path | None]:
        """Command, path of the restored image, cwd."""
        raise NotImplementedError

    def bytes_read(self, m: Measure) -> int:
        return m.rchar

    def scrubs(self) -> list[tuple[str, list[str]]]:
        """(label, command) of each scrub timed after the restore."""
        return []


class RepoEngine(Tool):
    name = "repo-engine"
    binary = "repo-engine"
    init_args: list[str] = []      # e.g. ["--block-size", "64KiB"] (bench/blocksize.py)

    def init(self) -> list[list[str]]:
        return [self.command + ["init", str(self.repo)] + self.init_args]

    def backup(self, day: int, extents: Path | None) -> list[str]:
        cmd = self.command + ["backup", "image", str(self.repo), "--vm", "bench", "--disk", f"sda={self.image}"]
        if extents is not None:
            cmd += ["--changed", f"sda={extents}"]
        return cmd + ["--json"]

    def restore(self, day: int, out_dir: Path) -> tuple[list[str], Path, Path | None]:
        out = out_dir / "restored.img"
        return self.command + ["restore", str(self.repo), "bench@latest", "--disk", "sda", "--to", str(out)], out, None

    def bytes_read(self, m: Measure) -> int:
        return int(parse_json_output(m.stdout)["backup"]["bytes_read"])


class RepoEngineShared(RepoEngine):
    """repo-engine on a shared (journal) repository, the format every encrypted one has: the
    baseline that isolates what encryption itself costs."""
    name = "repo-engine-shared"
    init_args = ["--shared"]


class RepoEngineEncrypted(RepoEngine):
    """repo-engine on an encrypted repository, its passphrase in a file named by
    $REPO_ENGINE_PASSWORD_FILE (the way a cron job gives it); scrub is timed with and without
    the key on the repository the backups left."""
    name = "repo-engine-encrypted"
    init_args = ["--encryption"]

    @property
    def passphrase_file(self) -> Path:
        return self.root / "passphrase"

    def env(self) -> dict[str, str]:
        return {**os.environ, "REPO_ENGINE_PASSWORD_FILE": str(self.passphrase_file)}

    def init(self) -> list[list[str]]:
        self.passphrase_file.write_text("bench passphrase\n")
        return super().init()

    def scrubs(self) -> list[tuple[str, list[str]]]:
        scrub = self.command + ["scrub", str(self.repo)]
        return [("scrub", scrub), ("scrub --no-key", scrub + ["--no-key"])]


class RepoEngineKeyFile(RepoEngineEncrypted):
    """repo-engine on an encrypted repository opened by a key file ($REPO_ENGINE_KEY_FILE: the
    recovery private key `key export-recovery` wrote right after init), the way an unattended
    host runs: no passphrase and no key derivation per command."""
    name = "repo-engine-keyfile"

    @property
    def key_file(self) -> Path:
        return self.root / "host.pem"

    def env(self) -> dict[str, str]:
        return {**super().env(), "REPO_ENGINE_KEY_FILE": str(self.key_file)}

    def init(self) -> list[list[str]]:
        self.key_file.unlink(missing_ok=True)
        return super().init() + [self.command + ["key", "export-recovery", str(self.repo),
                                                 "--out", str(self.key_file)]]


def parse_json_output(text: str) -> dict:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        for line in reversed(text.splitlines()):
            if line.strip().startswith("{"):
                return json.loads(line)
        raise


class Restic(Tool):
    name = binary = "restic"

    def env(self) -> dict[str, str]:
        return {**os.environ, "RESTIC_PASSWORD": "bench", "RESTIC_REPOSITORY": str(self.repo),
                "RESTIC_CACHE_DIR": str(self.root / "cache")}

    def init(self) -> list[list[str]]:
        return [["restic", "init"]]

    def backup(self, day: int, extents: Path | None) -> list[str]:
        return ["restic", "backup", "--host", "bench", str(self.image)]

    def restore(self, day: int, out_dir: Path) -> tuple[list[str], Path, Path | None]:
        return ["restic", "restore", "latest", "--target", str(out_dir)], self.restored_path(out_dir), None


class Borg(Tool):
    name = binary = "borg"
    create_args: list[str] = []
    extract_args: list[str] = []

    def env(self) -> dict[str, str]:
        return {**os.environ, "BORG_BASE_DIR": str(self.root / "base"),
                "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes", "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes"}

    def init(self) -> list[list[str]]:
        return [["borg", "init", "-e", "none", str(self.repo)]]

    def backup(self, day: int, extents: Path | None) -> list[str]:
        return ["borg", "create", *self.create_args, f"{self.repo}::day{day}", str(self.image)]

    def restore(self, day: int, out_dir: Path) -> tuple[list[str], Path, Path | None]:
        return ["borg", "extract", *self.extract_args, f"{self.repo}::day{day}"], self.restored_path(out_dir), out_dir


class BorgFixed(Borg):
    name = "borg-fixed"
    create_args = ["--chunker-params", "fixed,65536", "--sparse"]
    extract_args = ["--sparse"]


class Casync(Tool):
    name = binary = "casync"

    def init(self) -> list[list[str]]:
        self.repo.mkdir(parents=True)       # holds store/ and one .caibx index per day
        return []

    def backup(self, day: int, extents: Path | None) -> list[str]:
        return ["casync", "make", f"--store={self.repo / 'store'}", str(self.repo / f"day{day}.caibx"), str(self.image)]

    def restore(self, day: int, out_dir: Path) -> tuple[list[str], Path, Path | None]:
        out = out_dir / "restored.img"
        return ["casync", "extract", f"--store={self.repo / 'store'}", str(self.repo / f"day{day}.caibx"),
                str(out)], out, None


BENJI_BLOCK = 4 << 20
BENJI_CONFIG = """configurationVersion: '1'
databaseEngine: sqlite:///{root}/benji.sqlite
defaultStorage: storage-1
blockSize: {block}
storages:
  - name: storage-1
    storageId: 1
    module: file
    configuration:
      path: {repo}
      activeTransforms: [zstd]
transforms:
  - name: zstd
    module: zstd
    configuration:
      level: 1
ios:
  - name: file
    module: file
"""


class Benji(Tool):
    """Benji 0.17 (4 MiB blocks, zstd level 1); incrementals get the changed extents as rbd-diff
    hints (`-r`) on top of the previous version (`-f`), as Ceph RBD changed-block tracking gives."""
    name = binary = "benji"

    @property
    def config(self) -> Path:
        return self.root / "benji.yaml"

    def init(self) -> list[list[str]]:
        self.config.write_text(BENJI_CONFIG.format(root=self.root, repo=self.repo, block=BENJI_BLOCK))
        return [[*self.command, "-c", str(self.config), "database-init"]]

    def backup(self, day: int, extents: Path | None) -> list[str]:
        cmd = [*self.command, "-c", str(self.config), "--log-level", "WARNING", "backup",
               "-u", f"day{day}"]
        if extents is not None:
            hints = self.root / f"day{day}.hints.json"
            hints.write_text(json.dumps(rbd_hints(json.loads(extents.read_text()))))
            cmd += ["-r", str(hints), "-f", f"day{day - 1}"]
        return cmd + [f"file:{self.image}", "bench"]

    def restore(self, day: int, out_dir: Path) -> tuple[list[str], Path, Path | None]:
        out = out_dir / "restored.img"
        return [*self.command, "-c", str(self.config), "--log-level", "WARNING", "restore", "-s",
                f"day{day}", f"file:{out}"], out, None


def rbd_hints(extents: list[list[int]]) -> list[dict]:
    """`rbd diff --format json` entries for byte extents (Benji reads every block a hint touches)."""
    return [{"offset": off, "length": length, "exists": "true"} for off, length in extents]


class Baseline(Tool):
    """Just read / hash / compress the day-0 image: a lower bound for a full backup."""
    baseline = True
    args: list[str] = []

    def backup(self, day: int, extents: Path | None) -> list[str]:
        return [*self.command, *self.args, str(self.image)]


class Cat(Baseline):
    name = binary = "cat"


class B3sum(Baseline):
    name = binary = "b3sum"


class Zstd(Baseline):
    name = binary = "zstd"
    args = ["-T2", "-1", "-c"]


TOOLS: dict[str, type[Tool]] = {t.name: t for t in (RepoEngine, RepoEngineShared, RepoEngineEncrypted, RepoEngineKeyFile, Benji, Restic, Borg, BorgFixed, Casync, Cat, B3sum, Zstd)}


# ---------------------------------------------------------------- running

@dataclass
class Result:
    tool: str
    version: str = ""
    status: str = "ok"
    backups: list[dict] = field(default_factory=list)    # per day: Measure fields + bytes_read
    restore: dict | None = None
    repo_bytes: int | None = None
    scrubs: dict[str, dict] = field(default_factory=dict)  # label -> seconds, cpu_seconds, load


def day_images(work: Path, days: int) -> list[Path]:
    imgs = [work / f"day{d}.img" for d in range(days + 1)]
    missing = [str(p) for p in imgs if not p.exists()] + \
        [str(work / f"day{d}.extents.json") for d in range(1, days + 1) if not (work / f"day{d}.extents.json").exists()]
    if missing:
        sys.exit("missing workload files (run bench/workload.py first): " + ", ".join(missing))
    return imgs


def stage(src: Path, current: Path) -> None:
    """Copy a day's image onto the fixed path every tool backs up (untimed), then warm the cache."""
    subprocess.run(["cp", "--sparse=always", str(src), str(current)], check=True)
    warm(current)


def fail(res: Result, what: str, m: Measure | None = None) -> None:
    res.status = f"FAILED ({what}{f', rc={m.rc}' if m else ''})"
    print(f"  {res.tool}: {res.status}", file=sys.stderr)


def run_backup(tool: Tool, res: Result, day: int, extents: Path | None, logs: Path) -> None:
    m = measure(tool.backup(day, extents), env=tool.env(), log=logs / f"{tool.name}-day{day}.log",
                keep_stdout=not tool.baseline)
    if m.rc != 0:
        return fail(res, f"backup day {day}", m)
    try:
        read = tool.bytes_read(m)
    except (KeyError, ValueError) as e:
        return fail(res, f"day {day} --json output: {e!r}")
    res.backups.append({"day": day, **{k: v for k, v in asdict(m).items() if k != "stdout"}, "bytes_read": read,
                        "load": os.getloadavg()[0]})
    print(f"  {tool.name:12s} day {day}: {m.seconds:7.2f} s  read {read / MIB:9.1f} MiB  "
          f"rss {m.maxrss_kb / 1024:7.1f} MB", file=sys.stderr)


def run_restore(tool: Tool, res: Result, day: int, expected: Path, logs: Path) -> None:
    out_dir = tool.root / "restore"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    cmd, restored, cwd = tool.restore(day, out_dir)
    evict(tool.root)     # cold: the repository (and caches) come from disk
    m = measure(cmd, env=tool.env(), cwd=cwd, log=logs / f"{tool.name}-restore.log")
    if m.rc != 0:
        return fail(res, "restore", m)
    ok = restored.exists() and files_equal(restored, expected)
    res.restore = {"seconds": m.seconds, "sync_seconds": m.sync_seconds, "maxrss_kb": m.maxrss_kb, "verified": ok,
                   "cpu_seconds": m.cpu_seconds, "load": os.getloadavg()[0]}
    print(f"  {tool.name:12s} restore: {m.seconds:7.2f} s  verified={ok}", file=sys.stderr)
    shutil.rmtree(out_dir, ignore_errors=True)
    if not ok:
        fail(res, "restore differs from source")


def run_scrubs(tool: Tool, res: Result, logs: Path) -> None:
    """Each scrub of the tool, cold like the restore."""
    for label, cmd in tool.scrubs():
        evict(tool.root)
        m = measure(cmd, env=tool.env(), log=logs / f"{tool.name}-{label.replace(' ', '')}.log")
        if m.rc != 0:
            return fail(res, label, m)
        res.scrubs[label] = {"seconds": m.seconds, "cpu_seconds": m.cpu_seconds,
                             "load": os.getloadavg()[0]}
        print(f"  {tool.name:12s} {label}: {m.seconds:7.2f} s", file=sys.stderr)


def rotated(items: list, step: int) -> list:
    k = step % len(items) if items else 0
    return items[k:] + items[:k]


def prepare(tools: list[Tool], logs: Path) -> dict[str, Result]:
    """Check each tool is installed and init its repository (untimed)."""
    results: dict[str, Result] = {}
    for tool in tools:
        res = results[tool.name] = Result(tool.name)
        if (why := tool.missing()) is not None:
            res.status = why
            continue
        res.version = tool.version()
        tool.root.mkdir(parents=True)
        for cmd in tool.init():
            if (m := measure(cmd, env=tool.env(), log=logs / f"{tool.name}-init.log")).rc != 0:
                fail(res, "init", m)
                break
    return results


def run_backups(imgs: list[Path], current: Path, tools: list[Tool], results: dict[str, Result],
                logs: Path) -> None:
    """Day 0 full, days 1..N incremental; all tools on a day before the next day."""
    for day, img in enumerate(imgs):
        print(f"step: backup day {day}", file=sys.stderr)
        stage(img, current)
        extents = img.with_name(f"day{day}.extents.json") if day else None
        active = [t for t in tools if results[t.name].status == "ok" and not (t.baseline and day > 0)]
        for tool in rotated(active, day):
            run_backup(tool, results[tool.name], day, extents, logs)


Build = tuple[str, list[str]]   # (label, command) of one repo-engine build; label "" alone


def parse_build(value: str) -> Build:
    """`LABEL=CMD` or `CMD`, CMD shell-split."""
    label, sep, cmd = value.partition("=")
    if sep and re.fullmatch(r"[\w.-]+", label):
        return label, shlex.split(cmd)
    return "", shlex.split(value)


def make_tools(names: list[str], builds: list[Build], root: Path, current: Path) -> list[Tool]:
    """Each tool of `names`; a repo-engine one once per build, named TOOL@LABEL when labelled."""
    tools = []
    for n in names:
        for label, cmd in builds if issubclass(TOOLS[n], RepoEngine) else [("", None)]:
            name = f"{n}@{label}" if label else n
            tool = TOOLS[n](root / name, current, cmd)
            tool.name = name
            tools.append(tool)
    return tools


def run_all(work: Path, names: list[str], days: int, builds: list[Build]) -> tuple[list[Result], dict]:
    imgs = day_images(work, days)
    root = work / "bench-run"
    shutil.rmtree(root, ignore_errors=True)
    logs = root / "logs"
    logs.mkdir(parents=True)
    current = root / "current.img"
    tools = make_tools(names, builds, root, current)
    order = [t.name for t in tools]
    results = prepare(tools, logs)
    tools = [t for t in tools if results[t.name].status == "ok"]
    run_backups(imgs, current, tools, results, logs)
    print(f"step: restore day {days}", file=sys.stderr)
    for tool in rotated([t for t in tools if not t.baseline and results[t.name].status == "ok"], days + 1):
        results[tool.name].repo_bytes = du_bytes(tool.repo)
        run_restore(tool, results[tool.name], days, imgs[-1], logs)
        run_scrubs(tool, results[tool.name], logs)
    meta = {"work": str(work), "days": days, "image_bytes": imgs[0].stat().st_size,
            "host": platform.node(), "cpus": os.cpu_count(), "kernel": platform.release(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    manifest = work / "manifest.json"
    if manifest.exists():
        meta["workload"] = json.loads(manifest.read_text())
    return [results[n] for n in order], meta


# ---------------------------------------------------------------- reporting

def fmt(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def row(res: Result) -> list[str]:
    full = next((b for b in res.backups if b["day"] == 0), None)
    incr = [b for b in res.backups if b["day"] > 0]
    mean = (lambda key: statistics.mean(b[key] for b in incr)) if incr else (lambda key: None)
    read = mean("bytes_read")
    return [res.tool, fmt(full and full["seconds"], 2), fmt(mean("seconds"), 2),
            fmt(read / MIB if read is not None else None), fmt(res.restore and res.restore["seconds"], 2),
            fmt(res.repo_bytes / MIB if res.repo_bytes is not None else None),
            fmt(max(b["maxrss_kb"] for b in res.backups) / 1024 if res.backups else None),
            res.status]


HEADER = ["tool", "full backup s", "incremental s (mean)", "incr. read MiB (mean)", "restore s",
          "repo MiB", "peak RSS MB", "status"]


def load_range(results: list[Result]) -> str:
    """The 1-minute load average seen after the commands, lowest to highest (0 to 2 on an idle
    2-CPU machine running one command at a time)."""
    loads = [b["load"] for r in results for b in r.backups]
    loads += [r.restore["load"] for r in results if r.restore]
    loads += [m["load"] for r in results for m in r.scrubs.values()]
    return f"{min(loads):.2f}-{max(loads):.2f}" if loads else "—"


def cpu_and_scrub_lines(results: list[Result]) -> list[str]:
    """CPU seconds next to the wall ones (a loaded machine stretches wall time, less so CPU) and
    each tool's scrubs."""
    lines = []
    for res in results:
        full = next((b for b in res.backups if b["day"] == 0), None)
        incr = [b["cpu_seconds"] for b in res.backups if b["day"] > 0]
        wall = [b["seconds"] for b in res.backups if b["day"] > 0]
        lines.append(f"- {res.tool} CPU s: full {fmt(full and full['cpu_seconds'], 2)}, incremental "
                     f"(mean) {fmt(statistics.mean(incr) if incr else None, 2)}, (median) "
                     f"{fmt(statistics.median(incr) if incr else None, 3)} CPU, "
                     f"{fmt(statistics.median(wall) if wall else None, 3)} s wall, restore "
                     f"{fmt(res.restore and res.restore['cpu_seconds'], 2)}"
                     + "".join(f"; {label} {m['seconds']:.2f} s wall, {m['cpu_seconds']:.2f} s CPU"
                               for label, m in res.scrubs.items()))
    return lines


def table(results: list[Result], meta: dict) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row(r)) + " |" for r in results]
    lines += [""] + cpu_and_scrub_lines([r for r in results if r.backups])
    size = meta["image_bytes"] / MIB
    alloc = meta.get("workload", {}).get("per_day", [{}])[0].get("allocated")
    lines += ["",
              f"Workload: {size:.0f} MiB ext4 image"
              + (f" ({alloc / MIB:.0f} MiB allocated on day 0)" if alloc else "")
              + f", days 1..{meta['days']}; {meta['cpus']} CPUs, kernel {meta['kernel']}, {meta['date']}; "
              f"1-minute load average after the commands {load_range(results)}.",
              "- Times are wall seconds of the command plus a `sync` after it; images are in the page cache. "
              "Each day's image is first copied (untimed) to one fixed path that every tool backs up.",
              "- Incremental = mean over days 1..N. repo-engine is given the day's changed-extent list "
              "(`--changed`, like hypervisor changed-block tracking); peers have no such input and re-read the image.",
              "- incr. read: repo-engine = `bytes_read` from its --json summary; peers = `rchar` of the process "
              "and its children from /proc/PID/io: every read syscall, so it includes the tool's own repository, "
              "index and temp-file reads (restic reads each pack's temp file back when saving it); "
              "holes skipped via SEEK_HOLE (borg-fixed --sparse) are not read.",
              "- restore: restore of day N to a file, cold (every file under the tool's directory dropped from "
              "the page cache first, POSIX_FADV_DONTNEED) and timed until durable (trailing `sync`), verified "
              "byte for byte with cmp against the source image.",
              "- repo MiB: `du -sb` (apparent) of the repository after all days; client caches "
              "(borg cache, restic cache) excluded.",
              "- peak RSS: max over all backups of the tool's maximum resident set size (GNU time %M); "
              "b3sum mmaps the image, so its RSS includes mapped file pages (and its rchar is ~0).",
              "- Baselines cat / b3sum / `zstd -T2 -1 -c` just read, hash or compress the day-0 image.",
              "- borg: defaults (buzhash CDC, lz4); borg-fixed: `--chunker-params fixed,65536 --sparse`, "
              "extract `--sparse`. restic and casync: defaults.",
              "- benji: 4 MiB blocks, zstd level 1, file storage, sqlite; incrementals get the changed extents "
              "as rbd-diff hints on the previous version (`backup -r HINTS -f dayK-1`); restore `-s` (sparse)."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="directory made by bench/workload.py")
    ap.add_argument("--tools", default=DEFAULT_TOOLS)
    ap.add_argument("--days", type=int, help="default: all days in the work dir's manifest")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "results.json")
    ap.add_argument("--repo-engine", action="append", metavar="[LABEL=]CMD",
                    help="command to run repo-engine (shell-split; default: repo-engine); given "
                         "several times, each LABEL=CMD, every repo-engine tool runs once per build")
    args = ap.parse_args()
    names = [n.strip() for n in args.tools.split(",") if n.strip()]
    if unknown := [n for n in names if n not in TOOLS]:
        sys.exit(f"unknown tools: {unknown}; known: {', '.join(TOOLS)}")
    work = args.work.resolve()
    days = args.days if args.days is not None else json.loads((work / "manifest.json").read_text())["days"]
    builds = [parse_build(v) for v in args.repo_engine or ["repo-engine"]]
    if len(builds) > 1 and not all(label for label, _ in builds):
        sys.exit("several --repo-engine: give each as LABEL=CMD")
    results, meta = run_all(work, names, days, builds)
    text = table(results, meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results], "table": text}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
