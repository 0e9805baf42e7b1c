"""The PostgreSQL backend of the Store contract (``gatekeeper.store.contract``).

It runs the SQL, row mapping and write bodies of ``gatekeeper.store.sqlstore`` (shared with
the SQLite backend); what is PostgreSQL's is here: connecting, the migrations under an
advisory lock, read-only sessions, and the mapping of PostgreSQL's errors (SQLSTATE) to
the ``StoreError`` family.

Driver: psycopg 3. It is one driver with both a synchronous API and an asynchronous one.
Writes keep the SQLite backend's design: a whole transaction, every statement and the
COMMIT, is ONE call on the store's ``WriterThread`` running the same write bodies on a
synchronous connection (autocommit off, ``synchronous_commit`` set ``on`` for the session:
a write acknowledged is committed and flushed to the server's WAL when the coroutine
returns). Reads run on the event loop through an asynchronous connection in a read-only
session (autocommit: each read sees what was committed). The activation of a ruleset is
announced with ``NOTIFY gatekeeper_ruleset`` in its transaction (sent on commit);
``ruleset_changes`` listens on a connection of its own.
(asyncpg has no synchronous API: the write bodies would have to be written twice;
``bench/bench_pg_driver.py`` compares the two drivers.)

``database: postgresql://user@host:port/dbname`` (or ``postgres://``) names the database;
its password never sits in the URL (``gatekeeper.config.database_url_problem`` refuses
one): libpq reads it from the environment (``PGPASSWORD``) or ``~/.pgpass``. Messages name
the host and database only.

Schema: the migrations of ``gatekeeper/store/migrations/postgresql`` (the first is 12, the
schema of SQLite's migrations 1 to 12), each recorded in ``schema_version``, run in a
transaction holding ``pg_advisory_xact_lock(MIGRATION_LOCK)``, so daemons starting
together migrate once. Tables are those of the session's current schema (the first of its
``search_path``).

Several daemons serve one schema side by side. Each holds the schema's daemon lock in
SHARED mode on its writer's session (``hold_daemon_lock``); a migration, ``copy-db`` and
a gatekeeper of before (one daemon per database, which takes it EXCLUSIVE) need it alone,
so the schema never changes, nor is copied, under a serving daemon, and an older
gatekeeper never decides beside newer ones. What serialises the daemons' decisions is the
state version every deciding write checks and moves in its transaction
(``sqlstore.SqlStore._fenced``, ``StateFence``): a daemon whose memory is behind, because
another decided meanwhile or its own session broke while others served, is refused
(``StateBehind``) and catches up before it decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
from collections.abc import AsyncGenerator, Iterable, Sequence
from typing import Any, ClassVar

import psycopg
from psycopg import errors as pgerrors
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from gatekeeper.store.errors import (
    Conflict,
    DatabaseInUse,
    NotAGatekeeperDatabase,
    StoreError,
    StoreUnavailable,
)
from gatekeeper.store.migrations import Migration, load_migrations
from gatekeeper.store.sqlstore import (
    POSTGRESQL,
    RULESET_CHANNEL,
    Cursor,
    SqlStore,
    Tx,
    newer_schema,
    older_schema,
    release_claims,
)
from gatekeeper.store.writer_thread import WriterThread

log = logging.getLogger("gatekeeper.store.postgresql")

MIGRATIONS: tuple[Migration, ...] = load_migrations("postgresql", first=12)
"""The schema's migrations, in version order (``schema_version`` holds the applied ones)."""

SCHEMA_VERSION = MIGRATIONS[-1].version
"""The schema version this gatekeeper writes."""

MIGRATION_LOCK = 0x6761_7465_6B65_6570
"""The key of the transaction-level advisory lock migrations run under (``gatekeep``)."""

DAEMON_LOCK_KEY = "SELECT hashtextextended('gatekeeper daemon ' || current_schema(), 0)"
"""The key of the session advisory lock on a schema: every serving daemon holds it shared
(``hold_daemon_lock``), a migration or a copy exclusive. Per schema, so gatekeepers in
different schemas of one database do not exclude each other."""

