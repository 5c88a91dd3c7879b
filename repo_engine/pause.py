"""Pause points: a test facility that lets a test force a race between commands deterministically.

A command calls `pause_point(name)` at the places where a concurrent command may change the
repository under it (between reading a snapshot of the index and committing, between opening the
repository and locking it, before a backup's catalog commit, ...). Normally it does nothing: the
check is one lookup in a set built at import time.

When the environment variable `REPO_ENGINE_PAUSE` names the point (a comma-separated list of
names), the process creates `<REPO_ENGINE_PAUSE_DIR>/<name>.reached` (holding its pid) and waits
until `<REPO_ENGINE_PAUSE_DIR>/<name>.go` exists, then goes on. The go file stays: later passes
through the same point do not wait. A process that is never released goes on by itself after
`REPO_ENGINE_PAUSE_TIMEOUT` seconds (default 120), so a failed test cannot leave it hanging.

Without `REPO_ENGINE_PAUSE_DIR`, `REPO_ENGINE_PAUSE_JITTER` = S makes a named point sleep a random
0 to S seconds instead: a soak widens every race window this way.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

# every pause point (`gc.waiting`: gc waits for a running session; `atomic.written`: a file or
# batch is durable under its temporary names, not renamed yet; `backup.packs_published`: a pack
# of a backup is in the store, no journal entry names it yet; `repository.point_built`: a
# point's manifest is durable, its catalog entry not written yet; `restore.writing`: a restore
# holds its target and writes it)
NAMES = ("repository.before_lock", "backup.before_commit", "backup.packs_published",
         "repository.point_built", "gc.recount", "gc.sweep", "gc.repacked", "gc.waiting",
         "verify.snapshot", "scrub.snapshot", "atomic.written", "restore.writing")

_NAMES = frozenset(n for n in os.environ.get("REPO_ENGINE_PAUSE", "").split(",") if n)


def pause_point(name: str) -> None:
    """Wait here if a test asked for it (see the module docstring); otherwise return at once."""
    if name in _NAMES:
        _wait(name)


def _wait(name: str) -> None:
    if "REPO_ENGINE_PAUSE_DIR" not in os.environ:
        time.sleep(random.uniform(0, float(os.environ.get("REPO_ENGINE_PAUSE_JITTER", "0"))))
        return
    folder = Path(os.environ["REPO_ENGINE_PAUSE_DIR"])
    (folder / f"{name}.reached").write_text(str(os.getpid()))
    deadline = time.monotonic() + float(os.environ.get("REPO_ENGINE_PAUSE_TIMEOUT", "120"))
    while not (folder / f"{name}.go").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
