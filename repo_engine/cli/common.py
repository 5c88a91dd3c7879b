"""What every command shares: the repository argument, JSON output, progress bars."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:  # imported lazily at run time: `--help` must not load the engine
    from ..repository.repo import Repository

repo_argument = click.argument("repo", type=click.Path(path_type=Path))
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")


def emit_json(doc: object) -> None:
    if is_dataclass(doc) and not isinstance(doc, type):
        doc = asdict(doc)
    elif isinstance(doc, list):
        doc = [asdict(d) if is_dataclass(d) and not isinstance(d, type) else d for d in doc]
    click.echo(json.dumps(doc, indent=2, sort_keys=True))


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
