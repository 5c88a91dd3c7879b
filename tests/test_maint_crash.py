"""Crash safety: SIGKILL forget, gc and repack at random moments. Afterwards every kept point
restores byte-identical, the next gc finishes the job and verify is clean."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import CRASH_KILLS, MIB, DiskModel, copy_repo, new_crash_repo, write_extents
from repo_engine.maintenance.forget import forget_points
from repo_engine.maintenance.gc import _live_side_cheaper, gc
from repo_engine.repository.repo import Repository
from repo_engine.restore.restorer import restore_disk

KILLS = CRASH_KILLS


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A repository of 14 points of one VM (chains of 4) and each point's expected digest."""
    import _pytest.capture  # noqa: F401 - cli() needs a capsys-like object

    tmp = tmp_path_factory.mktemp("crashbase")
    repo = tmp / "repo"
    new_crash_repo(repo, "--block-size", "16KiB", "--max-chain", "4", "--pack-size", "64KiB")
    rng = np.random.default_rng(21)
    model = DiskModel(tmp / "sda.img", 2 * MIB, rng)
    model.random_changes(8)
    expected = {}
    for day in range(14):
        args = ["backup", "image", repo, "--vm", "vm", "--disk", f"sda={model.path}", "--json"]
        if day:
            extents = model.random_changes(int(rng.integers(1, 4)), 120_000)
            args += ["--changed", f"sda={write_extents(tmp / f'e{day}.json', extents)}"]
        done = _run(*args)
        assert done.returncode == 0, done.stderr
        expected[json.loads(done.stdout)["point"]["id"]] = hashlib.sha256(model.content).hexdigest()
    return repo, expected


def _cmd(*args: object) -> list[str]:
    return [sys.executable, "-m", "repo_engine", *map(str, args)]


def _run(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(*args), capture_output=True, text=True)


def _digest(repo: Repository, point, tmp: Path) -> str:
    target = tmp / "restored.img"
    target.unlink(missing_ok=True)
    restore_disk(repo, point, "sda", target)
    return hashlib.sha256(target.read_bytes()).hexdigest()


def _check(repo_path: Path, expected: dict[str, str], must_keep: set[str], tmp: Path) -> None:
    """Finish the job (gc), then: kept points present and byte-identical, verify clean."""
    with Repository.open(repo_path) as repo:
        report = gc(repo, max_unused=0)
        assert not report.damaged_packs_skipped
        points = repo.points("vm")
        ids = {p.id for p in points}
        assert must_keep <= ids, "a point that was not forgotten vanished"
        for point in points:
            assert _digest(repo, point, tmp) == expected[point.id], point.id
        from repo_engine.maintenance.verify import verify

        result = verify(repo)
        assert result.ok, result.errors
        assert not any(result.orphans[k] for k in ("packs", "maps", "manifests")), result.orphans
        assert not list((repo_path / "tmp").iterdir())


def _prepare(base_repo: Path, tmp: Path, n: int) -> Path:
    repo = tmp / f"r{n}"
    copy_repo(base_repo, repo)
    return repo


def _kill_at_random(cmd: list[str], rng: np.random.Generator, window: tuple[float, float]) -> bool:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(float(rng.uniform(*window)))
    landed = proc.poll() is None
    if landed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    return landed


def _window(cmd: list[str], idle: list[str]) -> tuple[float, float]:
    """Kill between most of the interpreter start-up and the end of an unkilled run."""
    started = time.monotonic()
    subprocess.run(idle, capture_output=True)
    startup = time.monotonic() - started
    started = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    end = (time.monotonic() - started) * 0.9
    # on a loaded machine the idle command's start-up can outlast the whole timed run
    return min(startup * 0.8, end * 0.5), end


@pytest.mark.parametrize("mode", ["forget", "gc", "repack", "gc-most"])
def test_sigkill_maintenance(base, tmp_path, mode):
    """`gc-most`: gc after a forget of all points but 3, which counts the maps in use
    (`_live_side_cheaper`) instead of settling the dead ones."""
    base_repo, expected = base
    rng = np.random.default_rng({"forget": 1, "gc": 2, "repack": 3, "gc-most": 4}[mode])
    ids = list(expected)
    landed = attempts = 0
    window = None
    while landed < KILLS:
        attempts += 1
        assert attempts < KILLS * 6, f"only {landed} kills landed"
        repo = _prepare(base_repo, tmp_path, attempts)
        size = len(ids) - 3 if mode == "gc-most" else int(rng.integers(3, 8))
        victims = [str(v) for v in rng.choice(ids, size=size, replace=False)]
        if mode == "forget":
            cmd = _cmd("forget", repo, *victims)
        else:
            with Repository.open(repo) as r:
                forget_points(r, victims)
                if mode == "repack":
                    gc(r, max_unused=100)  # drop chunks only: the killed run repacks
                assert mode != "gc-most" or _live_side_cheaper(r)
            cmd = _cmd("gc", repo, "--max-unused", "0")
        if window is None:
            window = _window(cmd, _cmd("points", repo))
            continue  # the calibration run finished the job; take a fresh copy
        if _kill_at_random(cmd, rng, window):
            landed += 1
        else:
            # the run beat the kill (the machine got less busy since the calibration): aim earlier
            window = (window[0] * 0.8, window[1] * 0.8)
        keep = set(ids) - set(victims)
        _check(repo, expected, keep, tmp_path)
        if mode == "forget":
            # rerunning forget for what is left finishes the job
            with Repository.open(repo) as r:
                left = [v for v in victims if v in {p.id for p in r.points()}]
                if left:
                    forget_points(r, left)
            _check(repo, expected, keep, tmp_path)
            with Repository.open(repo) as r:
                assert {p.id for p in r.points("vm")} == keep
        shutil.rmtree(repo)
