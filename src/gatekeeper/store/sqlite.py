"""The SQLite backend of the Store contract (``gatekeeper.store.contract``).

Every write goes through one connection on one thread (a single writer), and everything a
fact causes is committed in one transaction (``commit_transition``): the fact, the decisions
it causes, the rule states and the actions they queue (a transactional outbox). A whole
transaction, ``BEGIN IMMEDIATE`` to ``COMMIT``, is one call on the writer's thread.

SQLite runs in WAL mode with ``synchronous=FULL``: a committed transaction is on disk
(fsynced) before ``commit_transition`` returns, so an acknowledged fact survives a crash.
The schema is versioned with ``PRAGMA user_version`` and upgraded by the migration files of
``gatekeeper/store/migrations/sqlite`` in order.

Times are RFC 3339 text in UTC with milliseconds (``format_rfc3339``: fixed width, so the
text sorts as the time does) in the columns, aware ``datetime``s at the interface. The
query types are translated to SQL here (``_outbox_where``, ``_audit_where``). Driver
errors leave as the ``StoreError`` family (``_store_error``).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import itertools
import json
import os
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from gatekeeper.clock import format_rfc3339, parse_rfc3339
from gatekeeper.engine.model import (
    ApprovalInput,
    CausedBy,
    Decision,
    FactInput,
    FactKey,
    InstanceKey,
    QueuedAction,
    RuleState,
    SignOff,
    Stand,
    Transition,
)
from gatekeeper.engine.signoffs import SignedOff
from gatekeeper.rules.model import Ruleset
from gatekeeper.store.errors import (
    ADVICE,
    AttemptInFlight,
    Conflict,
    KeyReused,
    NotAGatekeeperDatabase,
    SchemaTooNew,
    StoreError,
    StoreUnavailable,
)
from gatekeeper.store.evidence import (
    Unresolved,
    referenced_seqs,
    resolve,
    shown_evaluation,
    stored_evaluation,
)
from gatekeeper.store.lockfile import DatabaseLock
from gatekeeper.store.migrations import Migration, load_migrations
from gatekeeper.store.queries import AuditQuery, OutboxFilter, Projects
from gatekeeper.store.records import (
    ActionStatus,
    Attempt,
    AttemptRecord,
    AuditEntry,
    CancelRequest,
    EscrowFigures,
    EscrowTotals,
    IdempotencyOutcome,
    LedgerMovement,
    LoggedFact,
    OutboxEntry,
    ReleaseRecord,
    RulesetCursor,
    RulesetSummary,
    Settlement,
    SettlementCallback,
    SettlementResult,
    ShadowedReleases,
    StandingApprovals,
    StoredDecision,
    StoredFact,
    StoredRuleset,
    canonical_json,
)
from gatekeeper.store.writer_thread import WriterThread

MIGRATIONS: tuple[Migration, ...] = load_migrations("sqlite")
"""The schema's migrations, in version order (``PRAGMA user_version`` = the last applied)."""


def content_hash(text: str) -> str:
    """The content hash a ruleset file's text is kept under: SHA-256 (hex) of its UTF-8."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def add_functions(db: sqlite3.Connection) -> None:
    """Register the SQL functions the migrations use on ``db``: ``gk_sha256(text)``
    (``content_hash``)."""
    db.create_function("gk_sha256", 1, content_hash, deterministic=True)


_dumps = canonical_json


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


T = TypeVar("T")


def _in(column: str, values: Iterable[str]) -> tuple[str, list[Any]]:
    """``column IN (?, ...)`` and its parameters (``0``, false, for no value)."""
    listed = list(values)
    if not listed:
        return "0", []
    return f"{column} IN ({', '.join('?' * len(listed))})", listed


def _visible(column: str, projects: Projects) -> tuple[str, list[Any]]:
    """The clause keeping rows whose project (``column``) ``projects`` may see: no project,
    or one of them. ``1`` when every project is visible."""
    if projects is None:
        return "1", []
    clause, params = _in(column, sorted(projects))
    return f"({column} IS NULL OR {clause})", params


def _outbox_where(only: OutboxFilter | None) -> tuple[str, list[Any]]:
    """The ``AND ...`` clause of an ``OutboxFilter`` over ``outbox``, and its parameters."""
    if only is None:
        return "", []
    where = ""
    params: list[Any] = []
    if only.target is not None:
        where += " AND outbox.target = ?"
        params.append(only.target)
    if only.not_targets:
        where += f" AND outbox.target NOT IN ({', '.join('?' * len(only.not_targets))})"
        params += only.not_targets
    if only.exclude_ids:
        where += f" AND outbox.action_id NOT IN ({', '.join('?' * len(only.exclude_ids))})"
        params += only.exclude_ids
    return where, params


_AUDIT_UNION = (
    "SELECT 'decision' AS kind, id, decided_at AS at, rule_id, project, outcome AS what,"
    " NULL AS actor, reason, firing_id, fact_seq, request_id, trigger, project AS scope,"
    " instance, NULL AS instances, NULL AS rule_hash FROM decisions"
    " UNION ALL SELECT 'admin_act', id, at, subject, project, act, actor, reason, NULL, NULL,"
    " NULL, NULL, COALESCE(project, CASE WHEN act = 'retry_action' THEN"
    " (SELECT json_extract(outbox.payload, '$.project') FROM outbox"
    " WHERE outbox.action_id = admin_acts.subject) END), instance, instances, rule_hash"
    " FROM admin_acts"
    " UNION ALL SELECT 'approval', seq, received_at, json_extract(data, '$.rule'), project,"
    " json_extract(data, '$.decision'), id, json_extract(data, '$.comment'), NULL, seq,"
    " request_id, NULL, project, COALESCE(json_extract(data, '$.instance'), ''), NULL, NULL"
    " FROM fact_log WHERE kind = 'approval'"
)
"""Every audit entry in one shape. ``scope`` is the project that decides who may see the
entry: its own, or for an act on an action stored without one (``retry_action``), the
action's project."""


def _audit_where(query: AuditQuery) -> tuple[str, list[Any]]:
    """The WHERE clause of ``query`` over ``_AUDIT_UNION``, and its parameters."""
    clause, params = _in("kind", query.kinds)
    clauses = [clause]
    for column, value in (
        ("project", query.project),
        ("rule_id", query.rule_id),
        ("instance", query.instance),
    ):
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    if query.outcome is not None:
        clauses.append("(kind != 'decision' OR what = ?)")
        params.append(query.outcome)
    if query.since is not None:
        clauses.append("at >= ?")
        params.append(format_rfc3339(query.since))
    if query.until is not None:
        clauses.append("at < ?")
        params.append(format_rfc3339(query.until))
    if query.after is not None:
        at = format_rfc3339(query.after.at)
        kind, id_ = query.after.kind, query.after.id
        clauses.append("(at < ? OR (at = ? AND (kind < ? OR (kind = ? AND id < ?))))")
        params += [at, at, kind, kind, id_]
    if query.projects is not None:
        visible, visible_params = _visible("scope", query.projects)
        clauses.append(visible)
        params += visible_params
    return " WHERE " + " AND ".join(clauses), params


def caused_by_json(caused_by: CausedBy) -> dict[str, Any]:
    """``caused_by`` as stored in the fact log and shown by the API."""
    return {
        "rule_id": caused_by.rule_id,
        "instance": caused_by.instance,
        "firing_id": caused_by.firing_id,
        "depth": caused_by.depth,
    }


def _time(text: str | None) -> datetime | None:
    return None if text is None else parse_rfc3339(text)


