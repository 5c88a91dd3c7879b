#!/usr/bin/env python3
"""Build a realistic VM-disk workload: an ext4 image and N days of changes.

    python3 bench/workload.py --out DIR [--size 4GiB] [--days 7] [--seed 1]

Produces DIR/day0.img .. DIR/dayN.img (sparse ext4 images, one file per day),
DIR/dayK.extents.json (64 KiB-aligned byte extents changed vs day K-1) and
DIR/manifest.json (summary). Needs root: the image is loop-mounted and every
change goes through the real filesystem (see bench/README.md).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

BLOCK = 64 * 1024
PAGE = 4096
SOURCE_ROOTS = ["/usr/bin", "/usr/sbin", "/usr/lib", "/usr/share/doc", "/usr/include",
                "/usr/share/man", "/usr/share/perl5"]
TEXT_SUFFIXES = (".py", ".txt", ".md", ".h", ".pm", ".rst", ".html", ".c", ".cfg", ".conf")
MAX_SOURCE_FILE = 64 * 1024 * 1024
FILL_FRACTION = 0.45          # of capacity, including the database and log
DB_MAX = 200 * 1024 * 1024    # database-like file, capped at 20% of capacity
# Daily change budget, as fractions of the used bytes (see README).
LOG_APPEND_FRACTION = 0.003
ADDED_FILES_FRACTION = 0.01
DB_PAGE_FRACTION = 0.01       # of the database's 4 KiB pages
EDITED_FILES = 30
UPGRADED_FILES = 40
DELETED_FILES = 25


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size: {text!r}")
    mult = 1024 ** " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * mult)


def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True)


# ---------------------------------------------------------------- source files

def source_groups(roots: list[str]) -> list[list[tuple[str, int]]]:
    """Regular files under roots, grouped by directory, in a stable order."""
    groups: list[list[tuple[str, int]]] = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            files = []
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if os.path.isfile(path) and not os.path.islink(path) and 0 < st.st_size <= MAX_SOURCE_FILE \
                        and os.access(path, os.R_OK):
                    files.append((path, -(-st.st_size // 4096) * 4096))   # size on disk, 4 KiB blocks
            if files:
                groups.append(files)
    return groups


def split_pool(groups: list[list[tuple[str, int]]], budget: int,
               rng: random.Random) -> tuple[list[str], list[str]]:
    """Pick whole directories (seeded order) until budget bytes; return (picked, rest)."""
    order = list(range(len(groups)))
    rng.shuffle(order)
    picked: list[str] = []
    rest: list[str] = []
    used = 0
    for i in order:
        size = sum(s for _, s in groups[i])
        target = picked if used + size <= budget else rest
        target.extend(p for p, _ in groups[i])
        if target is picked:
            used += size
    return picked, rest


def dest_of(mnt: Path, src: str) -> Path:
    return mnt / "rootfs" / src.lstrip("/")


def copy_in(mnt: Path, src: str) -> Path | None:
    dst = dest_of(mnt, src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copyfile(src, dst)
    except OSError:
        return None
    return dst


# ---------------------------------------------------------------- mounting

@contextmanager
def mounted(image: Path, mnt: Path) -> Iterator[Path]:
    mnt.mkdir(parents=True, exist_ok=True)
    run("mount", "-o", "loop", str(image), str(mnt))
    try:
        yield mnt
    finally:
        run("sync")
        run("umount", str(mnt))


def make_fs(image: Path, size: int, seed: int) -> None:
    with open(image, "wb") as f:
        f.truncate(size)
    fs_uuid = str(uuid.UUID(int=random.Random(seed).getrandbits(128)))
    run("mkfs.ext4", "-q", "-F", "-L", "benchroot", "-U", fs_uuid,
        "-E", f"lazy_itable_init=0,lazy_journal_init=0,hash_seed={fs_uuid}", str(image))


def fs_used(mnt: Path) -> int:
    st = os.statvfs(mnt)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


# ---------------------------------------------------------------- content

def db_pages(np_rng: np.random.Generator, first: int, count: int, day: int) -> bytes:
    """Database-like pages: header, half random payload, half low-entropy text."""
    pages = np.zeros((count, PAGE), dtype=np.uint8)
    pages[:, 16:2048] = np_rng.integers(0, 256, size=(count, 2032), dtype=np.uint8)
    filler = np.frombuffer((b"row=%08d;status=active;" % day) * 90, dtype=np.uint8)[:PAGE - 2048]
    pages[:, 2048:] = filler
    header = np.array([[first + i, day] for i in range(count)], dtype="<u8").view(np.uint8)
    pages[:, :16] = header.reshape(count, 16)
    return pages.tobytes()


def log_lines(rng: random.Random, nbytes: int, day: int) -> bytes:
    verbs = ["GET", "POST", "PUT", "DELETE"]
    paths = ["/api/v1/items", "/api/v1/users", "/healthz", "/login", "/static/app.js"]
    out: list[str] = []
    size = 0
    while size < nbytes:
        line = (f"2024-03-{day + 1:02d}T{rng.randrange(24):02d}:{rng.randrange(60):02d}:"
                f"{rng.randrange(60):02d}Z INFO {rng.choice(verbs)} {rng.choice(paths)} "
                f"status={rng.choice([200, 200, 200, 201, 404, 500])} "
                f"latency_ms={rng.randrange(1, 900)} req={rng.getrandbits(64):016x}\n")
        out.append(line)
        size += len(line)
    return "".join(out).encode()


def upgraded(data: bytes, rng: random.Random, day: int) -> bytes:
    """A 'new version' of a file: bytes inserted near the start, scattered edits."""
    buf = bytearray(data)
    for pos in range(rng.randrange(0, 4096), len(buf), 16 * 1024):
        for j in range(pos, min(pos + 8, len(buf))):
            buf[j] = rng.randrange(256)
    at = rng.randrange(0, max(1, len(buf) // 10))
    buf[at:at] = f"upgraded-day{day}-".encode() * rng.randrange(1, 16)
    return bytes(buf)


# ---------------------------------------------------------------- days

class State:
    """What the generator knows about the files inside the image."""

    def __init__(self, copied: list[Path], pool: list[str], db_size: int, used: int) -> None:
        self.copied = copied
        self.pool = pool
        self.db_size = db_size
        self.used = used


def populate(mnt: Path, size: int, seed: int) -> State:
    rng = random.Random(seed)
    db_size = min(DB_MAX, size // 5) // BLOCK * BLOCK
    budget = int(size * FILL_FRACTION) - db_size - fs_used(mnt)
    picked, rest = split_pool(source_groups(SOURCE_ROOTS + [sys_stdlib()]), budget, rng)
    copied = [d for d in (copy_in(mnt, s) for s in picked) if d is not None]
    db = mnt / "var/lib/db/data.db"
    db.parent.mkdir(parents=True)
    np_rng = np.random.default_rng(seed)
    per = 1024
    with open(db, "wb") as f:
        for first in range(0, db_size // PAGE, per):
            f.write(db_pages(np_rng, first, min(per, db_size // PAGE - first), 0))
    (mnt / "var/log").mkdir(parents=True)
    (mnt / "var/log/app.log").write_bytes(log_lines(rng, 1 << 20, 0))
    (mnt / "home/user").mkdir(parents=True)
    rng.shuffle(rest)
    return State(copied, rest, db_size, fs_used(mnt))


def sys_stdlib() -> str:
    import sysconfig
    return sysconfig.get_paths()["stdlib"]


def change_day(mnt: Path, state: State, seed: int, day: int) -> dict[str, int]:
    rng = random.Random(f"{seed}-{day}")
    np_rng = np.random.default_rng([seed, day])
    counts: dict[str, int] = {}
    live = [p for p in state.copied if p.exists()]

    texts = [p for p in live if p.suffix in TEXT_SUFFIXES or "/doc/" in str(p)]
    for path in rng.sample(texts, min(EDITED_FILES, len(texts))):
        n = path.stat().st_size
        with open(path, "r+b") as f:
            f.seek(rng.randrange(n))
            f.write(bytes(rng.randrange(32, 127) for _ in range(rng.randrange(1, 200))))
    counts["edited"] = min(EDITED_FILES, len(texts))

    with open(mnt / "var/log/app.log", "ab") as f:
        f.write(log_lines(rng, int(state.used * LOG_APPEND_FRACTION), day))

    by_dir: dict[Path, list[Path]] = {}
    for p in live:
        by_dir.setdefault(p.parent, []).append(p)
    big = sorted((d for d, fs in by_dir.items() if len(fs) >= UPGRADED_FILES), key=str) \
        or [max(by_dir, key=lambda d: len(by_dir[d]))]
    pkg = rng.choice(big)
    for path in rng.sample(sorted(by_dir[pkg]), min(UPGRADED_FILES, len(by_dir[pkg]))):
        tmp = path.with_name(path.name + ".dpkg-new")
        tmp.write_bytes(upgraded(path.read_bytes(), rng, day))
        os.replace(tmp, path)
    counts["upgraded"] = min(UPGRADED_FILES, len(by_dir[pkg]))

    added = 0
    target = int(state.used * ADDED_FILES_FRACTION)
    while state.pool and added < target:
        src = state.pool.pop()
        dst = mnt / "home/user" / f"day{day}" / src.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(src, dst)
        except OSError:
            continue
        added += dst.stat().st_size
        state.copied.append(dst)
    counts["added_bytes"] = added

    victims = rng.sample([p for p in live if p.parent != pkg], min(DELETED_FILES, len(live)))
    for path in victims:
        path.unlink()
    counts["deleted"] = len(victims)

    pages = state.db_size // PAGE
    chosen = sorted(rng.sample(range(pages), max(1, int(pages * DB_PAGE_FRACTION))))
    fd = os.open(mnt / "var/lib/db/data.db", os.O_WRONLY)
    try:
        for page in chosen:
            os.pwrite(fd, db_pages(np_rng, page, 1, day), page * PAGE)
        os.fsync(fd)
    finally:
        os.close(fd)
    counts["db_pages"] = len(chosen)
    return counts


# ---------------------------------------------------------------- extents

def changed_extents(old: Path, new: Path, chunk: int = 256 * 1024 * 1024) -> list[list[int]]:
    """[[offset, length], ...] of aligned 64 KiB blocks that differ (merged when adjacent)."""
    size = new.stat().st_size
    assert old.stat().st_size == size and size % BLOCK == 0, "images must be equal, 64 KiB multiples"
    a = np.memmap(old, dtype=np.uint64, mode="r")
    b = np.memmap(new, dtype=np.uint64, mode="r")
    words = BLOCK // 8
    blocks: list[np.ndarray] = []
    for start in range(0, a.size, chunk // 8):
        end = min(start + chunk // 8, a.size)
        diff = (a[start:end] != b[start:end]).reshape(-1, words).any(axis=1)
        blocks.append(np.flatnonzero(diff) + start // words)
    idx = np.concatenate(blocks) if blocks else np.array([], dtype=np.int64)
    extents: list[list[int]] = []
    for i in idx.tolist():
        if extents and extents[-1][0] + extents[-1][1] == i * BLOCK:
            extents[-1][1] += BLOCK
        else:
            extents.append([i * BLOCK, BLOCK])
    return extents


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


# ---------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--size", type=parse_size, default=parse_size("4GiB"))
    ap.add_argument("--days", type=int, default=7)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("workload.py needs root (loop mount)")
    if args.size % BLOCK:
        sys.exit("--size must be a multiple of 64 KiB")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    work, mnt = out / "work.img", out / "mnt"
    t0 = time.monotonic()
    make_fs(work, args.size, args.seed)
    with mounted(work, mnt):
        state = populate(mnt, args.size, args.seed)
    days = [{"day": 0, "fs_used": state.used}]
    run("cp", "--sparse=always", str(work), str(out / "day0.img"))
    for day in range(1, args.days + 1):
        with mounted(work, mnt):
            counts = change_day(mnt, state, args.seed, day)
            used = fs_used(mnt)
        img = out / f"day{day}.img"
        if day == args.days:
            os.replace(work, img)
        else:
            run("cp", "--sparse=always", str(work), str(img))
        extents = changed_extents(out / f"day{day - 1}.img", img)
        (out / f"day{day}.extents.json").write_text(json.dumps(extents))
        days.append({"day": day, "fs_used": used, "changed_bytes": sum(n for _, n in extents),
                     "extents": len(extents), **counts})
    if args.days == 0:
        work.unlink()
    mnt.rmdir()
    for d in days:
        d["allocated"] = allocated(out / f"day{d['day']}.img")
    manifest = {"capacity": args.size, "days": args.days, "seed": args.seed, "block": BLOCK,
                "db_size": state.db_size, "seconds": round(time.monotonic() - t0, 1), "per_day": days}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print_summary(manifest)


def print_summary(m: dict) -> None:
    mib = 1024 * 1024
    print(f"capacity {m['capacity'] / mib:.0f} MiB, database {m['db_size'] / mib:.0f} MiB, "
          f"generated in {m['seconds']} s")
    print(f"{'day':>3} {'fs used MiB':>12} {'allocated MiB':>14} {'changed MiB':>12} "
          f"{'changed % used':>15} {'extents':>8}")
    for d in m["per_day"]:
        ch = d.get("changed_bytes")
        pct = f"{100 * ch / d['fs_used']:.2f}" if ch is not None else "-"
        chs = f"{ch / mib:.1f}" if ch is not None else "-"
        print(f"{d['day']:>3} {d['fs_used'] / mib:>12.1f} {d['allocated'] / mib:>14.1f} {chs:>12} {pct:>15} "
              f"{d.get('extents', '-'):>8}")


if __name__ == "__main__":
    main()
