#!/usr/bin/env python3
"""Sweep repo-engine block size x zstd level over a bench/workload.py work dir.

    python3 bench/blocksize.py --work DIR [--days 7] [--block-sizes 16KiB,...] [--levels 1,3,6]

For each configuration: fresh repository (`repo-engine init --block-size B
--compression-level L`), day 0 full backup, days 1..N with --changed, then a
restore of day N verified against the source. Configurations are interleaved
per day, like bench/run.py. Prints one markdown table.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
from dataclasses import asdict
from pathlib import Path

from run import MIB, RepoEngine, Result, day_images, du_bytes, prepare, run_backups, run_restore

BLOCK_SIZES = "16KiB,32KiB,64KiB,128KiB,256KiB,1MiB"
LEVELS = "1,3,6"


def configs(work_root: Path, current: Path, command: list[str], sizes: list[str],
            levels: list[int]) -> list[RepoEngine]:
    tools = []
    for size in sizes:
        for level in levels:
            tool = RepoEngine(work_root / f"bs{size}-z{level}", current, command)
            tool.name = f"bs{size}-z{level}"
            tool.init_args = ["--block-size", size, "--compression-level", str(level)]
            tools.append(tool)
    return tools


def table(tools: list[RepoEngine], results: dict[str, Result]) -> str:
    lines = ["| block size | zstd level | stored MiB | total backup s | incr. read MiB (total) | restore s | status |",
             "|---|---|---|---|---|---|---|"]
    for tool in tools:
        r = results[tool.name]
        size, level = tool.init_args[1], tool.init_args[3]
        stored = f"{r.repo_bytes / MIB:.1f}" if r.repo_bytes is not None else "—"
        secs = f"{sum(b['seconds'] for b in r.backups):.2f}" if r.backups else "—"
        read = f"{sum(b['bytes_read'] for b in r.backups if b['day'] > 0) / MIB:.1f}" if r.backups else "—"
        restore = f"{r.restore['seconds']:.2f}" if r.restore else "—"
        lines.append(f"| {size} | {level} | {stored} | {secs} | {read} | {restore} | {r.status} |")
    lines += ["", "stored = `du -sb` of the repository after all days; total backup s = day 0 full + days 1..N "
              "incremental (each timed with a trailing sync); restore of day N verified with cmp."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--days", type=int, help="default: all days in the work dir's manifest")
    ap.add_argument("--block-sizes", default=BLOCK_SIZES)
    ap.add_argument("--levels", default=LEVELS)
    ap.add_argument("--repo-engine", default="repo-engine", help="command to run repo-engine (shell-split)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "blocksize.json")
    args = ap.parse_args()
    work = args.work.resolve()
    days = args.days if args.days is not None else json.loads((work / "manifest.json").read_text())["days"]
    imgs = day_images(work, days)
    root = work / "bench-blocksize"
    shutil.rmtree(root, ignore_errors=True)
    logs = root / "logs"
    logs.mkdir(parents=True)
    current = root / "current.img"
    tools = configs(root, current, shlex.split(args.repo_engine), args.block_sizes.split(","),
                    [int(x) for x in args.levels.split(",")])
    results = prepare(tools, logs)
    live = [t for t in tools if results[t.name].status == "ok"]
    run_backups(imgs, current, live, results, logs)
    for tool in live:
        if results[tool.name].status == "ok":
            results[tool.name].repo_bytes = du_bytes(tool.repo)
            run_restore(tool, results[tool.name], days, imgs[-1], logs)
    text = table(tools, results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": [asdict(results[t.name]) for t in tools], "table": text}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
