"""Randomized soak: backups of several VMs, forget (with and without --prune), gc, gc --full,
verify, verify --repair, scrub, rebuild-index, restore and the read-only commands run as real
processes, concurrently, in loops, for a bounded time. Afterwards every point whose backup exited 0 and that no forget removed restores
byte-identical to the bytes backed up, and verify passes. While it runs, a command may fail
because of a lock conflict (exit 1, saying so), never with exit 3 on this healthy repository, and
never with a traceback.

Every command sleeps up to `JITTER` seconds at each pause point (repo_engine/pause.py) to widen
the race windows. `REPO_ENGINE_SOAK_SECONDS` (default 40) sets how long the loops run;
`REPO_ENGINE_SOAK_SEED` the random seed (printed on failure)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from repo_engine.pause import NAMES

from helpers import MIB, DiskModel, cli, restore_bytes, write_extents

SECONDS = float(os.environ.get("REPO_ENGINE_SOAK_SECONDS", "40"))
SEED = int(os.environ.get("REPO_ENGINE_SOAK_SEED", str(int.from_bytes(os.urandom(3), "big"))))
VMS = ("alpha", "beta", "gamma")
JITTER = "0.3"
# what a command may say when it exits 1 because another command holds the repository
CONFLICTS = ("repository is locked", "rebuild-index is replacing the index",
             "the catalog kept changing")


@dataclass
class Ledger:
    """What the soak learned, shared by its threads."""

    expected: dict[str, str] = field(default_factory=dict)  # point id -> sha256 of its disk
    removed: set[str] = field(default_factory=set)
    newest: dict[str, str] = field(default_factory=dict)  # VM -> its last backup's point
    unsure: int = 0  # forgets that may have removed points, then failed (their gc met a lock)
    failures: list[str] = field(default_factory=list)
    runs: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, name: str) -> None:
        with self.lock:
            self.runs[name] = self.runs.get(name, 0) + 1

    def fail(self, text: str) -> None:
        with self.lock:
            self.failures.append(text)


def _run(ledger: Ledger, *args: object,
         allowed: tuple[str, ...] = ()) -> subprocess.CompletedProcess | None:
    """Run `repo-engine ARGS`; the result when it exited 0, None after an allowed failure (a lock
    conflict, or one of `allowed`); any other outcome is recorded as a failure."""
    argv = [str(a) for a in args]
    env = dict(os.environ, REPO_ENGINE_PAUSE=",".join(NAMES), REPO_ENGINE_PAUSE_JITTER=JITTER)
    env.pop("REPO_ENGINE_PAUSE_DIR", None)
    done = subprocess.run([sys.executable, "-m", "repo_engine", *argv], capture_output=True,
                          text=True, timeout=600, env=env)
    ledger.note(argv[0] if argv[0] != "backup" else "backup")
    what = " ".join(argv[:1] + argv[2:])
    if "Traceback" in done.stderr:
        ledger.fail(f"{what}: traceback\n{done.stderr[-3000:]}")
    elif done.returncode == 0:
        return done
    elif done.returncode == 1 and any(s in done.stderr for s in CONFLICTS + allowed):
        return None
    else:
        ledger.fail(f"{what}: exit {done.returncode}\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return None


def _backups(ledger: Ledger, repo: Path, tmp: Path, vm: str, seed: int, stop: float) -> None:
    rng = np.random.default_rng(seed)
    model = DiskModel(tmp / f"{vm}.img", 2 * MIB, rng)
    unsaved: list[list[int]] = []  # changes since the last backup that exited 0
    while time.monotonic() < stop:
        unsaved += model.random_changes(int(rng.integers(1, 12)), max_len=96 * 1024)
        args: list[object] = ["backup", "image", repo, "--vm", vm, "--disk",
                              f"sda={model.path}", "--json"]
        if rng.random() < 0.5:
            changes = write_extents(tmp / f"{vm}-changes.json", unsaved)
            args += ["--changed", f"sda={changes}"]
        digest = hashlib.sha256(model.content).hexdigest()
        done = _run(ledger, *args)
        if done is not None:
            point = json.loads(done.stdout)["point"]["id"]
            unsaved = []
            with ledger.lock:
                ledger.expected[point] = digest
                ledger.newest[vm] = point


def _maintenance(ledger: Ledger, repo: Path, tmp: Path, seed: int, stop: float) -> None:
    rng = np.random.default_rng(seed)
    actions = ("forget", "forget", "gc", "gc-full", "verify", "verify-repair", "scrub", "rebuild",
               "restore", "read")
    while time.monotonic() < stop:
        action = actions[int(rng.integers(len(actions)))]
        if action == "forget":
            prune = ["--prune"] if rng.random() < 0.5 else []
            done = _run(ledger, "forget", repo, "--keep-last", int(rng.integers(1, 4)), "--json",
                        *prune)
            with ledger.lock:
                if done is not None:
                    ledger.removed.update(json.loads(done.stdout)["removed"])
                elif prune:
                    ledger.unsure += 1
        elif action in ("gc", "gc-full"):
            _run(ledger, "gc", repo, *(["--full"] if action == "gc-full" else []),
                 "--max-unused", "0")
        elif action in ("verify", "scrub"):
            _run(ledger, action, repo)
        elif action == "verify-repair":
            _run(ledger, "verify", repo, "--repair")
        elif action == "read":
            for args in (("points", repo), ("stats", repo), ("gc", repo, "--dry-run")):
                _run(ledger, *args)
        elif action == "rebuild":
            _run(ledger, "rebuild-index", repo)
        else:
            _restore_one(ledger, repo, tmp, rng)


def _restore_one(ledger: Ledger, repo: Path, tmp: Path, rng: np.random.Generator) -> None:
    with ledger.lock:
        choices = sorted(set(ledger.expected) - ledger.removed)
    if not choices:
        return
    point = choices[int(rng.integers(len(choices)))]
    target = tmp / f"restore-{threading.get_ident()}.img"
    target.unlink(missing_ok=True)
    # a forget may remove the point before the restore finds it
    done = _run(ledger, "restore", repo, point, "--disk", "sda", "--to", target,
                allowed=("no restore point matches",))
    if done is not None:
        digest = hashlib.sha256(target.read_bytes()).hexdigest()
        if digest != ledger.expected[point]:
            ledger.fail(f"restore of {point} exited 0 with wrong bytes")


def test_concurrent_commands_keep_every_point(tmp_path, capsys):
    repo = tmp_path / "repo"
    result = cli(capsys, "init", repo, "--block-size", "16KiB", "--pack-size", "256KiB",
                 "--max-chain", "3")
    assert result.code == 0, result.err
    ledger = Ledger()
    stop = time.monotonic() + SECONDS
    threads = [threading.Thread(target=_backups, args=(ledger, repo, tmp_path, vm, SEED + i, stop))
               for i, vm in enumerate(VMS)]
    threads += [threading.Thread(target=_maintenance,
                                 args=(ledger, repo, tmp_path, SEED + 10 + i, stop))
                for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not ledger.failures, f"seed {SEED}, runs {ledger.runs}:\n" + "\n\n".join(
        ledger.failures[:5])
    for args in (("gc", repo, "--full"), ("gc", repo, "--max-unused", "0")):
        result = cli(capsys, *args)
        assert result.code == 0, (SEED, result.err)
    result = cli(capsys, "verify", repo, "--json")
    assert result.code == 0 and result.json()["ok"], (SEED, result.out)
    listed = {p["id"] for p in cli(capsys, "points", repo, "--json").json()["points"]}
    alive = set(ledger.expected) - ledger.removed
    assert listed <= alive, (SEED, sorted(listed - alive))
    assert ledger.unsure or listed == alive, (SEED, ledger.runs, sorted(alive - listed))
    assert set(ledger.newest.values()) <= listed and len(ledger.newest) == len(VMS), SEED
    for point in sorted(listed):
        data = restore_bytes(capsys, repo, point, "sda", tmp_path / "final.img")
        assert hashlib.sha256(data).hexdigest() == ledger.expected[point], (SEED, point)