@dataclass(frozen=True)
class _Insert:
    """An INSERT of many rows in one statement: ``head VALUES row, row, ... tail``, at most
    ``MAX_ROWS`` rows per statement (one ``sqlite3_step``, where ``executemany`` steps,
    and gives the GIL away and back, once per row). Rows go in in order, so ids are given
    in order and a later upsert of the same key wins, as row by row."""

    head: str
    row: str
    tail: str = ""

    MAX_ROWS = 50
    """Rows per statement: 50 rows of 17 columns stay under SQLite's historical limit of
    999 parameters."""

    def run(self, db: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
        """Insert ``rows`` (tuples in the order of ``row``'s parameters)."""
        for start in range(0, len(rows), self.MAX_ROWS):
            chunk = rows[start : start + self.MAX_ROWS]
            db.execute(self._sql(len(chunk)), list(itertools.chain.from_iterable(chunk)))

    @functools.cache  # noqa: B019 -- a handful of module-level constants, never freed anyway
    def _sql(self, rows: int) -> str:
        return f"{self.head} VALUES {', '.join([self.row] * rows)}{self.tail}"


_INSERT_FACT_LOG = (
    "INSERT INTO fact_log (project, kind, id, data, received_at, request_id, caused_by)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_UPSERT_FACTS = _Insert(
    "INSERT INTO facts (project, kind, id, data, seq, updated_at)",
    "(?, ?, ?, ?, ?, ?)",
    " ON CONFLICT (project, kind, id) DO UPDATE SET"
    " data = excluded.data, seq = excluded.seq, updated_at = excluded.updated_at",
)
_INSERT_DECISIONS = _Insert(
    "INSERT INTO decisions (decided_at, rule_id, rule_hash, ruleset_version, git_commit,"
    " trigger, fact_seq, outcome, gate_open, evaluation, approvals, firing_id,"
    " request_id, reason, project, instance, notice_id, mode)",
    "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
)
_UPSERT_RULE_STATES = _Insert(
    "INSERT INTO rule_state (rule_id, instance, gate_open, fired_count, last_fired_at,"
    " rule_hash, paused, rearms, notified, notices, signoff_alerted, blocked, blocks)",
    "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    " ON CONFLICT (rule_id, instance) DO UPDATE SET"
    " gate_open = excluded.gate_open, fired_count = excluded.fired_count,"
    " last_fired_at = excluded.last_fired_at, rule_hash = excluded.rule_hash,"
    " paused = excluded.paused, rearms = excluded.rearms,"
    " notified = excluded.notified, notices = excluded.notices,"
    " signoff_alerted = excluded.signoff_alerted,"
    " blocked = excluded.blocked, blocks = excluded.blocks",
)
# decision_id: the decision of the same firing, written just before in this transaction
# (firing_id is UNIQUE in decisions; no such decision leaves it NULL, which NOT NULL refuses);
# a notice that a rule waits for approvals names its decision's notice_id instead; a
# shadowed action goes in with status 'shadowed' (never due)
_INSERT_OUTBOX = _Insert(
    "INSERT INTO outbox (action_id, decision_id, rule_id, firing_id, kind, target,"
    " payload, created_at, next_attempt_at, instance, status)",
    "(?, COALESCE((SELECT id FROM decisions WHERE firing_id = ?),"
    " (SELECT id FROM decisions WHERE notice_id = ?)), ?, ?, ?, ?, ?, ?, ?, ?, ?)",
)
_INSERT_LEDGER = _Insert(
    "INSERT INTO ledger (release_id, escrow, amount, currency, payee, rule_id,"
    " firing_id, recorded_at)",
    "(?, ?, ?, ?, ?, ?, ?, ?)",
)

_MOVEMENT_COLUMNS = "release_id, escrow, movement, amount, currency, at, actor, reference, reason"
_INSERT_MOVEMENTS = _Insert(
    f"INSERT INTO ledger_entries ({_MOVEMENT_COLUMNS})", "(?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_SEND = (
    f"INSERT INTO ledger_entries ({_MOVEMENT_COLUMNS})"
    " SELECT ledger.release_id, ledger.escrow, 'send', ledger.amount, ledger.currency, ?,"
    " outbox.target, NULL, NULL FROM ledger JOIN outbox ON outbox.action_id = ledger.release_id"
    " WHERE ledger.release_id = ? ON CONFLICT (release_id, movement) DO NOTHING"
)
"""The ``send`` movement of a delivered action when it is a release (none otherwise), once."""
FOLLOW_UP_ALERTS = ("dead_letter", "settlement_failed", "settled_after_cancel")
"""The alerts queued after a decision about one of its actions (by delivery, by a
settlement), filed under that decision."""
_INSERT_FOLLOW_UP = (
    "INSERT INTO outbox (action_id, decision_id, rule_id, firing_id, kind, target, payload,"
    " created_at, next_attempt_at, instance)"
    " SELECT ?, decision_id, ?, ?, ?, ?, ?, ?, ?, ? FROM outbox WHERE action_id = ?"
)
"""An alert about an outbox entry (a dead letter, a failed settlement), queued under the
decision of the entry it is about (the last parameter)."""


_INSERT_ATTEMPTS = _Insert(
    "INSERT INTO delivery_attempts (action_id, attempt, started_at, latency_ms,"
    " status_code, error)",
    "(?, ?, ?, ?, ?, ?)",
)


class SqliteStore:
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

    def __init__(self, path: Path | str, *, read_only: bool = False) -> None:
        self.path = Path(path)
        self._memory = str(path) == ":memory:"
        self._read_only = read_only
        """Opened for reading only (``open_store(read_only=True)``): no writer, no lock."""
        self._uri = f"file:gatekeeper-{id(self)}?mode=memory&cache=shared"
        self._writer: WriterThread | None = None
        self._db: sqlite3.Connection | None = None
        """The writer connection; only ever used on the writer thread."""
        self._reader: aiosqlite.Connection | None = None
        self._written: _Written | None = None
        """The fact log as written so far by the transaction in progress (writer thread)."""
        self._lock: DatabaseLock | None = None

    @property
    def is_open(self) -> bool:
        return self._reader is not None and (self._db is not None or self._read_only)

    @property
    def reader(self) -> aiosqlite.Connection:
        """The reader connection: each query sees only committed data (a WAL snapshot), so
        nothing reads rows of a transaction that may still roll back. Raises
        ``StoreUnavailable`` when the store is not open."""
        if self._reader is None:
            raise StoreUnavailable("store is not open")
        return self._reader

    async def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Every row of a read query (on the reader connection)."""
        try:
            async with self.reader.execute(sql, params) as cursor:
                return list(await cursor.fetchall())
        except sqlite3.Error as exc:
            raise _store_error(exc) from exc

    async def _row(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """The first row of a read query, or None."""
        try:
            async with self.reader.execute(sql, params) as cursor:
                return await cursor.fetchone()
        except sqlite3.Error as exc:
            raise _store_error(exc) from exc

    async def _transaction(self, body: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``body(connection)`` inside ``BEGIN IMMEDIATE`` ... ``COMMIT`` on the writer
        thread, in one round trip, and return its result (see ``_transact``). Driver errors
        leave as the ``StoreError`` family.

        Once queued the transaction runs to its end (COMMIT or ROLLBACK) whatever happens
        to the awaiting task: a cancelled caller cannot leave it half done.
        """
        if self._writer is None:
            if self._read_only and self._reader is not None:
                raise StoreUnavailable(f"database {self.path} is open read-only", "read_only")
            raise StoreUnavailable("store is not open")
        try:
            return await self._writer.run(self._transact, body)
        except sqlite3.Error as exc:
            raise _store_error(exc) from exc

    def _transact(self, body: Callable[[sqlite3.Connection], T]) -> T:
        """On the writer thread: ``BEGIN IMMEDIATE``, ``body``, ``COMMIT``. On any error the
        transaction is rolled back (if still open) and the original exception is raised,
        never one from the rollback."""
        db = self._db
        if db is None:
            raise StoreUnavailable("store is not open")
        db.execute("BEGIN IMMEDIATE")
        try:
            result = body(db)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                with contextlib.suppress(Exception):
                    db.execute("ROLLBACK")
            raise
        return result

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
                raise SchemaTooNew(
                    f"database {path} has schema version {version}, newer than this "
                    f"gatekeeper knows ({len(MIGRATIONS)}); use the gatekeeper that wrote it"
                )
            self._refuse_foreign(version, application, tables)
            if version < len(MIGRATIONS):
                raise StoreUnavailable(
                    f"database {path} has schema version {version}, older than this "
                    f"gatekeeper's ({len(MIGRATIONS)}); it is read only as it is: start "
                    "gatekeeper serve on it once to upgrade it"
                )
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
        # statements of 1 to _Insert.MAX_ROWS rows per table: keep them all prepared
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
            raise SchemaTooNew(
                f"database {self.path} has schema version {current}, newer than this "
                f"gatekeeper knows ({len(MIGRATIONS)}); upgrade gatekeeper"
            )
        for migration in MIGRATIONS[current:]:

            def migrate(db: sqlite3.Connection, m: Migration = migration) -> None:
                for statement in m.statements:
                    db.execute(statement)
                db.execute(f"PRAGMA user_version={m.version}")

            self._transact(migrate)

    # -- StateStore ---------------------------------------------------------------------

    async def commit_transition(self, transition: Transition) -> list[int]:
        return (await self.commit_transitions([transition]))[0]

    async def commit_transitions(self, transitions: Sequence[Transition]) -> list[list[int]]:
        transitions = list(transitions)

        def write(db: sqlite3.Connection) -> list[list[int]]:
            self._written = _Written(db)
            try:
                return [self._write_transition(db, t) for t in transitions]
            finally:
                self._written = None

        return await self._transaction(write)

    def _write_then(self, db: sqlite3.Connection, t: Transition) -> None:
        """Inside a ledger write's transaction: the transition its return decided."""
        self._written = _Written(db)
        try:
            self._write_transition(db, t)
        finally:
            self._written = None

    def _write_transition(self, db: sqlite3.Connection, t: Transition) -> list[int]:
        """On the writer thread, inside the open transaction: write everything ``t`` changes
        (fact log, facts, approvals, admin acts, ruleset, decisions, rule states, outbox,
        ledger, idempotency key); return the facts' (and approvals') sequence numbers.
        ``self._written`` follows the fact log through the transaction's transitions."""
        written = self._written or _Written(db)
        if t.decisions:
            now = t.decisions[0].decided_at
        elif t.planned_at is not None:
            now = format_rfc3339(t.planned_at)
        elif t.facts or t.approvals or t.admin_acts or t.signoffs or t.ruleset or t.idempotency:
            raise ValueError("a transition without decisions needs planned_at")
        else:
            now = ""
        seqs: list[int] = []
        request_id = t.request_id
        fact_rows = []
        for fact in t.facts:
            data = _dumps(fact.data)
            caused_by = fact.caused_by
            cursor = db.execute(
                _INSERT_FACT_LOG,
                (
                    fact.project,
                    fact.kind,
                    fact.id,
                    data,
                    now,
                    request_id,
                    None if caused_by is None else _dumps(caused_by_json(caused_by)),
                ),
            )
            seq = int(cursor.lastrowid or 0)
            seqs.append(seq)
            fact_rows.append((fact.project, fact.kind, fact.id, data, seq, now))
            written.facts[(fact.project, fact.kind, fact.id)] = seq
        if fact_rows:
            _UPSERT_FACTS.run(db, fact_rows)
        for approval in t.approvals:
            seqs.append(_write_approval(db, approval, now, request_id))
        if t.consumed:
            db.executemany(
                "DELETE FROM approvals WHERE rule_id = ? AND instance = ? AND subject = ?"
                " AND decision = 'approve'",
                [(c.rule_id, c.instance, s) for c in t.consumed for s in c.subjects],
            )
        if seqs:
            written.last = seqs[-1]
        if t.admin_acts:
            db.executemany(
                "INSERT INTO admin_acts (at, actor, act, subject, reason, project, instance,"
                " instances) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        now,
                        a.actor,
                        a.act,
                        a.rule_id,
                        a.reason,
                        a.project or None,
                        a.instance or "",
                        a.instances,
                    )
                    for a in t.admin_acts
                ],
            )
        if t.signoffs:
            db.executemany(
                "INSERT INTO admin_acts (at, actor, act, subject, reason, project, rule_hash)"
                " VALUES (?, ?, 'signoff', ?, ?, ?, ?)",
                [
                    (now, o.actor, o.rule_id, o.comment, o.project or None, o.content_hash)
                    for o in t.signoffs
                ],
            )
        if t.ruleset is not None:
            _write_ruleset(db, t.ruleset, now)
        if t.decisions:
            _INSERT_DECISIONS.run(db, written.decision_rows(t.decisions, seqs, request_id))
        if t.rule_states:
            _UPSERT_RULE_STATES.run(
                db,
                [
                    (
                        rule_id,
                        instance,
                        s.gate_open,
                        s.fired_count,
                        s.last_fired_at,
                        s.rule_hash,
                        s.paused,
                        s.rearms,
                        s.notified,
                        s.notices,
                        s.signoff_alerted,
                        s.blocked,
                        s.blocks,
                    )
                    for (rule_id, instance), s in t.rule_states.items()
                ],
            )
        if t.actions:
            _INSERT_OUTBOX.run(
                db,
                [
                    (
                        a.action_id,
                        a.firing_id,
                        a.firing_id,
                        a.rule_id,
                        a.firing_id,
                        a.kind,
                        a.target,
                        _dumps(a.payload),
                        a.created_at,
                        a.created_at,
                        a.instance,
                        "shadowed" if a.shadowed else "pending",
                    )
                    for a in t.actions
                ],
            )
        if t.ledger:
            _INSERT_LEDGER.run(
                db,
                [
                    (
                        e.release_id,
                        e.escrow,
                        e.amount,
                        e.currency,
                        e.payee,
                        e.rule_id,
                        e.firing_id,
                        e.recorded_at,
                    )
                    for e in t.ledger
                ],
            )
            _INSERT_MOVEMENTS.run(
                db,
                [
                    (
                        e.release_id,
                        e.escrow,
                        "reserve",
                        e.amount,
                        e.currency,
                        e.recorded_at,
                        e.rule_id,
                        None,
                        None,
                    )
                    for e in t.ledger
                ],
            )
        if t.idempotency is not None:
            db.execute(
                "INSERT INTO idempotency_keys (key, request_hash, seqs, request_id, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (
                    t.idempotency.key,
                    t.idempotency.request_hash,
                    _dumps(
                        [
                            seq
                            for seq, fact in zip(seqs, [*t.facts, *t.approvals], strict=True)
                            if not isinstance(fact, FactInput) or fact.caused_by is None
                        ]
                    ),
                    request_id,
                    now,
                ),
            )
        return seqs

    async def find_idempotency_key(self, key: str) -> IdempotencyOutcome | None:
        row = await self._row(
            "SELECT request_hash, seqs, request_id, created_at FROM idempotency_keys WHERE key = ?",
            (key,),
        )
        if row is None:
            return None
        return IdempotencyOutcome(row[0], json.loads(row[1]), row[2], parse_rfc3339(row[3]))

    async def purge_idempotency_keys(self, before: datetime) -> int:
        cutoff = format_rfc3339(before)

        def purge(db: sqlite3.Connection) -> int:
            cursor = db.execute("DELETE FROM idempotency_keys WHERE created_at < ?", (cutoff,))
            return int(cursor.rowcount)

        return await self._transaction(purge)

    async def load_facts(self) -> dict[FactKey, dict[str, Any]]:
        rows = await self._rows("SELECT project, kind, id, data FROM facts")
        return {(r[0], r[1], r[2]): json.loads(r[3]) for r in rows}

    async def load_rule_states(self) -> dict[InstanceKey, RuleState]:
        rows = await self._rows(
            "SELECT rule_id, gate_open, fired_count, last_fired_at, rule_hash, paused, rearms,"
            " instance, notified, notices, signoff_alerted, blocked, blocks FROM rule_state"
        )
        return {
            (r[0], r[7]): RuleState(
                rule_id=r[0],
                gate_open=None if r[1] is None else bool(r[1]),
                fired_count=int(r[2]),
                last_fired_at=r[3],
                rule_hash=r[4],
                paused=bool(r[5]),
                rearms=int(r[6]),
                instance=r[7],
                notified=bool(r[8]),
                notices=int(r[9]),
                signoff_alerted=r[10],
                blocked=r[11],
                blocks=int(r[12]),
            )
            for r in rows
        }

    async def load_signoffs(self) -> SignedOff:
        signed: SignedOff = {}
        for rule_hash, actor, rule_id, comment, project, at in await self._rows(
            "SELECT rule_hash, actor, subject, reason, project, at FROM admin_acts"
            " WHERE act = 'signoff' ORDER BY id"
        ):
            signoff = SignOff(rule_hash, rule_id, actor, comment, project or "", parse_rfc3339(at))
            signed.setdefault(rule_hash, {})[actor] = signoff
        return signed

    async def load_approvals(self) -> StandingApprovals:
        standing: StandingApprovals = {}
        for rule_id, instance, subject, decision, decided_at in await self._rows(
            "SELECT rule_id, instance, subject, decision, decided_at FROM approvals"
        ):
            key = f"{rule_id}[{instance}]" if instance else rule_id
            standing.setdefault(key, {})[subject] = Stand(decision, parse_rfc3339(decided_at))
        return standing

    async def escrow_totals(self) -> EscrowTotals:
        # grouped by amount: a count of equal amounts multiplies exactly, and there are
        # far fewer distinct amounts than movements
        sums: dict[str, dict[str, Decimal]] = {}
        # a fail of a release never sent (a dead letter the bank failed) comes off reserved
        for escrow, movement, amount, count in await self._rows(
            "SELECT escrow, CASE WHEN movement = 'fail' AND NOT EXISTS (SELECT 1 FROM"
            " ledger_entries AS sent WHERE sent.release_id = ledger_entries.release_id"
            " AND sent.movement = 'send') THEN 'fail_unsent' ELSE movement END AS moved,"
            " amount, COUNT(*) FROM ledger_entries GROUP BY escrow, moved, amount"
        ):
            by_movement = sums.setdefault(escrow, {})
            by_movement[movement] = by_movement.get(movement, _ZERO) + Decimal(amount) * count
        dead: dict[str, Decimal] = {}
        for escrow, amount, count in await self._rows(
            "SELECT ledger.escrow, ledger.amount, COUNT(*) FROM ledger"
            " JOIN outbox ON outbox.action_id = ledger.release_id"
            " WHERE outbox.status = 'dead' GROUP BY ledger.escrow, ledger.amount"
        ):
            dead[escrow] = dead.get(escrow, _ZERO) + Decimal(amount) * count
        return {
            escrow: _figures(by_movement, dead.get(escrow, _ZERO))
            for escrow, by_movement in sums.items()
        }

    async def last_ruleset(self) -> StoredRuleset | None:
        row = await self._row(
            f"SELECT {_RULESET_COLUMNS} FROM rulesets"
            " WHERE version = (SELECT value FROM meta WHERE key = 'active_ruleset')"
        )
        return await self._stored_ruleset(row) if row else None

    async def _stored_ruleset(self, r: Any) -> StoredRuleset:
        """The ruleset version of row ``r`` (``_RULESET_COLUMNS``) with its files' text."""
        hashes: dict[str, str] = json.loads(r[1])
        wanted = sorted(set(hashes.values()))
        rows = await self._rows(
            "SELECT content_hash, text FROM ruleset_files"
            f" WHERE content_hash IN ({', '.join('?' * len(wanted))})",
            wanted,
        )
        texts = dict(rows)
        missing = sorted(name for name, h in hashes.items() if h not in texts)
        if missing:
            raise StoreError(f"ruleset {r[0]}: the text of {', '.join(missing)} is not stored")
        files = {name: texts[h] for name, h in hashes.items()}
        return StoredRuleset(r[0], files, r[2], parse_rfc3339(r[3]), parse_rfc3339(r[4]))

    # -- DeliveryQueue ------------------------------------------------------------------

    async def due_actions(
        self, now: datetime, limit: int, *, only: OutboxFilter | None = None
    ) -> list[OutboxEntry]:
        where, params = _outbox_where(only)
        rows = await self._rows(
            f"SELECT {_OUTBOX_COLUMNS} FROM {_OUTBOX_FROM}"
            f" WHERE outbox.status = 'pending' AND outbox.next_attempt_at <= ?{where}"
            " ORDER BY outbox.next_attempt_at, outbox.action_id LIMIT ?",
            (format_rfc3339(now), *params, limit),
        )
        return [_outbox_entry(r) for r in rows]

    async def next_attempt_at(self, *, only: OutboxFilter | None = None) -> datetime | None:
        where, params = _outbox_where(only)
        row = await self._row(
            f"SELECT MIN(next_attempt_at) FROM outbox WHERE status = 'pending'{where}", params
        )
        return _time(row[0]) if row else None

    async def begin_attempt(self, action_id: str, at: datetime) -> bool:
        started = format_rfc3339(at)

        def begin(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "UPDATE outbox SET attempt_started_at = ? WHERE action_id = ?"
                " AND status = 'pending'",
                (started, action_id),
            )
            return cursor.rowcount == 1

        return await self._transaction(begin)

    async def record_attempt(self, record: AttemptRecord) -> None:
        await self.record_attempts([record])

    async def record_attempts(self, records: Sequence[AttemptRecord]) -> None:
        attempts = []
        updates = []
        for r in records:
            a = r.attempt
            started_at = format_rfc3339(a.started_at)
            attempts.append(
                (a.action_id, a.attempt, started_at, a.latency_ms, a.status_code, a.error)
            )
            updates.append(
                (
                    r.status,
                    a.attempt,
                    a.error,
                    None if r.next_attempt_at is None else format_rfc3339(r.next_attempt_at),
                    started_at if r.status == "delivered" else None,
                    r.dead_reason if r.status == "dead" else None,
                    a.status_code if r.status == "dead" else None,
                    a.action_id,
                )
            )

        sends = [
            (format_rfc3339(r.attempt.started_at), r.attempt.action_id)
            for r in records
            if r.status == "delivered"
        ]
        alerts = [
            (*_outbox_row(r.alert), r.attempt.action_id) for r in records if r.alert is not None
        ]

        def record(db: sqlite3.Connection) -> None:
            _INSERT_ATTEMPTS.run(db, attempts)
            db.executemany(
                "UPDATE outbox SET status = ?, attempts = ?, last_error = ?,"
                " next_attempt_at = COALESCE(?, next_attempt_at), delivered_at = ?,"
                " dead_reason = ?, dead_status = ?, attempt_started_at = NULL"
                " WHERE action_id = ? AND status != 'cancelled'",
                updates,
            )
            if sends:
                db.executemany(_INSERT_SEND, sends)
            if alerts:
                db.executemany(_INSERT_FOLLOW_UP, alerts)

        if records:
            await self._transaction(record)

    # -- OutboxAdmin --------------------------------------------------------------------

    async def get_action(self, action_id: str) -> OutboxEntry | None:
        row = await self._row(
            f"SELECT {_OUTBOX_COLUMNS} FROM {_OUTBOX_FROM} WHERE outbox.action_id = ?",
            (action_id,),
        )
        return _outbox_entry(row) if row else None

    async def list_actions(
        self,
        status: ActionStatus | None = None,
        limit: int = 100,
        *,
        projects: Projects = None,
    ) -> list[OutboxEntry]:
        where, params = _visible("json_extract(outbox.payload, '$.project')", projects)
        if status is not None:
            where += " AND outbox.status = ?"
            params.append(status)
        rows = await self._rows(
            f"SELECT {_OUTBOX_COLUMNS} FROM {_OUTBOX_FROM} WHERE {where}"
            " ORDER BY outbox.created_at DESC, outbox.action_id LIMIT ?",
            (*params, limit),
        )
        return [_outbox_entry(r) for r in rows]

    async def count_actions(self) -> dict[str, int]:
        rows = await self._rows("SELECT status, COUNT(*) FROM outbox GROUP BY status")
        return {str(status): int(count) for status, count in rows}

    async def list_attempts(self, action_id: str) -> list[Attempt]:
        rows = await self._rows(
            "SELECT action_id, attempt, started_at, latency_ms, status_code, error"
            " FROM delivery_attempts WHERE action_id = ? ORDER BY attempt",
            (action_id,),
        )
        return [Attempt(r[0], r[1], parse_rfc3339(r[2]), r[3], r[4], r[5]) for r in rows]

    async def requeue_action(
        self, action_id: str, at: datetime, actor: str, reason: str | None
    ) -> OutboxEntry | None:
        now = format_rfc3339(at)

        def requeue(db: sqlite3.Connection) -> bool:
            row = db.execute(
                "SELECT status FROM outbox WHERE action_id = ?", (action_id,)
            ).fetchone()
            if row is None:
                return False
            if row[0] != "dead":
                raise Conflict(f"action {action_id} is {row[0]}, not dead")
            db.execute(
                "UPDATE outbox SET status = 'pending', next_attempt_at = ?, requeued_at = ?,"
                " attempts_at_requeue = attempts, dead_reason = NULL, dead_status = NULL"
                " WHERE action_id = ?",
                (now, now, action_id),
            )
            db.execute(
                "INSERT INTO admin_acts (at, actor, act, subject, reason)"
                " VALUES (?, ?, 'retry_action', ?, ?)",
                (now, actor, action_id, reason),
            )
            return True

        if not await self._transaction(requeue):
            return None
        return await self.get_action(action_id)

    # -- LedgerBook ---------------------------------------------------------------------

    async def cancel_release(
        self, cancel: CancelRequest
    ) -> tuple[OutboxEntry, list[LedgerMovement]] | None:
        now = format_rfc3339(cancel.at)
        release_id = cancel.release_id

        def write(db: sqlite3.Connection) -> list[int] | None:
            row = db.execute(
                "SELECT kind, status, attempt_started_at, json_extract(payload, '$.project')"
                " FROM outbox WHERE action_id = ?",
                (release_id,),
            ).fetchone()
            if row is None:
                return None
            kind, status, started, project = row
            release = db.execute(
                "SELECT escrow, amount, currency FROM ledger WHERE release_id = ?",
                (release_id,),
            ).fetchone()
            if kind != "release":
                raise Conflict(f"action {release_id} is a {kind}, not a release")
            if status not in ("pending", "dead"):
                raise Conflict(
                    f"release {release_id} is {status}: only a pending or dead release can be "
                    "cancelled"
                )
            if release is None:
                raise Conflict(f"release {release_id} has no ledger entry")
            if started is not None:
                raise AttemptInFlight(
                    f"release {release_id}: an attempt is in flight; its outcome decides"
                )
            db.execute("UPDATE outbox SET status = 'cancelled' WHERE action_id = ?", (release_id,))
            escrow, amount, currency = release
            ids = [
                _insert_movement(
                    db,
                    release_id,
                    escrow,
                    "cancel",
                    amount,
                    currency,
                    now,
                    cancel.actor,
                    None,
                    cancel.reason,
                ),
                _insert_movement(
                    db,
                    release_id,
                    escrow,
                    "return",
                    amount,
                    currency,
                    now,
                    cancel.actor,
                    None,
                    "cancelled",
                ),
            ]
            db.execute(
                "INSERT INTO admin_acts (at, actor, act, subject, reason, project)"
                " VALUES (?, ?, 'cancel_action', ?, ?, ?)",
                (now, cancel.actor, release_id, cancel.reason, project),
            )
            if cancel.then is not None:
                self._write_then(db, cancel.then)
            return ids

        ids = await self._transaction(write)
        if ids is None:
            return None
        entry = await self.get_action(release_id)
        assert entry is not None
        return entry, await self._movements_by_id(ids)

    async def settle_release(self, callback: SettlementCallback) -> SettlementResult | None:
        now = format_rfc3339(callback.at)
        release_id = callback.release_id

        def write(db: sqlite3.Connection) -> tuple[list[int], bool] | None:
            row = db.execute(
                "SELECT ledger.escrow, ledger.amount, ledger.currency, outbox.status,"
                " outbox.attempt_started_at, outbox.dead_reason, outbox.dead_status,"
                " json_extract(outbox.payload, '$.project')"
                " FROM ledger JOIN outbox ON outbox.action_id = ledger.release_id"
                " WHERE ledger.release_id = ? AND outbox.target = ?",
                (release_id, callback.target),
            ).fetchone()
            if row is None:
                return None
            escrow, amount, currency, status, started, dead_reason, dead_status, project = row
            seen = db.execute(
                "SELECT body_sha256 FROM settlement_callbacks WHERE target = ? AND webhook_id = ?",
                (callback.target, callback.webhook_id),
            ).fetchone()
            if seen is not None:
                if seen[0] != callback.body_sha256:
                    raise KeyReused(
                        f"webhook-id {callback.webhook_id!r} was already used with another body"
                    )
                return [], True
            moved = {
                movement
                for (movement,) in db.execute(
                    "SELECT movement FROM ledger_entries WHERE release_id = ?", (release_id,)
                )
            }
            recorded = _recorded_settlement(db, release_id, moved)
            ids: list[int] = []
            if recorded is not None and recorded != callback.outcome:
                raise Conflict(
                    f"release {release_id} was already {recorded}; it cannot be "
                    f"{callback.outcome} too"
                )
            if recorded is None:
                if status == "pending" and started is not None:
                    raise AttemptInFlight(
                        f"release {release_id}: an attempt is in flight (sent, its answer not "
                        "yet recorded); retry the callback shortly"
                    )
                if "send" not in moved and status not in ("dead", "cancelled"):
                    raise Conflict(
                        f"release {release_id} has not been sent (it is {status}): only a "
                        "sent, dead or cancelled release can be settled or failed"
                    )

                def move(movement: str, reason: str | None = None) -> None:
                    ids.append(
                        _insert_movement(
                            db,
                            release_id,
                            escrow,
                            movement,
                            amount,
                            currency,
                            now,
                            callback.target,
                            callback.reference,
                            reason,
                        )
                    )

                settled = callback.outcome == "settled"
                if status == "cancelled" and settled:  # the bank paid it after all
                    move("reclaim", "settled after its cancel")
                if settled and "send" not in moved:
                    move("send", "settled by the bank")
                returned = not settled and status != "cancelled"  # a cancel returned it
                if settled:
                    move("settle")
                elif returned:
                    move("fail", callback.reason)
                    move("return", "settlement failed")
                if status in ("dead", "cancelled"):
                    what = f"{callback.outcome} (reference {callback.reference})"
                    if status == "dead":
                        db.execute(
                            "UPDATE outbox SET status = 'delivered', delivered_at = ?,"
                            " dead_reason = NULL, dead_status = NULL WHERE action_id = ?",
                            (now, release_id),
                        )
                        act = "dead_letter_settlement"
                        last = f", HTTP {dead_status}" if dead_status is not None else ""
                        why = f"{what}; it was a dead letter: {dead_reason}{last}"
                    else:
                        act, why = "settlement_after_cancel", f"{what} after its cancel"
                    db.execute(
                        "INSERT INTO admin_acts (at, actor, act, subject, reason, project)"
                        " VALUES (?, ?, ?, ?, ?, ?)",
                        (now, callback.target, act, release_id, why, project),
                    )
                if callback.alert is not None and ids:
                    db.execute(_INSERT_FOLLOW_UP, (*_outbox_row(callback.alert), release_id))
                if callback.then is not None and returned:
                    self._write_then(db, callback.then)
            db.execute(
                "INSERT INTO settlement_callbacks (target, webhook_id, body_sha256, release_id,"
                " received_at, outcome, reference) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    callback.target,
                    callback.webhook_id,
                    callback.body_sha256,
                    release_id,
                    now,
                    callback.outcome,
                    callback.reference,
                ),
            )
            return ids, False

        written = await self._transaction(write)
        if written is None:
            return None
        ids, replayed = written
        settled = [
            m
            for m in await self.ledger_movements(release_id=release_id)
            if m.movement in ("settle", "fail")
        ]
        if settled:
            last = settled[-1]
            outcome: Settlement = "settled" if last.movement == "settle" else "failed"
            reference, at = last.reference, last.at
        else:  # a failure of a cancelled release: recorded, nothing moved
            row = await self._row(
                "SELECT outcome, reference, received_at FROM settlement_callbacks"
                " WHERE release_id = ? AND outcome IS NOT NULL ORDER BY received_at LIMIT 1",
                (release_id,),
            )
            if row is None:  # a replayed webhook-id's release is settled: it always is
                raise Conflict(f"release {release_id} has no settlement recorded")
            outcome, reference, at = row[0], row[1], parse_rfc3339(row[2])
        return SettlementResult(
            release_id=release_id,
            outcome=outcome,
            reference=reference,
            at=at,
            movements=tuple(await self._movements_by_id(ids)),
            replayed=replayed,
        )

    async def ledger_movements(
        self,
        escrow: str | None = None,
        *,
        release_id: str | None = None,
        after: int = 0,
        limit: int = 1000,
        projects: Projects = None,
    ) -> list[LedgerMovement]:
        where = "ledger_entries.id > ?"
        params: list[Any] = [after]
        join = ""
        if escrow is not None:
            where += " AND ledger_entries.escrow = ?"
            params.append(escrow)
        if release_id is not None:
            where += " AND ledger_entries.release_id = ?"
            params.append(release_id)
        if projects is not None:
            join = " JOIN outbox ON outbox.action_id = ledger_entries.release_id"
            visible, visible_params = _visible(
                "json_extract(outbox.payload, '$.project')", projects
            )
            where += f" AND {visible}"
            params += visible_params
        rows = await self._rows(
            f"SELECT {_MOVEMENT_SELECT} FROM ledger_entries{join} WHERE {where}"
            " ORDER BY ledger_entries.id LIMIT ?",
            (*params, limit),
        )
        return [_movement(r) for r in rows]

    async def _movements_by_id(self, ids: Sequence[int]) -> list[LedgerMovement]:
        if not ids:
            return []
        rows = await self._rows(
            f"SELECT {_MOVEMENT_SELECT} FROM ledger_entries"
            f" WHERE id IN ({', '.join('?' * len(ids))}) ORDER BY id",
            list(ids),
        )
        return [_movement(r) for r in rows]

    # -- AuditReads ---------------------------------------------------------------------

    async def list_facts(
        self,
        project: str | None = None,
        *,
        projects: Projects = None,
        after: FactKey | None = None,
        limit: int | None = None,
    ) -> list[StoredFact]:
        where, params = _visible("facts.project", projects)
        if project is not None:
            where += " AND facts.project = ?"
            params.append(project)
        if after is not None:
            where += " AND (facts.project, facts.kind, facts.id) > (?, ?, ?)"
            params += after
        rows = await self._rows(
            "SELECT facts.project, facts.kind, facts.id, facts.data, facts.seq,"
            " facts.updated_at, fact_log.caused_by"
            " FROM facts LEFT JOIN fact_log ON fact_log.seq = facts.seq"
            f" WHERE {where} ORDER BY facts.project, facts.kind, facts.id LIMIT ?",
            (*params, -1 if limit is None else limit),
        )
        return [
            StoredFact(
                r[0],
                r[1],
                r[2],
                json.loads(r[3]),
                r[4],
                parse_rfc3339(r[5]),
                None if r[6] is None else json.loads(r[6]),
            )
            for r in rows
        ]

    async def fact_log(
        self, after_seq: int = 0, limit: int = 1000, *, projects: Projects = None
    ) -> list[LoggedFact]:
        visible, params = _visible("project", projects)
        rows = await self._rows(
            f"SELECT {_FACT_LOG_COLUMNS} FROM fact_log WHERE seq > ? AND {visible}"
            " ORDER BY seq LIMIT ?",
            (after_seq, *params, limit),
        )
        return [_logged_fact(r) for r in rows]

    async def fact_at(self, seq: int) -> LoggedFact | None:
        row = await self._row(f"SELECT {_FACT_LOG_COLUMNS} FROM fact_log WHERE seq = ?", (seq,))
        return _logged_fact(row) if row else None

    async def list_decisions(
        self, rule_id: str | None = None, limit: int = 100, *, instance: str | None = None
    ) -> list[StoredDecision]:
        if rule_id is None:
            return await self._decisions("", (), limit)
        if instance is None:
            return await self._decisions("WHERE rule_id = ?", (rule_id,), limit)
        return await self._decisions(
            "WHERE rule_id = ? AND instance = ?", (rule_id, instance), limit
        )

    async def decision_of_firing(self, firing_id: str) -> StoredDecision | None:
        for decision in await self._decisions("WHERE firing_id = ?", (firing_id,), 1):
            return decision
        return None

    async def decision_log(
        self,
        after_id: int = 0,
        limit: int = 1000,
        *,
        evaluations: bool = True,
        quiet: bool = True,
        projects: Projects = None,
    ) -> list[StoredDecision]:
        visible, params = _visible("project", projects)
        where = f"WHERE id > ? AND {visible}"
        if not quiet:
            where += (
                " AND (trigger NOT IN ('fact', 'approval') OR firing_id IS NOT NULL"
                " OR notice_id IS NOT NULL)"
            )
        return await self._decisions(
            where, (after_id, *params), limit, oldest_first=True, evaluations=evaluations
        )

    async def fact_log_positions(self, decision_ids: Sequence[int]) -> dict[int, int]:
        if not decision_ids:
            return {}
        rows = await self._rows(
            "SELECT id, COALESCE(before, 0) FROM (SELECT id, MAX(CASE WHEN trigger IN"
            " ('fact', 'approval') THEN fact_seq END) OVER (ORDER BY id ROWS BETWEEN"
            " UNBOUNDED PRECEDING AND 1 PRECEDING) AS before FROM decisions WHERE id <= ?)"
            " WHERE id IN (SELECT value FROM json_each(?))",
            (max(decision_ids), _dumps(sorted(set(decision_ids)))),
        )
        return {int(r[0]): int(r[1]) for r in rows}

    async def actions_of_decisions(self, first_id: int, last_id: int) -> list[OutboxEntry]:
        rows = await self._rows(
            f"SELECT {_OUTBOX_COLUMNS} FROM {_OUTBOX_FROM}"
            " WHERE outbox.decision_id BETWEEN ? AND ?"
            " AND COALESCE(json_extract(outbox.payload, '$.alert'), '')"
            f" NOT IN ({', '.join(repr(a) for a in FOLLOW_UP_ALERTS)})"
            " ORDER BY outbox.decision_id, outbox.rowid",
            (first_id, last_id),
        )
        return [_outbox_entry(r) for r in rows]

    async def _decisions(
        self,
        where: str,
        params: tuple[Any, ...],
        limit: int,
        *,
        oldest_first: bool = False,
        evaluations: bool = True,
    ) -> list[StoredDecision]:
        rows = await self._rows(
            "SELECT id, decided_at, rule_id, rule_hash, ruleset_version, git_commit, trigger,"
            " fact_seq, outcome, gate_open,"
            f" {'evaluation' if evaluations else 'NULL'}, approvals, firing_id, request_id,"
            f" reason, instance, mode FROM decisions {where}"
            f" ORDER BY id {'ASC' if oldest_first else 'DESC'} LIMIT ?",
            (*params, limit),
        )
        stored = [json.loads(r[10]) if evaluations else {} for r in rows]
        data_of = await self._fact_data(
            {seq for evaluation in stored for seq in referenced_seqs(evaluation)}
        )
        return [
            StoredDecision(
                id=r[0],
                decided_at=parse_rfc3339(r[1]),
                rule_id=r[2],
                rule_hash=r[3],
                ruleset_version=r[4],
                git_commit=r[5],
                trigger=r[6],
                fact_seq=r[7],
                outcome=r[8],
                gate_open=bool(r[9]),
                evaluation=shown_evaluation(evaluation, data_of) if evaluations else {},
                approvals=json.loads(r[11]) if r[11] else None,
                firing_id=r[12],
                request_id=r[13],
                reason=r[14],
                instance=r[15],
                mode=r[16] or "live",
            )
            for r, evaluation in zip(rows, stored, strict=True)
        ]

    async def _fact_data(self, seqs: Iterable[int]) -> dict[int, Any]:
        """The data of the fact log entries ``seqs``, by seq."""
        wanted = sorted(seqs)
        data: dict[int, Any] = {}
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            rows = await self._rows(
                f"SELECT seq, data FROM fact_log WHERE seq IN ({', '.join('?' * len(chunk))})",
                chunk,
            )
            data.update((seq, json.loads(text)) for seq, text in rows)
        return data

    async def audit(self, query: AuditQuery) -> list[AuditEntry]:
        where, params = _audit_where(query)
        rows = await self._rows(
            "SELECT kind, id, at, rule_id, project, what, actor, reason, firing_id, fact_seq,"
            " request_id, trigger, instance, instances, rule_hash"
            f" FROM ({_AUDIT_UNION}) AS entries{where}"
            " ORDER BY at DESC, kind DESC, id DESC LIMIT ?",
            (*params, query.limit),
        )
        return [AuditEntry(r[0], r[1], parse_rfc3339(r[2]), *r[3:]) for r in rows]

    async def shadowed_releases(self) -> list[ShadowedReleases]:
        rows = await self._rows(
            "SELECT outbox.rule_id, decisions.rule_hash, json_extract(outbox.payload, '$.escrow'),"
            " json_extract(outbox.payload, '$.currency'), json_extract(outbox.payload, '$.amount'),"
            " outbox.action_id FROM outbox JOIN decisions ON decisions.id = outbox.decision_id"
            " WHERE outbox.status = 'shadowed' AND outbox.kind = 'release'"
            " ORDER BY outbox.created_at, outbox.action_id"
        )
        totals: dict[tuple[str, str, str, str], ShadowedReleases] = {}
        for rule_id, rule_hash, escrow, currency, amount, action_id in rows:
            key = (rule_id, rule_hash, escrow, currency)
            found = totals.get(key)
            if found is None:
                totals[key] = ShadowedReleases(
                    rule_id, rule_hash, escrow, currency, 1, Decimal(amount), action_id
                )
            else:
                totals[key] = replace(
                    found, count=found.count + 1, amount=found.amount + Decimal(amount)
                )
        return [totals[key] for key in sorted(totals)]

    async def release_record(self, release_id: str) -> ReleaseRecord | None:
        row = await self._row(
            "SELECT release_id, escrow, amount, currency, payee, rule_id, firing_id,"
            " recorded_at FROM ledger WHERE release_id = ?",
            (release_id,),
        )
        if row is None:
            return None
        release_id, escrow, amount, currency, payee, rule_id, firing_id, recorded_at = row
        return ReleaseRecord(
            release_id,
            escrow,
            amount,
            currency,
            payee,
            rule_id,
            firing_id,
            parse_rfc3339(recorded_at),
        )

    # -- RulesetReads -------------------------------------------------------------------

    async def list_rulesets(
        self, limit: int = 100, *, after: RulesetCursor | None = None
    ) -> list[RulesetSummary]:
        where = ""
        params: list[Any] = []
        if after is not None:
            at = format_rfc3339(after.last_activated_at)
            where = " WHERE (last_activated_at, version) < (?, ?)"
            params = [at, after.version]
        rows = await self._rows(
            "SELECT version, git_commit, first_activated_at, last_activated_at, files"
            f" FROM rulesets{where} ORDER BY last_activated_at DESC, version DESC LIMIT ?",
            (*params, limit),
        )
        return [
            RulesetSummary(
                r[0], r[1], parse_rfc3339(r[2]), parse_rfc3339(r[3]), sorted(json.loads(r[4]))
            )
            for r in rows
        ]

    async def get_ruleset(self, version: str) -> StoredRuleset | None:
        row = await self._row(
            f"SELECT {_RULESET_COLUMNS} FROM rulesets WHERE version = ?", (version,)
        )
        return await self._stored_ruleset(row) if row else None


