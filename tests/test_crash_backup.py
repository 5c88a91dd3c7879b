"""A backup killed with SIGKILL at random moments never leaves a half point, never harms the
points already catalogued, and the next backup succeeds."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from helpers import CRASH_KILLS, MIB, DiskModel, cli, new_crash_repo

KILLS = CRASH_KILLS
MAX_ATTEMPTS = 4 * KILLS


def _backup_cmd(repo, image):
    return [sys.executable, "-m", "repo_engine", "backup", "image", str(repo), "--vm", "vm",
            "--disk", f"sda={image}", "--json"]


def _points(capsys, repo) -> list[dict]:
    result = cli(capsys, "points", repo, "--vm", "vm", "--json")
    assert result.code == 0, result.err
    return result.json()["points"]


def _restored_digest(capsys, repo, point_id, tmp_path) -> str:
    out = tmp_path / "restored.img"
    out.unlink(missing_ok=True)
    result = cli(capsys, "restore", repo, point_id, "--disk", "sda", "--to", out)
    assert result.code == 0, result.err
    return hashlib.sha256(out.read_bytes()).hexdigest()


def test_sigkill_during_backup(tmp_path, capsys):
    rng = np.random.default_rng(11)
    repo = tmp_path / "repo"
    new_crash_repo(repo, "--block-size", "16KiB", "--pack-size", "512KiB")
    model = DiskModel(tmp_path / "sda.img", 24 * MIB, rng)
    model.write(0, rng.integers(0, 256, 12 * MIB, dtype=np.uint8).tobytes())

    started = time.monotonic()
    subprocess.run(_backup_cmd(repo, model.path), check=True, capture_output=True)
    duration = time.monotonic() - started
    expected = {_points(capsys, repo)[0]["id"]: hashlib.sha256(model.content).hexdigest()}

    kills_landed = 0
    for _attempt in range(MAX_ATTEMPTS):
        if kills_landed >= KILLS:
            break
        model.random_changes(3, max_len=2 * MIB)
        digest = hashlib.sha256(model.content).hexdigest()
        proc = subprocess.Popen(_backup_cmd(repo, model.path), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        time.sleep(float(rng.uniform(0.05, 0.95)) * duration)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills_landed += 1
        else:
            # the backup beat the kill: later backups (incrementals, a less loaded machine) run
            # faster than the first one timed, so aim earlier
            duration *= 0.8
        proc.communicate()

        points = _points(capsys, repo)
        new = [p for p in points if p["id"] not in expected]
        assert len(new) <= 1, "one attempt made two points"
        for point in new:
            expected[point["id"]] = digest
        assert {p["id"] for p in points} == set(expected), "a point vanished"
        # the newest point and one older one restore exactly
        check = {points[-1]["id"], points[int(rng.integers(0, len(points)))]["id"]}
        for point_id in check:
            assert _restored_digest(capsys, repo, point_id, tmp_path) == expected[point_id]

    assert kills_landed >= KILLS, f"only {kills_landed} kills landed during a backup"
    final = subprocess.run(_backup_cmd(repo, model.path), capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    expected[json.loads(final.stdout)["point"]["id"]] = hashlib.sha256(model.content).hexdigest()
    for point in _points(capsys, repo):
        assert _restored_digest(capsys, repo, point["id"], tmp_path) == expected[point["id"]]
    assert not list((repo / "locks").iterdir()), "stale locks were not cleaned"
