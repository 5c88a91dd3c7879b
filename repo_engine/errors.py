"""The one exception hierarchy of repo-engine.

Every error a user can meet is a `RepoError`; its message says what is wrong and, where it helps,
what to do. Each class carries the process exit code the CLI returns for it.
"""

from __future__ import annotations


class RepoError(Exception):
    """Base of all repo-engine errors (exit code 1)."""

    exit_code = 1


class UsageError(RepoError):
    """The request itself is malformed: a bad argument, a bad extents file (exit code 2)."""

    exit_code = 2


class NotARepository(RepoError):
    """The path holds no repository."""


class FormatError(RepoError):
    """A file is of an unknown format or an unsupported version."""


class DamageError(RepoError):
    """Stored data or metadata failed a check: a checksum, a hash, a missing pack (exit code 3)."""

    exit_code = 3


class ChainBroken(DamageError):
    """A point's chain reaches an ancestor whose catalog record or block map is missing or
    damaged: the point cannot be resolved (exit code 3). The message names the point, the disk,
    the ancestor and the cause, then `advice`."""

    RESTORE = ("restore a point older than {ancestor} or on another chain ('repo-engine verify' "
               "names every point it breaks)")

    def __init__(self, point: str, key: str, ancestor: str, cause: str,
                 advice: str = RESTORE) -> None:
        self.point, self.key, self.ancestor, self.cause = point, key, ancestor, cause
        super().__init__(f"the chain of disk {key!r} at point {point[:8]} is broken: its "
                         f"ancestor {ancestor[:8]} {cause}; "
                         + advice.format(ancestor=ancestor[:8]))


class PointNotFound(RepoError):
    """No restore point matches the given reference."""


class LockedError(RepoError):
    """Another process holds a conflicting repository lock."""


class SourceError(RepoError):
    """A disk source could not be read: missing, unreadable, or reported wrong data."""


class TamperedError(DamageError):
    """A sealed (encrypted) object failed authentication: changed, truncated, moved to another
    name, or sealed with a key the keyring does not hold (exit code 3)."""


class LeaseLost(RepoError):
    """This command's lease or lock in a shared repository's store is no longer its own (it
    stalled past its lease, or the store failed its renewal): gc may have deleted what it wrote,
    so it stops before it writes anything more. `reason` says how it was lost."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


class CommitStalled(RepoError):
    """A commit found, caught up with the journal, that gc swept an object it names (a pack, a
    manifest, a chunk) while the writer stalled past its lease: nothing is committed. `what`
    says what gc deleted."""

    def __init__(self, what: str, message: str = "") -> None:
        super().__init__(message or f"this command stalled past its lease: {what}; nothing "
                         "naming it was committed: run the command again")
        self.what = what


# what a refused recovery key file's message asks for (the CLI's file check and the key's
# parse both say it)
NAME_THE_KEY = "name the file 'repo-engine key export-recovery' wrote"
