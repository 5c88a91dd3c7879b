"""Errors of the vSphere source (each a RepoError, so the CLI prints one line and exits 1)."""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from contextlib import contextmanager

from ...errors import SourceError


class VSphereError(SourceError):
    """vCenter/ESXi refused or failed a step; the message says which and what to do."""


class ConnectionLost(VSphereError):
    """The session with vCenter/ESXi broke: nothing more can be asked of it (cleanup included)."""


def fault_text(exc: BaseException) -> str:
    """A vim/vmodl fault's message, or its type name when it has none."""
    msg = getattr(exc, "msg", None) or getattr(exc, "localizedMessage", None) or ""
    name = type(exc).__name__.rsplit(".", 1)[-1]
    if msg.startswith("*types."):   # govmomi's simulator puts the Go type there
        msg = ""
    return f"{name}: {msg}" if msg else name


def connection_broke(exc: BaseException) -> bool:
    """A pyvmomi call failed because the connection did (reset, closed, timed out, TLS), not
    because vSphere answered with a fault."""
    return isinstance(exc, (ConnectionLost, OSError, http.client.HTTPException))


@contextmanager
def asking(server: str, what: str) -> Iterator[None]:
    """Around pyvmomi calls (never VDDK ones, whose errors are OSErrors too): a vim fault
    becomes a VSphereError naming `what`; a broken connection a ConnectionLost."""
    from pyVmomi import vmodl

    try:
        yield
    except VSphereError:
        raise
    except vmodl.MethodFault as exc:
        raise VSphereError(f"{what} failed: {fault_text(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - only connection failures are turned, see below
        if not connection_broke(exc):
            raise
        detail = str(exc) or type(exc).__name__
        raise ConnectionLost(f"the connection to {server} was lost while {what} "
                             f"({detail})") from None
