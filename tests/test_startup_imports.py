"""An image backup loads only the modules it uses: a small incremental's run time is mostly the
interpreter's start-up, so the vSphere client and the maintenance modules must stay unloaded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import MIB, write_extents

# Run in a fresh interpreter (the test process has imported everything already).
SCRIPT = """
import json, sys
from repo_engine.cli.main import run
for argv in json.loads(sys.argv[1]):
    if run(argv) != 0:
        sys.exit(f"command failed: {argv}")
print(json.dumps(sorted(sys.modules)))
"""
# Never needed by an image backup without damaged chunks.
UNUSED = ("pyVmomi", "pyVim", "repo_engine.maintenance", "repo_engine.sources.vsphere",
          "repo_engine.restore")


def loaded_after(commands: list[list[str]]) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(commands)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.splitlines()[-1])


def test_image_backups_leave_unused_modules_unloaded(tmp_path: Path) -> None:
    repo, image = tmp_path / "repo", tmp_path / "disk.img"
    data = bytearray(4 * MIB)
    data[:MIB] = bytes(range(256)) * (MIB // 256)
    image.write_bytes(bytes(data))
    changed = write_extents(tmp_path / "changed.json", [[0, 64 * 1024]])
    backup = ["backup", "image", str(repo), "--vm", "vm", "--disk", f"sda={image}", "--json"]
    modules = loaded_after([["init", str(repo)], backup,
                            [*backup[:-1], "--changed", f"sda={changed}", "--json"]])
    assert "repo_engine.backup.job" in modules   # the backup did run in this interpreter
    assert [m for m in modules if m.startswith(UNUSED)] == []
