"""Durable state: the fact log, decisions, rule states, the outbox, the ledger, rulesets and
the audit log, behind one storage contract.

Owns: ``contract`` (the Store Protocols, split by concern), ``records`` (the typed rows
they return), ``queries`` (query types: plain data), ``errors`` (the ``StoreError``
family), ``evidence`` (what a decision saw, stored by reference), ``migrations`` (schema
migrations as files, per backend), ``sqlstore`` (what the SQL backends share: the SQL,
the row mapping, the write bodies, a ``Dialect`` for what differs), ``sqlite`` (the
embedded backend: WAL, ``synchronous=FULL``) with ``lockfile`` (one daemon per database
file), ``postgresql`` (the server backend, psycopg 3), ``writer_thread`` (their single
writer), ``history`` (a deployment's recorded history read for a replay,
and the backtest and self-check run over it), ``copy`` (a whole database copied to
another, either backend, verified: ``gatekeeper copy-db``), and ``open_store`` (the backend a
``database:`` setting names, read-only for a backtest).

May import: ``gatekeeper.engine`` (the records it stores), ``gatekeeper.rules`` and the
ground floor. Never the runtime, delivery or HTTP layers.
"""

from __future__ import annotations

from pathlib import Path

from gatekeeper.config import POSTGRESQL_SCHEMES, database_url_problem
from gatekeeper.store.contract import Store
from gatekeeper.store.errors import UnsupportedDatabase

__all__ = ["SQLITE_PREFIX", "Store", "database_name", "open_store", "store_for"]

SQLITE_PREFIX = "sqlite:///"


def store_for(database: str | Path, *, read_only: bool = False) -> Store:
    """The (not yet opened) store a ``database:`` setting names; ``read_only`` opens it
    for reading only (see ``open_store``).

    ``database`` is a plain path (``state/gatekeeper.db``), ``sqlite:///<path>`` (three
    slashes then the path, so ``sqlite:////var/lib/gk.db`` is absolute and
    ``sqlite:///gk.db`` relative to the working folder), ``sqlite:///:memory:`` (a private
    in-memory database, gone when the store closes) or ``postgresql://user@host:port/dbname``
    (also ``postgres://``; the password from the environment, see
    ``gatekeeper.store.postgresql``). Raises ``UnsupportedDatabase`` naming the scheme for
    any other URL, or saying what is wrong with a PostgreSQL URL (a password in it: the
    URL is not repeated).
    """
    from gatekeeper.store.sqlite import SqliteStore

    if isinstance(database, Path):
        return SqliteStore(database, read_only=read_only)
    scheme, sep, _ = database.partition("://")
    if not sep:
        return SqliteStore(Path(database), read_only=read_only)
    if database.startswith(SQLITE_PREFIX):
        path = database[len(SQLITE_PREFIX) :]
        if not path:
            raise UnsupportedDatabase(f"database URL {database!r} names no file")
        return SqliteStore(path if path == ":memory:" else Path(path), read_only=read_only)
    if scheme == "sqlite":
        raise UnsupportedDatabase(
            f"database URL {database!r}: write sqlite:///<path> (three slashes)"
        )
    if scheme in POSTGRESQL_SCHEMES:
        problem = database_url_problem(database)
        if problem is not None:
            raise UnsupportedDatabase(f"the {scheme} database URL {problem}")
        from gatekeeper.store.postgresql import PostgresStore

        return PostgresStore(database, read_only=read_only)
    raise UnsupportedDatabase(
        f"database URL scheme {scheme!r} is not supported (supported: a file path, "
        "sqlite:///<path>, postgresql://user@host:port/dbname)"
    )


def database_name(database: str | Path) -> str:
    """A ``database:`` setting fit for a message: a path as is, a PostgreSQL URL as its
    database and host (never a password), another URL by its scheme only."""
    if isinstance(database, Path) or "://" not in database:
        return str(database)
    if database.startswith(SQLITE_PREFIX):
        return database[len(SQLITE_PREFIX) :]
    scheme = database.partition("://")[0]
    if scheme in POSTGRESQL_SCHEMES and database_url_problem(database) is None:
        from gatekeeper.store.postgresql import describe

        return f"{describe(database)} (PostgreSQL)"
    return scheme + "://..."


async def open_store(database: str | Path, *, read_only: bool = False) -> Store:
    """The store ``database`` names (see ``store_for``), opened: its schema is up to date.

    With ``read_only`` (``gatekeeper backtest``) nothing is created, migrated, locked or
    written: the database must exist with this gatekeeper's schema version (a daemon may
    be running on it), its reads see what was committed, and every write raises
    ``StoreUnavailable``.

    Raises ``UnsupportedDatabase`` for an unknown scheme, ``StoreUnavailable`` when the
    database cannot be opened (read-only: when it does not exist, or its schema is older
    than this gatekeeper's), ``SchemaTooNew`` when a newer gatekeeper wrote it."""
    store = store_for(database, read_only=read_only)
    await store.open()
    return store
