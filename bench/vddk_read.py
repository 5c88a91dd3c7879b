#!/usr/bin/env python3
"""Read-loop throughput: VDDK path (fake libvixDiskLib) vs local file vs `cat`.

    python3 bench/vddk_read.py [--size 1GiB] [--work /var/tmp/vddk-bench] [--repeat 7]

One page-cached image of random (incompressible, non-zero) bytes is read whole, in the backup
pipeline's shape (64 KiB blocks, 4 MiB batches, default max_request), by:
  - vddk_ext.open_local  -> the local-file backend (pread),
  - vddk_ext.open_vddk   -> the VDDK backend over tests/fake_vddk (ReadAsync + Wait, and Read),
                            whose Read is a pread of the same file: the difference is the cost of
                            the VDDK path itself (dlopen'd calls, sector conversion, 2 MiB cap),
  - cat FILE > /dev/null.
Runs are interleaved round-robin; each figure is the best of --repeat. Targets: the VDDK path
within 10 % of local, local >= 0.9x cat.
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


def read_loop(disk) -> int:
    blocks = np.arange(-(-disk.capacity // BLOCK), dtype=np.uint64)
    reader = disk.reader(BLOCK, blocks, batch_bytes=BATCH)
    for _batch in reader:
        pass
    return reader.bytes_read


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--work", type=Path, default=Path("/var/tmp/vddk-bench"))
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    size = parse_size(args.size)

    sys.path.insert(0, str(ROOT))
    import vddk_ext

    image = args.work / "ds" / "bench" / "disk-flat.vmdk"
    make_image(image, size)
    subprocess.run(["sh", str(ROOT / "tests" / "fake_vddk" / "build.sh"), str(args.work / "fake")],
                   check=True, capture_output=True)
    os.environ["FAKE_VDDK_ROOT"] = str(args.work / "ds")
    os.environ.pop("FAKE_VDDK_FAULTS", None)
    vddk_ext.vddk_init(str(args.work / "fake" / "full"))
    remote = dict(server="bench", thumbprint="00:" * 19 + "00", user="u", password="p",
                  vmx_spec="moref=vm-1", transports="nbdssl")
    subprocess.run(["cat", str(image)], stdout=subprocess.DEVNULL, check=True)   # page cache

    def local() -> None:
        with vddk_ext.open_local(str(image)) as d:
            assert read_loop(d) == size

    def vddk(async_reads: bool):
        def run() -> None:
            with vddk_ext.open_vddk("[bench] disk.vmdk", async_reads=async_reads,
                                    **remote) as d:
                assert read_loop(d) == size
        return run

    def cat() -> None:
        subprocess.run(f"cat '{image}' > /dev/null", shell=True, check=True)

    cases = {"local file (pread)": local, "VDDK fake, ReadAsync+Wait": vddk(True),
             "VDDK fake, Read": vddk(False), "cat FILE > /dev/null": cat}
    best = {name: float("inf") for name in cases}
    for _ in range(args.repeat):
        for name, fn in cases.items():
            best[name] = min(best[name], timed(fn))
    mbps = {name: size / t / 1e6 for name, t in best.items()}
    local_rate, cat_rate = mbps["local file (pread)"], mbps["cat FILE > /dev/null"]
    print(f"image {size / MIB:.0f} MiB page-cached, {BLOCK // 1024} KiB blocks, "
          f"{BATCH // MIB} MiB batches; best of {args.repeat}; {os.cpu_count()} CPUs\n")
    print("| read path | MB/s | vs local | vs cat | target |")
    print("|---|---:|---:|---:|---|")
    targets = {"local file (pread)": ">= 0.9x cat", "VDDK fake, ReadAsync+Wait": ">= 0.9x local",
               "VDDK fake, Read": ">= 0.9x local", "cat FILE > /dev/null": ""}
    for name, rate in mbps.items():
        print(f"| {name} | {rate:,.0f} | {rate / local_rate:.3f}x | {rate / cat_rate:.3f}x "
              f"| {targets[name]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