_OUTBOX_COLUMNS = (
    "outbox.action_id, outbox.rule_id, outbox.firing_id, outbox.kind, outbox.target,"
    " outbox.payload, outbox.status, outbox.attempts, outbox.created_at,"
    " outbox.next_attempt_at, outbox.last_error, outbox.delivered_at, outbox.decision_id,"
    " outbox.requeued_at, outbox.attempts_at_requeue, decisions.request_id,"
    " outbox.dead_reason, outbox.dead_status, outbox.instance"
)
_OUTBOX_FROM = "outbox LEFT JOIN decisions ON decisions.firing_id = outbox.firing_id"
"""The outbox with each action's decision (firing_id is UNIQUE there), for the request id
that caused it."""


def _outbox_entry(r: Any) -> OutboxEntry:
    return OutboxEntry(
        action_id=r[0],
        rule_id=r[1],
        firing_id=r[2],
        kind=r[3],
        target=r[4],
        payload=json.loads(r[5]),
        status=r[6],
        attempts=int(r[7]),
        created_at=parse_rfc3339(r[8]),
        next_attempt_at=parse_rfc3339(r[9]),
        last_error=r[10],
        delivered_at=_time(r[11]),
        decision_id=int(r[12]),
        requeued_at=_time(r[13]),
        attempts_at_requeue=int(r[14]),
        request_id=r[15],
        dead_reason=r[16],
        dead_status=r[17],
        instance=r[18],
    )


