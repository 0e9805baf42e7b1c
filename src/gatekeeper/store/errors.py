"""The store's errors: every backend raises these, never its driver's own exceptions.

``StoreError`` is the root; the original driver exception is kept as ``__cause__`` (for the
logs; its text never holds secrets: the store keeps none).
"""

from __future__ import annotations


class StoreError(Exception):
    """A storage operation failed; nothing it was asked to write was written."""


class StoreUnavailable(StoreError):
    """The database cannot be used right now or at all: locked by another process past the
    busy timeout, disk full, an I/O error, a file that cannot be opened, a store that is
    not open. Retrying later may succeed.

    ``condition`` names the cause for health reports and logs: ``locked`` (another
    connection holds the write lock), ``disk_full``, ``io_error``, ``read_only``,
    ``damaged`` (a corrupted page or a file that is not a database) or ``unavailable``
    (anything else, e.g. a store that is not open)."""

    def __init__(self, message: str, condition: str = "unavailable") -> None:
        super().__init__(message)
        self.condition = condition


class DatabaseInUse(StoreUnavailable):
    """The database is in use in a way that excludes this process: another gatekeeper
    daemon serves the SQLite file (it holds its lock: one daemon per file), or a PostgreSQL
    schema's advisory lock is held in a mode this process cannot share (daemons serving
    while a migration needs it alone; a migration or copy in progress; a gatekeeper of
    before, deciding alone). ``holder_pid`` is the holder's process id when known
    (SQLite)."""

    def __init__(self, message: str, holder_pid: int | None) -> None:
        super().__init__(message, "locked")
        self.holder_pid = holder_pid


class NotAGatekeeperDatabase(StoreUnavailable):
    """The file at the database path exists but is not a gatekeeper database (empty, not
    SQLite, or another application's SQLite database): it is refused, never overwritten
    or migrated."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "damaged")


class Conflict(StoreError):
    """The write contradicts what is stored: a unique key already recorded (e.g. a
    ``firing_id`` or ``action_id`` written twice, which would mean a double firing), a
    reference to a missing row, or an entry not in a state the operation applies to (e.g.
    requeuing an action that is not dead)."""


class RulesetChanged(Conflict):
    """The transitions were planned with ruleset version ``planned_with`` but ``active`` is
    the active one now (another daemon activated it): nothing was written; adopt the active
    ruleset and plan again."""

    def __init__(self, planned_with: str, active: str) -> None:
        super().__init__(
            f"planned with ruleset {planned_with[:12]}, but ruleset {active[:12]} is active"
        )
        self.planned_with = planned_with
        self.active = active


class StateBehind(StoreError):
    """A deciding write was planned on memory at state version ``expected`` but the
    database is at ``current`` (another daemon sharing it decided meanwhile, or a commit
    whose answer was lost did commit): nothing was written. The writer catches up
    (``StateStore.state_changes``) and plans again (see ``StateFence``)."""

    def __init__(self, expected: int, current: int) -> None:
        super().__init__(
            f"planned on state version {expected}, but the database is at version {current}"
        )
        self.expected = expected
        self.current = current


class AttemptInFlight(Conflict):
    """An attempt of the release is in flight (begun, its outcome not yet recorded): the
    operation must wait for that outcome, which decides (retry it shortly)."""


class KeyReused(Conflict):
    """A key that makes a request idempotent (a settlement callback's ``webhook-id``) was
    already used with another request: nothing is applied."""


class SchemaTooNew(StoreUnavailable):
    """The database was written by a newer gatekeeper (its schema version is higher than
    any migration this one knows)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "unavailable")


class UnsupportedDatabase(StoreError, ValueError):
    """``open_store`` was given a ``database:`` it has no backend for (an unknown URL
    scheme)."""


ADVICE = {
    "locked": "another process holds the database's write lock; stop that process (one "
    "gatekeeper daemon per database file) or wait for it to finish, then start again",
    "disk_full": "the disk is full; free space on it, then start again",
    "io_error": "the file system reported an I/O error; check the disk, then start again",
    "read_only": "it cannot be written; give gatekeeper's user write access to the file, "
    "its folder and its -wal and -shm files, then start again",
    "damaged": "the file is damaged; restore it from a backup (sqlite3's .recover may save "
    "what is left), then start again",
    "unavailable": "check that the file and its folder exist and gatekeeper's user may read "
    "and write them, then start again",
}
"""What an operator can do about a ``StoreUnavailable.condition`` at startup (one clause)."""
