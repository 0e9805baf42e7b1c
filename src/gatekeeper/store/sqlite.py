"""Storage: the one narrow interface the daemon writes through, and its SQLite backend.

``Store`` is a Protocol so that a PostgreSQL backend can stand beside ``SqliteStore``.
Every write goes through one connection on one thread (a single writer), and everything a
fact causes is committed in one transaction (``commit_transition``): the fact, the decisions
it causes, the rule states and the actions they queue (a transactional outbox). A whole
transaction, ``BEGIN IMMEDIATE`` to ``COMMIT``, is one call on the writer's thread.

SQLite runs in WAL mode with ``synchronous=FULL``: a committed transaction is on disk
(fsynced) before ``commit_transition`` returns, so an acknowledged fact survives a crash.
The schema is versioned with ``PRAGMA user_version`` and upgraded by ``MIGRATIONS`` in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from queue import SimpleQueue
from typing import Any, Literal, Protocol, TypeVar

import aiosqlite

from gatekeeper.clock import format_rfc3339
from gatekeeper.engine.model import (
    ApprovalInput,
    Decision,
    FactKey,
    QueuedAction,
    RuleState,
    Transition,
    evaluation_to_json,
)
from gatekeeper.rules.model import Ruleset

ActionStatus = Literal["pending", "delivered", "dead"]

MIGRATIONS: tuple[str, ...] = (
    # 1: the first schema
    """
    CREATE TABLE fact_log (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        project TEXT NOT NULL, kind TEXT NOT NULL, id TEXT NOT NULL,
        data TEXT NOT NULL,
        received_at TEXT NOT NULL,
        request_id TEXT
    );
    CREATE TABLE facts (
        project TEXT NOT NULL, kind TEXT NOT NULL, id TEXT NOT NULL,
        data TEXT NOT NULL,
        seq INTEGER NOT NULL REFERENCES fact_log(seq),
        updated_at TEXT NOT NULL,
        PRIMARY KEY (project, kind, id)
    );
    CREATE TABLE rulesets (
        version TEXT PRIMARY KEY,
        files TEXT NOT NULL,
        git_commit TEXT,
        first_activated_at TEXT NOT NULL,
        last_activated_at TEXT NOT NULL
    );
    CREATE TABLE rule_state (
        rule_id TEXT PRIMARY KEY,
        gate_open INTEGER,
        fired_count INTEGER NOT NULL DEFAULT 0,
        last_fired_at TEXT,
        rule_hash TEXT
    );
    CREATE TABLE decisions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        decided_at TEXT NOT NULL,
        rule_id TEXT NOT NULL,
        rule_hash TEXT NOT NULL,
        ruleset_version TEXT NOT NULL,
        git_commit TEXT,
        trigger TEXT NOT NULL,
        fact_seq INTEGER REFERENCES fact_log(seq),
        outcome TEXT NOT NULL,
        gate_open INTEGER NOT NULL,
        evaluation TEXT NOT NULL,
        approvals TEXT,
        firing_id TEXT UNIQUE,
        request_id TEXT
    );
    CREATE INDEX decisions_rule ON decisions(rule_id, id);
    CREATE TABLE outbox (
        action_id TEXT PRIMARY KEY,
        decision_id INTEGER NOT NULL REFERENCES decisions(id),
        rule_id TEXT NOT NULL,
        firing_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        target TEXT NOT NULL,
        payload TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0,
        created_at TEXT NOT NULL,
        next_attempt_at TEXT NOT NULL,
        last_error TEXT,
        delivered_at TEXT
    );
    CREATE INDEX outbox_due ON outbox(status, next_attempt_at);
    CREATE TABLE delivery_attempts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        action_id TEXT NOT NULL REFERENCES outbox(action_id),
        attempt INTEGER NOT NULL,
        started_at TEXT NOT NULL,
        latency_ms REAL NOT NULL,
        status_code INTEGER,
        error TEXT
    );
    CREATE INDEX delivery_attempts_action ON delivery_attempts(action_id, attempt);
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # 2: the release ledger, blocked decisions, idempotent ingest, requeued dead letters,
    #    admin acts
    """
    ALTER TABLE decisions ADD COLUMN reason TEXT;
    CREATE TABLE ledger (
        release_id TEXT PRIMARY KEY REFERENCES outbox(action_id),
        escrow TEXT NOT NULL,
        amount TEXT NOT NULL,
        currency TEXT NOT NULL,
        payee TEXT NOT NULL,
        rule_id TEXT NOT NULL,
        firing_id TEXT NOT NULL,
        recorded_at TEXT NOT NULL
    );
    CREATE INDEX ledger_escrow ON ledger(escrow);
    CREATE TABLE idempotency_keys (
        key TEXT PRIMARY KEY,
        request_hash TEXT NOT NULL,
        seqs TEXT NOT NULL,
        request_id TEXT,
        created_at TEXT NOT NULL
    );
    CREATE INDEX idempotency_keys_created ON idempotency_keys(created_at);
    ALTER TABLE outbox ADD COLUMN requeued_at TEXT;
    ALTER TABLE outbox ADD COLUMN attempts_at_requeue INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE admin_acts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at TEXT NOT NULL,
        actor TEXT NOT NULL,
        act TEXT NOT NULL,
        subject TEXT NOT NULL,
        reason TEXT
    );
    """,
    # 3: approvals (each also appended to fact_log as kind 'approval'), paused and
    #    re-armed rules
    """
    CREATE TABLE approvals (
        rule_id TEXT NOT NULL,
        subject TEXT NOT NULL,
        decision TEXT NOT NULL,
        comment TEXT,
        seq INTEGER NOT NULL REFERENCES fact_log(seq),
        decided_at TEXT NOT NULL,
        PRIMARY KEY (rule_id, subject)
    );
    ALTER TABLE rule_state ADD COLUMN paused INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE rule_state ADD COLUMN rearms INTEGER NOT NULL DEFAULT 0;
    """,
    # 4: the audit log is filtered by project
    """
    ALTER TABLE decisions ADD COLUMN project TEXT;
    ALTER TABLE admin_acts ADD COLUMN project TEXT;
    CREATE INDEX decisions_time ON decisions(decided_at, id);
    CREATE INDEX admin_acts_time ON admin_acts(at, id);
    """,
)


