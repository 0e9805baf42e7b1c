"""A deployment's whole database copied to another, on either backend (``gatekeeper
copy-db``): every table of the schema, row for row, ids and sequence numbers kept, in one
transaction on the destination, verified before it commits.

The tables and their columns are read from the databases themselves (SQLite's
``sqlite_master`` and ``PRAGMA table_info``, PostgreSQL's ``pg_tables`` and
``information_schema.columns`` of the current schema): both backends have the same tables
and columns at the same schema version, so whatever a migration adds is copied without a
list here to keep up. Left out: the schema's own bookkeeping (PostgreSQL's
``schema_version``, SQLite's ``sqlite_*`` tables and ``user_version``), which each side
keeps for itself. One column has a different home: PostgreSQL's ``outbox.queued`` (the
order the outbox was written in) is SQLite's ``rowid`` (``ROWID_COLUMNS``); it is copied
too. Rows are portable as they are (times are fixed-width RFC 3339 text, JSON canonical
text on both); flags are SQLite integers 0/1 and PostgreSQL booleans.

Preconditions, checked before anything is written (``CopyRefused`` otherwise):

- no daemon serves the source or the destination, and none can start on either during
  the copy: this process holds their daemon locks (SQLite: the lock file,
  ``gatekeeper.store.lockfile``; PostgreSQL: the schema's session advisory lock,
  ``gatekeeper.store.postgresql.DAEMON_LOCK_KEY``, exclusive: serving daemons share it);
- the source is read without a write: a SQLite file through a read-only connection in one
  read transaction; PostgreSQL in one ``REPEATABLE READ READ ONLY`` transaction (one
  consistent snapshot);
- the source has this gatekeeper's schema version (older: open it once with this
  gatekeeper to migrate it; newer: ``SchemaTooNew``);
- the destination is created or migrated by opening it as the daemon does, and must then
  hold no row at all; it is locked for the copy (SQLite: its lock file and a write
  transaction; PostgreSQL: every table ``LOCK``-ed in ``EXCLUSIVE`` mode).

Then, in one transaction on the destination: the tables in the order of their foreign
keys, in batches (PostgreSQL: ``COPY ... FROM STDIN``; SQLite: ``executemany``), the
PostgreSQL identity sequences set past the largest ids copied (``setval``), and each
table verified: its row count and a digest of its rows (``TableDigest``: the sum of a
hash of each row, so the two sides need not read in the same order) must be equal on
both sides, or everything is rolled back (``CopyMismatch``).
"""

from __future__ import annotations

import asyncio
import contextlib
import graphlib
import hashlib
import os
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gatekeeper.store.errors import SchemaTooNew, StoreError

BATCH_ROWS = 2000
"""Rows read and written per batch."""

ROWID_COLUMNS = {"outbox": "queued"}
"""Columns PostgreSQL keeps that SQLite keeps as the table's ``rowid``, by table."""

_DIGEST_MODULUS = 1 << 128


class CopyRefused(StoreError):
    """The copy was not started: a source or destination that cannot be used as it is
    (the message names which and why; never a password). Nothing was written."""


class CopyFailed(StoreError):
    """The copy failed part way (a driver error while reading or writing); the
    destination's transaction was rolled back: it holds nothing of it."""


class CopyMismatch(CopyFailed):
    """The copied rows did not verify (``mismatches``: one line per table); everything
    was rolled back."""

    def __init__(self, message: str, mismatches: Sequence[str]) -> None:
        super().__init__(message)
        self.mismatches = tuple(mismatches)


@dataclass
class TableDigest:
    """What one side holds of a table: ``rows`` and ``digest``, the sum (mod 2**128) of a
    BLAKE2b hash of each row's values, normalized so both backends hash alike (a flag as
    0/1, a float by its ``repr``), the columns in name order."""

    rows: int = 0
    digest: int = 0

    def add(self, row: Sequence[Any]) -> None:
        """Count ``row`` (values in column-name order) in."""
        text = "\x1f".join(_normal(value) for value in row)
        hashed = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16)
        self.rows += 1
        self.digest = (self.digest + int.from_bytes(hashed.digest())) % _DIGEST_MODULUS


