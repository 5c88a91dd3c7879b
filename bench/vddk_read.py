#!/usr/bin/env python3
"""Read-loop throughput of vddk_ext: the VDDK path against a local file and `cat`, or, with
--latency-ms, at VDDK queue depths 1, 4 and 16 over a simulated network round trip.

    python3 bench/vddk_read.py [--size 1GiB] [--work /var/tmp/vddk-bench] [--repeat 7]
    python3 bench/vddk_read.py --latency-ms 5 [--size 256MiB] [--repeat 3]

One page-cached image of random (incompressible, non-zero) bytes is read whole, in the backup
pipeline's shape (64 KiB blocks, 4 MiB batches, default max_request of 1 MiB).

Without --latency-ms, by:
  - vddk_ext.open_local  -> the local-file backend (pread),
  - vddk_ext.open_vddk   -> the VDDK backend over tests/fake_vddk (ReadAsync + Wait, and Read),
                            whose Read is a pread of the same file: the difference is the cost of
                            the VDDK path itself (dlopen'd calls, sector conversion, 2 MiB cap),
  - cat FILE > /dev/null.
Targets: the VDDK path within 10 % of local, local >= 0.9x cat.

With --latency-ms M, the fake answers each read M ms after it was issued (reads in flight wait
out their latencies side by side, as over a network), and the VDDK backend reads at
queue_depth 1, 4 and 16, with 4 MiB batches (the backup pipeline's) and 16 MiB batches; the
fake's own counters give the ReadAsync and Wait calls and the most reads ever in flight.

Runs are interleaved round-robin; each figure is the best of --repeat.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20
BLOCK = 64 * 1024
BATCH = 4 * MIB


def parse_size(text: str) -> int:
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return int(float(text[:-len(suffix)]) * factor)
    return int(text)


def make_image(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size == size:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 64 * MIB)
            f.write(rng.integers(1, 256, n, dtype=np.uint8).tobytes())
            left -= n


def read_loop(disk, batch: int = BATCH) -> int:
    blocks = np.arange(-(-disk.capacity // BLOCK), dtype=np.uint64)
    reader = disk.reader(BLOCK, blocks, batch_bytes=batch)
    for _batch in reader:
        pass
    return reader.bytes_read


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


REMOTE = dict(server="bench", thumbprint="00:" * 19 + "00", user="u", password="p",
              vmx_spec="moref=vm-1", transports="nbdssl")


def best_of(cases: dict, repeat: int) -> dict[str, float]:
    """Seconds per case, the best of `repeat` rounds run round-robin."""
    best = {name: float("inf") for name in cases}
    for _ in range(repeat):
        for name, fn in cases.items():
            best[name] = min(best[name], timed(fn))
    return best


def page_cache_table(vddk_ext, image: Path, size: int, repeat: int) -> None:
    def local() -> None:
        with vddk_ext.open_local(str(image)) as d:
            assert read_loop(d) == size

    def vddk(async_reads: bool):
        def run() -> None:
            with vddk_ext.open_vddk("[bench] disk.vmdk", async_reads=async_reads,
                                    **REMOTE) as d:
                assert read_loop(d) == size
        return run

    def cat() -> None:
        subprocess.run(f"cat '{image}' > /dev/null", shell=True, check=True)

    cases = {"local file (pread)": local, "VDDK fake, ReadAsync+Wait": vddk(True),
             "VDDK fake, Read": vddk(False), "cat FILE > /dev/null": cat}
    mbps = {name: size / t / 1e6 for name, t in best_of(cases, repeat).items()}
    local_rate, cat_rate = mbps["local file (pread)"], mbps["cat FILE > /dev/null"]
    print(f"image {size / MIB:.0f} MiB page-cached, {BLOCK // 1024} KiB blocks, "
          f"{BATCH // MIB} MiB batches; best of {repeat}; {os.cpu_count()} CPUs\n")
    print("| read path | MB/s | vs local | vs cat | target |")
    print("|---|---:|---:|---:|---|")
    targets = {"local file (pread)": ">= 0.9x cat", "VDDK fake, ReadAsync+Wait": ">= 0.9x local",
               "VDDK fake, Read": ">= 0.9x local", "cat FILE > /dev/null": ""}
    for name, rate in mbps.items():
        print(f"| {name} | {rate:,.0f} | {rate / local_rate:.3f}x | {rate / cat_rate:.3f}x "
              f"| {targets[name]} |")


def fake_counts(trace: Path) -> dict[str, int]:
    """The fake's counters for the last handle closed ("close read_async=A wait=W ...")."""
    line = [t for t in trace.read_text().split("\n") if t.startswith("close")][-1]
    return {k: int(v) for k, v in (item.split("=") for item in line.split()[1:])}


