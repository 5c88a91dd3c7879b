"""Errors of the vSphere source (each a RepoError, so the CLI prints one line and exits 1)."""

from __future__ import annotations

from ...errors import SourceError


class VSphereError(SourceError):
    """vCenter/ESXi refused or failed a step; the message says which and what to do."""


def fault_text(exc: BaseException) -> str:
    """A vim/vmodl fault's message, or its type name when it has none."""
    msg = getattr(exc, "msg", None) or getattr(exc, "localizedMessage", None) or ""
    name = type(exc).__name__.rsplit(".", 1)[-1]
    if msg.startswith("*types."):   # govmomi's simulator puts the Go type there
        msg = ""
    return f"{name}: {msg}" if msg else name