def _normal(value: Any) -> str:
    if value is None:
        return "\x00"
    if isinstance(value, bool):
        return f"i{int(value)}"
    if isinstance(value, int):
        return f"i{value}"
    if isinstance(value, float):
        return f"f{value!r}"
    if isinstance(value, bytes):
        return "b" + value.hex()
    return f"s{value}"


@dataclass(frozen=True)
class TableCopied:
    """One table copied: its name, the rows copied, and the digest both sides agreed on
    (hex)."""

    table: str
    rows: int
    digest: str


@dataclass
class CopyReport:
    """A verified copy: ``source`` and ``destination`` as fit for messages, the schema
    ``version``, each table (in the order copied), and the seconds the copy took (reading,
    writing and verifying, migrations of a new destination left out)."""

    source: str
    destination: str
    version: int
    tables: list[TableCopied] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rows(self) -> int:
        """The rows copied, all tables."""
        return sum(table.rows for table in self.tables)

    @property
    def rows_per_second(self) -> float:
        """Rows copied per second of ``seconds``."""
        return self.rows / self.seconds if self.seconds > 0 else 0.0


class Side(ABC):
    """One database of a copy, connected: its tables and columns, its rows in batches,
    and (as a destination) one write transaction."""

    name: str
    """The database as fit for a message (never a password)."""

    @abstractmethod
    def version(self) -> int:
        """The schema version it has (0: none)."""

    @abstractmethod
    def tables(self) -> list[str]:
        """Its tables, bookkeeping left out, sorted by name."""

    @abstractmethod
    def columns(self, table: str) -> list[str]:
        """The columns of ``table`` (with ``ROWID_COLUMNS``' stand-in), sorted by name."""

    @abstractmethod
    def references(self) -> dict[str, set[str]]:
        """Each table's tables its foreign keys refer to."""

    @abstractmethod
    def read(self, table: str, columns: Sequence[str]) -> Iterator[list[tuple[Any, ...]]]:
        """The rows of ``table`` (values in the order of ``columns``), in batches."""

    @abstractmethod
    def begin_writing(self, tables: Sequence[str]) -> None:
        """Begin the write transaction, locking ``tables`` against any other writer."""

    @abstractmethod
    def write(self, table: str, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]) -> None:
        """Insert ``rows`` into ``table``, every column given (ids included)."""

    @abstractmethod
    def after_writing(self) -> None:
        """Bring what generates ids past the ids written (in the write transaction)."""

    @abstractmethod
    def commit(self) -> None:
        """Commit the write transaction."""

    @abstractmethod
    def close(self) -> None:
        """Close the connection (rolling back what was not committed) and release locks."""

    def digest(self, table: str, columns: Sequence[str]) -> TableDigest:
        """The ``TableDigest`` of ``table`` as this connection sees it."""
        digest = TableDigest()
        for batch in self.read(table, columns):
            for row in batch:
                digest.add(row)
        return digest

    @abstractmethod
    def has_rows(self, table: str) -> bool:
        """Whether ``table`` holds a row."""


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class SqliteSide(Side):
    """A SQLite file, locked with its lock file while connected: read-only as a source,
    one ``BEGIN IMMEDIATE`` transaction as a destination."""

    def __init__(self, path: Path, *, read_only: bool) -> None:
        """Lock ``path`` and connect. Raises ``CopyRefused`` (no such file, a daemon
        serving it, cannot be opened)."""
        from gatekeeper.store.errors import DatabaseInUse
        from gatekeeper.store.lockfile import DatabaseLock

        self.name = str(path)
        if not path.is_file():
            raise CopyRefused(f"database {path} does not exist")
        try:
            self._lock = DatabaseLock(Path(os.path.realpath(path)))
        except DatabaseInUse as exc:
            who = f"pid {exc.holder_pid}" if exc.holder_pid is not None else "pid unknown"
            raise CopyRefused(
                f"database {path} is in use by another gatekeeper daemon ({who}, lock file "
                f"{path}.lock): stop it before copying (a copy is taken of a database no "
                "daemon changes)"
            ) from exc
        except StoreError as exc:
            raise CopyRefused(str(exc)) from exc
        try:
            uri = path.resolve().as_uri() + ("?mode=ro" if read_only else "")
            self._db = sqlite3.connect(uri, uri=True, isolation_level=None)
            self._db.execute("PRAGMA busy_timeout=5000")
            if read_only:
                self._db.execute("PRAGMA query_only=ON")
                self._db.execute("BEGIN")  # one snapshot for every read
        except sqlite3.Error as exc:
            self._lock.release()
            raise CopyRefused(f"cannot open database {path}: {exc}") from exc

    def version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def tables(self) -> list[str]:
        rows = self._db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%'"
            " ESCAPE '\\' ORDER BY name"
        )
        return [name for (name,) in rows]

    def columns(self, table: str) -> list[str]:
        names = [row[1] for row in self._db.execute(f"PRAGMA table_info({_quoted(table)})")]
        if table in ROWID_COLUMNS:
            names.append(ROWID_COLUMNS[table])
        return sorted(names)

    def references(self) -> dict[str, set[str]]:
        return {
            table: {
                row[2] for row in self._db.execute(f"PRAGMA foreign_key_list({_quoted(table)})")
            }
            for table in self.tables()
        }

    def has_rows(self, table: str) -> bool:
        return bool(
            self._db.execute(f"SELECT EXISTS (SELECT 1 FROM {_quoted(table)})").fetchone()[0]
        )

    def _names(self, table: str, columns: Sequence[str]) -> str:
        stand_in = ROWID_COLUMNS.get(table)
        return ", ".join("rowid" if c == stand_in else _quoted(c) for c in columns)

    def read(self, table: str, columns: Sequence[str]) -> Iterator[list[tuple[Any, ...]]]:
        cursor = self._db.execute(f"SELECT {self._names(table, columns)} FROM {_quoted(table)}")
        while batch := cursor.fetchmany(BATCH_ROWS):
            yield batch

    def begin_writing(self, tables: Sequence[str]) -> None:
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("BEGIN IMMEDIATE")

    def write(self, table: str, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]) -> None:
        marks = ", ".join("?" * len(columns))
        self._db.executemany(
            f"INSERT INTO {_quoted(table)} ({self._names(table, columns)}) VALUES ({marks})",
            rows,
        )

    def after_writing(self) -> None:
        """Nothing: an ``AUTOINCREMENT`` table's ``sqlite_sequence`` follows the ids
        written."""

    def commit(self) -> None:
        self._db.execute("COMMIT")

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            self._db.close()
        self._lock.release()


