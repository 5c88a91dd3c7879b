#!/usr/bin/env python3
"""What opening an encrypted repository by a key file costs a short command: `repo-engine points`
on an encrypted repository (opened by $REPO_ENGINE_KEY_FILE) against the same command on an
unencrypted shared one (the journal format every encrypted repository has), for one build or
several side by side.

    python3 bench/open_path.py [--runs 15] [--work DIR] \\
        [--repo-engine before=/tmp/old/.venv/bin/repo-engine --repo-engine after=repo-engine]

Per build (untimed): both repositories made in the work dir and one 16 MiB image backed up into
each. Then `points` runs --runs times on every (build, repository), round robin, so that a
change in the machine's load spreads over all of them. Prints per pair the median CPU seconds
(user + system of the command) and wall seconds, and what the encrypted one adds.

Closer to the open path alone, and less noisy: in a fresh interpreter of the build's venv (the
`python` beside its `repo-engine`), the CPU of opening the encrypted repository by the key file
right after opening the unencrypted one (which loaded what both need): the cryptography imports,
the slot and keyring reads, the X25519 unwrapping; the median of --runs interpreters.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run import Build, parse_build   # run.py also keeps byte code cached, as installed

KINDS = ("shared", "keyfile")
OPEN = """
import os, sys, time
from pathlib import Path
from repo_engine.repository.location import open_repository
pem = Path(os.environ["REPO_ENGINE_KEY_FILE"]).read_bytes()
open_repository(sys.argv[1]).close()
start = time.process_time()
open_repository(sys.argv[2], key_file=lambda: (pem, "key file")).close()
print(time.process_time() - start)
"""


def prepare(cmd: list[str], root: Path, image: Path) -> dict[str, dict[str, str]]:
    """The two repositories of one build under `root`; the environment each command gets."""
    root.mkdir(parents=True)
    (root / "passphrase").write_text("bench passphrase\n")
    base = {k: v for k, v in os.environ.items() if not k.startswith("REPO_ENGINE_")}
    base["REPO_ENGINE_CACHE_DIR"] = str(root / "cache")
    sealed = {**base, "REPO_ENGINE_PASSWORD_FILE": str(root / "passphrase")}
    steps = [(base, ["init", str(root / "shared"), "--shared"]),
             (sealed, ["init", str(root / "keyfile"), "--encryption"]),
             (sealed, ["key", "export-recovery", str(root / "keyfile"), "--out",
                       str(root / "host.pem")])]
    steps += [(sealed if kind == "keyfile" else base,
               ["backup", "image", str(root / kind), "--vm", "bench", "--disk", f"sda={image}"])
              for kind in KINDS]
    for env, args in steps:
        subprocess.run(cmd + args, env=env, check=True, stdout=subprocess.DEVNULL)
    return {"shared": base, "keyfile": {**base, "REPO_ENGINE_KEY_FILE": str(root / "host.pem")}}


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall, CPU) seconds of one command."""
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def open_cost(cmd: list[str], root: Path, env: dict[str, str]) -> float | None:
    """CPU seconds of the encrypted repository's open beyond the unencrypted one's (OPEN); None
    when the build has no `python` beside its `repo-engine`."""
    python = Path(shutil.which(cmd[0]) or cmd[0]).with_name("python")
    if not python.exists():
        return None
    # run in `root`: from a checkout, `python -c` would import the checkout's repo_engine
    done = subprocess.run([str(python), "-c", OPEN, "shared", "keyfile"], cwd=root, env=env,
                          check=True, capture_output=True, text=True)
    return float(done.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--work", type=Path, help="default: a temporary directory, removed after")
    ap.add_argument("--repo-engine", action="append", metavar="[LABEL=]CMD")
    args = ap.parse_args()
    builds: list[Build] = [parse_build(v) for v in args.repo_engine or ["repo-engine"]]
    work = Path(tempfile.mkdtemp(prefix="open-path-", dir=args.work))
    try:
        image = work / "disk.img"
        image.write_bytes(os.urandom(16 << 20))
        envs = {label: prepare(cmd, work / (label or "build"), image) for label, cmd in builds}
        runs: dict[tuple[str, str], list[tuple[float, float]]] = {
            (label, kind): [] for label, _ in builds for kind in KINDS}
        opens: dict[str, list[float]] = {label: [] for label, _ in builds}
        for _ in range(args.runs):
            for label, cmd in builds:
                cost = open_cost(cmd, work / (label or "build"), envs[label]["keyfile"])
                opens[label] += [] if cost is None else [cost]
                for kind in KINDS:
                    repo = work / (label or "build") / kind
                    runs[label, kind].append(timed(cmd + ["points", str(repo)],
                                                   envs[label][kind]))
        for label, _ in builds:
            wall, cpu = ({kind: statistics.median(r[i] for r in runs[label, kind])
                          for kind in KINDS} for i in (0, 1))
            print(f"{label or 'repo-engine'}: points, median of {args.runs}: unencrypted "
                  f"{cpu['shared']:.3f} s CPU ({wall['shared']:.3f} s wall), key file "
                  f"{cpu['keyfile']:.3f} s CPU ({wall['keyfile']:.3f} s wall): encryption adds "
                  f"{1e3 * (cpu['keyfile'] - cpu['shared']):.0f} ms CPU, "
                  f"{1e3 * (wall['keyfile'] - wall['shared']):.0f} ms wall"
                  + (f"; the open alone adds {1e3 * statistics.median(opens[label]):.1f} ms CPU"
                     if opens[label] else ""))
        print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    sys.exit(main())