@dataclass(frozen=True)
class StoredRuleset:
    """A ruleset version as kept in the database: its files' text and where it came from."""

    version: str
    files: Mapping[str, str]
    git_commit: str | None
    first_activated_at: str
    last_activated_at: str


@dataclass(frozen=True)
class OutboxEntry:
    """One queued action and its delivery state. Times are RFC 3339 strings (UTC).

    ``decision_id`` is None for an entry handed to the dispatcher in memory right after its
    commit (``outbox_entry_of``); ``request_id`` is the HTTP request that caused the
    decision (``decisions.request_id``), None when there was none.
    """

    action_id: str
    rule_id: str
    firing_id: str
    kind: str
    target: str
    payload: Mapping[str, Any]
    status: ActionStatus
    attempts: int
    created_at: str
    next_attempt_at: str
    last_error: str | None
    delivered_at: str | None
    decision_id: int | None
    requeued_at: str | None = None
    attempts_at_requeue: int = 0
    request_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "action_id": self.action_id,
            "rule_id": self.rule_id,
            "firing_id": self.firing_id,
            "kind": self.kind,
            "target": self.target,
            "payload": dict(self.payload),
            "status": self.status,
            "attempts": self.attempts,
            "created_at": self.created_at,
            "next_attempt_at": self.next_attempt_at,
            "last_error": self.last_error,
            "delivered_at": self.delivered_at,
            "decision_id": self.decision_id,
            "requeued_at": self.requeued_at,
        }


@dataclass(frozen=True)
class Attempt:
    """One delivery attempt: when, how long (milliseconds), HTTP status or error text."""

    action_id: str
    attempt: int
    started_at: str
    latency_ms: float
    status_code: int | None
    error: str | None


@dataclass(frozen=True)
class AttemptRecord:
    """A delivery attempt with the action's state after it: ``status`` and, for a retry,
    ``next_attempt_at`` (RFC 3339; None keeps the current one)."""

    attempt: Attempt
    status: ActionStatus
    next_attempt_at: str | None


def outbox_entry_of(action: QueuedAction, request_id: str | None) -> OutboxEntry:
    """The pending outbox entry of ``action`` as its row reads once committed (no attempt
    yet, due at once), without reading it back: the payload goes through the same JSON
    text as the stored one, so a first attempt sends what a retry loaded from the database
    sends. ``decision_id`` is not known here (None)."""
    return OutboxEntry(
        action_id=action.action_id,
        rule_id=action.rule_id,
        firing_id=action.firing_id,
        kind=action.kind,
        target=action.target,
        payload=json.loads(_dumps(action.payload)),
        status="pending",
        attempts=0,
        created_at=action.created_at,
        next_attempt_at=action.created_at,
        last_error=None,
        delivered_at=None,
        decision_id=None,
        request_id=request_id,
    )


@dataclass(frozen=True)
class OutboxFilter:
    """Narrows outbox queries: ``target`` only that target; ``not_targets`` none of these;
    ``exclude_ids`` never these actions (e.g. the ones being delivered right now)."""

    target: str | None = None
    not_targets: Sequence[str] = ()
    exclude_ids: Sequence[str] = ()

    def sql(self) -> tuple[str, tuple[str, ...]]:
        """The ``AND ...`` clause and its parameters."""
        where = ""
        params: tuple[str, ...] = ()
        if self.target is not None:
            where += " AND outbox.target = ?"
            params += (self.target,)
        if self.not_targets:
            where += f" AND outbox.target NOT IN ({', '.join('?' * len(self.not_targets))})"
            params += tuple(self.not_targets)
        if self.exclude_ids:
            where += f" AND outbox.action_id NOT IN ({', '.join('?' * len(self.exclude_ids))})"
            params += tuple(self.exclude_ids)
        return where, params


AuditKind = Literal["decision", "admin_act", "approval"]
AUDIT_KINDS: tuple[AuditKind, ...] = ("decision", "admin_act", "approval")
_AUDIT_UNION = (
    "SELECT 'decision' AS kind, id, decided_at AS at, rule_id, project, outcome AS what,"
    " NULL AS actor, reason, firing_id, fact_seq, request_id, trigger FROM decisions"
    " UNION ALL SELECT 'admin_act', id, at, subject, project, act, actor, reason, NULL, NULL,"
    " NULL, NULL FROM admin_acts"
    " UNION ALL SELECT 'approval', seq, received_at, json_extract(data, '$.rule'), project,"
    " json_extract(data, '$.decision'), id, json_extract(data, '$.comment'), NULL, seq,"
    " request_id, NULL FROM fact_log WHERE kind = 'approval'"
)


