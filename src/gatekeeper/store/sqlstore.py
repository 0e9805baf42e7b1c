"""What the SQL backends of the Store contract share: the SQL text, the row -> record
mapping, the write bodies run inside one transaction, and the translation of the query
types (``_outbox_where``, ``_audit_where``, ``_visible``), written once.

``SqlStore`` implements every method of the contract but opening and closing over the
primitives a backend gives: ``_read`` (a read, on the event loop, seeing only committed
data), ``_begin``/``_commit``/``_rollback`` (on the backend's ``WriterThread``: a whole
write transaction is one call, ``_transact``, running a write body on a ``Tx``) and
``_store_error`` (a driver error as the ``StoreError`` family). The SQL is written with
``?`` placeholders; what differs between the backends' SQL is a ``Dialect``: how a field of
a JSON text column is read, how a JSON list parameter becomes rows, and what orders the
outbox as it was queued. The backends: ``gatekeeper.store.sqlite`` and
``gatekeeper.store.postgresql``.

Times are RFC 3339 text in UTC with milliseconds (``format_rfc3339``: fixed width, so the
text sorts as the time does; PostgreSQL's text columns are ``COLLATE "C"``, byte order, as
SQLite compares) in the columns, aware ``datetime``s at the interface: the same columns,
comparisons and keyset cursors on both backends. JSON (facts, payloads, evaluations) is
stored as its canonical text (``canonical_json``) on both, read back exactly as written.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, ClassVar, Protocol, TypeVar

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
    AttemptInFlight,
    Conflict,
    KeyReused,
    RulesetChanged,
    SchemaTooNew,
    StateBehind,
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
from gatekeeper.store.queries import AuditQuery, OutboxFilter, Projects
from gatekeeper.store.records import (
    ActionStatus,
    Attempt,
    AttemptRecord,
    AuditEntry,
    CancelRequest,
    CaughtUpDecision,
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
    StateChanges,
    StateCursor,
    StateFence,
    StoredDecision,
    StoredFact,
    StoredRuleset,
    canonical_json,
)
from gatekeeper.store.writer_thread import WriterThread

_dumps = canonical_json


SQLITE_MAX_PARAMS = 32_766
"""Parameters a SQLite statement may have (``SQLITE_MAX_VARIABLE_NUMBER`` since 3.32)."""
POSTGRESQL_MAX_PARAMS = 65_535
"""Parameters a PostgreSQL statement may have (the protocol counts them in 16 bits)."""


@dataclass(frozen=True)
class Dialect:
    """What the SQL of one backend writes differently (every template has ``{column}``,
    ``{key}`` or ``{param}`` holes).

    ``field``: a text field of the JSON text in ``column`` (NULL when absent);
    ``rows``: the elements of a JSON list parameter as rows of one column ``value`` (JSON
    values), ``texts``/``ints``: a sub-select of its elements as text or integers;
    ``queued``: the column ordering the outbox in the order its entries were written;
    ``ordered_join``: an inner join whose left side drives the loop (SQLite's ``CROSS
    JOIN`` hint; PostgreSQL plans joins itself); ``notify_ruleset``: the statement run in
    the transaction activating a ruleset, its version the parameter (PostgreSQL: a
    ``NOTIFY`` on ``RULESET_CHANNEL``, sent only if the transaction commits; empty on
    SQLite, whose file one daemon writes); ``lock_shared``: the clause a SELECT ends with to
    hold its rows against updates until the transaction ends (SQLite: none, one writer);
    ``claim_lock``: what ends the select of
    the outbox rows a delivery claim takes, so that writers claiming together take
    disjoint rows (PostgreSQL's ``FOR UPDATE ... SKIP LOCKED``; SQLite has one writer);
    ``snapshot``: the first statement of a transaction whose reads must all see one
    snapshot (a catch-up, ``state_changes``: PostgreSQL's ``REPEATABLE READ``; SQLite's
    ``BEGIN IMMEDIATE`` transaction sees no other writer anyway); ``max_params``: the
    most parameters one statement may have.
    """

    name: str
    field_sql: str
    rows_sql: str
    texts_sql: str
    ints_sql: str
    queued: str
    ordered_join: str
    notify_ruleset: str = ""
    lock_shared: str = ""
    claim_lock: str = ""
    snapshot: str = ""
    max_params: int = SQLITE_MAX_PARAMS

    def field(self, column: str, key: str) -> str:
        """``key`` of the JSON object in ``column``, as text."""
        return self.field_sql.format(column=column, key=key)

    def rows(self, param: str = "?") -> str:
        """A table source of the elements of the JSON list ``param`` (column ``value``)."""
        return self.rows_sql.format(param=param)

    def texts(self, param: str = "?") -> str:
        """A sub-select of the text elements of the JSON list ``param``."""
        return self.texts_sql.format(param=param)

    def ints(self, param: str = "?") -> str:
        """A sub-select of the integer elements of the JSON list ``param``."""
        return self.ints_sql.format(param=param)


RULESET_CHANNEL = "gatekeeper_ruleset"
"""The notification channel a ruleset's activation is announced on (payload: its version)."""

_EACH = "SELECT value FROM json_each({param})"
SQLITE = Dialect(
    "sqlite", "json_extract({column}, '$.{key}')", "json_each({param})", _EACH, _EACH,
    "outbox.rowid", "CROSS JOIN",
)  # fmt: skip
_TEXTS = "jsonb_array_elements_text({param}::jsonb) AS value"
POSTGRESQL = Dialect(
    "postgresql", "({column}::jsonb ->> '{key}')", "jsonb_array_elements({param}::jsonb)",
    f"SELECT value FROM {_TEXTS}", f"SELECT value::bigint FROM {_TEXTS}", "outbox.queued",
    "JOIN", f"SELECT pg_notify('{RULESET_CHANNEL}', ?)", " FOR SHARE",
    " FOR UPDATE OF outbox SKIP LOCKED",
    "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY", POSTGRESQL_MAX_PARAMS,
)  # fmt: skip


class Cursor(Protocol):
    """What a write body reads back from a statement."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Tx(Protocol):
    """The open write transaction a write body runs in (on the writer thread): SQL with
    ``?`` placeholders. A stdlib ``sqlite3.Connection`` is one."""

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Cursor: ...

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> object: ...


def newer_schema(database: str, version: int, known: int, advice: str) -> SchemaTooNew:
    """The refusal of database ``database`` of schema ``version``, above the ``known``
    one: a newer gatekeeper wrote it (``advice``: what to do)."""
    return SchemaTooNew(
        f"database {database} has schema version {version}, newer than this gatekeeper "
        f"knows ({known}); {advice}"
    )


def older_schema(database: str, version: int, known: int) -> StoreUnavailable:
    """The refusal to read (read-only: never migrated) database ``database`` of schema
    ``version``, below the ``known`` one."""
    return StoreUnavailable(
        f"database {database} has schema version {version}, older than this gatekeeper's "
        f"({known}); it is read only as it is: start gatekeeper serve on it once to "
        "upgrade it"
    )


def insert_id(db: Tx, sql: str, params: Sequence[Any], column: str) -> int:
    """Run the INSERT of one row ``sql`` and return the ``column`` it was given (its
    generated id): ``INSERT ... RETURNING``, which both backends have."""
    row = db.execute(f"{sql} RETURNING {column}", params).fetchall()[0]
    return int(row[0])


def content_hash(text: str) -> str:
    """The content hash a ruleset file's text is kept under: SHA-256 (hex) of its UTF-8."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


T = TypeVar("T")


def _in(column: str, values: Iterable[str]) -> tuple[str, list[Any]]:
    """``column IN (?, ...)`` and its parameters (``FALSE`` for no value)."""
    listed = list(values)
    if not listed:
        return "FALSE", []
    return f"{column} IN ({', '.join('?' * len(listed))})", listed


def _visible(column: str, projects: Projects) -> tuple[str, list[Any]]:
    """The clause keeping rows whose project (``column``) ``projects`` may see: no project,
    or one of them. ``TRUE`` when every project is visible."""
    if projects is None:
        return "TRUE", []
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
    if only.ids is not None:
        clause, listed = _in("outbox.action_id", only.ids)
        where += f" AND {clause}"
        params += listed
    return where, params


_DUE_AT = (
    "CASE WHEN outbox.lease_until > outbox.next_attempt_at THEN outbox.lease_until"
    " ELSE outbox.next_attempt_at END"
)
"""When a pending action falls due for any daemon: its ``next_attempt_at``, or the end of
the lease a daemon claimed it with when that is later (NULL lease: never later)."""


@functools.cache
def _audit_union(d: Dialect) -> str:
    """Every audit entry in one shape. ``scope`` is the project that decides who may see
    the entry: its own, or for an act on an action stored without one (``retry_action``),
    the action's project."""
    return (
        "SELECT 'decision' AS kind, id, decided_at AS at, rule_id, project, outcome AS what,"
        " NULL AS actor, reason, firing_id, fact_seq, request_id, trigger, project AS scope,"
        " instance, NULL AS instances, NULL AS rule_hash FROM decisions"
        " UNION ALL SELECT 'admin_act', id, at, subject, project, act, actor, reason, NULL, NULL,"
        " NULL, NULL, COALESCE(project, CASE WHEN act = 'retry_action' THEN"
        f" (SELECT {d.field('outbox.payload', 'project')} FROM outbox"
        " WHERE outbox.action_id = admin_acts.subject) END), instance, instances, rule_hash"
        " FROM admin_acts"
        f" UNION ALL SELECT 'approval', seq, received_at, {d.field('data', 'rule')}, project,"
        f" {d.field('data', 'decision')}, id, {d.field('data', 'comment')}, NULL, seq,"
        f" request_id, NULL, project, COALESCE({d.field('data', 'instance')}, ''), NULL, NULL"
        " FROM fact_log WHERE kind = 'approval'"
    )


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
    """An INSERT of many rows in one statement: ``head VALUES row, row, ... tail``, as many
    rows per statement as the backend's parameter limit lets in (one ``sqlite3_step``,
    where ``executemany`` steps, and gives the GIL away and back, once per row; one round
    trip to a PostgreSQL server). Rows go in in order, so ids are given in order. An
    upsert gets each key once (PostgreSQL refuses to change one row twice in a
    statement)."""

    head: str
    row: str
    tail: str = ""

    MAX_ROWS: ClassVar[int] = 5_000
    """Rows per statement at most, whatever the parameter limit (a bound on the text of a
    statement; a group commit's tables have far fewer rows)."""

    def run(
        self, db: Tx, rows: Sequence[tuple[Any, ...]], max_params: int = SQLITE_MAX_PARAMS
    ) -> None:
        """Insert ``rows`` (tuples in the order of ``row``'s parameters), in statements of
        at most ``max_params`` parameters and ``MAX_ROWS`` rows."""
        per = max(1, min(self.MAX_ROWS, max_params // self.row.count("?")))
        for start in range(0, len(rows), per):
            chunk = rows[start : start + per]
            db.execute(_values_sql(self, len(chunk)), list(itertools.chain.from_iterable(chunk)))


@functools.lru_cache(maxsize=1024)
def _values_sql(insert: _Insert, rows: int) -> str:
    """The text of ``insert`` with ``rows`` rows (the sizes in use, not every size a
    group may reach, stay cached)."""
    return f"{insert.head} VALUES {', '.join([insert.row] * rows)}{insert.tail}"


_INSERT_FACT_LOG = _Insert(
    "INSERT INTO fact_log (seq, project, kind, id, data, received_at, request_id, caused_by)",
    "(?, ?, ?, ?, ?, ?, ?, ?)",
)
"""Fact log entries with their ``seq``: the next after the last (``_Written.next_seq``), so
the log has no hole where a transaction rolled back (a sequence generator's numbers would
be lost), its order is the commit order, and a transition's facts go in together."""
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
_RULE_STATE_UPSERT = (
    " ON CONFLICT (rule_id, instance) DO UPDATE SET"
    " gate_open = excluded.gate_open, fired_count = excluded.fired_count,"
    " last_fired_at = excluded.last_fired_at, rule_hash = excluded.rule_hash,"
    " paused = excluded.paused, rearms = excluded.rearms,"
    " notified = excluded.notified, notices = excluded.notices,"
    " signoff_alerted = excluded.signoff_alerted,"
    " blocked = excluded.blocked, blocks = excluded.blocks"
)
_UPSERT_RULE_STATES = _Insert(
    "INSERT INTO rule_state (rule_id, instance, gate_open, fired_count, last_fired_at,"
    " rule_hash, paused, rearms, notified, notices, signoff_alerted, blocked, blocks)",
    "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    _RULE_STATE_UPSERT,
)
_UPSERT_RULE_STATES_AT = _Insert(
    "INSERT INTO rule_state (rule_id, instance, gate_open, fired_count, last_fired_at,"
    " rule_hash, paused, rearms, notified, notices, signoff_alerted, blocked, blocks,"
    " version)",
    "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    _RULE_STATE_UPSERT + ", version = excluded.version",
)
"""Rule states written by a checked deciding write (``StateFence``), with its state
version: what a catch-up reads (``state_changes``). Unchecked writes (a SQLite file's one
daemon) use ``_UPSERT_RULE_STATES`` and leave the version as it was."""
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


_INSERT_IDEMPOTENCY = _Insert(
    "INSERT INTO idempotency_keys (key, request_hash, seqs, request_id, created_at)",
    "(?, ?, ?, ?, ?)",
)
_INSERT_ATTEMPTS = _Insert(
    "INSERT INTO delivery_attempts (action_id, attempt, started_at, latency_ms,"
    " status_code, error)",
    "(?, ?, ?, ?, ?, ?)",
)


class SqlStore(ABC):
    """The Store contract over SQL, but for opening and closing (see the module): a
    backend subclasses it with its ``dialect``, its driver's error class and the
    primitives. Writes go to ``_writer`` (set while open for writing); ``_written`` follows
    the fact log through the write transaction in progress (on the writer thread)."""

    dialect: ClassVar[Dialect]
    shared: ClassVar[bool] = False
    """Whether other daemons may serve this database (``StoreLifecycle.shared``)."""
    driver_error: ClassVar[type[Exception]]
    """The root of the driver's exceptions (``_store_error`` translates them)."""

    def __init__(self, *, read_only: bool) -> None:
        self._read_only = read_only
        """Opened for reading only (``open_store(read_only=True)``): no writer."""
        self._writer: WriterThread | None = None
        self._written: _Written | None = None
        """The fact log as written so far by the transaction in progress, and the rows it
        has still to insert (writer thread)."""
        self._state_version: int | None = None
        """The state version the checked write in progress commits (``_fenced``; writer
        thread): its rule states are stamped with it. None: an unchecked write."""

    @property
    @abstractmethod
    def is_open(self) -> bool:
        """Whether ``open`` succeeded and ``close`` has not been called since."""

    @property
    @abstractmethod
    def name(self) -> str:
        """The database for messages: a file path, or a host and database name (never a
        password)."""

    @abstractmethod
    async def _read(self, sql: str, params: Sequence[Any]) -> list[Any]:
        """Every row of a read query (committed data only), on the event loop. Raises
        ``StoreUnavailable`` when the store is not open, driver errors as they are."""

    async def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Every row of a read query; driver errors leave as the ``StoreError`` family."""
        try:
            return await self._read(sql, params)
        except self.driver_error as exc:
            raise self._store_error(exc) from exc

    async def _row(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """The row of a read query of one row at most, or None."""
        rows = await self._rows(sql, params)
        return rows[0] if rows else None

    @abstractmethod
    def _begin(self) -> Tx:
        """On the writer thread: begin a write transaction on the writer connection and
        return it. Raises ``StoreUnavailable`` when the store is not open."""

    @abstractmethod
    def _commit(self) -> None:
        """On the writer thread: commit the transaction ``_begin`` began."""

    @abstractmethod
    def _rollback(self) -> None:
        """On the writer thread: roll the transaction back if it is still open; never
        raises (the error that caused it is the one to report)."""

    def _transact(self, body: Callable[[Tx], T]) -> T:
        """On the writer thread: begin, ``body``, commit. On any error the transaction is
        rolled back and the original exception is raised, never one from the rollback."""
        db = self._begin()
        try:
            result = body(db)
            self._commit()
        except BaseException:
            self._rollback()
            raise
        return result

    @abstractmethod
    def _store_error(self, exc: Exception) -> StoreError:
        """The contract's error for a driver error ``exc`` (a ``driver_error``)."""

    async def _transaction(self, body: Callable[[Tx], T]) -> T:
        """Run ``body(transaction)`` as one whole transaction on the writer thread, in one
        round trip, and return its result (see ``_transact``). Driver errors leave as the
        ``StoreError`` family.

        Once queued the transaction runs to its end (COMMIT or ROLLBACK) whatever happens
        to the awaiting task: a cancelled caller cannot leave it half done.
        """
        if self._writer is None:
            if self._read_only and self.is_open:
                raise StoreUnavailable(f"database {self.name} is open read-only", "read_only")
            raise StoreUnavailable("store is not open")
        try:
            return await self._writer.run(self._transact, body)
        except self.driver_error as exc:
            raise self._store_error(exc) from exc

    async def ping(self) -> None:
        await self._rows("SELECT 1")

    # -- StateStore ---------------------------------------------------------------------

    async def commit_transition(self, transition: Transition) -> list[int]:
        return (await self.commit_transitions([transition]))[0]

    async def commit_transitions(
        self,
        transitions: Sequence[Transition],
        *,
        planned_with: str | None = None,
        fence: StateFence | None = None,
    ) -> list[list[int]]:
        transitions = list(transitions)

        def write(db: Tx) -> list[list[int]]:
            if planned_with is not None:
                _check_active_ruleset(db, self.dialect, planned_with)
            return self._write_transitions(db, transitions)

        return await self._fenced(fence, write)

    async def _fenced(self, fence: StateFence | None, body: Callable[[Tx], T]) -> T:
        """``_transaction(body)``, checked against ``fence`` when given (a deciding write on
        a database several daemons share, see ``StateFence``): the transaction first takes
        the ``state_version`` row (``_take_version``: every checked write of every daemon
        waits for the one in progress) and raises ``StateBehind``, writing nothing, unless
        the database is at ``fence.cursor.version``; it then runs ``body`` with the new
        version (stamped on the rule states written) and reads the position it reached.
        ``fence.cursor`` moves there once the COMMIT succeeded, not otherwise.

        The version is global, one for the database, not one per project: every deciding
        write of every project commits in turn. Per project would let projects decide in
        parallel, but the escrows are shared across projects (a release of one project's
        rule counts against an escrow another project's rules release from too), so a
        project lock would need every escrow row a firing may touch locked as well, in one
        order, and a catch-up per project: a throughput refinement, not needed for what one
        database of gatekeeper decides per second."""
        if fence is None:
            return await self._transaction(body)
        expected = fence.cursor.version

        def checked(db: Tx) -> tuple[T, StateCursor]:
            self._await_turn(db)
            self._state_version = _take_version(db, expected)
            try:
                result = body(db)
            finally:
                self._state_version = None
            return result, _read_cursor(db)

        result, cursor = await self._transaction(checked)
        fence.cursor = cursor
        return result

    def _await_turn(self, db: Tx) -> None:
        """Inside a checked write, first: wait while another daemon holds the decision
        turn (``take_turn``). A database one daemon serves has none."""
        return None

    async def take_turn(self) -> None:
        return None

    async def end_turn(self) -> None:
        return None

    async def state_cursor(self) -> StateCursor:
        return _cursor_of(await self._row(_CURSOR))

    async def state_changes(self, since: StateCursor) -> StateChanges:
        snapshot = self.dialect.snapshot
        texts = self.dialect.texts()
        approvals_of = _approvals_of(self.dialect)

        def read(db: Tx) -> StateChanges:
            if snapshot:
                db.execute(snapshot)
            cursor = _read_cursor(db)
            facts: list[tuple[FactKey, dict[str, Any]]] = []
            keys: set[InstanceKey] = set()
            if cursor.fact_seq > since.fact_seq:
                for project, kind, fact_id, data in db.execute(
                    "SELECT project, kind, id, data FROM fact_log WHERE seq > ? AND seq <= ?"
                    " ORDER BY seq",
                    (since.fact_seq, cursor.fact_seq),
                ):
                    loaded = json.loads(data)
                    if kind == "approval":  # an approver's decision, logged with the facts
                        keys.add((loaded["rule"], loaded.get("instance", "")))
                    else:
                        facts.append(((project, kind, fact_id), loaded))
            states: dict[InstanceKey, RuleState] = {}
            if cursor.version > since.version:
                for r in db.execute(  # bounded: a range the planner takes by the index
                    f"SELECT {_RULE_STATE_COLUMNS} FROM rule_state"
                    " WHERE version > ? AND version <= ?",
                    (since.version, cursor.version),
                ):
                    state = _rule_state(r)
                    states[(state.rule_id, state.instance)] = state
            keys.update(states)
            standing: StandingApprovals = {}
            if keys:
                for rule_id, instance in keys:
                    standing[f"{rule_id}[{instance}]" if instance else rule_id] = {}
                for rule_id, instance, subject, decision, decided_at in db.execute(
                    approvals_of, (_dumps(sorted(keys)),)
                ):
                    key = f"{rule_id}[{instance}]" if instance else rule_id
                    standing[key][subject] = Stand(decision, parse_rfc3339(decided_at))
            signoffs = [
                _signoff(r)
                for r in db.execute(
                    f"SELECT {_SIGNOFF_COLUMNS} FROM admin_acts WHERE act = 'signoff'"
                    " AND id > ? AND id <= ? ORDER BY id",
                    (since.signoff_id, cursor.signoff_id),
                )
            ]
            escrows: dict[str, Decimal] = {}
            if cursor.ledger_id > since.ledger_id:
                changed = sorted(
                    escrow
                    for (escrow,) in db.execute(
                        "SELECT DISTINCT escrow FROM ledger_entries WHERE id > ? AND id <= ?"
                        f" AND movement IN {_COMMITTED_MOVEMENTS}",
                        (since.ledger_id, cursor.ledger_id),
                    )
                )
                sums = db.execute(
                    _escrow_sums(f" WHERE escrow IN ({texts})"), (_dumps(changed),)
                ).fetchall()
                totals = _escrow_figures(sums, [])
                escrows = {e: totals[e].committed if e in totals else _ZERO for e in changed}
            decisions = [
                CaughtUpDecision(r[0] or "", *r[1:])
                for r in db.execute(
                    "SELECT project, decided_at, rule_id, instance, outcome, trigger, reason"
                    " FROM decisions WHERE id > ? AND id <= ? ORDER BY id",
                    (since.decision_id, cursor.decision_id),
                )
            ]
            return StateChanges(cursor, facts, states, standing, signoffs, escrows, decisions)

        return await self._transaction(read)

    def _write_then(self, db: Tx, t: Transition) -> None:
        """Inside a ledger write's transaction: the transition its return decided."""
        self._write_transitions(db, [t])

    def _write_transitions(self, db: Tx, transitions: Sequence[Transition]) -> list[list[int]]:
        """On the writer thread, inside the open transaction: write everything
        ``transitions`` change, in their order; return each one's sequence numbers
        (``_write_transition``). Their rows of the tables every ingest writes go in
        together at the end (``_Written.flush``), one statement per table: the same rows
        with the same sequence numbers and ids as written one transition after another."""
        self._written = written = _Written(db, self.dialect)
        try:
            seqs = [self._write_transition(db, t) for t in transitions]
            written.flush(self._state_version)
        finally:
            self._written = None
        return seqs

    def _write_transition(self, db: Tx, t: Transition) -> list[int]:
        """Inside ``_write_transitions``: write everything ``t`` changes (fact log, facts,
        approvals, admin acts, ruleset, decisions, rule states, outbox, ledger, idempotency
        key), its rows of the tables ``self._written`` gathers left there for its
        ``flush``; return the facts' (and approvals') sequence numbers."""
        written = self._written
        assert written is not None, "a transition is written by _write_transitions"
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
        log_rows = written.log_rows
        fact_rows = written.fact_rows
        for fact in t.facts:
            data = _dumps(fact.data)
            caused_by = fact.caused_by
            seq = written.next_seq()
            log_rows.append(
                (
                    seq,
                    fact.project,
                    fact.kind,
                    fact.id,
                    data,
                    now,
                    request_id,
                    None if caused_by is None else _dumps(caused_by_json(caused_by)),
                )
            )
            seqs.append(seq)
            key = (fact.project, fact.kind, fact.id)
            fact_rows[key] = (*key, data, seq, now)
            written.facts[key] = seq
        for approval in t.approvals:
            seqs.append(_write_approval(db, written.next_seq(), approval, now, request_id))
        if t.consumed:
            db.executemany(
                "DELETE FROM approvals WHERE rule_id = ? AND instance = ? AND subject = ?"
                " AND decision = 'approve'",
                [(c.rule_id, c.instance, s) for c in t.consumed for s in c.subjects],
            )
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
            _write_ruleset(db, self.dialect, t.ruleset, now)
        if t.decisions:
            written.decisions.extend(written.decision_rows(t.decisions, seqs, request_id))
        for (rule_id, instance), s in t.rule_states.items():
            written.rule_states[(rule_id, instance)] = (
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
        written.outbox.extend(
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
        )
        for e in t.ledger:
            written.ledger.append(
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
            )
            written.movements.append(
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
            )
        if t.idempotency is not None:
            written.idempotency.append(
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
                )
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

        def purge(db: Tx) -> int:
            cursor = db.execute("DELETE FROM idempotency_keys WHERE created_at < ?", (cutoff,))
            return int(cursor.rowcount)

        return await self._transaction(purge)

    async def load_facts(self) -> dict[FactKey, dict[str, Any]]:
        rows = await self._rows("SELECT project, kind, id, data FROM facts")
        return {(r[0], r[1], r[2]): json.loads(r[3]) for r in rows}

    async def load_rule_states(self) -> dict[InstanceKey, RuleState]:
        rows = await self._rows(f"SELECT {_RULE_STATE_COLUMNS} FROM rule_state")
        return {(r[0], r[7]): _rule_state(r) for r in rows}

    async def load_signoffs(self) -> SignedOff:
        signed: SignedOff = {}
        for r in await self._rows(
            f"SELECT {_SIGNOFF_COLUMNS} FROM admin_acts WHERE act = 'signoff' ORDER BY id"
        ):
            signoff = _signoff(r)
            signed.setdefault(signoff.content_hash, {})[signoff.actor] = signoff
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
        sums = await self._rows(_escrow_sums(""))
        dead = await self._rows(
            "SELECT ledger.escrow, ledger.amount, COUNT(*) FROM ledger"
            " JOIN outbox ON outbox.action_id = ledger.release_id"
            " WHERE outbox.status = 'dead' GROUP BY ledger.escrow, ledger.amount"
        )
        return _escrow_figures(sums, dead)

    async def last_ruleset(self) -> StoredRuleset | None:
        row = await self._row(
            f"SELECT {_RULESET_COLUMNS} FROM rulesets"
            " WHERE version = (SELECT value FROM meta WHERE key = 'active_ruleset')"
        )
        return await self._stored_ruleset(row) if row else None

    async def active_ruleset_version(self) -> str | None:
        row = await self._row("SELECT value FROM meta WHERE key = 'active_ruleset'")
        return None if row is None else str(row[0])

    async def ruleset_changes(self) -> AsyncGenerator[str, None]:
        return
        yield  # pragma: no cover - a generator that ends at once

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

    async def claim_due(
        self,
        now: datetime,
        limit: int,
        *,
        daemon_id: str,
        lease_s: float,
        only: OutboxFilter | None = None,
    ) -> list[OutboxEntry]:
        at = format_rfc3339(now)
        until = format_rfc3339(now + timedelta(seconds=lease_s))
        where, params = _outbox_where(only)
        select = (
            f"SELECT {_OUTBOX_COLUMNS}, outbox.claimed_by, outbox.lease_until"
            f" FROM {_OUTBOX_FROM}"
            " WHERE outbox.status = 'pending' AND outbox.next_attempt_at <= ?"
            " AND (outbox.lease_until IS NULL OR outbox.lease_until <= ?"
            f" OR outbox.claimed_by = ?){where}"
            f" ORDER BY outbox.next_attempt_at, outbox.action_id LIMIT ?{self.dialect.claim_lock}"
        )

        def claim(db: Tx) -> list[OutboxEntry]:
            rows = db.execute(select, (at, at, daemon_id, *params, limit)).fetchall()
            if not rows:
                return []
            ids, id_params = _in("action_id", [r[0] for r in rows])
            db.execute(
                f"UPDATE outbox SET claimed_by = ?, lease_until = ? WHERE {ids}",
                (daemon_id, until, *id_params),
            )
            return [_claimed_entry(r, daemon_id) for r in rows]

        return await self._transaction(claim)

    async def next_attempt_at(self, *, only: OutboxFilter | None = None) -> datetime | None:
        where, params = _outbox_where(only)
        row = await self._row(
            f"SELECT MIN({_DUE_AT}) FROM outbox WHERE status = 'pending'{where}", params
        )
        return _time(row[0]) if row else None

    async def begin_attempt(
        self, action_id: str, at: datetime, *, daemon_id: str | None = None
    ) -> bool:
        started = format_rfc3339(at)
        sql = "UPDATE outbox SET attempt_started_at = ? WHERE action_id = ? AND status = 'pending'"
        params: tuple[Any, ...] = (started, action_id)
        if daemon_id is not None:
            sql += " AND (claimed_by IS NULL OR claimed_by = ? OR lease_until <= ?)"
            params += (daemon_id, started)

        def begin(db: Tx) -> bool:
            cursor = db.execute(sql, params)
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

        def record(db: Tx) -> None:
            _INSERT_ATTEMPTS.run(db, attempts)
            db.executemany(
                "UPDATE outbox SET status = ?, attempts = ?, last_error = ?,"
                " next_attempt_at = COALESCE(?, next_attempt_at), delivered_at = ?,"
                " dead_reason = ?, dead_status = ?, attempt_started_at = NULL,"
                " claimed_by = NULL, lease_until = NULL"
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
        where, params = _visible(self.dialect.field("outbox.payload", "project"), projects)
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

        def requeue(db: Tx) -> bool:
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
        self, cancel: CancelRequest, *, fence: StateFence | None = None
    ) -> tuple[OutboxEntry, list[LedgerMovement]] | None:
        now = format_rfc3339(cancel.at)
        release_id = cancel.release_id

        def write(db: Tx) -> list[int] | None:
            row = db.execute(
                "SELECT kind, status, attempt_started_at,"
                f" {self.dialect.field('payload', 'project')}"
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

        ids = await self._fenced(fence, write)
        if ids is None:
            return None
        entry = await self.get_action(release_id)
        assert entry is not None
        return entry, await self._movements_by_id(ids)

    async def settle_release(
        self, callback: SettlementCallback, *, fence: StateFence | None = None
    ) -> SettlementResult | None:
        now = format_rfc3339(callback.at)
        release_id = callback.release_id

        def write(db: Tx) -> tuple[list[int], bool] | None:
            row = db.execute(
                "SELECT ledger.escrow, ledger.amount, ledger.currency, outbox.status,"
                " outbox.attempt_started_at, outbox.dead_reason, outbox.dead_status,"
                f" {self.dialect.field('outbox.payload', 'project')}"
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

        written = await self._fenced(fence, write)
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
                self.dialect.field("outbox.payload", "project"), projects
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
            f" WHERE {where} ORDER BY facts.project, facts.kind, facts.id"
            + ("" if limit is None else " LIMIT ?"),
            params if limit is None else (*params, limit),
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
            f" AS positions WHERE id IN ({self.dialect.ints()})",
            (max(decision_ids), _dumps(sorted(set(decision_ids)))),
        )
        return {int(r[0]): int(r[1]) for r in rows}

    async def actions_of_decisions(self, first_id: int, last_id: int) -> list[OutboxEntry]:
        rows = await self._rows(
            f"SELECT {_OUTBOX_COLUMNS} FROM {_OUTBOX_FROM}"
            " WHERE outbox.decision_id BETWEEN ? AND ?"
            f" AND COALESCE({self.dialect.field('outbox.payload', 'alert')}, '')"
            f" NOT IN ({', '.join(repr(a) for a in FOLLOW_UP_ALERTS)})"
            f" ORDER BY outbox.decision_id, {self.dialect.queued}",
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
            f" FROM ({_audit_union(self.dialect)}) AS entries{where}"
            " ORDER BY at DESC, kind DESC, id DESC LIMIT ?",
            (*params, query.limit),
        )
        return [AuditEntry(r[0], r[1], parse_rfc3339(r[2]), *r[3:]) for r in rows]

    async def shadowed_releases(self) -> list[ShadowedReleases]:
        field = self.dialect.field
        rows = await self._rows(
            f"SELECT outbox.rule_id, decisions.rule_hash, {field('outbox.payload', 'escrow')},"
            f" {field('outbox.payload', 'currency')}, {field('outbox.payload', 'amount')},"
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


def _claimed_entry(r: Any, daemon_id: str) -> OutboxEntry:
    """The entry of a row ``claim_due`` read (``_OUTBOX_COLUMNS``, then ``claimed_by`` and
    ``lease_until``) and claimed for ``daemon_id``: ``lease_taken_from`` names the other
    daemon whose lease it was under (expired, or it would not have been read)."""
    entry = _outbox_entry(r)
    previous = r[-2]
    if previous is None or previous == daemon_id:
        return entry
    return replace(entry, lease_taken_from=previous)


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


def _escrow_sums(where: str) -> str:
    """The sums of the ledger's movements per escrow, movement and amount (``where``: a
    clause narrowing the escrows, or ""); grouped by amount, as a count of equal amounts
    multiplies exactly and there are far fewer distinct amounts than movements. A ``fail``
    of a release never sent (a dead letter the bank failed) is ``fail_unsent``."""
    return (
        "SELECT escrow, CASE WHEN movement = 'fail' AND NOT EXISTS (SELECT 1 FROM"
        " ledger_entries AS sent WHERE sent.release_id = ledger_entries.release_id"
        " AND sent.movement = 'send') THEN 'fail_unsent' ELSE movement END AS moved,"
        f" amount, COUNT(*) FROM ledger_entries{where} GROUP BY escrow, moved, amount"
    )


def _escrow_figures(sums: Iterable[Any], dead: Iterable[Any]) -> EscrowTotals:
    """The figures of each escrow from the rows of ``_escrow_sums`` and of the dead
    letters' amounts (escrow, amount, count)."""
    by_escrow: dict[str, dict[str, Decimal]] = {}
    for escrow, movement, amount, count in sums:
        by_movement = by_escrow.setdefault(escrow, {})
        by_movement[movement] = by_movement.get(movement, _ZERO) + Decimal(amount) * count
    unconfirmed: dict[str, Decimal] = {}
    for escrow, amount, count in dead:
        unconfirmed[escrow] = unconfirmed.get(escrow, _ZERO) + Decimal(amount) * count
    return {
        escrow: _figures(by_movement, unconfirmed.get(escrow, _ZERO))
        for escrow, by_movement in by_escrow.items()
    }


_COMMITTED_MOVEMENTS = "('reserve', 'return', 'reclaim')"
"""The movements that change what counts against an escrow (``EscrowFigures.committed``:
reserve + reclaim - return), all written by deciding writes (a ``send`` or ``settle`` moves
an amount within it)."""

_CURSOR = (
    "SELECT (SELECT value FROM meta WHERE key = 'state_version'),"
    " (SELECT MAX(seq) FROM fact_log), (SELECT MAX(id) FROM decisions),"
    " (SELECT MAX(id) FROM admin_acts WHERE act = 'signoff'),"
    f" (SELECT MAX(id) FROM ledger_entries WHERE movement IN {_COMMITTED_MOVEMENTS})"
)
"""The database's ``StateCursor``, in one statement (PostgreSQL: each an index lookup)."""


def _cursor_of(row: Any) -> StateCursor:
    return StateCursor(*(int(value or 0) for value in row))


def _read_cursor(db: Tx) -> StateCursor:
    """The database's ``StateCursor`` as the open transaction sees it."""
    return _cursor_of(db.execute(_CURSOR).fetchone())


def _take_version(db: Tx, expected: int) -> int:
    """Inside a checked deciding write, first: move ``meta`` row ``state_version`` from
    ``expected`` to the next version and return it, holding the row (locked until the
    transaction ends: a checked write of another daemon waits, then finds the version
    moved). Raises ``StateBehind`` when the database is at another version (a missing row
    is version 0: a new database, or one no checked write has decided on yet)."""
    new = str(expected + 1)
    if expected == 0:  # the row may not exist yet: two first writes meet on its key
        row = db.execute(
            "INSERT INTO meta (key, value) VALUES ('state_version', ?) ON CONFLICT (key)"
            " DO UPDATE SET value = excluded.value WHERE meta.value = '0' RETURNING value",
            (new,),
        ).fetchone()
    else:
        row = db.execute(
            "UPDATE meta SET value = ? WHERE key = 'state_version' AND value = ? RETURNING value",
            (new, str(expected)),
        ).fetchone()
    if row is None:
        found = db.execute("SELECT value FROM meta WHERE key = 'state_version'").fetchone()
        raise StateBehind(expected, int(found[0]) if found else 0)
    return expected + 1


_RULE_STATE_COLUMNS = (
    "rule_id, gate_open, fired_count, last_fired_at, rule_hash, paused, rearms,"
    " instance, notified, notices, signoff_alerted, blocked, blocks"
)


def _rule_state(r: Any) -> RuleState:
    """The ``RuleState`` of a row of ``_RULE_STATE_COLUMNS``."""
    return RuleState(
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


_SIGNOFF_COLUMNS = "rule_hash, actor, subject, reason, project, at"


def _signoff(r: Any) -> SignOff:
    """The ``SignOff`` of an admin act ``signoff`` row of ``_SIGNOFF_COLUMNS``."""
    rule_hash, actor, rule_id, comment, project, at = r
    return SignOff(rule_hash, rule_id, actor, comment, project or "", parse_rfc3339(at))


@functools.cache
def _approvals_of(d: Dialect) -> str:
    """The standing approvals of the instances ``[rule id, item id]`` of a JSON list."""
    return (
        "SELECT approvals.rule_id, approvals.instance, approvals.subject,"
        f" approvals.decision, approvals.decided_at FROM {d.rows()} AS keys"
        f" {d.ordered_join} approvals ON approvals.rule_id = keys.value ->> 0"
        " AND approvals.instance = keys.value ->> 1"
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
    db: Tx,
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
    return insert_id(
        db,
        f"INSERT INTO ledger_entries ({_MOVEMENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (release_id, escrow, movement, amount, currency, at, actor, reference, reason),
        "id",
    )


def _recorded_settlement(db: Tx, release_id: str, moved: set[str]) -> Settlement | None:
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
    db: Tx, seq: int, approval: ApprovalInput, now: str, request_id: str | None
) -> int:
    """Append ``approval`` to the fact log as ``seq`` (kind ``approval``, id the approver)
    and set, or for ``withdraw`` remove, the approver's standing decision on the rule;
    return its seq."""
    data: dict[str, Any] = {
        "rule": approval.rule_id,
        "decision": approval.decision,
        "comment": approval.comment,
    }
    if approval.instance:
        data["instance"] = approval.instance
    db.execute(
        "INSERT INTO fact_log (seq, project, kind, id, data, received_at, request_id)"
        " VALUES (?, ?, 'approval', ?, ?, ?, ?)",
        (seq, approval.project, approval.subject, _dumps(data), now, request_id),
    )
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


@functools.cache
def _seqs_of_facts(d: Dialect) -> str:
    """The current ``seq`` of each ``[project, kind, id]`` of a JSON list, in one
    statement."""
    return (
        f"SELECT facts.project, facts.kind, facts.id, facts.seq FROM {d.rows()} AS keys"
        f" {d.ordered_join} facts ON facts.project = keys.value ->> 0"
        " AND facts.kind = keys.value ->> 1"
        " AND facts.id = keys.value ->> 2"
    )


class _Written:
    """Inside one write transaction (on the writer thread): the fact log ``seq`` of the
    current data of each fact key written or looked up so far, and the last ``seq``
    written; what a decision's references are made of (``gatekeeper.store.evidence``).

    It also gathers the rows of the tables every ingest writes (fact log, facts,
    decisions, rule states, outbox, ledger and its reserve movements, idempotency keys),
    in the order the transaction's transitions make them, for ``flush`` to insert in one
    statement per table: a row a transition writes later never reads one of them back (a
    decision finds the facts written before it in ``facts``, an outbox row its decision
    at the flush, after the decisions)."""

    __slots__ = (
        "db",
        "decisions",
        "dialect",
        "fact_rows",
        "facts",
        "idempotency",
        "last",
        "ledger",
        "log_rows",
        "movements",
        "outbox",
        "rule_states",
    )

    def __init__(self, db: Tx, dialect: Dialect) -> None:
        self.db = db
        self.dialect = dialect
        self.facts: dict[FactKey, int] = {}
        self.last: int | None = None
        self.log_rows: list[tuple[Any, ...]] = []
        self.fact_rows: dict[FactKey, tuple[Any, ...]] = {}
        """Each key once, its last data (PostgreSQL refuses to upsert a row twice in a
        statement), where it was first written."""
        self.decisions: list[tuple[Any, ...]] = []
        self.rule_states: dict[InstanceKey, tuple[Any, ...]] = {}
        """Each key once, its last state (as ``fact_rows``)."""
        self.outbox: list[tuple[Any, ...]] = []
        self.ledger: list[tuple[Any, ...]] = []
        self.movements: list[tuple[Any, ...]] = []
        self.idempotency: list[tuple[Any, ...]] = []

    def flush(self, version: int | None) -> None:
        """Insert the rows gathered, table by table in the order their references need
        (a fact log row before the facts and decisions naming it, a decision before its
        outbox rows, an outbox row before its ledger row), and forget them. ``version``:
        the state version of a checked write (``StateFence``), stamped on the rule states;
        None leaves theirs as it was."""
        db = self.db
        limit = self.dialect.max_params
        if self.log_rows:
            _INSERT_FACT_LOG.run(db, self.log_rows, limit)
            _UPSERT_FACTS.run(db, list(self.fact_rows.values()), limit)
        if self.decisions:
            _INSERT_DECISIONS.run(db, self.decisions, limit)
        if self.rule_states:
            if version is None:
                _UPSERT_RULE_STATES.run(db, list(self.rule_states.values()), limit)
            else:  # a checked write: what other daemons catch up on
                rows = [(*row, version) for row in self.rule_states.values()]
                _UPSERT_RULE_STATES_AT.run(db, rows, limit)
        if self.outbox:
            _INSERT_OUTBOX.run(db, self.outbox, limit)
        if self.ledger:
            _INSERT_LEDGER.run(db, self.ledger, limit)
            _INSERT_MOVEMENTS.run(db, self.movements, limit)
        if self.idempotency:
            _INSERT_IDEMPOTENCY.run(db, self.idempotency, limit)
        self.log_rows, self.fact_rows, self.decisions, self.rule_states = [], {}, [], {}
        self.outbox, self.ledger, self.movements, self.idempotency = [], [], [], []

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
            for project, kind, fact_id, seq in self.db.execute(
                _seqs_of_facts(self.dialect), (_dumps(keys),)
            ):
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

    def next_seq(self) -> int:
        """The ``seq`` of the next fact log entry (the last one's + 1), taken."""
        self.last = self.as_of() + 1
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


def _check_active_ruleset(db: Tx, dialect: Dialect, planned_with: str) -> None:
    """Raise ``RulesetChanged`` when the active ruleset is not ``planned_with``; the row
    read stays locked against an activation until the transaction ends."""
    row = db.execute(
        f"SELECT value FROM meta WHERE key = 'active_ruleset'{dialect.lock_shared}"
    ).fetchone()
    if row is not None and row[0] != planned_with:
        raise RulesetChanged(planned_with, str(row[0]))


def _write_ruleset(db: Tx, dialect: Dialect, ruleset: Ruleset, now: str) -> None:
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
                f"SELECT content_hash FROM ruleset_files WHERE content_hash IN ({dialect.texts()})",
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
    if dialect.notify_ruleset:
        db.execute(dialect.notify_ruleset, (ruleset.version,))


def release_claims(db: Tx) -> None:
    """Release the delivery claims (``claim_due``) earlier daemons left: run by a daemon
    that serves the database alone (SQLite's lock file when it opens the file; on
    PostgreSQL, ``hold_daemon_lock`` finding no other session sharing the daemon lock), so
    whoever claimed them is gone, and its actions are due at once rather than when their
    leases run out."""
    db.execute(
        "UPDATE outbox SET claimed_by = NULL, lease_until = NULL WHERE claimed_by IS NOT NULL"
    )
