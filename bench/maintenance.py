"""Maintenance benchmark: forget + gc, full gc, verify and scrub on a large synthetic repository.

Part A builds a repository of >= 1,000,000 chunks and >= 500 points directly through the
repository API (tiny raw chunks, block maps written as a backup would, points committed through
`Repository.commit_point` so the reference counts are maintained), then times, each in a fresh
process (peak RSS from getrusage):
  forget of one point (a full base: its child becomes a full map) + incremental gc,
  gc --full (mark and sweep, recount), verify.
Part B builds a repository of realistic 64 KiB chunks (zstd, about 2:1) and compares scrub's
verified-bytes throughput with `zstd -d | b3sum` over the same compressed chunks.

Usage: python3 bench/maintenance.py [--work DIR] [--vms 20] [--points 25] [--blocks 50000]
                                    [--scrub-mib 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from repo_engine.repository.blockmap import BlockMap  # noqa: E402
from repo_engine.repository.packs import CODEC_RAW, CODEC_ZSTD  # noqa: E402
from repo_engine.repository.points import DiskRecord, PointRecord  # noqa: E402
from repo_engine.repository.repo import Repository  # noqa: E402

BS = 16 * 1024


def build_large(path: Path, vms: int, points: int, blocks: int, change: int) -> dict:
    """VMs x points; each VM's first point a full map of `blocks` fresh chunks, every later point
    a delta of `change` fresh chunks. Chunks are 48 random bytes + a counter, stored raw."""
    started = time.monotonic()
    repo = Repository.init(path, block_size=BS, pack_size=4 << 20, max_chain=30)
    rng = np.random.default_rng(1)
    next_ref = [repo.index.reserve_refs(vms * (blocks + points * change) + 10)]
    writer = [repo.pack_writer()]
    chunk_id = repo.codec.chunk_id
    salt = rng.integers(0, 256, 48, dtype=np.uint8).tobytes()

    def new_chunks(n: int) -> np.ndarray:
        refs = np.arange(next_ref[0], next_ref[0] + n, dtype=np.uint64)
        next_ref[0] += n
        w = writer[0]
        for ref in refs.tolist():
            data = salt + ref.to_bytes(8, "little")
            w.add(ref, chunk_id(data), data, len(data), CODEC_RAW)
            if w.size >= repo.config.pack_size:
                repo.commit_pack(w)
                w = writer[0] = repo.pack_writer()
        return refs

    total_points = 0
    t = 1_700_000_000
    for v in range(vms):
        vm = f"vm{v:03d}"
        full = new_chunks(blocks)
        parent: PointRecord | None = None
        for i in range(points):
            if parent is None:
                bmap, kind, links = BlockMap.full(full), "full", 1
            else:
                changed = np.sort(rng.choice(blocks, change, replace=False)).astype(np.uint64)
                bmap = BlockMap.delta(blocks, changed, new_chunks(change))
                kind, links = "delta", parent.disks[0].links + 1
            if writer[0].size:
                repo.commit_pack(writer[0])
                writer[0] = repo.pack_writer()
            when = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime(t + i * 86400))
            disk = DiskRecord("sda", blocks * BS, BS, repo.write_map(bmap), kind,
                              parent.id if parent else None, links)
            point = PointRecord(id=f"{v:08x}{i:08x}", vm=vm, time=when, source="bench",
                                disks=[disk])
            repo.commit_point(point)
            parent = point
            total_points += 1
    writer[0].abort()
    counters = repo.index.counters()
    repo.close()
    return {"chunks": counters["chunks"], "packs": counters["packs"], "points": total_points,
            "build_s": round(time.monotonic() - started, 1)}


CHILD = """
import json, resource, sys, time
from pathlib import Path
from repo_engine.repository.repo import Repository
path, what = Path(sys.argv[1]), sys.argv[2]
repo = Repository.open(path)
t = time.monotonic()
extra = {}
if what == "forget+gc":
    from repo_engine.maintenance.forget import forget_points
    from repo_engine.maintenance.gc import gc
    victim = repo.points("vm000")[0].id
    t1 = time.monotonic()
    forget_points(repo, [victim])
    extra["forget_s"] = round(time.monotonic() - t1, 3)
    r = gc(repo)
    extra.update(dropped=r.chunks_dropped, repacked=r.packs_repacked)
elif what == "gc-full":
    from repo_engine.maintenance.gc import gc
    r = gc(repo, full=True)
    extra.update(dropped=r.chunks_dropped, recount=r.recount)
elif what == "verify":
    from repo_engine.maintenance.verify import verify
    r = verify(repo)
    extra.update(ok=r.ok, errors=r.errors[:3])
elif what == "scrub":
    from repo_engine.maintenance.scrub import scrub
    r = scrub(repo)
    extra.update(ok=r.ok, raw=r.raw_bytes, mbps=r.mib_per_s)
