"""The store's writer: a whole transaction is one call on the writer thread, through a real
SQLite file. All or nothing (a failed statement in the middle of a group leaves no row of
the group and nothing in memory), not interrupted by a cancelled caller, and the rows are
the ones the audit log needs (decision ids of the outbox, fact sequence numbers)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from gatekeeper.engine.evaluate import Engine
from gatekeeper.engine.facts import FactTable
from gatekeeper.engine.model import FactInput, RuleState, Transition
from gatekeeper.rules.loader import load_rule_texts
from gatekeeper.store.errors import Conflict, StoreUnavailable
from gatekeeper.store.records import Attempt, AttemptRecord, canonical_json
from gatekeeper.store.sqlite import SqliteStore
from gatekeeper.store.sqlstore import _Insert

from .conftest import DESIGN_RULE, Project, fact

NOW = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)
RULES = """\
- id: t/each
  project: t
  when: task.a.done
  fire: each_time
  actions:
    - notify: {target: chat, message: "a is done"}
    - pipeline: {target: ci, ref: main}
- id: t/b
  project: t
  when: task.b.done
  fire: each_time
  actions:
    - notify: {target: chat, message: "b is done"}
- id: t/both
  project: t
  when: task.a.done and task.b.done
  fire: once
  actions:
    - notify: {target: chat, message: "both"}
