"""The SQLite backend of the Store contract (``gatekeeper.store.contract``).

Every write goes through one connection on one thread (a single writer), and everything a
fact causes is committed in one transaction (``commit_transition``): the fact, the decisions
it causes, the rule states and the actions they queue (a transactional outbox). A whole
transaction, ``BEGIN IMMEDIATE`` to ``COMMIT``, is one call on the writer's thread.

SQLite runs in WAL mode with ``synchronous=FULL``: a committed transaction is on disk
(fsynced) before ``commit_transition`` returns, so an acknowledged fact survives a crash.
The schema is versioned with ``PRAGMA user_version`` and upgraded by the migration files of
``gatekeeper/store/migrations/sqlite`` in order.

The SQL, the row mapping and the write bodies are shared with the PostgreSQL backend
(``gatekeeper.store.sqlstore``); what is SQLite's is here: the file checks, the pragmas,
the lock file, the migrations by ``user_version``. Driver errors leave as the
``StoreError`` family (``_store_error``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import aiosqlite

from gatekeeper.store.errors import (
    ADVICE,
    Conflict,
    NotAGatekeeperDatabase,
    StoreError,
    StoreUnavailable,
)
from gatekeeper.store.lockfile import DatabaseLock
from gatekeeper.store.migrations import Migration, load_migrations
from gatekeeper.store.sqlstore import (
    SQLITE,
    SqlStore,
    Tx,
    content_hash,
    newer_schema,
    older_schema,
    release_claims,
)
from gatekeeper.store.writer_thread import WriterThread

MIGRATIONS: tuple[Migration, ...] = load_migrations("sqlite")
"""The schema's migrations, in version order (``PRAGMA user_version`` = the last applied)."""


def add_functions(db: sqlite3.Connection) -> None:
    """Register the SQL functions the migrations use on ``db``: ``gk_sha256(text)``
    (``content_hash``)."""
    db.create_function("gk_sha256", 1, content_hash, deterministic=True)


_CONDITIONS = {
    sqlite3.SQLITE_BUSY: "locked",
    sqlite3.SQLITE_LOCKED: "locked",
    sqlite3.SQLITE_FULL: "disk_full",
    sqlite3.SQLITE_IOERR: "io_error",
    sqlite3.SQLITE_READONLY: "read_only",
    sqlite3.SQLITE_CORRUPT: "damaged",
    sqlite3.SQLITE_NOTADB: "damaged",
}
"""``StoreUnavailable.condition`` by SQLite primary result code."""


def _condition(exc: sqlite3.Error) -> str:
    code = getattr(exc, "sqlite_errorcode", None)
    return "unavailable" if code is None else _CONDITIONS.get(code & 0xFF, "unavailable")


def _store_error(exc: sqlite3.Error) -> StoreError:
    """The contract's error for a driver error: a unique/foreign key refused ->
    ``Conflict``; a misuse of the driver -> ``StoreError``; anything else (locked, disk
    full, I/O error, a file that is not a database) -> ``StoreUnavailable`` with its
    ``condition``."""
    if isinstance(exc, sqlite3.IntegrityError):
        return Conflict(str(exc))
    if isinstance(exc, sqlite3.ProgrammingError | sqlite3.InterfaceError):
        return StoreError(str(exc))
    return StoreUnavailable(str(exc), _condition(exc))


def _open_error(path: Path, exc: sqlite3.Error) -> StoreUnavailable:
    """The error for a driver error while opening ``path``: what, which file, what to do."""
    condition = _condition(exc)
    if isinstance(exc, sqlite3.OperationalError) and "unable to open" in str(exc):
        condition = "unavailable"
    return StoreUnavailable(f"cannot open database {path}: {exc}; {ADVICE[condition]}", condition)


SQLITE_HEADER = b"SQLite format 3\x00"
"""The first 16 bytes of every SQLite database file."""

GATEKEEPER_TABLE = "fact_log"
"""A table every gatekeeper schema has had since its first migration: a SQLite file with
a schema version but without it belongs to another application."""

STARTUP_BUSY_TIMEOUT_MS = 500
"""How long opening waits for another process's write lock before refusing to start."""

BUSY_TIMEOUT_MS = 5000
"""How long a write waits for another connection's lock at run time before it fails
with ``StoreUnavailable`` (condition ``locked``)."""


