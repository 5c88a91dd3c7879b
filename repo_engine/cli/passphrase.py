"""Where an encrypted repository's passphrase comes from, never the command line.

The first that is given wins: `--passphrase-file FILE`, `$REPO_ENGINE_PASSWORD_FILE`,
`$REPO_ENGINE_PASSWORD`, else a prompt on the terminal (no echo; twice when a new passphrase is
chosen). A file loses exactly one trailing newline (the one `echo` adds); an empty passphrase is
refused wherever it came from. Without a source and without a terminal, the error says how to
give one.

A source is read only when it is asked for: the repository asks only when it is encrypted, so an
unencrypted repository never prompts.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import click

from ..errors import NAME_THE_KEY, RepoError, UsageError

FILE_ENV = "REPO_ENGINE_PASSWORD_FILE"
VALUE_ENV = "REPO_ENGINE_PASSWORD"
KEY_FILE_ENV = "REPO_ENGINE_KEY_FILE"
MAX_PASSPHRASE = 4096
MAX_KEY_FILE = 64 << 10  # a PEM private key is some 120 bytes
HOW = f"--passphrase-file FILE, ${FILE_ENV} or ${VALUE_ENV}"


def read_passphrase_file(path: Path, option: str) -> bytes:
    """The passphrase in `path` (named by `option` in errors), one trailing newline dropped."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_PASSPHRASE + 2)
    except OSError as exc:  # a bad input file, as an extents file that cannot be read
        raise UsageError(f"{option}: cannot read the passphrase file {path}: "
                         f"{exc.strerror or exc}") from None
    return checked(data[:-1] if data.endswith(b"\n") else data, f"{option} {path}")


def checked(passphrase: bytes, where: str) -> bytes:
    if not passphrase:
        raise UsageError(f"the passphrase from {where} is empty; an empty passphrase is refused")
    if len(passphrase) > MAX_PASSPHRASE:
        raise UsageError(f"the passphrase from {where} is longer than {MAX_PASSPHRASE} bytes")
    return passphrase


def prompt(text: str, *, confirm: bool) -> bytes:
    """A passphrase typed on the terminal, without echo (twice, the same, when `confirm`)."""
    value = click.prompt(text, hide_input=True, err=True,
                         confirmation_prompt="Repeat the passphrase" if confirm else False)
    return checked(value.encode(), "the terminal")


def on_terminal() -> bool:
    return sys.stdin.isatty()


@dataclass(frozen=True)
class PassphraseSource:
    """The passphrase of the repository at `location`: `file` (`--passphrase-file`), else the
    environment, else the terminal."""

    location: str
    file: Path | None = None
    # what was read, kept: a source that can be read once (a pipe: --passphrase-file /dev/stdin)
    # is asked several times in a command (the unlock ahead, then the unlock)
    _read: list[bytes] = field(default_factory=list, compare=False, repr=False)

    def __call__(self) -> bytes:
        return self.read(confirm=False)

    @property
    def asks(self) -> bool:
        """Whether the passphrase comes from the terminal (crypto/null.asks)."""
        return self.file is None and not os.environ.get(FILE_ENV) and VALUE_ENV not in os.environ

    def read(self, *, confirm: bool, environ: Mapping[str, str] | None = None) -> bytes:
        """`confirm`: a new repository's passphrase, asked twice on the terminal. Read once,
        then kept; in a command that re-executed itself (cli/vddk_env.py), the one its parent
        read."""
        if not self._read:
            from .vddk_env import PASSPHRASE_FD, handed

            self._read.append(handed(PASSPHRASE_FD) or self._from_source(confirm, environ))
        return self._read[0]

    @property
    def held(self) -> bytes | None:
        """The passphrase, when it was read already."""
        return self._read[0] if self._read else None

    def _from_source(self, confirm: bool, environ: Mapping[str, str] | None) -> bytes:
        environ = os.environ if environ is None else environ
        if self.file is not None:
            return read_passphrase_file(self.file, "--passphrase-file")
        if environ.get(FILE_ENV):
            return read_passphrase_file(Path(environ[FILE_ENV]), f"${FILE_ENV}")
        if VALUE_ENV in environ:
            # its bytes as the environment has them, UTF-8 or not
            return checked(os.fsencode(environ[VALUE_ENV]), f"${VALUE_ENV}")
        if not on_terminal():
            raise RepoError(self._missing(confirm))
        return prompt(f"{'New passphrase' if confirm else 'Passphrase'} for {self.location}",
                      confirm=confirm)

    def _missing(self, new: bool) -> str:
        if new:
            return (f"{self.location}: an encrypted repository needs a passphrase and none was "
                    f"given (and no terminal to ask on): give it with {HOW}, or create the "
                    "repository unencrypted with --no-encryption")
        return (f"{self.location} is encrypted and no passphrase was given (and no terminal to "
                f"ask on): give it with {HOW}")


@dataclass(frozen=True)
class KeyFileSource:
    """A recovery private key file (`key export-recovery`) that opens an encrypted repository
    without its passphrase and without a KDF, for hosts that run backups unattended: `file`
    (`--key-file`), else `$REPO_ENGINE_KEY_FILE`; None when neither is given."""

    file: Path | None = None

    def given(self) -> bool:
        return self._chosen(os.environ) is not None

    def __call__(self, environ: Mapping[str, str] | None = None) -> tuple[bytes, str] | None:
        chosen = self._chosen(os.environ if environ is None else environ)
        return None if chosen is None else read_key_file(*chosen)

    def _chosen(self, environ: Mapping[str, str]) -> tuple[Path, str] | None:
        """The key file given, and the option that named it."""
        if self.file is not None:
            return self.file, "--key-file"
        if environ.get(KEY_FILE_ENV):
            return Path(environ[KEY_FILE_ENV]), f"${KEY_FILE_ENV}"
        return None


def read_key_file(path: Path, option: str) -> tuple[bytes, str]:
    """The PEM in `path` (named by `option` in errors) and how messages name it."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_KEY_FILE + 1)
    except OSError as exc:  # a bad input file, as a passphrase file that cannot be read
        raise UsageError(f"{option}: cannot read the key file {path}: {exc.strerror or exc}; "
                         f"{NAME_THE_KEY}") from None
    if len(data) > MAX_KEY_FILE:
        raise UsageError(f"{option} {path} is larger than any key file ({MAX_KEY_FILE} bytes)")
    return data, f"{option} {path}"


def new_passphrase(file: Path | None, what: str) -> bytes:
    """A passphrase to add: from `--new-passphrase-file`, else typed twice on the terminal."""
    if file is not None:
        return read_passphrase_file(file, "--new-passphrase-file")
    if not on_terminal():
        raise RepoError(f"no new passphrase for {what} was given (and no terminal to ask on): "
                        "give it with --new-passphrase-file FILE")
    return prompt(f"New passphrase for {what}", confirm=True)