_ZERO = Decimal("0.00")


def _figures(by_movement: dict[str, Decimal], unconfirmed: Decimal) -> EscrowFigures:
    """An escrow's figures from the sums of its movements (see ``EscrowFigures``; the
    ``fail`` of a release never sent is summed as ``fail_unsent``)."""

    def total(movement: str) -> Decimal:
        return by_movement.get(movement, _ZERO)

    return EscrowFigures(
        reserved=total("reserve")
        + total("reclaim")
        - total("send")
        - total("cancel")
        - total("fail_unsent"),
        sent=total("send") - total("settle") - total("fail"),
        settled=total("settle"),
        returned=total("return") - total("reclaim"),
        unconfirmed=unconfirmed,
    )


_MOVEMENT_SELECT = (
    "ledger_entries.id, ledger_entries.release_id, ledger_entries.escrow,"
    " ledger_entries.movement, ledger_entries.amount, ledger_entries.currency,"
    " ledger_entries.at, ledger_entries.actor, ledger_entries.reference, ledger_entries.reason"
)


def _movement(r: Any) -> LedgerMovement:
    return LedgerMovement(
        int(r[0]), r[1], r[2], r[3], r[4], r[5], parse_rfc3339(r[6]), r[7], r[8], r[9]
    )


def _insert_movement(
    db: sqlite3.Connection,
    release_id: str,
    escrow: str,
    movement: str,
    amount: str,
    currency: str,
    at: str,
    actor: str | None,
    reference: str | None,
    reason: str | None,
) -> int:
    """Write one ledger movement (on the writer thread); return its id. A movement a
    release already has is refused (``IntegrityError``: each at most once)."""
    cursor = db.execute(
        f"INSERT INTO ledger_entries ({_MOVEMENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (release_id, escrow, movement, amount, currency, at, actor, reference, reason),
    )
    return int(cursor.lastrowid or 0)


