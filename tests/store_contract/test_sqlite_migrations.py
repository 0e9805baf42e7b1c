"""The SQLite backend's migrations as files: versions 1-4 build exactly the schema the store
built before they were files (``tests/data/sqlite_schema_v4.sql``, dumped from that code), a
database of that schema opens, is upgraded and works, and a newer one is refused."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from decimal import Decimal
from pathlib import Path

import pytest

from gatekeeper.clock import parse_rfc3339
from gatekeeper.engine.model import RuleState, Stand, Transition
from gatekeeper.store import open_store
from gatekeeper.store.errors import SchemaTooNew
from gatekeeper.store.migrations import load_migrations
from gatekeeper.store.queries import AuditQuery
from gatekeeper.store.records import Attempt, AttemptRecord, SettlementCallback
from gatekeeper.store.sqlite import add_functions, content_hash

from . import build

OLD_SCHEMA = Path(__file__).parents[1] / "data" / "sqlite_schema_v4.sql"
MIGRATIONS = load_migrations("sqlite")


def _schema(db: sqlite3.Connection) -> list[tuple[str, str, str]]:
    return db.execute(
        "SELECT type, name, sql FROM sqlite_master WHERE sql IS NOT NULL"
        " AND name != 'sqlite_sequence' ORDER BY name"
    ).fetchall()


def _migrated(path: Path | str, up_to: int) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    add_functions(db)
    for migration in MIGRATIONS[:up_to]:
        for statement in migration.statements:
            db.execute(statement)
        db.execute(f"PRAGMA user_version={migration.version}")
    return db


def _old_database(path: Path) -> None:
    """A database as the store of schema version 4 left it, with a few rows."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.executescript(OLD_SCHEMA.read_text())
        db.execute("PRAGMA user_version=4")
        t = "2026-11-01T09:00:00.000Z"
        db.execute(
            "INSERT INTO fact_log (project, kind, id, data, received_at, request_id)"
            " VALUES ('tower-a', 'task', 'T-1', '{\"done\":true}', ?, 'req-1')",
            (t,),
        )
        db.execute(
            "INSERT INTO facts (project, kind, id, data, seq, updated_at)"
            " VALUES ('tower-a', 'task', 'T-1', '{\"done\":true}', 1, ?)",
            (t,),
        )
        db.execute(
            "INSERT INTO decisions (decided_at, rule_id, rule_hash, ruleset_version, trigger,"
            " fact_seq, outcome, gate_open, evaluation, firing_id, request_id, project)"
            " VALUES (?, 'tower-a/r', 'h', 'v1', 'fact', 1, 'fired', 1, '{}', 'tower-a/r#1',"
            " 'req-1', 'tower-a')",
            (t,),
        )
        db.execute(
            "INSERT INTO outbox (action_id, decision_id, rule_id, firing_id, kind, target,"
            " payload, status, attempts, created_at, next_attempt_at, last_error)"
            " VALUES ('act-1', 1, 'tower-a/r', 'tower-a/r#1', 'pipeline', 'ci',"
            " '{\"project\":\"tower-a\"}', 'dead', 1, ?, ?, 'HTTP 422')",
            (t, t),
        )
        db.execute(
            "INSERT INTO delivery_attempts (action_id, attempt, started_at, latency_ms,"
            " status_code, error) VALUES ('act-1', 1, ?, 3.5, 422, 'HTTP 422')",
            (t,),
        )
        db.execute(
            "INSERT INTO admin_acts (at, actor, act, subject, reason)"
            " VALUES (?, 'ops', 'retry_action', 'act-0', NULL)",
            (t,),
        )


