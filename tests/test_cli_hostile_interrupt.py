"""Ctrl-C (SIGINT) in the middle of a command: one line on stderr, exit code 130, and a
repository that verifies and restores what it held before."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest

from helpers import MIB, DiskModel, cli, restore_bytes
from race import Command

INTERRUPTED = "repo-engine: interrupted\n"


def _repo(tmp_path: Path, capsys, *init_args: object) -> tuple[Path, DiskModel, str]:
    repo = tmp_path / "repo"
    assert cli(capsys, "init", repo, "--block-size", "16KiB", "--pack-size", "256KiB",
               *init_args).code == 0
    model = DiskModel(tmp_path / "d.img", 4 * MIB, np.random.default_rng(7))
    model.random_changes(30)
    result = cli(capsys, "backup", "image", repo, "--vm", "v", "--disk", f"d={model.path}",
                 "--json")
    assert result.code == 0, result.err
    return repo, model, result.json()["point"]["id"]


def _interrupt(command: Command, point: str) -> None:
    assert command.reached(point)
    command.proc.send_signal(signal.SIGINT)
    result = command.finish()
    assert (result.code, result.out, result.err) == (130, "", INTERRUPTED)


@pytest.mark.parametrize("shared", [[], ["--shared"]])
@pytest.mark.parametrize("point", ["atomic.written", "backup.before_commit"])
def test_a_backup_interrupted_stores_no_point_and_keeps_the_others(tmp_path, capsys, shared,
                                                                    point):
    repo, model, first = _repo(tmp_path, capsys, *shared)
    before = model.copy_of_content()
    model.random_changes(30)
    _interrupt(Command(tmp_path, "backup", "image", repo, "--vm", "v", "--disk",
                       f"d={model.path}", pauses=(point,)), point)
    assert [p["id"] for p in cli(capsys, "points", repo, "--json").json()["points"]] == [first]
    assert cli(capsys, "verify", repo).code == 0
    assert restore_bytes(capsys, repo, first[:12], "d", tmp_path / "o.img") == before
    # what the interrupted backup left is no obstacle to the next one, nor to gc
    assert cli(capsys, "backup", "image", repo, "--vm", "v", "--disk", f"d={model.path}").code == 0
    assert cli(capsys, "gc", repo, "--grace", "0s").code == 0
    assert cli(capsys, "verify", repo).code == 0
    assert restore_bytes(capsys, repo, "v@latest", "d", tmp_path / "n.img") == \
        model.copy_of_content()


@pytest.mark.parametrize("shared, gc_args, point", [
    ([], ["--full", "--max-unused", "0"], "gc.recount"),
    (["--shared"], ["--grace", "0s", "--repack", "--max-unused", "0"], "gc.sweep"),
])
def test_gc_interrupted_leaves_every_point_restorable(tmp_path, capsys, shared, gc_args, point):
    repo, model, first = _repo(tmp_path, capsys, *shared)
    before = model.copy_of_content()
    model.random_changes(30)
    assert cli(capsys, "backup", "image", repo, "--vm", "v", "--disk", f"d={model.path}").code == 0
    assert cli(capsys, "forget", repo, "v@latest").code == 0
    _interrupt(Command(tmp_path, "gc", repo, *gc_args, pauses=(point,)), point)
    assert cli(capsys, "verify", repo).code == 0
    assert restore_bytes(capsys, repo, first[:12], "d", tmp_path / "o.img") == before
    assert cli(capsys, "gc", repo, *gc_args).code == 0
    assert cli(capsys, "verify", repo).code == 0
    assert restore_bytes(capsys, repo, first[:12], "d", tmp_path / "o.img") == before