def _recorded_settlement(
    db: sqlite3.Connection, release_id: str, moved: set[str]
) -> Settlement | None:
    """The settlement recorded for ``release_id`` whose movements are ``moved`` (on the
    writer thread): ``settled`` or ``failed`` by its movements, or a failure reported for a
    cancelled release (no movement: the callback's outcome); None when none is."""
    if "settle" in moved:
        return "settled"
    if "fail" in moved:
        return "failed"
    row = db.execute(
        "SELECT 1 FROM settlement_callbacks WHERE release_id = ? AND outcome = 'failed'",
        (release_id,),
    ).fetchone()
    return None if row is None else "failed"


def _outbox_row(action: QueuedAction) -> tuple[Any, ...]:
    """The columns of ``_INSERT_FOLLOW_UP`` for ``action`` (all but its decision)."""
    return (
        action.action_id,
        action.rule_id,
        action.firing_id,
        action.kind,
        action.target,
        _dumps(action.payload),
        action.created_at,
        action.created_at,
        action.instance,
    )


_FACT_LOG_COLUMNS = "seq, project, kind, id, data, received_at, request_id, caused_by"


def _logged_fact(r: Any) -> LoggedFact:
    return LoggedFact(
        r[0],
        r[1],
        r[2],
        r[3],
        json.loads(r[4]),
        parse_rfc3339(r[5]),
        r[6],
        None if r[7] is None else json.loads(r[7]),
    )


