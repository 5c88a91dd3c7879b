"""Start the CLI with VDDK's libraries on LD_LIBRARY_PATH, and hand it the password safely.

VDDK dlopens its own bundled libraries (libcrypto, libssl, ...) by relative name, so its `lib64`
must be on `LD_LIBRARY_PATH` before the process starts. When it is not, the CLI re-executes
itself once with it prepended (`REPO_ENGINE_VDDK_REEXEC=1` marks the child).

The secret never travels on a command line or in the child's environment: the parent reads it
(from `--password-file` or the variable named by `--password-env`, which it then removes from
the child's environment), writes it into a pipe, and the child inherits only the pipe's read end;
`REPO_ENGINE_VDDK_SECRET_FD` names that descriptor number. Without a re-exec the secret is read
directly. The repository's passphrase, when the parent read it already (from a pipe such as
`--passphrase-file /dev/stdin`, which the child could not read again), is handed over the same
way, under `REPO_ENGINE_PASSPHRASE_FD`.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from ..units import cut

REEXEC_MARK = "REPO_ENGINE_VDDK_REEXEC"
SECRET_FD = "REPO_ENGINE_VDDK_SECRET_FD"
PASSPHRASE_FD = "REPO_ENGINE_PASSPHRASE_FD"
MAX_SECRET = 4096

log = logging.getLogger("repo_engine.vddk")


@dataclass(frozen=True)
class SecretSource:
    """Where the password comes from: a file, or an environment variable's name."""

    file: Path | None = None
    env: str | None = None

    def __post_init__(self) -> None:
        if (self.file is None) == (self.env is None):
            raise UsageError("give exactly one of --password-file FILE or --password-env VAR")
        if self.env is not None and (not self.env or "=" in self.env or "\x00" in self.env):
            raise UsageError(f"--password-env {cut(self.env)!r} is not the name of an "
                             "environment variable (e.g. VC_PASSWORD)")


def library_dir(libdir: str | os.PathLike[str]) -> Path:
    """The directory holding libvixDiskLib: LIBDIR/lib64 in a VDDK tree, else LIBDIR."""
    root = Path(libdir)
    return root / "lib64" if (root / "lib64").is_dir() else root


def _on_library_path(directory: Path) -> bool:
    wanted = directory.resolve()
    for item in os.environ.get("LD_LIBRARY_PATH", "").split(":"):
        if item and Path(item).resolve() == wanted:
            return True
    return False


def _invoked_as_cli() -> bool:
    """True when this process is the repo-engine command (not a library user or a test)."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    return argv0.name == "repo-engine" or (argv0.name == "__main__.py"
                                           and argv0.parent.name == "repo_engine")


def _read_direct(source: SecretSource) -> bytes:
    if source.env is not None:
        value = os.environ.get(source.env)
        if value is None:
            raise UsageError(f"--password-env: the environment variable {source.env} is not set")
        return value.encode()
    assert source.file is not None
    try:
        data = source.file.read_bytes()
    except OSError as exc:
        raise UsageError(f"--password-file: cannot read {source.file}: {exc.strerror}") from None
    return data[:-2] if data.endswith(b"\r\n") else data[:-1] if data.endswith(b"\n") else data


def _check(secret: bytes) -> bytes:
    if not secret:
        raise UsageError("the password is empty")
    if len(secret) > MAX_SECRET or b"\0" in secret:
        raise UsageError(f"the password must be at most {MAX_SECRET} bytes and hold no NUL byte")
    return secret


def handed(name: str) -> bytes | None:
    """What the re-executing parent wrote into the pipe whose descriptor the variable `name`
    names (read once: the variable is removed), None when there is none."""
    fd_text = os.environ.pop(name, None)
    if fd_text is None or not os.environ.get(REEXEC_MARK):
        return None
    fd = int(fd_text)
    chunks = []
    try:
        while chunk := os.read(fd, MAX_SECRET + 1):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def _hand(env: dict[str, str], name: str, secret: bytes) -> None:
    """`secret` in a pipe whose read end the child inherits, named by `env[name]`."""
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, secret)   # a few KiB at most: fits the pipe, never blocks
    finally:
        os.close(write_end)
    os.set_inheritable(read_end, True)
    env[name] = str(read_end)


def read_secret(source: SecretSource) -> str:
    """The password: from the pipe a re-executing parent left, else from its source."""
    secret = handed(SECRET_FD)
    return _check(_read_direct(source) if secret is None else secret).decode()


def ensure_library_path(libdir: str | os.PathLike[str], source: SecretSource,
                        passphrase: bytes | None = None) -> None:
    """Re-execute this command with VDDK's library directory on LD_LIBRARY_PATH, if needed;
    `passphrase`: the repository's, when it was read already (handed to the child).

    Returns when no re-exec is needed (already on the path, already re-executed, or not running
    as the repo-engine command, when it only warns); otherwise never returns.
    """
    directory = library_dir(libdir)
    if _on_library_path(directory) or os.environ.get(REEXEC_MARK):
        return
    if not _invoked_as_cli():
        log.warning("%s is not on LD_LIBRARY_PATH: the real VDDK may fail to load its own "
                    "libraries", directory)
        return
    secret = _check(_read_direct(source))
    env = dict(os.environ)
    if source.env is not None:
        env.pop(source.env, None)
    old = env.get("LD_LIBRARY_PATH")
    env["LD_LIBRARY_PATH"] = f"{directory}:{old}" if old else str(directory)
    env[REEXEC_MARK] = "1"
    _hand(env, SECRET_FD, secret)
    if passphrase is not None:
        _hand(env, PASSPHRASE_FD, passphrase)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
