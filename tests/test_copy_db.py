"""``gatekeeper copy-db`` on real histories: a real daemon records the construction
example's month into a real SQLite file (facts, releases delivered to a real receiver,
approvals, admin acts, deadlines, a dead letter), which is copied to a real PostgreSQL
database (a scratch schema, ``tests/pg.py``) and back; the copy is verified, reproduced by
the self-check, and served by a daemon that goes on where the original stopped."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import sqlite3
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from gatekeeper.cli.copydb import run_copy_db_command
from gatekeeper.cli.main import build_parser, main
from gatekeeper.clock import FixedClock
from gatekeeper.store import open_store
from gatekeeper.store.lockfile import DatabaseLock
from gatekeeper.store.sqlite import MIGRATIONS

from . import pg
from .conftest import ENV, Project, Receiver
from .test_backtest import T0, Recorder, backtest, record_history, write_deployment
from .test_daemon_postgresql import on_postgres

DEAD_PATH = "/ci/construction-docs"
"""The pipeline target: its first delivery is answered 400, a dead letter."""


async def copy_db(*argv: str) -> tuple[int, str]:
    """``gatekeeper copy-db ARGV`` in a thread (it runs its own event loop)."""
    args: argparse.Namespace = build_parser().parse_args(["copy-db", *argv])
    out = io.StringIO()
    code = await asyncio.to_thread(run_copy_db_command, args, out)
    return code, out.getvalue()


async def in_thread(argv: list[str]) -> int:
    """``gatekeeper ARGV`` (``main``) in a thread: it runs its own event loop."""
    return await asyncio.to_thread(main, argv)


@pytest.fixture
async def recorded(
    tmp_path: Path, receiver: Receiver, start_daemon: Callable[..., Any]
) -> tuple[Project, Path]:
    """The recorded deployment and its SQLite database, its daemon stopped."""
    receiver.path_responses[DEAD_PATH] = [400]
    project = write_deployment(tmp_path / "deployment", receiver.url)
    gk, database = await record_history(project, start_daemon, reload=True)
    await gk.stop()
    return project, database


def sqlite_rows(database: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table of a SQLite database (the outbox with its rowid), sorted."""
    with contextlib.closing(sqlite3.connect(database)) as db:
        tables = [
            name
            for (name,) in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name != 'sqlite_sequence'"
            )
        ]
        return {
            table: sorted(db.execute(f"SELECT rowid, * FROM {table}").fetchall(), key=repr)
            for table in tables
        }


def pg_count(url: str, table: str) -> int:
    with psycopg.connect(url) as db:
        [(count,)] = db.execute(f"SELECT COUNT(*) FROM {table}").fetchall()
        return int(count)