_RULESET_COLUMNS = "version, files, git_commit, first_activated_at, last_activated_at"


def _write_approval(
    db: sqlite3.Connection, approval: ApprovalInput, now: str, request_id: str | None
) -> int:
    """Append ``approval`` to the fact log (kind ``approval``, id the approver) and set, or
    for ``withdraw`` remove, the approver's standing decision on the rule; return its seq."""
    data: dict[str, Any] = {
        "rule": approval.rule_id,
        "decision": approval.decision,
        "comment": approval.comment,
    }
    if approval.instance:
        data["instance"] = approval.instance
    cursor = db.execute(
        "INSERT INTO fact_log (project, kind, id, data, received_at, request_id)"
        " VALUES (?, 'approval', ?, ?, ?, ?)",
        (approval.project, approval.subject, _dumps(data), now, request_id),
    )
    seq = int(cursor.lastrowid or 0)
    if approval.decision == "withdraw":
        db.execute(
            "DELETE FROM approvals WHERE rule_id = ? AND instance = ? AND subject = ?",
            (approval.rule_id, approval.instance, approval.subject),
        )
    else:
        db.execute(
            "INSERT INTO approvals (rule_id, instance, subject, decision, comment, seq,"
            " decided_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (rule_id, instance, subject) DO UPDATE SET"
            " decision = excluded.decision, comment = excluded.comment,"
            " seq = excluded.seq, decided_at = excluded.decided_at",
            (
                approval.rule_id,
                approval.instance,
                approval.subject,
                approval.decision,
                approval.comment,
                seq,
                now,
            ),
        )
    return seq


