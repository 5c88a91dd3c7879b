"""Run `repo-engine` commands as real processes that stop at named pause points
(repo_engine/pause.py), so a test can order two commands' steps exactly as a race would."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from helpers import CliResult

GIVE_UP = 120.0  # seconds: only so that a broken test fails instead of hanging


class Command:
    """One `repo-engine ARGS` process; `pauses` names the points where it stops until released."""

    def __init__(self, tmp: Path, *args: object, pauses: tuple[str, ...] = ()) -> None:
        self.dir = tmp / f"pause-{os.urandom(4).hex()}"
        self.dir.mkdir()
        env = dict(os.environ, REPO_ENGINE_PAUSE=",".join(pauses),
                   REPO_ENGINE_PAUSE_DIR=str(self.dir))
        self.args = [str(a) for a in args]
        self.proc = subprocess.Popen([sys.executable, "-m", "repo_engine", *self.args], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def reached(self, point: str) -> bool:
        """Wait until the process stops at `point` (True) or exits without reaching it (False)."""
        deadline = time.monotonic() + GIVE_UP
        while time.monotonic() < deadline:
            if (self.dir / f"{point}.reached").exists():
                return True
            if self.proc.poll() is not None:
                return (self.dir / f"{point}.reached").exists()
            time.sleep(0.01)
        raise AssertionError(f"{self.args[0]} neither reached {point} nor exited")

    def release(self, point: str) -> None:
        (self.dir / f"{point}.go").touch()

    def finish(self) -> CliResult:
        out, err = self.proc.communicate(timeout=GIVE_UP)
        return CliResult(self.proc.returncode, out, err)