TURN_LOCK_KEY = "SELECT hashtextextended('gatekeeper turn ' || current_schema(), 0)"
"""The key of the advisory lock that is the decision turn (``take_turn``): every checked
write takes it for its transaction (``pg_advisory_xact_lock``) before the ``state_version``
row; a daemon refused as behind holds it for its session until its next checked write is
done, and the others' checked writes wait meanwhile. Advisory locks are re-entrant within a
session, so the holder's own checked write passes."""

GATEKEEPER_TABLE = "fact_log"
"""A table every gatekeeper schema has: a schema with a version but without it is not
gatekeeper's."""

CONNECT_TIMEOUT_S = 10
"""How long connecting waits for the server (unless the URL says ``connect_timeout``)."""

LOCK_TIMEOUT_MS = 5000
"""How long a write waits for another session's lock before it fails with
``StoreUnavailable`` (condition ``locked``), as SQLite's busy timeout."""

APPLICATION_NAME = f"gatekeeper {socket.gethostname()}:{os.getpid()}"[:63]
"""How this process's sessions appear in ``pg_stat_activity`` (and in ``DatabaseInUse``)."""

KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}
"""libpq's TCP keepalive settings (seconds; ``tcp_user_timeout`` in ms) unless the URL
sets them: a connection to a server gone silent (a partition) fails within about 30 s
instead of the system's two hours."""

SERVER_KEEPALIVES = (
    "SET tcp_keepalives_idle = 10",
    "SET tcp_keepalives_interval = 5",
    "SET tcp_keepalives_count = 3",
    "SET tcp_user_timeout = 30000",
)
"""The same on the server's side of the writer's session: a daemon gone silent loses its
session, and with it its share of the daemon lock, within about 30 s."""

ADVICE = (
    "check that PostgreSQL runs and is reachable there, that the database exists and that "
    "its user may connect (the password comes from PGPASSWORD or ~/.pgpass), then start again"
)


def describe(url: str) -> str:
    """The database a URL names, for messages: ``dbname on host:port`` (never a
    password)."""
    try:
        info = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "(an unreadable PostgreSQL URL)"
    host = info.get("host") or "localhost"
    port = info.get("port") or "5432"
    return f"{info.get('dbname') or info.get('user') or 'postgres'} on {host}:{port}"


@functools.lru_cache(maxsize=4096)
def _pg(sql: str) -> str:
    """``sql`` with PostgreSQL's numbered placeholders (``$1``, ``$2``, ...) for its ``?``.

    The connections use psycopg's raw cursors, which send a statement as it is: psycopg's
    own ``%s`` placeholders are found by parsing each statement again on every execution
    once it is longer than psycopg caches (a 40-row INSERT is), which cost about 2 ms of
    CPU per statement here; this translation is cached."""
    parts = sql.split("?")
    return "".join(f"{part}${n}" for n, part in enumerate(parts[:-1], 1)) + parts[-1]


class _Transaction:
    """A ``Tx`` over a synchronous psycopg connection in a transaction."""

    __slots__ = ("_db",)

    def __init__(self, db: psycopg.Connection[Any]) -> None:
        self._db = db

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Cursor:
        return self._db.execute(_pg(sql), parameters)

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> object:
        with self._db.cursor() as cursor:
            cursor.executemany(_pg(sql), list(parameters))
        return None


_LOCKED = (
    pgerrors.LockNotAvailable,
    pgerrors.DeadlockDetected,
    pgerrors.SerializationFailure,
    pgerrors.QueryCanceled,
)


def _condition(exc: psycopg.Error) -> str:
    """``StoreUnavailable.condition`` of a driver error."""
    if isinstance(exc, pgerrors.ReadOnlySqlTransaction | pgerrors.InsufficientPrivilege):
        return "read_only"
    if isinstance(exc, _LOCKED):
        return "locked"
    if isinstance(exc, pgerrors.DiskFull):
        return "disk_full"
    if isinstance(exc, pgerrors.IoError):
        return "io_error"
    if isinstance(exc, pgerrors.DataCorrupted | pgerrors.IndexCorrupted):
        return "damaged"
    return "unavailable"


def store_error(exc: psycopg.Error) -> StoreError:
    """The contract's error for a driver error: an integrity constraint refused (unique,
    foreign key, check) -> ``Conflict``; a statement the server cannot run (a programming
    or data error) -> ``StoreError``; anything else (the server unreachable or shutting
    down, a lock not granted in time, a read-only session, disk full, I/O) ->
    ``StoreUnavailable`` with its ``condition``."""
    if isinstance(exc, pgerrors.IntegrityError):
        return Conflict(str(exc))
    condition = _condition(exc)
    if condition == "unavailable" and isinstance(
        exc, psycopg.ProgrammingError | psycopg.DataError | psycopg.InterfaceError
    ):
        return StoreError(str(exc))
    return StoreUnavailable(str(exc), condition)


