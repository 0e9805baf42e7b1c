"""``gatekeeper copy-db`` from SQLite to PostgreSQL: rows per second for a 100,000-fact
history, beside a raw-INSERT baseline of the same rows in the same run.

Run: ``python bench/bench_copy_db.py`` (about 60 s on 2 cores); ``--facts``, ``--runs``.
Needs the PostgreSQL at ``--dsn`` (default ``postgresql://postgres@127.0.0.1:5432/postgres``).

The history: a SQLite database made by this gatekeeper's migrations, filled with
``--facts`` fact log entries (200 tasks' facts over and over, each a small JSON object),
the current facts, one decision per fact (an evaluation of about 300 bytes referencing
its fact's seq) and a ruleset; written with plain INSERTs (what a daemon would have
written, without running one for minutes).

Each run, on a fresh schema of a scratch database ``gk_bench_<random>`` (dropped at the
end), migrated by opening it as the daemon does:

- **copy-db**: ``gatekeeper.store.copy.copy_database`` from the SQLite file: discover the
  tables, read, ``COPY`` in, set the sequences, read everything back and verify, commit
  (``CopyReport.seconds``; the migrations of the new schema are not counted);
- **raw INSERT** (baseline): the same rows, read from the SQLite file into memory
  beforehand (not timed), inserted with psycopg's ``executemany`` of one plain ``INSERT``
  per table (psycopg pipelines it) in one transaction, committed: no reading, no
  verification.

Rows/s counts every row of every table. Runs interleave the two; the figures are medians.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import psycopg
from _common import fmt, machine_header, median, spread, table

from gatekeeper.store import open_store
from gatekeeper.store.copy import copy_database

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
TASKS = 200
T = "2026-11-02T09:00:00.000000Z"


def make_history(path: Path, facts: int) -> dict[str, int]:
    """Fill a new gatekeeper SQLite database at ``path``; returns its rows per table."""

    async def create() -> None:
        store = await open_store(str(path))
        await store.close()

    asyncio.run(create())
    evaluation = json.dumps(
        {"clauses": [{"expr": 'task["T-1"].status == "completed"', "value": False}] * 3},
        sort_keys=True,
        separators=(",", ":"),
    )
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("BEGIN")
        db.execute(
            "INSERT INTO rulesets VALUES ('v1', '{}', NULL, ?, ?)",
            (T, T),
        )
        db.executemany(
            "INSERT INTO fact_log (seq, project, kind, id, data, received_at) VALUES"
            " (?, 'bench', 'task', ?, ?, ?)",
            (
                (seq, f"T-{seq % TASKS}", f'{{"n":{seq},"status":"open"}}', T)
                for seq in range(1, facts + 1)
            ),
        )
        db.execute(
            "INSERT INTO facts (project, kind, id, data, seq, updated_at)"
            " SELECT project, kind, id, data, MAX(seq), received_at FROM fact_log"
            " GROUP BY project, kind, id"
        )
        db.executemany(
            "INSERT INTO decisions (decided_at, rule_id, rule_hash, ruleset_version, trigger,"
            " fact_seq, outcome, gate_open, evaluation, project)"
            " VALUES (?, ?, 'h', 'v1', 'fact', ?, 'not_fired', 0, ?, 'bench')",
            ((T, f"bench/r{seq % TASKS}", seq, evaluation) for seq in range(1, facts + 1)),
        )
        db.execute("COMMIT")
        tables = [
            n
            for (n,) in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite%'"
            )
        ]
        return {t: int(db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]) for t in tables}


def read_rows(path: Path) -> dict[str, tuple[list[str], list[tuple[Any, ...]]]]:
    """Every non-empty table's columns and rows (flags as booleans, as PostgreSQL has them)."""
    flags = {"gate_open"}
    found = {}
    with contextlib.closing(sqlite3.connect(path)) as db:
        for table_name in ("rulesets", "fact_log", "facts", "decisions"):
            columns = [row[1] for row in db.execute(f"PRAGMA table_info({table_name})")]
            rows = [
                tuple(
                    bool(v) if c in flags and v is not None else v
                    for c, v in zip(columns, row, strict=True)
                )
                for row in db.execute(f"SELECT * FROM {table_name}")
            ]
            found[table_name] = (columns, rows)
    return found


def raw_insert(url: str, data: dict[str, tuple[list[str], list[tuple[Any, ...]]]]) -> float:
    """Insert ``data`` with one ``executemany`` per table, one transaction; seconds."""
    started = time.perf_counter()
    with psycopg.connect(url) as db, db.cursor() as cursor:
        for table_name, (columns, rows) in data.items():
            marks = ", ".join(["%s"] * len(columns))
            cursor.executemany(
                f"INSERT INTO {table_name} ({', '.join(columns)}) VALUES ({marks})",  # type: ignore[arg-type]
                rows,
            )
        db.commit()
    return time.perf_counter() - started


@contextlib.contextmanager
def scratch_database(dsn: str) -> Any:
    name = f"gk_bench_{secrets.token_hex(5)}"
    with psycopg.connect(dsn, autocommit=True) as db:
        db.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
    try:
        head, _, _ = dsn.partition("?")
        yield head.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(dsn, autocommit=True) as db:
            db.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]


def fresh_schema(database: str) -> str:
    """A new, migrated schema in ``database``: the URL of its sessions."""
    schema = f"s_{secrets.token_hex(5)}"
    with psycopg.connect(database, autocommit=True) as db:
        db.execute(f'CREATE SCHEMA "{schema}"')  # type: ignore[arg-type]
    url = f"{database}?options=-csearch_path%3D{schema}"

    async def migrate() -> None:
        store = await open_store(url)
        await store.close()

    asyncio.run(migrate())
    return url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=DEFAULT_DSN)
    parser.add_argument("--facts", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(machine_header("copy-db: SQLite to PostgreSQL"))
    with tempfile.TemporaryDirectory() as tmp, scratch_database(args.dsn) as database:
        source = Path(tmp) / "gatekeeper.db"
        counts = make_history(source, args.facts)
        total = sum(counts.values())
        print(f"   history: {args.facts:,} facts, {total:,} rows in {len(counts)} tables")
        data = read_rows(source)
        assert sum(len(rows) for _, rows in data.values()) == total
        copied: list[float] = []
        inserted: list[float] = []
        for _ in range(args.runs):
            report = copy_database(str(source), fresh_schema(database))
            assert report.rows == total
            copied.append(total / report.seconds)
            inserted.append(total / raw_insert(fresh_schema(database), data))
    rows = [
        ["copy-db (read, COPY, verify)", fmt(median(copied)), spread(copied)],
        ["raw INSERT (baseline)", fmt(median(inserted)), spread(inserted)],
    ]
    print(table(["variant", "rows/s", "runs"], rows))
    print(
        f"   copy-db / raw INSERT: {median(copied) / median(inserted):.2f}x;"
        f" {args.facts:,} facts in {total / median(copied):.1f} s"
    )


if __name__ == "__main__":
    main()