class PostgresSide(Side):
    """A PostgreSQL database (the current schema of its URL's sessions): a source reads
    in one ``REPEATABLE READ READ ONLY`` transaction, a destination writes in one
    transaction with its tables locked."""

    def __init__(self, url: str, *, read_only: bool) -> None:
        """Connect. Raises ``CopyRefused`` naming the host and database."""
        import psycopg

        from gatekeeper.store.postgresql import describe

        self.name = f"{describe(url)} (PostgreSQL)"
        try:
            self._db = psycopg.connect(url, autocommit=False, connect_timeout=10)
        except psycopg.Error as exc:
            raise CopyRefused(
                f"cannot connect to database {self.name}: {_first_line(exc)}"
            ) from exc
        if read_only:
            self._db.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            self._db.read_only = True
        try:
            self._lock()
        except BaseException:
            self._db.close()
            raise
        self._read_only = read_only
        self._reads = 0

    def _lock(self) -> None:
        """Take the schema's daemon lock exclusive (``gatekeeper.store.postgresql``) for this
        session, in a transaction of its own, so a source's snapshot is taken after it,
        once no daemon serves it. Raises ``CopyRefused`` when a daemon (or another copy)
        holds it."""
        from gatekeeper.store.postgresql import DAEMON_LOCK_KEY

        [(locked,)] = self._rows(f"SELECT pg_try_advisory_lock(({DAEMON_LOCK_KEY}))")
        # end the transaction the lock was taken in (a session lock stays): a source's
        # snapshot is taken by its next statement, once the lock is held
        self._db.commit()
        if not locked:
            raise CopyRefused(
                f"database {self.name} is served by a gatekeeper daemon (or being copied): "
                "stop it before copying (a copy is taken of a database no daemon changes)"
            )

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._db.execute(sql, params).fetchall()

    def version(self) -> int:
        names = {t for (t,) in self._rows(_TABLES)}
        if "schema_version" not in names:
            return 0
        [(version,)] = self._rows("SELECT MAX(version) FROM schema_version")
        return int(version or 0)

    def tables(self) -> list[str]:
        return sorted(t for (t,) in self._rows(_TABLES) if t != "schema_version")

    def columns(self, table: str) -> list[str]:
        return sorted(
            c
            for (c,) in self._rows(
                "SELECT column_name FROM information_schema.columns"
                " WHERE table_schema = current_schema() AND table_name = %s",
                (table,),
            )
        )

    def references(self) -> dict[str, set[str]]:
        found: dict[str, set[str]] = {table: set() for table in self.tables()}
        for table, referred in self._rows(
            "SELECT child.relname, parent.relname FROM pg_constraint c"
            " JOIN pg_class child ON child.oid = c.conrelid"
            " JOIN pg_class parent ON parent.oid = c.confrelid"
            " WHERE c.contype = 'f' AND child.relnamespace = current_schema()::regnamespace"
        ):
            found.setdefault(table, set()).add(referred)
        return found

    def has_rows(self, table: str) -> bool:
        [(found,)] = self._rows(f"SELECT EXISTS (SELECT 1 FROM {_quoted(table)})")
        return bool(found)

    def read(self, table: str, columns: Sequence[str]) -> Iterator[list[tuple[Any, ...]]]:
        self._reads += 1
        selected = ", ".join(_quoted(c) for c in columns)
        with self._db.cursor(name=f"copy_{self._reads}") as cursor:
            cursor.execute(f"SELECT {selected} FROM {_quoted(table)}")
            while batch := cursor.fetchmany(BATCH_ROWS):
                yield batch

    def begin_writing(self, tables: Sequence[str]) -> None:
        listed = ", ".join(_quoted(t) for t in tables)
        self._db.execute(f"LOCK TABLE {listed} IN EXCLUSIVE MODE")

    def write(self, table: str, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]) -> None:
        names = ", ".join(_quoted(c) for c in columns)
        with self._db.cursor() as cursor:
            statement = f"COPY {_quoted(table)} ({names}) FROM STDIN"
            with cursor.copy(statement) as copy:
                for row in rows:
                    copy.write_row(row)

    def after_writing(self) -> None:
        for table, column in self._rows(
            "SELECT table_name, column_name FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND is_identity = 'YES'"
        ):
            self._db.execute(
                f"SELECT setval(pg_get_serial_sequence(%s, %s), MAX({_quoted(column)}))"
                f" FROM {_quoted(table)} HAVING MAX({_quoted(column)}) IS NOT NULL",
                (_quoted(table), column),
            )

    def commit(self) -> None:
        self._db.commit()

    def close(self) -> None:
        import psycopg

        with contextlib.suppress(psycopg.Error):
            self._db.close()