class PostgresStore(SqlStore):
    """``Store`` on one PostgreSQL database (see the module).

    Writes: one synchronous connection owned by a ``WriterThread`` (a whole transaction is
    one call, ``_transact``); reads: one asynchronous connection in a read-only session.
    A connection found broken (the server restarted) is opened again for the next call;
    the call that met the break fails with ``StoreUnavailable``.
    """

    dialect = POSTGRESQL
    shared = True
    driver_error: ClassVar[type[Exception]] = psycopg.Error

    def __init__(self, url: str, *, read_only: bool = False) -> None:
        super().__init__(read_only=read_only)
        self.url = url
        self._label = describe(url)
        self._db: psycopg.Connection[Any] | None = None
        """The writer connection; only ever used on the writer thread."""
        self._reader: psycopg.AsyncConnection[Any] | None = None
        self._daemon_lock = False
        """Whether ``hold_daemon_lock`` was asked for: the writer's session holds its
        share of the daemon lock (taken again on a new session)."""
        self._turn = False
        """Whether the writer's session holds the decision turn (``take_turn``)."""

    @property
    def is_open(self) -> bool:
        return self._reader is not None and (self._db is not None or self._read_only)

    @property
    def name(self) -> str:
        return self._label

    def _conninfo(self) -> str:
        info = conninfo_to_dict(self.url)
        extra: dict[str, Any] = {"application_name": APPLICATION_NAME}
        if "connect_timeout" not in info:
            extra["connect_timeout"] = CONNECT_TIMEOUT_S
        for key, value in KEEPALIVES.items():  # a dead server found within ~30 s
            if key not in info:
                extra[key] = value
        return make_conninfo(self.url, **extra)

    def _open_error(self, exc: psycopg.Error) -> StoreUnavailable:
        """The error for a driver error while opening: what, which database, what to do."""
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return StoreUnavailable(
            f"cannot open PostgreSQL database {self._label}: {first}; {ADVICE}",
            _condition(exc),
        )

    # -- reads --------------------------------------------------------------------------

    async def _reader_connection(self) -> psycopg.AsyncConnection[Any]:
        reader = self._reader
        if reader is None:
            raise StoreUnavailable("store is not open")
        if reader.closed:  # broken: the server restarted; the next read connects again
            self._reader = reader = await self._connect_reader()
        return reader

    async def _connect_reader(self) -> psycopg.AsyncConnection[Any]:
        reader = await psycopg.AsyncConnection.connect(
            self._conninfo(), autocommit=True, cursor_factory=psycopg.AsyncRawCursor
        )
        try:
            await reader.execute("SET default_transaction_read_only = on")
        except BaseException:
            await reader.close()
            raise
        return reader

    async def _read(self, sql: str, params: Sequence[Any]) -> list[Any]:
        reader = await self._reader_connection()
        cursor = await reader.execute(_pg(sql), params)
        return list(await cursor.fetchall())

    async def ruleset_changes(self) -> AsyncGenerator[str, None]:
        if not self.is_open:
            raise StoreUnavailable("store is not open")
        try:
            listener = await psycopg.AsyncConnection.connect(self._conninfo(), autocommit=True)
        except psycopg.Error as exc:
            raise self._store_error(exc) from exc
        try:
            await listener.execute(f"LISTEN {RULESET_CHANNEL}")
            async for notification in listener.notifies():
                yield notification.payload
        except psycopg.Error as exc:
            raise self._store_error(exc) from exc
        finally:
            await listener.close()

    # -- writes -------------------------------------------------------------------------

    def _store_error(self, exc: Exception) -> StoreError:
        assert isinstance(exc, psycopg.Error)
        return store_error(exc)

    def _begin(self) -> Tx:
        """The writer connection (a transaction begins with its first statement), opened
        again when found broken (the server restarted)."""
        db = self._db
        if db is None:
            raise StoreUnavailable("store is not open")
        if db.closed:
            db = self._connect_writer()
            if self._daemon_lock:  # the share went with the old session: no write without it
                try:
                    self._share_daemon_lock(db)
                except BaseException:
                    db.close()  # the next call connects and tries again
                    raise
            self._db = db
        return _Transaction(db)

    def _commit(self) -> None:
        assert self._db is not None
        self._db.commit()

    def _rollback(self) -> None:
        db = self._db
        if db is not None and not db.closed:
            with contextlib.suppress(psycopg.Error):
                db.rollback()

    def _connect_writer(self) -> psycopg.Connection[Any]:
        """On the writer thread: a connection for writes (autocommit off, synchronous
        commits, writes waiting ``LOCK_TIMEOUT_MS`` at most for a lock)."""
        db = psycopg.connect(self._conninfo(), autocommit=False, cursor_factory=psycopg.RawCursor)
        try:
            db.execute("SET synchronous_commit = on")
            # the server ends this session (and the daemon lock it shares) within ~30 s of
            # losing this daemon, so a migration is not held off (ignored on a Unix socket)
            for setting in SERVER_KEEPALIVES:
                db.execute(setting)
            db.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")
            db.commit()
        except BaseException:
            db.close()
            raise
        return db

    # -- the decision turn --------------------------------------------------------------

    def _await_turn(self, db: Tx) -> None:
        db.execute(f"SELECT pg_advisory_xact_lock(({TURN_LOCK_KEY}))")

    async def take_turn(self) -> None:
        if self._writer is None:
            raise StoreUnavailable("store is not open (or open read-only)")
        if not self._turn:  # a session lock taken twice must be released twice
            await self._writer.run(self._take_turn)

    def _take_turn(self) -> None:
        """On the writer thread: ``pg_advisory_lock`` on the turn's key, outside any
        transaction (a session lock: it stays after the COMMIT of the statement's own
        transaction), waiting ``LOCK_TIMEOUT_MS`` at most."""
        db = self._begin()  # reconnects a broken session first
        try:
            db.execute(f"SELECT pg_advisory_lock(({TURN_LOCK_KEY}))")
            self._commit()
        except psycopg.Error as exc:
            self._rollback()
            raise store_error(exc) from exc
        self._turn = True

    async def end_turn(self) -> None:
        if self._writer is None or not self._turn:
            return
        await asyncio.shield(self._writer.run(self._end_turn))

    def _end_turn(self) -> None:
        self._turn = False
        db = self._db
        if db is None or db.closed:
            return  # the turn ended with its session
        try:
            db.execute(f"SELECT pg_advisory_unlock(({TURN_LOCK_KEY}))")
            db.commit()
        except psycopg.Error:
            self._rollback()  # a broken session: the turn ended with it
            log.warning("ending the decision turn failed; it ends with the session")

    # -- lifecycle ----------------------------------------------------------------------

    async def hold_daemon_lock(self) -> None:
        """Share the schema's daemon lock on the writer's session (see the module and the
        contract): daemons serve side by side; a migration or copy in progress, or a
        gatekeeper of before (one daemon per database, holding it alone), refuses it with
        ``DatabaseInUse`` naming the holder. When no other session shares it, no other
        daemon serves: the delivery claims left in the outbox are of daemons gone, and are
        released (their actions due at once rather than when their leases run out).
        Raises ``StoreUnavailable`` when not open or read-only."""
        if self._writer is None:
            raise StoreUnavailable("store is not open (or open read-only)")
        try:
            await self._writer.run(self._lock_writer)
        except psycopg.Error as exc:
            raise self._open_error(exc) from exc

    def _lock_writer(self) -> None:
        db = self._db
        if db is None:
            raise StoreUnavailable("store is not open")
        self._share_daemon_lock(db)
        self._daemon_lock = True
        [(others,)] = db.execute(_OTHER_HOLDERS, ()).fetchall()
        if not others:  # alone: whoever claimed what is claimed is gone
            release_claims(_Transaction(db))
        db.commit()

    def _share_daemon_lock(self, db: psycopg.Connection[Any]) -> None:
        """On the writer thread: ``pg_advisory_lock_shared`` on the schema's key, outside
        any transaction (a session lock: held until the session ends, however it ends),
        waiting ``LOCK_TIMEOUT_MS`` at most for a session holding it exclusive (another
        gatekeeper starting looks for migrations to apply under it, for a moment). Raises
        ``DatabaseInUse`` naming the session holding it exclusive past that."""
        try:
            db.execute(f"SELECT pg_advisory_lock_shared(({DAEMON_LOCK_KEY}))")
            db.commit()
            return
        except pgerrors.LockNotAvailable:
            db.rollback()
        raise self._in_use(
            db,
            "is being migrated or copied, or is served by a gatekeeper that decides alone on "
            "a database (an older version); wait for the migration or copy to end, or stop "
            "that daemon",
        )

    def _in_use(self, db: psycopg.Connection[Any], what: str) -> DatabaseInUse:
        """``DatabaseInUse``: the schema ``what`` (a clause), naming the session holding
        the daemon lock exclusive (or, failing that, any session holding it)."""
        holder = db.execute(_LOCK_HOLDER, ()).fetchone()
        db.rollback()
        who = (
            f"{holder[0] or 'a session'} from {holder[1] or 'a local socket'}, connected "
            f"since {holder[2]:%Y-%m-%dT%H:%M:%SZ}"
            if holder
            else "a session that has just ended"
        )
        return DatabaseInUse(
            f"PostgreSQL database {self._label} (schema in use: {who}) {what}", None
        )

    def _lock_alone(self, db: psycopg.Connection[Any]) -> None:
        """On the writer thread: ``pg_try_advisory_lock`` (exclusive) on the schema's key,
        outside any transaction, to migrate. Raises ``DatabaseInUse`` naming a session
        that holds it (a serving daemon, a copy)."""
        row = db.execute(f"SELECT pg_try_advisory_lock(({DAEMON_LOCK_KEY}))").fetchone()
        if row and row[0]:
            db.commit()
            return
        raise self._in_use(
            db,
            "is served by gatekeeper daemons (or being copied), and its schema must be "
            "migrated: stop every daemon serving it, then start this gatekeeper (the schema "
            "never changes under a serving daemon)",
        )

    async def open(self) -> None:
        """Connect and bring the schema up to date (``migrate``); read-only: connect a
        read-only session to a database that has this gatekeeper's schema version, and
        migrate nothing. Raises ``StoreUnavailable`` naming the host and database (the
        server cannot be reached, the login is refused, the database does not exist, an
        older schema read-only), ``NotAGatekeeperDatabase`` (another application's tables),
        ``SchemaTooNew``."""
        if self._read_only:
            await self._open_read_only()
            return
        writer = WriterThread(f"gatekeeper-writer {self._label}")
        self._writer = writer
        try:
            await writer.run(self._open_writer)
            self._reader = await self._connect_reader()
        except BaseException as exc:  # no half-open store
            await self.close()
            if isinstance(exc, psycopg.Error):
                raise self._open_error(exc) from exc
            raise

    def _open_writer(self) -> None:
        """On the writer thread: connect and migrate."""
        self._db = self._connect_writer()
        self._migrate(self._db)

    async def _open_read_only(self) -> None:
        try:
            reader = await self._connect_reader()
        except psycopg.Error as exc:
            raise self._open_error(exc) from exc
        try:
            cursor = await reader.execute(_SCHEMA_TABLES)
            tables = {row[0] for row in await cursor.fetchall()}
            version = 0
            if "schema_version" in tables:
                cursor = await reader.execute("SELECT MAX(version) FROM schema_version")
                version = int((await cursor.fetchone() or (0,))[0] or 0)
            self._refuse(version, tables)
            if version == 0:
                raise StoreUnavailable(
                    f"PostgreSQL database {self._label} holds no gatekeeper schema (nothing "
                    "is created read-only); point at the database a daemon serves"
                )
            if version < SCHEMA_VERSION:
                raise older_schema(self.name, version, SCHEMA_VERSION)
        except BaseException as exc:
            await reader.close()
            if isinstance(exc, psycopg.Error):
                raise self._open_error(exc) from exc
            raise
        self._reader = reader

    def _refuse(self, version: int, tables: set[str]) -> None:
        """Raise ``SchemaTooNew`` for a newer gatekeeper's schema, ``NotAGatekeeperDatabase``
        for another application's tables (tables without a recorded schema version, or
        without gatekeeper's). An empty schema is fine: gatekeeper's to create."""
        if version > SCHEMA_VERSION:
            raise newer_schema(self.name, version, SCHEMA_VERSION, "upgrade gatekeeper")
        if not tables or (version >= MIGRATIONS[0].version and GATEKEEPER_TABLE in tables):
            return
        shown = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
        raise NotAGatekeeperDatabase(
            f"PostgreSQL database {self._label} holds tables that are not gatekeeper's "
            f"({shown}); point database: at an empty database or at gatekeeper's own "
            "(gatekeeper creates its tables only in an empty schema)"
        )

    def _migrate(self, db: psycopg.Connection[Any]) -> None:
        """On the writer thread: apply the migrations the database has not had, each in
        its own transaction together with its row in ``schema_version``, each holding the
        advisory lock ``MIGRATION_LOCK`` (a daemon starting meanwhile waits, then finds the
        schema up to date).

        The schema never changes under a daemon serving it: with migrations to apply, the
        daemon lock is taken exclusive first (waiting ``LOCK_TIMEOUT_MS`` at most, enough
        for another gatekeeper migrating), and released once they are applied. Daemons
        sharing it (serving): ``DatabaseInUse``, nothing changed."""
        version, tables = self._schema_version(db)
        db.commit()
        self._refuse(version, tables)
        if not [m for m in MIGRATIONS if m.version > version]:
            return
        try:
            db.execute(f"SELECT pg_advisory_lock(({DAEMON_LOCK_KEY}))")
            db.commit()
        except pgerrors.LockNotAvailable:
            db.rollback()
            self._lock_alone(db)  # held if freed meanwhile, else DatabaseInUse naming who
        try:
            while True:
                db.execute("SELECT pg_advisory_xact_lock($1)", (MIGRATION_LOCK,))
                version, tables = self._schema_version(db)
                self._refuse(version, tables)
                pending = [m for m in MIGRATIONS if m.version > version]
                if not pending:
                    db.commit()
                    return
                migration = pending[0]
                if "schema_version" not in tables:
                    db.execute(
                        "CREATE TABLE schema_version"
                        " (version INTEGER PRIMARY KEY, name TEXT NOT NULL)"
                    )
                for statement in migration.statements:
                    db.execute(statement)
                db.execute(
                    "INSERT INTO schema_version (version, name) VALUES ($1, $2)",
                    (migration.version, migration.name),
                )
                db.commit()
        finally:
            if db.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                db.rollback()
            if not db.closed:
                db.execute(f"SELECT pg_advisory_unlock(({DAEMON_LOCK_KEY}))")
                db.commit()

    @staticmethod
    def _schema_version(db: psycopg.Connection[Any]) -> tuple[int, set[str]]:
        """The schema version recorded in the current schema (0: none) and its tables."""
        tables = {row[0] for row in db.execute(_SCHEMA_TABLES)}
        version = 0
        if "schema_version" in tables:
            row = db.execute("SELECT MAX(version) FROM schema_version").fetchone()
            version = int(row[0] or 0) if row else 0
        return version, tables

    async def close(self) -> None:
        """Close both connections (after the writes already queued, if any)."""
        reader, self._reader = self._reader, None
        if reader is not None:
            await reader.close()
        writer, self._writer = self._writer, None
        if writer is not None:
            await writer.run(self._close_writer)
            await writer.stop()

    def _close_writer(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()


_LOCK_HOLDER = (
    "SELECT a.application_name, host(a.client_addr), a.backend_start AT TIME ZONE 'UTC'"
    " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
    " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
    " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    f" AND ((l.classid::bigint << 32) | l.objid::bigint) = ({DAEMON_LOCK_KEY})"
    " AND l.pid <> pg_backend_pid()"
    " ORDER BY l.mode = 'ExclusiveLock' DESC LIMIT 1"
)
"""Who holds the daemon lock (the exclusive holder first): its ``application_name``,
address and start (UTC)."""

_OTHER_HOLDERS = (
    "SELECT COUNT(*) FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted"
    " AND l.objsubid = 1"
    " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    f" AND ((l.classid::bigint << 32) | l.objid::bigint) = ({DAEMON_LOCK_KEY})"
    " AND l.pid <> pg_backend_pid()"
)
"""How many other sessions hold the daemon lock (other daemons serving the schema)."""

_SCHEMA_TABLES = "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
"""The tables of the session's current schema."""