def test_the_migration_files_are_numbered_and_package_data() -> None:
    assert [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
    assert all(m.statements for m in MIGRATIONS)


def test_migrations_1_to_4_build_the_schema_of_before(tmp_path: Path) -> None:
    with contextlib.closing(sqlite3.connect(tmp_path / "old.db")) as old:
        old.executescript(OLD_SCHEMA.read_text())
        expected = _schema(old)
    with contextlib.closing(_migrated(tmp_path / "new.db", 4)) as new:
        assert _schema(new) == expected


async def test_a_database_of_schema_4_opens_upgraded_and_works(tmp_path: Path) -> None:
    path = tmp_path / "gatekeeper.db"
    _old_database(path)
    store = await open_store(path)
    try:
        [dead] = await store.list_actions()
        assert (dead.action_id, dead.status, dead.request_id) == ("act-1", "dead", "req-1")
        assert (dead.dead_reason, dead.dead_status) == (None, None)  # not recorded back then
        assert [a.status_code for a in await store.list_attempts("act-1")] == [422]
        assert [f.data for f in await store.fact_log()] == [{"done": True}]
        entries = await store.audit(AuditQuery())
        assert [e.what for e in entries] == ["fired", "retry_action"]  # same time: by kind
        # ... and new rows go in beside the old ones
        requeued = await store.requeue_action("act-1", build.at(60), "ops", None)
        assert requeued is not None and requeued.status == "pending"
        attempt = Attempt("act-1", 2, build.at(61), 1.0, 404, "HTTP 404")
        await store.record_attempt(AttemptRecord(attempt, "dead", None, "refused"))
        again = await store.get_action("act-1")
        assert again is not None and (again.dead_reason, again.dead_status) == ("refused", 404)
        assert await store.commit_transition(build.firing("tower-a/s", 1, build.at(62))) == [2]
    finally:
        await store.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        upgraded = _schema(db)
    with contextlib.closing(_migrated(tmp_path / "fresh.db", len(MIGRATIONS))) as fresh:
        assert upgraded == _schema(fresh)


async def test_a_database_of_a_newer_gatekeeper_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "gatekeeper.db"
    with contextlib.closing(_migrated(path, len(MIGRATIONS))) as db:
        db.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    with pytest.raises(SchemaTooNew, match="upgrade gatekeeper"):
        await open_store(path)


async def test_reopening_runs_no_migration_again(tmp_path: Path) -> None:
    path = tmp_path / "gatekeeper.db"
    for _ in range(2):
        store = await open_store(path)
        await store.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


async def test_rulesets_stored_with_their_texts_move_to_one_text_per_content(
    tmp_path: Path,
) -> None:
    path = tmp_path / "gatekeeper.db"
    big = "- id: big/r\n  when: x.y\n" * 1000
    with contextlib.closing(_migrated(path, 5)) as db:
        for n, at in enumerate(("2026-11-01T09:00:00.000Z", "2026-11-01T09:00:01.000Z")):
            files = json.dumps({"big.yaml": big, "small.yaml": f"# {n}\n"}, sort_keys=True)
            db.execute(
                "INSERT INTO rulesets (version, files, git_commit, first_activated_at,"
                " last_activated_at) VALUES (?, ?, NULL, ?, ?)",
                (f"v{n}", files, at, at),
            )
        db.execute("INSERT INTO meta (key, value) VALUES ('active_ruleset', 'v1')")
    store = await open_store(path)
    try:
        v0 = await store.get_ruleset("v0")
        assert v0 is not None and v0.files == {"big.yaml": big, "small.yaml": "# 0\n"}
        last = await store.last_ruleset()
        assert last is not None and last.files == {"big.yaml": big, "small.yaml": "# 1\n"}
        assert [(r.version, list(r.files)) for r in await store.list_rulesets()] == [
            ("v1", ["big.yaml", "small.yaml"]),
            ("v0", ["big.yaml", "small.yaml"]),
        ]
    finally:
        await store.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT COUNT(*) FROM ruleset_files").fetchone()[0] == 3
        [(files,)] = db.execute("SELECT files FROM rulesets WHERE version = 'v0'")
        assert json.loads(files)["big.yaml"] == content_hash(big)


async def test_a_database_of_schema_6_keeps_its_rule_states_as_plain_instances(
    tmp_path: Path,
) -> None:
    path = tmp_path / "gatekeeper.db"
    t = "2026-11-01T09:00:00.000Z"
    with contextlib.closing(_migrated(path, 6)) as db:
        db.execute(
            "INSERT INTO rule_state (rule_id, gate_open, fired_count, last_fired_at, rule_hash,"
            " paused, rearms) VALUES ('tower-a/r', 1, 2, ?, 'h-r', 1, 1),"
            " ('tower-a/s', NULL, 0, NULL, 'h-s', 0, 0)",
            (t,),
        )
        db.execute(
            "INSERT INTO fact_log (project, kind, id, data, received_at, request_id)"
            " VALUES ('tower-a', 'task', 'T-1', '{\"done\":true}', ?, 'req-1')",
            (t,),
        )
        db.execute(
            "INSERT INTO decisions (decided_at, rule_id, rule_hash, ruleset_version, trigger,"
            " fact_seq, outcome, gate_open, evaluation, firing_id, request_id, project)"
            " VALUES (?, 'tower-a/r', 'h-r', 'v1', 'fact', 1, 'fired', 1, '{}', 'tower-a/r#2',"
            " 'req-1', 'tower-a')",
            (t,),
        )
        db.execute(
            "INSERT INTO outbox (action_id, decision_id, rule_id, firing_id, kind, target,"
            " payload, created_at, next_attempt_at)"
            " VALUES ('act-1', 1, 'tower-a/r', 'tower-a/r#2', 'notify', 'chat',"
            ' \'{"project":"tower-a"}\', ?, ?)',
            (t, t),
        )
        db.execute(
            "INSERT INTO approvals (rule_id, subject, decision, comment, seq, decided_at)"
            " VALUES ('tower-a/r', 'alice', 'approve', 'ok', 1, ?)",
            (t,),
        )
    store = await open_store(path)
    try:
        assert await store.load_approvals() == {
            "tower-a/r": {"alice": Stand("approve", parse_rfc3339(t))}
        }
        states = await store.load_rule_states()
        assert states == {
            ("tower-a/r", ""): RuleState("tower-a/r", True, 2, t, "h-r", True, 1),
            ("tower-a/s", ""): RuleState("tower-a/s", None, 0, None, "h-s"),
        }
        [decision] = await store.list_decisions("tower-a/r")
        assert (decision.firing_id, decision.instance) == ("tower-a/r#2", "")
        assert "instance" not in decision.to_json()  # plain rules: shown as before
        [action] = await store.list_actions()
        assert (action.action_id, action.instance) == ("act-1", "")
        assert "instance" not in action.to_json()
        [logged] = await store.fact_log()
        assert logged.caused_by is None and "caused_by" not in logged.to_json()
        # a per-item instance of the same rule id goes in beside the plain one
        instance = RuleState("tower-a/r", False, 0, None, "h-r", instance="b-1")
        await store.commit_transition(
            Transition(rule_states={("tower-a/r", "b-1"): instance}, planned_at=build.at(1))
        )
        states = await store.load_rule_states()
        assert states[("tower-a/r", "b-1")] == instance
        assert states[("tower-a/r", "")].fired_count == 2
    finally:
        await store.close()


async def test_a_database_of_schema_10_gets_the_movements_of_its_releases(
    tmp_path: Path,
) -> None:
    """Old releases reconcile: each gets its reserve (at recorded_at), a delivered one its
    send (at delivered_at); nothing else is made up."""
    path = tmp_path / "gatekeeper.db"
    t0, t1, t2 = "2026-11-01T09:00:00.000Z", "2026-11-01T09:00:01.000Z", "2026-11-01T09:05:00.000Z"
    with contextlib.closing(_migrated(path, 10)) as db:
        for n, (status, delivered) in enumerate(
            (("delivered", t2), ("pending", None), ("dead", None)), start=1
        ):
            db.execute(
                "INSERT INTO decisions (decided_at, rule_id, rule_hash, ruleset_version,"
                " trigger, outcome, gate_open, evaluation, firing_id, project)"
                " VALUES (?, 'tower-a/pay', 'h', 'v1', 'fact', 'fired', 1, '{}', ?, 'tower-a')",
                (t0, f"tower-a/pay#{n}"),
            )
            db.execute(
                "INSERT INTO outbox (action_id, decision_id, rule_id, firing_id, kind, target,"
                " payload, status, created_at, next_attempt_at, delivered_at)"
                " VALUES (?, ?, 'tower-a/pay', ?, 'release', 'bank', '{\"project\":\"tower-a\"}',"
                " ?, ?, ?, ?)",
                (f"act-{n}", n, f"tower-a/pay#{n}", status, t0, t0, delivered),
            )
            db.execute(
                "INSERT INTO ledger (release_id, escrow, amount, currency, payee, rule_id,"
                " firing_id, recorded_at) VALUES (?, 'esc', ?, 'USD', 'acme', 'tower-a/pay',"
                " ?, ?)",
                (f"act-{n}", f"{n}00.00", f"tower-a/pay#{n}", t1 if n == 2 else t0),
            )
    store = await open_store(path)
    try:
        movements = await store.ledger_movements()
        assert [(m.release_id, m.movement, m.amount, m.at) for m in movements] == [
            ("act-1", "reserve", "100.00", parse_rfc3339(t0)),
            ("act-3", "reserve", "300.00", parse_rfc3339(t0)),
            ("act-2", "reserve", "200.00", parse_rfc3339(t1)),
            ("act-1", "send", "100.00", parse_rfc3339(t2)),
        ]
        figures = (await store.escrow_totals())["esc"]
        assert (figures.reserved, figures.sent, figures.unconfirmed, figures.committed) == (
            Decimal("500.00"),
            Decimal("100.00"),
            Decimal("300.00"),
            Decimal("600.00"),
        )
        assert await store.begin_attempt("act-2", build.at(1))  # a pending one goes on
    finally:
        await store.close()


async def test_a_database_of_schema_12_keeps_its_movements_and_takes_a_reclaim(
    tmp_path: Path,
) -> None:
    """Migration 13 rebuilds ledger_entries for the reclaim movement: every row and id is
    kept, new movements number on, and a cancelled release of before can be reclaimed."""
    path = tmp_path / "gatekeeper.db"
    t0 = "2026-11-01T09:00:00.000Z"
    with contextlib.closing(_migrated(path, 12)) as db:
        db.execute(
            "INSERT INTO decisions (decided_at, rule_id, rule_hash, ruleset_version, trigger,"
            " outcome, gate_open, evaluation, firing_id, project) VALUES (?, 'tower-a/pay', 'h',"
            " 'v1', 'fact', 'fired', 1, '{}', 'tower-a/pay#1', 'tower-a')",
            (t0,),
        )
        db.execute(
            "INSERT INTO outbox (action_id, decision_id, rule_id, firing_id, kind, target,"
            " payload, status, created_at, next_attempt_at) VALUES ('act-1', 1, 'tower-a/pay',"
            " 'tower-a/pay#1', 'release', 'bank', '{\"project\":\"tower-a\"}', 'cancelled', ?, ?)",
            (t0, t0),
        )
        db.execute(
            "INSERT INTO ledger (release_id, escrow, amount, currency, payee, rule_id,"
            " firing_id, recorded_at) VALUES ('act-1', 'esc', '100.00', 'USD', 'acme',"
            " 'tower-a/pay', 'tower-a/pay#1', ?)",
            (t0,),
        )
        for movement in ("reserve", "cancel", "return"):
            db.execute(
                "INSERT INTO ledger_entries (release_id, escrow, movement, amount, currency, at)"
                " VALUES ('act-1', 'esc', ?, '100.00', 'USD', ?)",
                (movement, t0),
            )
        db.execute("DELETE FROM ledger_entries WHERE movement = 'cancel'")  # a gap in the ids
        db.execute(
            "INSERT INTO ledger_entries (release_id, escrow, movement, amount, currency, at)"
            " VALUES ('act-1', 'esc', 'cancel', '100.00', 'USD', ?)",
            (t0,),
        )
    store = await open_store(path)
    try:
        before = [(m.id, m.movement) for m in await store.ledger_movements()]
        assert before == [(1, "reserve"), (3, "return"), (4, "cancel")]
        callback = SettlementCallback(
            "bank", "act-1", "settled", "ref-1", None, "msg-1", "b1", build.at(10)
        )
        result = await store.settle_release(callback)
        assert result is not None
        assert [(m.id, m.movement) for m in result.movements] == [
            (5, "reclaim"),
            (6, "send"),
            (7, "settle"),
        ]
        figures = (await store.escrow_totals())["esc"]
        assert (figures.settled, figures.returned, figures.committed) == (
            Decimal("100.00"),
            Decimal("0.00"),
            Decimal("100.00"),
        )
    finally:
        await store.close()