def latency_table(vddk_ext, work: Path, size: int, repeat: int, latency_ms: int) -> None:
    os.environ["FAKE_VDDK_FAULTS"] = f"slow_read_ms={latency_ms}"

    def vddk(depth: int, batch: int):
        def run() -> None:
            with vddk_ext.open_vddk("[bench] disk.vmdk", queue_depth=depth, **REMOTE) as d:
                assert read_loop(d, batch) == size
        return run

    shapes = [(batch, depth) for batch in (BATCH, 4 * BATCH) for depth in (1, 4, 16)]
    cases = {shape: vddk(shape[1], shape[0]) for shape in shapes}
    seconds = best_of(cases, repeat)
    trace = work / "trace"
    counts = {}
    for shape in shapes:   # once more, traced, for the fake's counters
        trace.unlink(missing_ok=True)
        os.environ["FAKE_VDDK_TRACE"] = str(trace)
        cases[shape]()
        del os.environ["FAKE_VDDK_TRACE"]
        counts[shape] = fake_counts(trace)
    print(f"image {size / MIB:.0f} MiB page-cached, read through the fake VDDK with "
          f"{latency_ms} ms per request; {BLOCK // 1024} KiB blocks, 1 MiB requests; "
          f"best of {repeat}; {os.cpu_count()} CPUs\n")
    print("| batch | queue depth | MB/s | vs depth 1 | ReadAsync | Wait | most in flight |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for batch, depth in shapes:
        rate, base = size / seconds[batch, depth] / 1e6, size / seconds[batch, 1] / 1e6
        c = counts[batch, depth]
        print(f"| {batch // MIB} MiB | {depth} | {rate:,.0f} | {rate / base:.1f}x "
              f"| {c['read_async']} | {c['wait']} | {c['max_in_flight']} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default=None, help="image size (default 1GiB; 256MiB with "
                                                 "--latency-ms)")
    ap.add_argument("--work", type=Path, default=Path("/var/tmp/vddk-bench"))
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--latency-ms", type=int, default=0,
                    help="simulate this many ms per VDDK read; compare queue depths")
    args = ap.parse_args()
    size = parse_size(args.size or ("256MiB" if args.latency_ms else "1GiB"))

    sys.path.insert(0, str(ROOT))
    import vddk_ext

    image = args.work / "ds" / "bench" / "disk-flat.vmdk"
    make_image(image, size)
    subprocess.run(["sh", str(ROOT / "tests" / "fake_vddk" / "build.sh"), str(args.work / "fake")],
                   check=True, capture_output=True)
    os.environ["FAKE_VDDK_ROOT"] = str(args.work / "ds")
    os.environ.pop("FAKE_VDDK_FAULTS", None)
    os.environ.pop("FAKE_VDDK_TRACE", None)
    vddk_ext.vddk_init(str(args.work / "fake" / "full"))
    subprocess.run(["cat", str(image)], stdout=subprocess.DEVNULL, check=True)   # page cache
    if args.latency_ms:
        latency_table(vddk_ext, args.work, size, args.repeat, args.latency_ms)
    else:
        page_cache_table(vddk_ext, image, size, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