_SEQS_OF_FACTS = (
    "SELECT facts.project, facts.kind, facts.id, facts.seq FROM json_each(?) AS keys"
    " CROSS JOIN facts ON facts.project = keys.value ->> 0 AND facts.kind = keys.value ->> 1"
    " AND facts.id = keys.value ->> 2"
)
"""The current ``seq`` of each ``[project, kind, id]`` of a JSON list, in one statement."""


class _Written:
    """Inside one write transaction (on the writer thread): the fact log ``seq`` of the
    current data of each fact key written or looked up so far, and the last ``seq``
    written; what a decision's references are made of (``gatekeeper.store.evidence``)."""

    __slots__ = ("db", "facts", "last")

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.facts: dict[FactKey, int] = {}
        self.last: int | None = None

    def decision_rows(
        self, decisions: Sequence[Decision], seqs: Sequence[int], request_id: str | None
    ) -> list[tuple[Any, ...]]:
        """The ``decisions`` rows of ``decisions`` (their evaluations by reference, their
        approvals as JSON text). The ``seq`` of the facts they read by id that this
        transaction has not written (usually none: a rule mostly reads the fact that
        triggered it) are looked up in one statement."""
        unresolved: Unresolved = []
        stored = [
            stored_evaluation(
                d.evaluation,
                d.project,
                self.facts,
                unresolved,
                self.as_of,
                (d.item_kind, d.instance) if d.item_kind else None,
            )
            for d in decisions
        ]
        if unresolved:
            keys = sorted({key for _, _, key in unresolved})
            for project, kind, fact_id, seq in self.db.execute(_SEQS_OF_FACTS, (_dumps(keys),)):
                self.facts[(project, kind, fact_id)] = seq
            resolve(unresolved, self.facts)
        return [
            _decision_row(d, evaluation, seqs, request_id)
            for d, evaluation in zip(decisions, stored, strict=True)
        ]

    def as_of(self) -> int:
        """The fact log's last ``seq`` (0 for an empty log)."""
        if self.last is None:
            row = self.db.execute("SELECT MAX(seq) FROM fact_log").fetchone()
            self.last = int(row[0] or 0)
        return self.last