"""
TABLES = ("fact_log", "facts", "decisions", "rule_state", "outbox", "idempotency_keys")


def _engine() -> Engine:
    result = load_rule_texts({"rules.yaml": RULES}, None)
    assert result.ruleset is not None, result.problems
    return Engine(result.ruleset)


def _plan(
    engine: Engine, facts: FactTable, states: dict[str, RuleState], *batch: FactInput
) -> Transition:
    """Plan ``batch`` on top of ``facts``/``states`` and apply it to them (as the daemon's
    group planning does), so the next plan sees it."""
    transition = engine.plan_ingest(facts, states, list(batch), NOW)
    for item in batch:
        facts.put(item.key, item.data)
    states.update(transition.rule_states)
    return transition


def _task(id_: str, **data: Any) -> FactInput:
    return FactInput("t", "task", id_, data)


def _count_rows(path: Path) -> dict[str, int]:
    """Rows per table, read through a separate connection (what is on disk, committed)."""
    db = sqlite3.connect(path)
    try:
        return {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}
    finally:
        db.close()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = SqliteStore(tmp_path / "state" / "gatekeeper.db")
    await opened.open()
    yield opened
    await opened.close()


async def test_a_failed_statement_mid_group_rolls_back_every_row_of_the_group(
    store: SqliteStore,
) -> None:
    engine = _engine()
    facts, states = FactTable(), {}
    first = _plan(engine, facts, states, _task("a", done=True))
    second = _plan(engine, facts, states, _task("b", done=True))
    # planned again from nothing: fires t/each#1 a second time, which the UNIQUE firing_id
    # of decisions refuses, after the first transition's rows are written
    double = engine.plan_ingest(FactTable(), {}, [_task("a", done=True)], NOW)
    assert first.fired and double.fired[0].firing_id == first.fired[0].firing_id

    with pytest.raises(Conflict):
        await store.commit_transitions([first, double, second])
    assert _count_rows(store.path) == dict.fromkeys(TABLES, 0)

    # the writer is usable afterwards and the same group without the double commits whole
    seqs = await store.commit_transitions([first, second])
    assert seqs == [[1], [2]]
    rows = _count_rows(store.path)
    assert rows["fact_log"] == 2 and rows["decisions"] == len(first.decisions) + len(
        second.decisions
    )
    assert rows["outbox"] == len(first.actions) + len(second.actions) == 4


@pytest.mark.parametrize("rows_per_insert", [None, 2])
async def test_outbox_rows_point_at_the_decision_of_their_firing(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch, rows_per_insert: int | None
) -> None:
    if rows_per_insert is not None:  # several multi-row statements per table
        monkeypatch.setattr(_Insert, "MAX_ROWS", rows_per_insert)
    engine = _engine()
    facts, states = FactTable(), {}
    group = [
        _plan(engine, facts, states, _task("a", done=True)),
        _plan(engine, facts, states, _task("b", done=True)),
        _plan(engine, facts, states, _task("a", done=False), _task("c", x=1)),
    ]
    seqs = await store.commit_transitions(group)
    assert seqs == [[1], [2], [3, 4]]

    db = sqlite3.connect(store.path)
    try:
        decisions = db.execute(
            "SELECT id, rule_id, firing_id, fact_seq, outcome FROM decisions ORDER BY id"
        ).fetchall()
        outbox = db.execute(
            "SELECT outbox.firing_id, outbox.decision_id, decisions.firing_id FROM outbox"
            " JOIN decisions ON decisions.id = outbox.decision_id ORDER BY outbox.rowid"
        ).fetchall()
        facts_rows = db.execute("SELECT kind, id, seq FROM facts ORDER BY seq").fetchall()
    finally:
        db.close()
    planned = [d for t in group for d in t.decisions]
    # ids follow the planned order; each decision's fact_seq is its own fact's seq
    assert [(r[1], r[2], r[4]) for r in decisions] == [
        (d.rule_id, d.firing_id, d.outcome) for d in planned
    ]
    assert [r[0] for r in decisions] == list(range(1, len(planned) + 1))
    assert {r[3] for r in decisions} == {1, 2, 3}
    fired = {r[2]: r[0] for r in decisions if r[2]}
    assert sorted(fired) == ["t/b#1", "t/both#1", "t/each#1"]
    assert len(outbox) == 4
    assert all(firing == decision_firing for firing, _, decision_firing in outbox)
    assert all(decision_id == fired[firing] for firing, decision_id, _ in outbox)
    assert facts_rows == [("task", "b", 2), ("task", "a", 3), ("task", "c", 4)]


async def test_a_fact_twice_in_one_batch_keeps_the_last(store: SqliteStore) -> None:
    engine = _engine()
    batch = [_task("a", done=False, v=1), _task("b", done=True), _task("a", done=True, v=2)]
    transition = _plan(engine, FactTable(), {}, *batch)
    assert await store.commit_transition(transition) == [1, 2, 3]
    current = {(f.id, f.seq): f.data for f in await store.list_facts()}
    assert current == {("a", 3): {"done": True, "v": 2}, ("b", 2): {"done": True}}
    assert [r.data for r in await store.fact_log()] == [f.data for f in batch]


async def test_a_cancelled_caller_does_not_interrupt_the_transaction(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancel the caller while its transaction is on the writer thread: the transaction
    runs to its COMMIT, the caller sees CancelledError, and the writer goes on working."""
    engine = _engine()
    transition = _plan(engine, FactTable(), {}, _task("a", done=True))
    started, release = threading.Event(), threading.Event()
    original = store._transact

    def held(body: Callable[[sqlite3.Connection], Any]) -> Any:
        started.set()
        assert release.wait(5)
        return original(body)

    monkeypatch.setattr(store, "_transact", held)
    task = asyncio.create_task(store.commit_transition(transition))
    assert await asyncio.to_thread(started.wait, 5)
    task.cancel()
    await asyncio.sleep(0.05)
    assert task.done()  # the caller is gone at once ...
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    monkeypatch.undo()
    # queued after it: it has finished
    assert await store.purge_idempotency_keys(datetime(2000, 1, 1, tzinfo=UTC)) == 0
    rows = _count_rows(store.path)
    assert rows["fact_log"] == 1 and rows["outbox"] == len(transition.actions) == 2


async def test_requeue_and_attempts_are_transactions_on_the_writer(store: SqliteStore) -> None:
    engine = _engine()
    transition = _plan(engine, FactTable(), {}, _task("b", done=True))
    await store.commit_transition(transition)
    (action,) = transition.actions
    later = datetime(2026, 11, 1, 10, 0, tzinfo=UTC)
    with pytest.raises(Conflict, match="not dead"):
        await store.requeue_action(action.action_id, later, "ops", "x")
    assert await store.requeue_action("act_nope", later, "ops", None) is None

    started = datetime(2026, 11, 1, 9, 0, 1, tzinfo=UTC)
    attempt = Attempt(action.action_id, 1, started, 12.5, 500, "HTTP 500")
    await store.record_attempt(AttemptRecord(attempt, "dead", None, "attempts_exhausted"))
    entry = await store.requeue_action(action.action_id, later, "ops", "x")
    assert entry is not None and entry.status == "pending" and entry.attempts == 1
    assert [a.status_code for a in await store.list_attempts(action.action_id)] == [500]
    db = sqlite3.connect(store.path)
    try:
        acts = db.execute("SELECT actor, act, subject, reason FROM admin_acts").fetchall()
    finally:
        db.close()
    assert acts == [("ops", "retry_action", action.action_id, "x")]  # the refused act left none