class SqliteStore(SqlStore):
    """``Store`` on one SQLite file (WAL, ``synchronous=FULL``).

    Writes go through one stdlib ``sqlite3`` connection owned by a ``WriterThread``: each
    write is ONE call on that thread running ``BEGIN IMMEDIATE``, every statement and
    ``COMMIT`` (``_transact``), so a group commit costs one round trip between the event loop
    and the thread. Reads go through a second, read-only connection (aiosqlite), which sees
    only committed data. ``path`` may be ``:memory:``: then both connections share one
    in-memory database (a named shared cache), gone at ``close``; meant for tests and dry
    runs: shared-cache locks are not waited for, so a read that meets a write in progress
    raises ``StoreUnavailable`` (table locked) instead of waiting.
    """

    dialect = SQLITE
    driver_error: ClassVar[type[Exception]] = sqlite3.Error

    def __init__(self, path: Path | str, *, read_only: bool = False) -> None:
        super().__init__(read_only=read_only)
        self.path = Path(path)
        self._memory = str(path) == ":memory:"
        self._uri = f"file:gatekeeper-{id(self)}?mode=memory&cache=shared"
        self._db: sqlite3.Connection | None = None
        """The writer connection; only ever used on the writer thread."""
        self._reader: aiosqlite.Connection | None = None
        self._lock: DatabaseLock | None = None

    @property
    def is_open(self) -> bool:
        return self._reader is not None and (self._db is not None or self._read_only)

    @property
    def name(self) -> str:
        return str(self.path)

    @property
    def reader(self) -> aiosqlite.Connection:
        """The reader connection: each query sees only committed data (a WAL snapshot), so
        nothing reads rows of a transaction that may still roll back. Raises
        ``StoreUnavailable`` when the store is not open."""
        if self._reader is None:
            raise StoreUnavailable("store is not open")
        return self._reader

    async def _read(self, sql: str, params: Sequence[Any]) -> list[Any]:
        async with self.reader.execute(sql, params) as cursor:
            return list(await cursor.fetchall())

    def _store_error(self, exc: Exception) -> StoreError:
        assert isinstance(exc, sqlite3.Error)
        return _store_error(exc)

    def _begin(self) -> Tx:
        """``BEGIN IMMEDIATE``: the write lock is taken at once."""
        db = self._db
        if db is None:
            raise StoreUnavailable("store is not open")
        db.execute("BEGIN IMMEDIATE")
        return db

    def _commit(self) -> None:
        assert self._db is not None
        self._db.execute("COMMIT")

    def _rollback(self) -> None:
        db = self._db
        if db is not None and db.in_transaction:
            with contextlib.suppress(Exception):
                db.execute("ROLLBACK")

    async def open(self) -> None:
        """Open the database and bring its schema up to date.

        A file database is first locked (``DatabaseLock``: one daemon per file; another
        holder raises ``DatabaseInUse``). A new database is created only where no file
        exists, and whole: built under ``<name>.new`` and renamed into place once its
        schema is written, so a file at the path is a gatekeeper database or is refused
        (``NotAGatekeeperDatabase``: empty, not SQLite, another application's). Errors name
        the file and what to do; the write lock of another process is waited for
        ``STARTUP_BUSY_TIMEOUT_MS`` at most. Read-only: see ``_open_read_only``."""
        if self._read_only:
            await self._open_read_only()
            return
        if not self._memory:
            self._refuse_dangling_link()
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                why = (
                    "a file is in the way"
                    if isinstance(exc, FileExistsError | NotADirectoryError)
                    else exc.strerror
                )
                raise StoreUnavailable(
                    f"cannot create the folder {self.path.parent} of database {self.path}: "
                    f"{why}; create it or point database: elsewhere"
                ) from exc
            # one lock per file, whatever name it was reached by (a link to it, or to a
            # folder on its path): the lock file sits beside the real file
            self._lock = DatabaseLock(Path(os.path.realpath(self.path)))
        self._writer = WriterThread(f"gatekeeper-writer {self.path.name}")
        try:
            await self._writer.run(self._connect_writer)
        except BaseException as exc:
            await self._writer.stop()
            self._writer = None
            self._release_lock()
            if isinstance(exc, sqlite3.Error):
                raise _open_error(self.path, exc) from exc
            raise
        try:
            if self._memory:
                self._reader = await aiosqlite.connect(self._uri, uri=True, isolation_level=None)
            else:
                self._reader = await aiosqlite.connect(self.path, isolation_level=None)
            await self.reader.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            await self.reader.execute("PRAGMA query_only=ON")
        except BaseException as exc:  # no half-open store: the writer thread is stopped too
            await self.close()
            if isinstance(exc, sqlite3.Error):
                raise _open_error(self.path, exc) from exc
            raise

    async def _open_read_only(self) -> None:
        """Open only the reader, on a database that must exist with this gatekeeper's
        schema version (SQLite ``mode=ro``): nothing is created, migrated or locked, so a
        daemon may be running on the file. Raises ``NotAGatekeeperDatabase``,
        ``SchemaTooNew``, or ``StoreUnavailable`` (no such file, an older schema)."""
        path = self.path
        if self._memory:
            raise StoreUnavailable("a private in-memory database cannot be opened read-only")
        if not path.exists():
            raise StoreUnavailable(f"database {path} does not exist (nothing is created)")
        self._check_header()
        uri = f"{path.resolve().as_uri()}?mode=ro"
        try:
            reader = await aiosqlite.connect(uri, uri=True, isolation_level=None)
        except sqlite3.Error as exc:
            raise _open_error(path, exc) from exc
        try:
            await reader.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            await reader.execute("PRAGMA query_only=ON")
            values = []
            for pragma in ("user_version", "application_id"):
                async with reader.execute(f"PRAGMA {pragma}") as cursor:
                    row = await cursor.fetchone()
                    values.append(int(row[0]) if row else 0)
            async with reader.execute("SELECT name FROM sqlite_master") as cursor:
                tables = {row[0] for row in await cursor.fetchall()}
            version, application = values
            if version > len(MIGRATIONS):
                raise newer_schema(
                    str(path), version, len(MIGRATIONS), "use the gatekeeper that wrote it"
                )
            self._refuse_foreign(version, application, tables)
            if version < len(MIGRATIONS):
                raise older_schema(str(path), version, len(MIGRATIONS))
        except BaseException as exc:
            await reader.close()
            if isinstance(exc, sqlite3.Error):
                raise _open_error(path, exc) from exc
            raise
        self._reader = reader

    def _refuse_dangling_link(self) -> None:
        """Refuse a database path that is a symbolic link to nothing (a volume not mounted,
        a restore not done): a new, empty database there would fire every ``once`` rule
        again and reset the escrows. Raises ``NotAGatekeeperDatabase``."""
        if os.path.islink(self.path) and not os.path.exists(self.path):
            raise NotAGatekeeperDatabase(
                f"database {self.path} is a symbolic link to {os.readlink(self.path)}, which "
                "does not exist (a volume not mounted, a restore not done?); make the "
                "database reachable there, or point database: at the file itself"
            )

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _connect_writer(self) -> None:
        """On the writer thread: check the file (creating a new database where none is),
        connect, set the pragmas, make sure no other process holds the write lock,
        migrate."""
        if not self._memory:
            self._check_file()
        # a group's INSERTs, one per table, have as many rows as the group: keep the
        # sizes in use prepared
        if self._memory:
            db = sqlite3.connect(self._uri, uri=True, isolation_level=None, cached_statements=512)
        else:
            db = sqlite3.connect(self.path, isolation_level=None, cached_statements=512)
        try:
            db.execute(f"PRAGMA busy_timeout={STARTUP_BUSY_TIMEOUT_MS}")
            if not self._memory:
                self._check_schema(db)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("BEGIN IMMEDIATE")  # another process's write lock: refuse now
            db.execute("ROLLBACK")
            self._db = db
            self._migrate()
            self._transact(release_claims)
            db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        except BaseException:
            self._db = None
            db.close()
            raise

    def _check_file(self) -> None:
        """On the writer thread: refuse what is at ``path`` unless it is a SQLite file;
        create a new database where nothing is."""
        path = self.path
        try:
            with path.open("rb") as file:
                header = file.read(len(SQLITE_HEADER))
        except FileNotFoundError:
            wal = path.with_name(path.name + "-wal")
            if wal.exists():
                raise NotAGatekeeperDatabase(
                    f"database {path} does not exist but its write-ahead log {wal} does "
                    "(a partial copy or restore?); restore the database file beside it, or "
                    "remove the log to start a new, empty database"
                ) from None
            self._create_file()
            return
        except IsADirectoryError:
            raise NotAGatekeeperDatabase(
                f"database {path} is a folder, not a database file; point database: at a file"
            ) from None
        except OSError as exc:
            raise StoreUnavailable(
                f"cannot read database {path}: {exc.strerror}; give gatekeeper's user read "
                "and write access to it",
                "read_only" if exc.errno in (errno.EACCES, errno.EROFS) else "unavailable",
            ) from exc
        self._refuse_header(header)

    def _check_header(self) -> None:
        """Refuse what is at ``path`` unless it is a SQLite file (it must exist)."""
        path = self.path
        try:
            with path.open("rb") as file:
                header = file.read(len(SQLITE_HEADER))
        except IsADirectoryError:
            raise NotAGatekeeperDatabase(
                f"database {path} is a folder, not a database file; point at a file"
            ) from None
        except OSError as exc:
            raise StoreUnavailable(f"cannot read database {path}: {exc.strerror}") from exc
        self._refuse_header(header)

    def _refuse_header(self, header: bytes) -> None:
        """Refuse an empty file or one that is not SQLite, by its first bytes."""
        path = self.path
        if not header:
            raise NotAGatekeeperDatabase(
                f"database {path} is an empty file (0 bytes), not a gatekeeper database "
                "(a failed copy or restore?); restore it from a backup, or delete it to "
                "start a new, empty database (gatekeeper creates one only where no file is)"
            )
        if header != SQLITE_HEADER:
            raise NotAGatekeeperDatabase(
                f"database {path} is not a SQLite database (it does not start with the "
                "SQLite header); point database: at gatekeeper's database file, or restore "
                "it from a backup"
            )

    def _check_schema(self, db: sqlite3.Connection) -> None:
        """Refuse a SQLite database that is not gatekeeper's (before writing anything to
        it). A newer gatekeeper's (a schema version above ours) is left to ``_migrate``."""
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        application = int(db.execute("PRAGMA application_id").fetchone()[0])
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        if version > len(MIGRATIONS):
            return
        self._refuse_foreign(version, application, tables)

    def _refuse_foreign(self, version: int, application: int, tables: set[str]) -> None:
        """Raise ``NotAGatekeeperDatabase`` unless a SQLite database of schema ``version``,
        ``application`` id and ``tables`` is gatekeeper's."""
        if application == 0 and version > 0 and GATEKEEPER_TABLE in tables:
            return
        shown = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
        what = f"tables: {shown}" if tables else "no tables"
        raise NotAGatekeeperDatabase(
            f"database {self.path} is a SQLite database but not gatekeeper's "
            f"(schema version {version}, {what}); point database: at gatekeeper's database "
            "file (gatekeeper creates a new one only where no file is)"
        )

    def _create_file(self) -> None:
        """On the writer thread: create a new database at ``path`` (where no file is),
        whole: schema written under ``<name>.new``, fsynced, then renamed into place."""
        path = self.path
        scratch = path.with_name(path.name + ".new")
        for stale in (scratch, *(scratch.with_name(scratch.name + s) for s in ("-wal", "-shm"))):
            stale.unlink(missing_ok=True)  # left by a start that died (we hold the lock)
        db = sqlite3.connect(scratch, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            self._db = db
            self._migrate()
        finally:
            self._db = None
            db.close()  # the last connection: the log is checkpointed and removed
        fd = os.open(scratch, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(scratch, path)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)

    async def hold_daemon_lock(self) -> None:
        """Nothing more: ``open`` locked the file (``DatabaseLock``), or the database is
        in memory or read-only (no daemon decides on it)."""

    async def close(self) -> None:
        """Close both connections (after the writes already queued, if any), then release
        the database's lock."""
        if self._reader is not None:
            await self._reader.close()
            self._reader = None
        writer = self._writer
        if writer is not None:
            self._writer = None
            await writer.run(self._close_writer)
            await writer.stop()
        self._release_lock()

    def _close_writer(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _migrate(self) -> None:
        """On the writer thread: run the migrations the database has not had yet, each in
        its own transaction together with its new ``user_version``."""
        assert self._db is not None
        add_functions(self._db)
        row = self._db.execute("PRAGMA user_version").fetchone()
        current = int(row[0]) if row else 0
        if current > len(MIGRATIONS):
            raise newer_schema(self.name, current, len(MIGRATIONS), "upgrade gatekeeper")
        for migration in MIGRATIONS[current:]:

            def migrate(db: Tx, m: Migration = migration) -> None:
                for statement in m.statements:
                    db.execute(statement)
                db.execute(f"PRAGMA user_version={m.version}")

            self._transact(migrate)