def _decision_row(
    d: Decision, evaluation: dict[str, Any], seqs: Sequence[int], request_id: str | None
) -> tuple[Any, ...]:
    """The ``decisions`` row of ``d`` with its stored ``evaluation`` (as JSON text)."""
    return (
        d.decided_at,
        d.rule_id,
        d.rule_hash,
        d.ruleset_version,
        d.git_commit,
        d.trigger,
        seqs[d.fact_index] if d.fact_index is not None else None,
        d.outcome,
        d.gate_open,
        _dumps(evaluation),
        _dumps(d.approvals) if d.approvals is not None else None,
        d.firing_id,
        request_id,
        d.reason,
        d.project or None,
        d.instance,
        d.notice_id,
        None if d.mode == "live" else d.mode,
    )


def _write_ruleset(db: sqlite3.Connection, ruleset: Ruleset, now: str) -> None:
    """Record the activation of ``ruleset``: a version seen before gets its new
    ``last_activated_at`` and git commit; a new one its row, file name -> content hash, and
    the text of each file not stored yet (each text once per content hash, whatever the
    number of versions holding it)."""
    cursor = db.execute(
        "UPDATE rulesets SET last_activated_at = ?, git_commit = ? WHERE version = ?",
        (now, ruleset.git_commit, ruleset.version),
    )
    if cursor.rowcount == 0:
        hashes = {name: content_hash(text) for name, text in ruleset.files.items()}
        stored = {
            h
            for (h,) in db.execute(
                "SELECT content_hash FROM ruleset_files WHERE content_hash IN"
                " (SELECT value FROM json_each(?))",
                (_dumps(sorted(set(hashes.values()))),),
            )
        }
        db.executemany(
            "INSERT INTO ruleset_files (content_hash, text) VALUES (?, ?)"
            " ON CONFLICT (content_hash) DO NOTHING",
            [(h, ruleset.files[name]) for name, h in hashes.items() if h not in stored],
        )
        db.execute(
            "INSERT INTO rulesets (version, files, git_commit, first_activated_at,"
            " last_activated_at) VALUES (?, ?, ?, ?, ?)",
            (ruleset.version, _dumps(hashes), ruleset.git_commit, now, now),
        )
    db.execute(
        "INSERT INTO meta (key, value) VALUES ('active_ruleset', ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (ruleset.version,),
    )
