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
    not open. Retrying later may succeed."""


class Conflict(StoreError):
    """The write contradicts what is stored: a unique key already recorded (e.g. a
    ``firing_id`` or ``action_id`` written twice, which would mean a double firing), a
    reference to a missing row, or an entry not in a state the operation applies to (e.g.
    requeuing an action that is not dead)."""


class SchemaTooNew(StoreUnavailable):
    """The database was written by a newer gatekeeper (its schema version is higher than
    any migration this one knows)."""


class UnsupportedDatabase(StoreError, ValueError):
    """``open_store`` was given a ``database:`` it has no backend for (an unknown URL
    scheme)."""
