"""What every command shares: the repository argument, JSON output, progress bars."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:  # imported lazily at run time: `--help` must not load the engine
    from ..repository.repo import Repository

repo_argument = click.argument("repo", type=click.Path(path_type=Path))
json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print a versioned JSON document instead of text (docs/JSON.md).")


def emit_json(doc: object = None, **fields: object) -> None:
    """Print a versioned document (see schema.py): a report dataclass or dict, plus `fields`."""
    from .schema import document

    click.echo(json.dumps(document(doc, **fields), indent=2, sort_keys=True))


@contextmanager
def open_repo(path: Path, shared: str | None = None) -> Iterator[Repository]:
    """The repository at `path`; with `shared` (the command's name), under a shared lock taken
    before anything is read, so that gc waits for the command and rebuild-index excludes it."""
    from ..repository.locks import SHARED
    from ..repository.repo import Repository

    repo = Repository.open(path)
    try:
        if shared is None:
            yield repo
        else:
            with repo.lock(SHARED, shared):
                yield repo
    finally:
        repo.close()


class Progress:
    """Progress bars on stderr when it is a terminal; silent otherwise."""

    def __init__(self) -> None:
        self._stack = ExitStack()
        self.enabled = sys.stderr.isatty()

    def bar(self, label: str, total: int) -> Callable[[int], None]:
        if not self.enabled or total <= 0:
            return lambda _n: None
        bar = self._stack.enter_context(click.progressbar(
            length=total, label=label, file=sys.stderr, show_eta=True, show_percent=True))
        return bar.update

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def human_bytes(n: float) -> str:
    from ..units import format_size

    return format_size(n)


# how a backup read a disk (DiskRecord.read_mode), in words
READ_MODES = {"allocated": "read its allocated extents", "changed": "read the changed extents",
              "full": "read whole"}


def disk_line(d: object) -> str:
    """`read the changed extents, delta on 3f2a9c1d (2 links)`, and the disk's note."""
    from ..repository.points import DiskRecord

    assert isinstance(d, DiskRecord)
    stored = f"delta on {d.parent[:8]}" if d.kind == "delta" and d.parent else "full map"
    links = f" (a chain of {d.links} maps)" if d.links > 1 else ""
    note = f"  ({d.note})" if d.note else ""
    return f"{READ_MODES.get(d.read_mode, d.read_mode + ' read')}, {stored}{links}{note}"