async def test_close_ends_the_writer_thread_and_reopen_migrates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "gk.db"
    store = SqliteStore(path)
    await store.open()
    await store.commit_transition(_plan(_engine(), FactTable(), {}, _task("a", done=True)))
    writers = [t for t in threading.enumerate() if t.name.startswith("gatekeeper-writer")]
    assert len(writers) == 1
    await store.close()
    assert not writers[0].is_alive()
    with pytest.raises(StoreUnavailable, match="not open"):
        await store.commit_transition(Transition())

    again = SqliteStore(path)
    await again.open()
    try:
        assert [r.seq for r in await again.fact_log()] == [1]
        db = sqlite3.connect(path)
        try:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        finally:
            db.close()
    finally:
        await again.close()


async def test_a_failed_group_leaves_the_daemons_memory_unchanged(
    project_factory: Callable[..., Project], start_daemon: Any
) -> None:
    """Through the daemon and its real database file: a group whose last transition fails
    in the database changes neither the database nor the in-memory facts and states."""
    project = project_factory()
    project.write_rule("design.yaml", DESIGN_RULE)
    gk = await start_daemon(project)
    daemon = gk.daemon.writer
    engine = daemon.engine
    facts_before = daemon.facts.snapshot()
    states_before = dict(daemon.states)
    approved = fact("milestone", "design", status="approved", approved_at="2026-11-01T09:00:00Z")
    passed = fact("quality_gate", "qg1", passed=True)
    batch = [FactInput(f["project"], f["kind"], f["id"], f["data"]) for f in (approved, passed)]
    fires = engine.plan_ingest(daemon.facts, daemon.states, batch, daemon.clock.now())
    assert fires.fired
    again = engine.plan_ingest(daemon.facts, daemon.states, batch, daemon.clock.now())

    with pytest.raises(Conflict):
        await daemon.commit_and_apply([fires, again])
    assert daemon.facts.snapshot() == facts_before
    assert daemon.states == states_before
    assert await daemon.store.fact_log() == []
    assert await daemon.store.list_actions() == []


async def test_a_store_that_fails_to_open_leaves_no_writer_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer thread was started and left running when the reader connection failed."""
    import aiosqlite

    async def refuse(*args: Any, **kwargs: Any) -> Any:
        raise sqlite3.OperationalError("unable to open database file")

    monkeypatch.setattr(aiosqlite, "connect", refuse)
    store = SqliteStore(tmp_path / "gatekeeper.db")
    with pytest.raises(StoreUnavailable):
        await store.open()
    for _ in range(50):
        writers = [t for t in threading.enumerate() if t.name.startswith("gatekeeper-writer")]
        if not writers:
            break
        await asyncio.sleep(0.02)
    assert writers == []


@pytest.mark.parametrize(
    "value",
    [
        {"b": [1.5, 1e16, 1e-7, -0.0, 12345678901234567890123], "a": {"y": None, "x": True}},
        {"é": 'ü\u2028\x7f<>&"\\', "\U0001f600": "\uffff"},
        {"x": "\ud800"},  # a lone surrogate: valid JSON, not UTF-8
        {1: "int keys", 2: [Decimal("1.50")]},
        [Decimal("0.10"), "plain"],
    ],
)
def test_canonical_json_reads_back_as_json_did(value: Any) -> None:
    """The stored JSON text is compact, sorted and parses to what ``json`` with sorted keys
    and ``default=str`` gave (only the escaping of non-ASCII characters and the spelling of
    exponents may differ)."""
    text = canonical_json(value)
    before = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    assert json.loads(text) == json.loads(before)
    assert list(_keys_in_order(json.loads(text))) == list(_keys_in_order(json.loads(before)))
    assert ", " not in text and '": ' not in text


def _keys_in_order(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _keys_in_order(item)
    elif isinstance(value, list):
        for item in value:
            yield from _keys_in_order(item)