async def test_a_recorded_month_copied_to_postgresql_verifies_replays_and_goes_on(
    recorded: tuple[Project, Path],
    receiver: Receiver,
    start_daemon: Callable[..., Any],
    postgres_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    project, database = recorded
    before = sqlite_rows(database)
    assert before["outbox"] and before["ledger_entries"] and before["admin_acts"]
    assert any(row[8] == "dead" for row in before["outbox"])  # status: the dead letter

    code, out = await copy_db("--from", str(database), "--to", postgres_url, "--format", "json")
    assert code == 0, out
    report = json.loads(out)
    assert report["verified"] is True
    assert report["schema_version"] == len(MIGRATIONS)
    copied = {t["table"]: t["rows"] for t in report["tables"]}
    assert copied == {table: len(rows) for table, rows in before.items()}
    for table, rows in copied.items():
        assert pg_count(postgres_url, table) == rows, table
    assert sqlite_rows(database) == before  # the source is unchanged

    # (b) the copy is the same history: the self-check reproduces every decision
    with psycopg.connect(postgres_url) as db:
        [(decisions,)] = db.execute("SELECT COUNT(*) FROM decisions").fetchall()
        queued = [q for (q,) in db.execute("SELECT queued FROM outbox ORDER BY queued")]
    assert queued == sorted(row[0] for row in before["outbox"])  # written order kept
    code, out = await backtest(project, "--self-check", "--database", postgres_url)
    assert code == 0, out
    assert out.strip() == f"{decisions} of {decisions} decisions reproduced"

    # (c) a daemon on the copy goes on: the fired once rule stays fired, seq continues
    on_postgres(project, postgres_url)
    delivered = len(receiver.received)
    clock = FixedClock(T0 + timedelta(days=30))
    gk = await start_daemon(project, clock=clock, env=ENV)
    with psycopg.connect(postgres_url) as db:
        [(fired,)] = db.execute(
            "SELECT fired_count FROM rule_state WHERE rule_id = 'tower-a/design-release'"
        ).fetchall()
    assert fired >= 1
    last_seq = max(row[0] for row in before["fact_log"])
    rec = Recorder(gk, clock)
    await rec.facts(("quality_gate", "qg_design", {"passed": False}))
    await rec.facts(("quality_gate", "qg_design", {"passed": True}))
    with psycopg.connect(postgres_url) as db:
        seqs = [s for (s,) in db.execute("SELECT seq FROM fact_log WHERE seq > %s", (last_seq,))]
        [(firings,)] = db.execute(
            "SELECT COUNT(*) FROM decisions WHERE rule_id = 'tower-a/design-release'"
            " AND outcome = 'fired'"
        ).fetchall()
    assert seqs == [last_seq + 1, last_seq + 2]
    assert firings == sum(
        1 for row in before["decisions"] if row[3] == "tower-a/design-release" and row[9] == "fired"
    )
    await asyncio.sleep(0.3)
    assert not [r for r in receiver.received[delivered:] if r.path.startswith("/bank")]
    # a database a daemon serves is not copied from (nor to), on PostgreSQL as on SQLite
    code, out = await copy_db("--from", postgres_url, "--to", str(tmp_path / "served.db"))
    assert (code, out) == (2, "")
    assert "is served by a gatekeeper daemon" in capsys.readouterr().err
    assert not (tmp_path / "served.db").exists()
    await gk.stop()


async def test_postgresql_back_to_sqlite_gives_the_same_rows(
    recorded: tuple[Project, Path], tmp_path: Path, postgres_url: str
) -> None:
    _, database = recorded
    code, out = await copy_db("--from", str(database), "--to", postgres_url)
    assert code == 0, out
    assert "verified" in out and "rows/s" in out
    back = tmp_path / "back" / "gatekeeper.db"
    code, out = await copy_db("--from", postgres_url, "--to", f"sqlite:///{back}")
    assert code == 0, out
    assert sqlite_rows(back) == sqlite_rows(database)
    with contextlib.closing(sqlite3.connect(back)) as db:
        sequences = dict(db.execute("SELECT name, seq FROM sqlite_sequence").fetchall())
    assert sequences["fact_log"] == max(row[0] for row in sqlite_rows(database)["fact_log"])


async def test_copying_into_a_database_that_is_not_empty_is_refused_and_changes_nothing(
    recorded: tuple[Project, Path],
    tmp_path: Path,
    postgres_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, database = recorded
    code, _ = await copy_db("--from", str(database), "--to", postgres_url)
    assert code == 0
    with psycopg.connect(postgres_url) as db:
        [(seqs,)] = db.execute("SELECT SUM(seq) FROM fact_log").fetchall()
    code, out = await copy_db("--from", str(database), "--to", postgres_url)
    assert (code, out) == (2, "")
    err = capsys.readouterr().err
    assert "(PostgreSQL) is not empty (rows in admin_acts, " in err and "fact_log" in err
    with psycopg.connect(postgres_url) as db:
        [(after,)] = db.execute("SELECT SUM(seq) FROM fact_log").fetchall()
    assert after == seqs
    # into a SQLite file that has a history too
    other = tmp_path / "other.db"
    assert await in_thread(["copy-db", "--from", postgres_url, "--to", str(other)]) == 0
    rows = sqlite_rows(other)
    assert await in_thread(["copy-db", "--from", str(database), "--to", str(other)]) == 2
    assert f"database {other} is not empty" in capsys.readouterr().err
    assert sqlite_rows(other) == rows


async def test_a_served_source_and_other_schema_versions_are_refused(
    recorded: tuple[Project, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, database = recorded
    target = tmp_path / "copy.db"
    lock = DatabaseLock(database.resolve())
    try:
        assert await in_thread(["copy-db", "--from", str(database), "--to", str(target)]) == 2
    finally:
        lock.release()
    err = capsys.readouterr().err
    assert f"in use by another gatekeeper daemon (pid {os.getpid()}" in err, err
    assert "stop it before copying" in err
    assert not target.exists()
    for version, says in ((len(MIGRATIONS) + 1, "newer than this gatekeeper"), (5, "older")):
        with contextlib.closing(sqlite3.connect(database)) as db:
            db.execute(f"PRAGMA user_version={version}")
        assert await in_thread(["copy-db", "--from", str(database), "--to", str(target)]) == 2
        err = capsys.readouterr().err
        assert says in err, err
        assert not target.exists()
    assert "open it once with this gatekeeper to migrate it" in err
    same = ["copy-db", "--from", str(database), "--to", f"sqlite:///{database}"]
    assert await in_thread(same) == 2
    assert "SOURCE and DEST are the same database" in capsys.readouterr().err
    missing = ["copy-db", "--from", str(tmp_path / "none.db"), "--to", str(target)]
    assert await in_thread(missing) == 2
    assert "does not exist" in capsys.readouterr().err
    garbage = tmp_path / "notes.db"
    garbage.write_text("not a database, " * 512)
    assert await in_thread(["copy-db", "--from", str(garbage), "--to", str(target)]) == 2
    err = capsys.readouterr().err
    assert f"cannot read database {garbage}: file is not a database" in err, err
    assert "Traceback" not in err and not target.exists()


async def test_a_postgresql_url_with_a_password_is_refused_without_repeating_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "gk.db"
    code = await in_thread(["copy-db", "--from", str(source), "--to", "postgresql://u:s3cret@h/db"])
    assert code == 2
    err = capsys.readouterr().err
    assert "s3cret" not in err and err.startswith("gatekeeper copy-db: ")


async def test_a_copy_that_does_not_verify_exits_1_and_keeps_nothing(
    recorded: tuple[Project, Path], postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A destination that changes what it is given (a trigger rewriting a release's amount
    as it is written) fails the verification: nothing of the copy is kept."""
    _, database = recorded
    store = await open_store(postgres_url)
    await store.close()
    with psycopg.connect(postgres_url) as db:
        db.execute(
            "CREATE FUNCTION skim() RETURNS trigger AS $$ BEGIN NEW.amount := '0.01';"
            " RETURN NEW; END $$ LANGUAGE plpgsql"
        )
        db.execute(
            "CREATE TRIGGER skim BEFORE INSERT ON ledger FOR EACH ROW EXECUTE FUNCTION skim()"
        )
    code, out = await copy_db("--from", str(database), "--to", postgres_url)
    assert (code, out) == (1, "")
    err = capsys.readouterr().err
    assert "did not verify; nothing was kept" in err
    assert "  ledger: " in err and "rows read" in err
    for table in ("fact_log", "decisions", "outbox", "ledger"):
        assert pg_count(postgres_url, table) == 0, table


async def test_copies_within_one_backend_keep_every_row(
    recorded: tuple[Project, Path], tmp_path: Path, postgres_url: str
) -> None:
    """SQLite to SQLite (the outbox's rowid kept), then PostgreSQL to PostgreSQL (another
    schema) and back to SQLite: the same rows."""
    _, database = recorded
    copy = tmp_path / "copy" / "gatekeeper.db"
    code, out = await copy_db("--from", str(database), "--to", str(copy))
    assert code == 0, out
    assert sqlite_rows(copy) == sqlite_rows(database)
    code, out = await copy_db("--from", str(copy), "--to", postgres_url)
    assert code == 0, out
    back = tmp_path / "back.db"
    with pg.scratch_database() as other:
        code, out = await copy_db("--from", postgres_url, "--to", other)
        assert code == 0, out
        code, out = await copy_db("--from", other, "--to", str(back))
        assert code == 0, out
    assert sqlite_rows(back) == sqlite_rows(database)