secs = time.monotonic() - t
print(json.dumps({"seconds": round(secs, 3),
                  "rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  **extra}))
"""


def child(path: Path, what: str) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(path), what], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parent.parent)
    if done.returncode:
        raise SystemExit(f"{what} failed:\n{done.stderr}")
    return json.loads(done.stdout)


def build_scrub(path: Path, mib: int, blob_file: Path, raw_file: Path) -> dict:
    """Realistic chunks: 64 KiB, half random half repeated text (zstd about 2:1)."""
    repo = Repository.init(path, block_size=64 * 1024)
    rng = np.random.default_rng(2)
    words = np.frombuffer(b"alpha beta gamma delta epsilon zeta eta theta iota kappa ", np.uint8)
    writer = repo.pack_writer()
    ref = repo.index.reserve_refs(mib * 16 + 10)
    with open(blob_file, "wb") as blobs, open(raw_file, "wb") as raws:
        for _ in range(mib * 16):
            text = np.resize(np.roll(words, int(rng.integers(0, len(words)))), 32 * 1024)
            data = rng.integers(0, 256, 32 * 1024, dtype=np.uint8).tobytes() + text.tobytes()
            blob, codec = repo.codec.encode(data)
            assert codec == CODEC_ZSTD
            writer.add(ref, repo.codec.chunk_id(data), blob, len(data), codec)
            blobs.write(blob)
            raws.write(data)
            ref += 1
            if writer.size >= repo.config.pack_size:
                repo.commit_pack(writer)
                writer = repo.pack_writer()
    repo.commit_pack(writer)
    repo.close()
    return {"raw_bytes": mib << 20}


def timed_shell(cmd: str) -> float:
    started = time.monotonic()
    subprocess.run(["sh", "-c", cmd], check=True, capture_output=True)
    return time.monotonic() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/var/tmp/re-maint-bench"))
    ap.add_argument("--vms", type=int, default=20)
    ap.add_argument("--points", type=int, default=25)
    ap.add_argument("--blocks", type=int, default=50_000)
    ap.add_argument("--change", type=int, default=1_000)
    ap.add_argument("--scrub-mib", type=int, default=1024)
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    rows: list[tuple[str, str, str]] = []

    large = args.work / "large"
    info = build_large(large, args.vms, args.points, args.blocks, args.change)
    rows.append(("synthetic repository", f"{info['chunks']:,} chunks, {info['points']} points, "
                 f"{info['packs']} packs", f"built in {info['build_s']} s"))
    r = child(large, "forget+gc")
    rows.append(("forget one point + gc", f"{r['seconds']:.2f} s",
                 f"forget {r['forget_s']} s; {r['dropped']} chunks dropped, "
                 f"{r['repacked']} packs repacked; first gc also checks every pack "
                 "indexed since the last gc for uncounted refs; target < 5 s"))
    r = child(large, "forget+gc")
    rows.append(("again (gc mark now current)", f"{r['seconds']:.2f} s",
                 f"forget {r['forget_s']} s; {r['dropped']} chunks dropped"))
    r = child(large, "gc-full")
    rows.append(("gc --full", f"{r['seconds']:.2f} s, peak RSS {r['rss_mib']} MiB",
                 "recount drift: " + ", ".join(f"{k.replace('_', ' ')} {v}"
                                               for k, v in r["recount"].items())
                 + "; target < 60 s, < 1 GiB"))
    r = child(large, "verify")
    rows.append(("verify", f"{r['seconds']:.2f} s, peak RSS {r['rss_mib']} MiB",
                 "ok" if r["ok"] else f"ERRORS {r['errors']}"))

    small = args.work / "scrub"
    blob_file, raw_file = args.work / "chunks.zst", args.work / "chunks.raw"
    build_scrub(small, args.scrub_mib, blob_file, raw_file)
    raw = args.scrub_mib << 20
    r = child(small, "scrub")
    scrub_mbps = raw / r["seconds"] / 1e6
    t_pipe = timed_shell(f"zstd -d -c {blob_file} | b3sum")
    t_zstd = timed_shell(f"zstd -d -c {blob_file} > /dev/null")
    t_b3 = timed_shell(f"b3sum {raw_file}")
    pipe_mbps = raw / t_pipe / 1e6
    rows.append(("scrub (64 KiB zstd chunks)", f"{scrub_mbps:.0f} MB/s",
                 f"{args.scrub_mib} MiB raw in {r['seconds']:.2f} s, ok={r['ok']}"))
    rows.append(("zstd -d | b3sum (same chunks)", f"{pipe_mbps:.0f} MB/s",
                 f"zstd -d alone {raw / t_zstd / 1e6:.0f} MB/s, b3sum alone "
                 f"{raw / t_b3 / 1e6:.0f} MB/s"))
    rows.append(("scrub / (zstd -d | b3sum)", f"{scrub_mbps / pipe_mbps * 100:.0f} %",
                 "target >= 70 %"))

    width = max(len(a) for a, _, _ in rows)
    width2 = max(len(b) for _, b, _ in rows)
    print(f"{'measure':{width}}  {'result':{width2}}  notes")
    for a, b, c in rows:
        print(f"{a:{width}}  {b:{width2}}  {c}")


if __name__ == "__main__":
    main()