_TABLES = "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"


def connect(database: str, *, read_only: bool) -> Side:
    """The ``Side`` a ``database:`` setting names (see ``gatekeeper.store.store_for``),
    connected. Raises ``CopyRefused`` (an unsupported URL, a database that cannot be
    opened, a SQLite file a daemon serves)."""
    from gatekeeper.store import store_for
    from gatekeeper.store.sqlite import SqliteStore

    try:
        store = store_for(database)
    except StoreError as exc:
        raise CopyRefused(str(exc)) from exc
    if isinstance(store, SqliteStore):
        if str(store.path) == ":memory:":
            raise CopyRefused("a private in-memory database cannot be copied from or to")
        return SqliteSide(store.path, read_only=read_only)
    return PostgresSide(database, read_only=read_only)


async def _migrate(database: str) -> None:
    from gatekeeper.store import open_store

    store = await open_store(database)
    await store.close()


def copy_database(source: str, destination: str) -> CopyReport:
    """Copy every row of ``source`` into ``destination`` (``database:`` settings: a path,
    ``sqlite:///...``, ``postgresql://...``), as the module says: ``destination`` is first
    created or migrated, then must be empty. Synchronous (runs its own event loop to open
    the destination).

    Returns the ``CopyReport`` of a verified, committed copy. Raises, with nothing
    written: ``CopyRefused``, ``SchemaTooNew`` (a source or destination a newer gatekeeper
    wrote), another ``StoreError`` (a destination that cannot be opened); rolled back:
    ``CopyFailed`` (a driver error part way), ``CopyMismatch``."""
    from gatekeeper.store import database_name, store_for
    from gatekeeper.store.sqlite import MIGRATIONS

    for database in (source, destination):  # both names checked before either is opened
        try:
            store_for(database)
        except StoreError as exc:
            raise CopyRefused(str(exc)) from exc
    if _same_file(source, destination):
        raise CopyRefused(f"SOURCE and DEST are the same database ({database_name(source)})")
    reader = connect(source, read_only=True)
    try:
        try:
            version = reader.version()
        except (sqlite3.Error, _driver_error()) as exc:
            raise CopyRefused(f"cannot read database {reader.name}: {_first_line(exc)}") from exc
        _check_version(reader.name, version, MIGRATIONS[-1].version)
        asyncio.run(_migrate(destination))
        writer = connect(destination, read_only=False)
        try:
            report = CopyReport(reader.name, writer.name, version)
            started = time.perf_counter()
            _copy(reader, writer, report)
            report.seconds = time.perf_counter() - started
            return report
        except (sqlite3.Error, _driver_error()) as exc:
            raise CopyFailed(
                f"copying {reader.name} to {database_name(destination)} failed, nothing "
                f"was kept: {_first_line(exc)}"
            ) from exc
        finally:
            writer.close()
    finally:
        reader.close()