@dataclass(frozen=True)
class AuditQuery:
    """Filters of the audit log: project, rule, kinds of entry, outcome (of decisions),
    time range (RFC 3339, ``since`` inclusive, ``until`` exclusive), and ``after`` = the
    ``(at, kind, id)`` of the last entry of the previous page."""

    project: str | None = None
    rule_id: str | None = None
    kinds: tuple[AuditKind, ...] = AUDIT_KINDS
    outcome: str | None = None
    since: str | None = None
    until: str | None = None
    after: tuple[str, str, int] | None = None
    limit: int = 100

    def sql(self) -> tuple[str, tuple[Any, ...]]:
        """The WHERE clause over the union of entries, and its parameters."""
        clauses = [f"kind IN ({', '.join('?' * len(self.kinds))})"]
        params: list[Any] = list(self.kinds)
        for column, value in (("project", self.project), ("rule_id", self.rule_id)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if self.outcome is not None:
            clauses.append("(kind != 'decision' OR what = ?)")
            params.append(self.outcome)
        if self.since is not None:
            clauses.append("at >= ?")
            params.append(self.since)
        if self.until is not None:
            clauses.append("at < ?")
            params.append(self.until)
        if self.after is not None:
            at, kind, id_ = self.after
            clauses.append("(at < ? OR (at = ? AND (kind < ? OR (kind = ? AND id < ?))))")
            params += [at, at, kind, kind, id_]
        return " WHERE " + " AND ".join(clauses), tuple(params)


class Store(Protocol):
    """What the daemon needs from storage. All methods are coroutines; writes are atomic."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def commit_transition(self, transition: Transition) -> list[int]: ...
    async def load_facts(self) -> dict[FactKey, dict[str, Any]]: ...
    async def load_rule_states(self) -> dict[str, RuleState]: ...
    async def last_ruleset(self) -> StoredRuleset | None: ...
    async def list_facts(self, project: str | None = None) -> list[dict[str, Any]]: ...
    async def list_decisions(
        self, rule_id: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]: ...
    async def list_actions(
        self, status: ActionStatus | None = None, limit: int = 100
    ) -> list[OutboxEntry]: ...
    async def due_actions(
        self, now: datetime, limit: int, *, only: OutboxFilter | None = None
    ) -> list[OutboxEntry]: ...
    async def next_attempt_at(self, *, only: OutboxFilter | None = None) -> str | None: ...
    async def record_attempt(
        self,
        attempt: Attempt,
        status: ActionStatus,
        next_attempt_at: str | None,
    ) -> None: ...
    async def record_attempts(self, outcomes: Sequence[AttemptRecord]) -> None: ...
    async def commit_transitions(self, transitions: Sequence[Transition]) -> list[list[int]]: ...
    async def escrow_totals(self) -> dict[str, dict[str, Decimal]]: ...
    async def find_idempotency_key(self, key: str) -> dict[str, Any] | None: ...
    async def purge_idempotency_keys(self, before: str) -> int: ...
    async def requeue_action(
        self, action_id: str, now: str, actor: str, reason: str | None
    ) -> OutboxEntry | None: ...
    async def get_action(self, action_id: str) -> OutboxEntry | None: ...
    async def list_attempts(self, action_id: str) -> list[Attempt]: ...
    async def fact_log(self, after_seq: int = 0, limit: int = 1000) -> list[dict[str, Any]]: ...
    async def fact_at(self, seq: int) -> dict[str, Any] | None: ...
    async def load_approvals(self) -> dict[str, dict[str, str]]: ...
    async def count_actions(self) -> dict[str, int]: ...
    async def audit(self, query: AuditQuery) -> list[dict[str, Any]]: ...
    async def list_rulesets(self, limit: int = 100) -> list[dict[str, Any]]: ...
    async def get_ruleset(self, version: str) -> StoredRuleset | None: ...
    async def release_record(self, release_id: str) -> dict[str, Any] | None: ...
    async def decision_of_firing(self, firing_id: str) -> dict[str, Any] | None: ...


_ENCODER = json.JSONEncoder(
    separators=(",", ":"), sort_keys=True, default=str, check_circular=False
)
"""Stored JSON is built from parsed JSON and our own records, which hold no cycles."""


def _dumps(value: Any) -> str:
    """Canonical JSON text as stored: compact, keys sorted, anything else as ``str``."""
    return _ENCODER.encode(value)


T = TypeVar("T")


class WriterThread:
    """One dedicated thread that owns the writer connection and runs calls on it, in order.

    ``run(fn)`` is one round trip: ``fn`` is queued to the thread, the awaiting task resumes
    when it has returned (through ``call_soon_threadsafe``). A call, once queued, runs to its
    end even if the awaiting task is cancelled meanwhile (the caller then sees
    ``CancelledError``, the call's effect stands). This is aiosqlite's design (its connection
    thread) reduced to what the store needs: a whole transaction is one call, so it costs one
    round trip instead of one per statement, and its Python side is lighter than
    ``loop.run_in_executor`` (about 30 µs of CPU per round trip here against 55 µs).
    """

    def __init__(self, name: str) -> None:
        self._calls: SimpleQueue[tuple[asyncio.Future[Any], Callable[[], Any]] | None] = (
            SimpleQueue()
        )
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while (item := self._calls.get()) is not None:
            future, call = item
            try:
                result = call()
            except BaseException as exc:
                _resolve(future, _set_exception, exc)
            else:
                _resolve(future, _set_result, result)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the thread and return its result (or raise its exception)."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._calls.put((future, functools.partial(fn, *args)))
        return await asyncio.shield(future)

    async def stop(self) -> None:
        """Let the queued calls finish, then end the thread."""
        self._calls.put(None)
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)


def _resolve(future: asyncio.Future[Any], setter: Callable[..., None], value: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
        future.get_loop().call_soon_threadsafe(setter, future, value)


def _set_result(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


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
    """Rows per statement: 50 rows of 15 columns stay under SQLite's historical limit of
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
    "INSERT INTO fact_log (project, kind, id, data, received_at, request_id)"
    " VALUES (?, ?, ?, ?, ?, ?)"
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
    " request_id, reason, project)",
    "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
)
_UPSERT_RULE_STATES = _Insert(
    "INSERT INTO rule_state (rule_id, gate_open, fired_count, last_fired_at, rule_hash,"
    " paused, rearms)",
    "(?, ?, ?, ?, ?, ?, ?)",
    " ON CONFLICT (rule_id) DO UPDATE SET"
    " gate_open = excluded.gate_open, fired_count = excluded.fired_count,"
    " last_fired_at = excluded.last_fired_at, rule_hash = excluded.rule_hash,"
    " paused = excluded.paused, rearms = excluded.rearms",
)
# decision_id: the decision of the same firing, written just before in this transaction
# (firing_id is UNIQUE in decisions; no such decision leaves it NULL, which NOT NULL refuses)
_INSERT_OUTBOX = _Insert(
    "INSERT INTO outbox (action_id, decision_id, rule_id, firing_id, kind, target,"
    " payload, created_at, next_attempt_at)",
    "(?, (SELECT id FROM decisions WHERE firing_id = ?), ?, ?, ?, ?, ?, ?, ?)",
)
_INSERT_LEDGER = _Insert(
    "INSERT INTO ledger (release_id, escrow, amount, currency, payee, rule_id,"
    " firing_id, recorded_at)",
    "(?, ?, ?, ?, ?, ?, ?, ?)",
)


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
    only committed data.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer: WriterThread | None = None
        self._db: sqlite3.Connection | None = None
        """The writer connection; only ever used on the writer thread."""
        self._reader: aiosqlite.Connection | None = None

    @property
    def reader(self) -> aiosqlite.Connection:
        """The reader connection: each query sees only committed data (a WAL snapshot), so
        nothing reads rows of a transaction that may still roll back."""
        if self._reader is None:
            raise RuntimeError("store is not open")
        return self._reader

    async def _transaction(self, body: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``body(connection)`` inside ``BEGIN IMMEDIATE`` ... ``COMMIT`` on the writer
        thread, in one round trip, and return its result (see ``_transact``).

        Once queued the transaction runs to its end (COMMIT or ROLLBACK) whatever happens
        to the awaiting task: a cancelled caller cannot leave it half done.
        """
        if self._writer is None:
            raise RuntimeError("store is not open")
        return await self._writer.run(self._transact, body)

    def _transact(self, body: Callable[[sqlite3.Connection], T]) -> T:
        """On the writer thread: ``BEGIN IMMEDIATE``, ``body``, ``COMMIT``. On any error the
        transaction is rolled back (if still open) and the original exception is raised,
        never one from the rollback."""
        db = self._db
        if db is None:
            raise RuntimeError("store is not open")
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
        """Open (creating if needed) the database and bring its schema up to date."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = WriterThread(f"gatekeeper-writer {self.path.name}")
        try:
            await self._writer.run(self._connect_writer)
        except BaseException:
            await self._writer.stop()
            self._writer = None
            raise
        try:
            self._reader = await aiosqlite.connect(self.path, isolation_level=None)
            await self.reader.execute("PRAGMA busy_timeout=5000")
            await self.reader.execute("PRAGMA query_only=ON")
        except BaseException:  # no half-open store: the writer thread is stopped too
            await self.close()
            raise

    def _connect_writer(self) -> None:
        """On the writer thread: connect, set the pragmas, migrate."""
        # statements of 1 to _Insert.MAX_ROWS rows per table: keep them all prepared
        db = sqlite3.connect(self.path, isolation_level=None, cached_statements=512)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA busy_timeout=5000")
            self._db = db
            self._migrate()
        except BaseException:
            self._db = None
            db.close()
            raise

    async def close(self) -> None:
        """Close both connections (after the writes already queued, if any)."""
        if self._reader is not None:
            await self._reader.close()
            self._reader = None
        writer = self._writer
        if writer is not None:
            self._writer = None
            await writer.run(self._close_writer)
            await writer.stop()

    def _close_writer(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _migrate(self) -> None:
        """On the writer thread: run the migrations the database has not had yet, each in
        its own transaction together with its new ``user_version``."""
        assert self._db is not None
        row = self._db.execute("PRAGMA user_version").fetchone()
        current = int(row[0]) if row else 0
        if current > len(MIGRATIONS):
            raise RuntimeError(
                f"database {self.path} has schema version {current}, newer than this "
                f"gatekeeper knows ({len(MIGRATIONS)}); upgrade gatekeeper"
            )
        for version, script in enumerate(MIGRATIONS[current:], start=current + 1):

            def migrate(db: sqlite3.Connection, script: str = script, v: int = version) -> None:
                for statement in script.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version={v}")

            self._transact(migrate)

    async def commit_transition(self, transition: Transition) -> list[int]:
        """Commit a transition in one transaction; return the facts' sequence numbers.

        Raises ``sqlite3.Error`` (after rolling back; nothing is changed) when the write fails,
        e.g. when a ``firing_id`` was already recorded, which would mean a double firing.
        """
        return (await self.commit_transitions([transition]))[0]

    async def commit_transitions(self, transitions: Sequence[Transition]) -> list[list[int]]:
        """Commit several transitions in ONE transaction (group commit: one fsync for all,
        one round trip to the writer thread); return each one's fact sequence numbers, in
        order. All or nothing, as ``commit_transition``."""
        transitions = list(transitions)

        def write(db: sqlite3.Connection) -> list[list[int]]:
            return [self._write_transition(db, t) for t in transitions]

        return await self._transaction(write)

    def _write_transition(self, db: sqlite3.Connection, t: Transition) -> list[int]:
        """On the writer thread, inside the open transaction: write everything ``t`` changes
        (fact log, facts, approvals, admin acts, ruleset, decisions, rule states, outbox,
        ledger, idempotency key); return the facts' (and approvals') sequence numbers."""
        now = t.decisions[0].decided_at if t.decisions else None
        seqs: list[int] = []
        request_id = t.request_id
        fact_rows = []
        for fact in t.facts:
            received_at = now or _now_text()
            data = _dumps(fact.data)
            cursor = db.execute(
                _INSERT_FACT_LOG, (fact.project, fact.kind, fact.id, data, received_at, request_id)
            )
            seq = int(cursor.lastrowid or 0)
            seqs.append(seq)
            fact_rows.append((fact.project, fact.kind, fact.id, data, seq, received_at))
        if fact_rows:
            _UPSERT_FACTS.run(db, fact_rows)
        for approval in t.approvals:
            seqs.append(_write_approval(db, approval, now or _now_text(), request_id))
        if t.admin_acts:
            db.executemany(
                "INSERT INTO admin_acts (at, actor, act, subject, reason, project)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (now or _now_text(), a.actor, a.act, a.rule_id, a.reason, a.project or None)
                    for a in t.admin_acts
                ],
            )
        if t.ruleset is not None:
            _write_ruleset(db, t.ruleset, now or _now_text())
        if t.decisions:
            _INSERT_DECISIONS.run(db, [_decision_row(d, seqs, request_id) for d in t.decisions])
        if t.rule_states:
            _UPSERT_RULE_STATES.run(
                db,
                [
                    (
                        s.rule_id,
                        s.gate_open,
                        s.fired_count,
                        s.last_fired_at,
                        s.rule_hash,
                        s.paused,
                        s.rearms,
                    )
                    for s in t.rule_states.values()
                ],
            )
        if t.actions:
            _INSERT_OUTBOX.run(
                db,
                [
                    (
                        a.action_id,
                        a.firing_id,
                        a.rule_id,
                        a.firing_id,
                        a.kind,
                        a.target,
                        _dumps(a.payload),
                        a.created_at,
                        a.created_at,
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
        if t.idempotency is not None:
            db.execute(
                "INSERT INTO idempotency_keys (key, request_hash, seqs, request_id, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (
                    t.idempotency.key,
                    t.idempotency.request_hash,
                    _dumps(seqs),
                    request_id,
                    now or _now_text(),
                ),
            )
        return seqs

    async def load_approvals(self) -> dict[str, dict[str, str]]:
        """Every standing approval decision: {rule id: {subject: "approve" | "reject"}}."""
        sql = "SELECT rule_id, subject, decision FROM approvals"
        standing: dict[str, dict[str, str]] = {}
        async with self.reader.execute(sql) as cursor:
            async for rule_id, subject, decision in cursor:
                standing.setdefault(rule_id, {})[subject] = decision
        return standing

    async def load_facts(self) -> dict[FactKey, dict[str, Any]]:
        """Every current fact: {(project, kind, id): data}."""
        async with self.reader.execute("SELECT project, kind, id, data FROM facts") as cursor:
            return {(r[0], r[1], r[2]): json.loads(r[3]) async for r in cursor}

    async def load_rule_states(self) -> dict[str, RuleState]:
        """Every rule's persisted state, by rule id (rules no longer loaded included)."""
        sql = (
            "SELECT rule_id, gate_open, fired_count, last_fired_at, rule_hash, paused, rearms"
            " FROM rule_state"
        )
        async with self.reader.execute(sql) as cursor:
            return {
                r[0]: RuleState(
                    rule_id=r[0],
                    gate_open=None if r[1] is None else bool(r[1]),
                    fired_count=int(r[2]),
                    last_fired_at=r[3],
                    rule_hash=r[4],
                    paused=bool(r[5]),
                    rearms=int(r[6]),
                )
                async for r in cursor
            }

    async def last_ruleset(self) -> StoredRuleset | None:
        """The ruleset version that was last active, or None in a new database."""
        sql = (
            "SELECT version, files, git_commit, first_activated_at, last_activated_at"
            " FROM rulesets WHERE version = (SELECT value FROM meta WHERE key = 'active_ruleset')"
        )
        async with self.reader.execute(sql) as cursor:
            row = await cursor.fetchone()
        if row is None:
            return None
        return StoredRuleset(row[0], json.loads(row[1]), row[2], row[3], row[4])

    async def list_facts(self, project: str | None = None) -> list[dict[str, Any]]:
        """Current facts (optionally of one project) with their sequence numbers."""
        sql = "SELECT project, kind, id, data, seq, updated_at FROM facts"
        params: tuple[Any, ...] = ()
        if project is not None:
            sql += " WHERE project = ?"
            params = (project,)
        sql += " ORDER BY project, kind, id"
        async with self.reader.execute(sql, params) as cursor:
            return [
                {
                    "project": r[0],
                    "kind": r[1],
                    "id": r[2],
                    "data": json.loads(r[3]),
                    "seq": r[4],
                    "updated_at": r[5],
                }
                async for r in cursor
            ]

    async def fact_log(self, after_seq: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        """The append-only log of accepted facts, from ``after_seq`` on, oldest first."""
        sql = (
            "SELECT seq, project, kind, id, data, received_at, request_id FROM fact_log"
            " WHERE seq > ? ORDER BY seq LIMIT ?"
        )
        async with self.reader.execute(sql, (after_seq, limit)) as cursor:
            return [
                {
                    "seq": r[0],
                    "project": r[1],
                    "kind": r[2],
                    "id": r[3],
                    "data": json.loads(r[4]),
                    "received_at": r[5],
                    "request_id": r[6],
                }
                async for r in cursor
            ]

    async def list_decisions(
        self, rule_id: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Recent decisions, newest first, optionally of one rule."""
        if rule_id is None:
            return await self._decisions("", (), limit)
        return await self._decisions("WHERE rule_id = ?", (rule_id,), limit)

    async def _decisions(
        self, where: str, params: tuple[Any, ...], limit: int
    ) -> list[dict[str, Any]]:
        sql = (
            "SELECT id, decided_at, rule_id, rule_hash, ruleset_version, git_commit, trigger,"
            " fact_seq, outcome, gate_open, evaluation, approvals, firing_id, request_id, reason"
            f" FROM decisions {where} ORDER BY id DESC LIMIT ?"
        )
        async with self.reader.execute(sql, (*params, limit)) as cursor:
            return [
                {
                    "id": r[0],
                    "decided_at": r[1],
                    "rule_id": r[2],
                    "rule_hash": r[3],
                    "ruleset_version": r[4],
                    "git_commit": r[5],
                    "trigger": r[6],
                    "fact_seq": r[7],
                    "outcome": r[8],
                    "gate_open": bool(r[9]),
                    "evaluation": json.loads(r[10]),
                    "approvals": json.loads(r[11]) if r[11] else None,
                    "firing_id": r[12],
                    "request_id": r[13],
                    "reason": r[14],
                }
                async for r in cursor
            ]

    _OUTBOX_COLUMNS = (
        "outbox.action_id, outbox.rule_id, outbox.firing_id, outbox.kind, outbox.target,"
        " outbox.payload, outbox.status, outbox.attempts, outbox.created_at,"
        " outbox.next_attempt_at, outbox.last_error, outbox.delivered_at, outbox.decision_id,"
        " outbox.requeued_at, outbox.attempts_at_requeue, decisions.request_id"
    )
    _OUTBOX_FROM = "outbox LEFT JOIN decisions ON decisions.firing_id = outbox.firing_id"
    """The outbox with each action's decision (firing_id is UNIQUE there), for the
    request id that caused it."""

    @staticmethod
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
            created_at=r[8],
            next_attempt_at=r[9],
            last_error=r[10],
            delivered_at=r[11],
            decision_id=int(r[12]),
            requeued_at=r[13],
            attempts_at_requeue=int(r[14]),
            request_id=r[15],
        )

    async def list_actions(
        self, status: ActionStatus | None = None, limit: int = 100
    ) -> list[OutboxEntry]:
        """The outbox (dead letters included), newest first, optionally of one status."""
        sql = f"SELECT {self._OUTBOX_COLUMNS} FROM {self._OUTBOX_FROM}"
        params: list[Any] = []
        if status is not None:
            sql += " WHERE outbox.status = ?"
            params.append(status)
        sql += " ORDER BY outbox.created_at DESC, outbox.action_id LIMIT ?"
        params.append(limit)
        async with self.reader.execute(sql, params) as cursor:
            return [self._outbox_entry(r) async for r in cursor]

    async def count_actions(self) -> dict[str, int]:
        """How many actions the outbox holds, by status: {"pending": n, "dead": n, ...}."""
        sql = "SELECT status, COUNT(*) FROM outbox GROUP BY status"
        async with self.reader.execute(sql) as cursor:
            return {str(status): int(count) async for status, count in cursor}

    async def get_action(self, action_id: str) -> OutboxEntry | None:
        sql = f"SELECT {self._OUTBOX_COLUMNS} FROM {self._OUTBOX_FROM} WHERE outbox.action_id = ?"
        async with self.reader.execute(sql, (action_id,)) as cursor:
            row = await cursor.fetchone()
        return self._outbox_entry(row) if row else None

    async def due_actions(
        self, now: datetime, limit: int, *, only: OutboxFilter | None = None
    ) -> list[OutboxEntry]:
        """Pending actions whose next attempt is due at ``now``, oldest first, narrowed by
        ``only`` (one target, or none of some targets; never the excluded ids)."""
        where, params = (only or OutboxFilter()).sql()
        sql = (
            f"SELECT {self._OUTBOX_COLUMNS} FROM {self._OUTBOX_FROM}"
            f" WHERE outbox.status = 'pending' AND outbox.next_attempt_at <= ?{where}"
            " ORDER BY outbox.next_attempt_at, outbox.action_id LIMIT ?"
        )
        async with self.reader.execute(sql, (format_rfc3339(now), *params, limit)) as cursor:
            return [self._outbox_entry(r) async for r in cursor]

    async def next_attempt_at(self, *, only: OutboxFilter | None = None) -> str | None:
        """When the earliest pending action (narrowed by ``only``) is due, as RFC 3339, or
        None when there is none."""
        where, params = (only or OutboxFilter()).sql()
        sql = f"SELECT MIN(next_attempt_at) FROM outbox WHERE status = 'pending'{where}"
        async with self.reader.execute(sql, params) as cursor:
            row = await cursor.fetchone()
        return row[0] if row else None

    async def list_attempts(self, action_id: str) -> list[Attempt]:
        sql = (
            "SELECT action_id, attempt, started_at, latency_ms, status_code, error"
            " FROM delivery_attempts WHERE action_id = ? ORDER BY attempt"
        )
        async with self.reader.execute(sql, (action_id,)) as cursor:
            return [Attempt(*r) async for r in cursor]

    async def audit(self, query: AuditQuery) -> list[dict[str, Any]]:
        """Audit entries newest first: decisions, admin acts and approvals, one shape.

        Each entry: kind (``decision``, ``admin_act``, ``approval``), id, at (RFC 3339),
        rule_id, project, what (a decision's outcome, the act, the approval's decision),
        actor, reason, firing_id, fact_seq, request_id, trigger. ``query.after`` continues
        from an entry (its ``(at, kind, id)``), for cursor pagination.
        """
        where, params = query.sql()
        sql = (
            f"SELECT kind, id, at, rule_id, project, what, actor, reason, firing_id, fact_seq,"
            f" request_id, trigger FROM ({_AUDIT_UNION}) AS entries{where}"
            " ORDER BY at DESC, kind DESC, id DESC LIMIT ?"
        )
        columns = (
            "kind", "id", "at", "rule_id", "project", "what", "actor", "reason",
            "firing_id", "fact_seq", "request_id", "trigger",
        )  # fmt: skip
        async with self.reader.execute(sql, (*params, query.limit)) as cursor:
            return [dict(zip(columns, row, strict=True)) async for row in cursor]

    async def list_rulesets(self, limit: int = 100) -> list[dict[str, Any]]:
        """Stored ruleset versions, the most recently activated first (without their text)."""
        sql = (
            "SELECT version, git_commit, first_activated_at, last_activated_at, files"
            " FROM rulesets ORDER BY last_activated_at DESC LIMIT ?"
        )
        async with self.reader.execute(sql, (limit,)) as cursor:
            return [
                {
                    "version": r[0],
                    "git_commit": r[1],
                    "first_activated_at": r[2],
                    "last_activated_at": r[3],
                    "files": sorted(json.loads(r[4])),
                }
                async for r in cursor
            ]

    async def get_ruleset(self, version: str) -> StoredRuleset | None:
        """One stored ruleset version with the text of its files, or None."""
        sql = (
            "SELECT version, files, git_commit, first_activated_at, last_activated_at"
            " FROM rulesets WHERE version = ?"
        )
        async with self.reader.execute(sql, (version,)) as cursor:
            row = await cursor.fetchone()
        return StoredRuleset(row[0], json.loads(row[1]), row[2], row[3], row[4]) if row else None

    async def release_record(self, release_id: str) -> dict[str, Any] | None:
        """A release's ledger row, or None: escrow, amount, currency, payee, rule_id,
        firing_id, recorded_at."""
        sql = (
            "SELECT escrow, amount, currency, payee, rule_id, firing_id, recorded_at"
            " FROM ledger WHERE release_id = ?"
        )
        async with self.reader.execute(sql, (release_id,)) as cursor:
            row = await cursor.fetchone()
        if row is None:
            return None
        keys = ("escrow", "amount", "currency", "payee", "rule_id", "firing_id", "recorded_at")
        return {"release_id": release_id, **dict(zip(keys, row, strict=True))}

    async def decision_of_firing(self, firing_id: str) -> dict[str, Any] | None:
        """The decision that fired (or blocked) ``firing_id``, in full."""
        for decision in await self._decisions("WHERE firing_id = ?", (firing_id,), 1):
            return decision
        return None

    async def fact_at(self, seq: int) -> dict[str, Any] | None:
        """The fact log entry with sequence number ``seq``."""
        rows = await self.fact_log(after_seq=seq - 1, limit=1)
        return rows[0] if rows and rows[0]["seq"] == seq else None

    async def escrow_totals(self) -> dict[str, dict[str, Decimal]]:
        """Per escrow, the sum of its recorded releases by delivery status:
        ``{escrow: {"pending": Decimal, "delivered": Decimal, "dead": Decimal}}``
        (statuses with no release are absent). Summed as Decimal, never as floats."""
        sql = (
            "SELECT ledger.escrow, outbox.status, ledger.amount FROM ledger"
            " JOIN outbox ON outbox.action_id = ledger.release_id"
        )
        async with self.reader.execute(sql) as cursor:
            return await _sum_amounts(cursor)

    async def find_idempotency_key(self, key: str) -> dict[str, Any] | None:
        """The stored outcome of ``key``: request_hash, seqs, request_id, created_at."""
        sql = (
            "SELECT request_hash, seqs, request_id, created_at FROM idempotency_keys WHERE key = ?"
        )
        async with self.reader.execute(sql, (key,)) as cursor:
            row = await cursor.fetchone()
        if row is None:
            return None
        return {
            "request_hash": row[0],
            "seqs": json.loads(row[1]),
            "request_id": row[2],
            "created_at": row[3],
        }

    async def purge_idempotency_keys(self, before: str) -> int:
        """Forget keys created before ``before`` (RFC 3339); return how many were removed."""

        def purge(db: sqlite3.Connection) -> int:
            cursor = db.execute("DELETE FROM idempotency_keys WHERE created_at < ?", (before,))
            return int(cursor.rowcount)

        return await self._transaction(purge)

    async def requeue_action(
        self, action_id: str, now: str, actor: str, reason: str | None
    ) -> OutboxEntry | None:
        """Put dead letter ``action_id`` back in the queue, due at ``now``, with a fresh
        allowance of attempts and age; the act is recorded in ``admin_acts``.

        Returns the updated entry; None when there is no such action. Raises ``ValueError``
        when the action is not dead (pending or delivered actions are not requeued).
        """

        def requeue(db: sqlite3.Connection) -> None:
            row = db.execute(
                "SELECT status FROM outbox WHERE action_id = ?", (action_id,)
            ).fetchone()
            if row is None:
                return
            if row[0] != "dead":
                raise ValueError(f"action {action_id} is {row[0]}, not dead")
            db.execute(
                "UPDATE outbox SET status = 'pending', next_attempt_at = ?,"
                " requeued_at = ?, attempts_at_requeue = attempts WHERE action_id = ?",
                (now, now, action_id),
            )
            db.execute(
                "INSERT INTO admin_acts (at, actor, act, subject, reason)"
                " VALUES (?, ?, 'retry_action', ?, ?)",
                (now, actor, action_id, reason),
            )

        await self._transaction(requeue)
        return await self.get_action(action_id)

    async def record_attempt(
        self,
        attempt: Attempt,
        status: ActionStatus,
        next_attempt_at: str | None,
    ) -> None:
        """Record a delivery attempt and the action's new status, atomically."""
        await self.record_attempts([AttemptRecord(attempt, status, next_attempt_at)])

    async def record_attempts(self, outcomes: Sequence[AttemptRecord]) -> None:
        """Record several delivery attempts and their actions' new states in ONE
        transaction (one fsync for all): all or nothing. Raises ``sqlite3.Error`` (after
        rolling back) when the write fails."""
        attempts = [
            (
                o.attempt.action_id,
                o.attempt.attempt,
                o.attempt.started_at,
                o.attempt.latency_ms,
                o.attempt.status_code,
                o.attempt.error,
            )
            for o in outcomes
        ]
        updates = [
            (
                o.status,
                o.attempt.attempt,
                o.attempt.error,
                o.next_attempt_at,
                o.attempt.started_at if o.status == "delivered" else None,
                o.attempt.action_id,
            )
            for o in outcomes
        ]

        def record(db: sqlite3.Connection) -> None:
            _INSERT_ATTEMPTS.run(db, attempts)
            db.executemany(
                "UPDATE outbox SET status = ?, attempts = ?, last_error = ?,"
                " next_attempt_at = COALESCE(?, next_attempt_at), delivered_at = ?"
                " WHERE action_id = ?",
                updates,
            )

        if outcomes:
            await self._transaction(record)


def _write_approval(
    db: sqlite3.Connection, approval: ApprovalInput, now: str, request_id: str | None
) -> int:
    """Append ``approval`` to the fact log (kind ``approval``, id the approver) and set, or
    for ``withdraw`` remove, the approver's standing decision on the rule; return its seq."""
    data = {
        "rule": approval.rule_id,
        "decision": approval.decision,
        "comment": approval.comment,
    }
    cursor = db.execute(
        "INSERT INTO fact_log (project, kind, id, data, received_at, request_id)"
        " VALUES (?, 'approval', ?, ?, ?, ?)",
        (approval.project, approval.subject, _dumps(data), now, request_id),
    )
    seq = int(cursor.lastrowid or 0)
    if approval.decision == "withdraw":
        db.execute(
            "DELETE FROM approvals WHERE rule_id = ? AND subject = ?",
            (approval.rule_id, approval.subject),
        )
    else:
        db.execute(
            "INSERT INTO approvals (rule_id, subject, decision, comment, seq, decided_at)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (rule_id, subject) DO UPDATE SET"
            " decision = excluded.decision, comment = excluded.comment,"
            " seq = excluded.seq, decided_at = excluded.decided_at",
            (approval.rule_id, approval.subject, approval.decision, approval.comment, seq, now),
        )
    return seq


def _decision_row(d: Decision, seqs: Sequence[int], request_id: str | None) -> tuple[Any, ...]:
    """The ``decisions`` row of ``d`` (its evaluation and approvals as JSON text)."""
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
        _dumps(evaluation_to_json(d.evaluation)),
        _dumps(d.approvals) if d.approvals is not None else None,
        d.firing_id,
        request_id,
        d.reason,
        d.project or None,
    )


def _write_ruleset(db: sqlite3.Connection, ruleset: Ruleset, now: str) -> None:
    db.execute(
        "INSERT INTO rulesets (version, files, git_commit, first_activated_at,"
        " last_activated_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT (version) DO UPDATE SET"
        " last_activated_at = excluded.last_activated_at, git_commit = excluded.git_commit",
        (ruleset.version, _dumps(dict(ruleset.files)), ruleset.git_commit, now, now),
    )
    db.execute(
        "INSERT INTO meta (key, value) VALUES ('active_ruleset', ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (ruleset.version,),
    )


async def _sum_amounts(cursor: aiosqlite.Cursor) -> dict[str, dict[str, Decimal]]:
    totals: dict[str, dict[str, Decimal]] = {}
    async for escrow, status, amount in cursor:
        by_status = totals.setdefault(escrow, {})
        by_status[status] = by_status.get(status, Decimal(0)) + Decimal(amount)
    return totals


def _now_text() -> str:
    return format_rfc3339(datetime.now(UTC))