def _same_file(source: str, destination: str) -> bool:
    """Whether both name one SQLite file (whatever the names: links resolved)."""
    from gatekeeper.store import store_for
    from gatekeeper.store.sqlite import SqliteStore

    stores = store_for(source), store_for(destination)
    paths = [os.path.realpath(s.path) for s in stores if isinstance(s, SqliteStore)]
    return len(paths) == 2 and paths[0] == paths[1]


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _driver_error() -> type[Exception]:
    import psycopg

    return psycopg.Error


def _check_version(name: str, version: int, known: int) -> None:
    """Refuse a source of another schema version than ``known`` (``CopyRefused``; a newer
    one: ``SchemaTooNew``)."""
    if version == 0:
        raise CopyRefused(f"database {name} holds no gatekeeper schema: nothing to copy")
    if version > known:
        raise SchemaTooNew(
            f"database {name} has schema version {version}, newer than this gatekeeper "
            f"knows ({known}); copy it with the gatekeeper that wrote it"
        )
    if version < known:
        raise CopyRefused(
            f"database {name} has schema version {version}, older than this gatekeeper's "
            f"({known}); open it once with this gatekeeper to migrate it (start gatekeeper "
            "serve on it, then stop it), then copy it"
        )


def _copy(reader: Side, writer: Side, report: CopyReport) -> None:
    """Copy, verify and commit (the write transaction is begun here)."""
    tables = reader.tables()
    if tables != writer.tables():
        raise CopyRefused(
            f"the tables of {reader.name} and {writer.name} differ "
            f"({', '.join(sorted(set(tables) ^ set(writer.tables())))}); are they of the same "
            "gatekeeper version?"
        )
    columns = {table: reader.columns(table) for table in tables}
    for table in tables:
        if columns[table] != writer.columns(table):
            raise CopyRefused(
                f"the columns of table {table} differ between {reader.name} and {writer.name}"
            )
    order = list(graphlib.TopologicalSorter(writer.references()).static_order())
    order = [table for table in order if table in columns]
    writer.begin_writing(order)
    filled = sorted(table for table in order if writer.has_rows(table))
    if filled:
        raise CopyRefused(
            f"database {writer.name} is not empty (rows in {', '.join(filled)}); copy into "
            "a new or empty database only"
        )
    digests: dict[str, TableDigest] = {}
    for table in order:
        digest = digests[table] = TableDigest()
        for batch in reader.read(table, columns[table]):
            writer.write(table, columns[table], batch)
            for row in batch:
                digest.add(row)
    writer.after_writing()
    mismatches = []
    for table in order:
        read, written = digests[table], writer.digest(table, columns[table])
        if (read.rows, read.digest) != (written.rows, written.digest):
            mismatches.append(
                f"{table}: {read.rows} rows read (digest {read.digest:032x}), "
                f"{written.rows} written (digest {written.digest:032x})"
            )
        report.tables.append(TableCopied(table, read.rows, f"{read.digest:032x}"))
    if mismatches:
        raise CopyMismatch(
            f"the copy of {reader.name} to {writer.name} did not verify; nothing was kept",
            mismatches,
        )
    writer.commit()
