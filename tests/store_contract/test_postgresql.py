"""The PostgreSQL backend's schema: one migration file holding the schema of version 12
(SQLite's 1 to 12), the same tables and columns as SQLite's, applied once under an advisory
lock however many daemons start together, recorded in ``schema_version``; a newer schema
and another application's tables are refused; read-only opening creates nothing; a
connection the server ended is opened again."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from gatekeeper.store import open_store
from gatekeeper.store.errors import (
    NotAGatekeeperDatabase,
    SchemaTooNew,
    StoreUnavailable,
)
from gatekeeper.store.migrations import load_migrations
from gatekeeper.store.postgresql import MIGRATIONS, SCHEMA_VERSION

from .. import pg
from . import build


def _tables(url: str) -> dict[str, set[str]]:
    with psycopg.connect(url) as db:
        rows = db.execute(
            "SELECT table_name, column_name FROM information_schema.columns"
            " WHERE table_schema = current_schema()"
        ).fetchall()
    tables: dict[str, set[str]] = {}
    for table, column in rows:
        tables.setdefault(table, set()).add(column)
    return tables


def _versions(url: str) -> list[int]:
    with psycopg.connect(url) as db:
        return [r[0] for r in db.execute("SELECT version FROM schema_version ORDER BY version")]


def test_the_first_migration_is_the_schema_of_version_12_in_step_with_sqlite() -> None:
    assert [m.version for m in MIGRATIONS] == list(range(12, 12 + len(MIGRATIONS)))
    assert len(load_migrations("sqlite")) == SCHEMA_VERSION  # the same schema version


async def test_the_schema_has_sqlites_tables_and_columns(postgres_url: str, tmp_path: Path) -> None:
    store = await open_store(postgres_url)
    await store.close()
    on_postgres = _tables(postgres_url)
    sqlite_store = await open_store(tmp_path / "gk.db")
    await sqlite_store.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "gk.db")) as db:
        names = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        on_sqlite = {
            name: {r[1] for r in db.execute(f"PRAGMA table_info({name})")}
            for name in names
            if name != "sqlite_sequence"
        }
    on_postgres.pop("schema_version")
    on_postgres["outbox"].remove("queued")  # SQLite's rowid
    assert on_postgres == on_sqlite


async def test_daemons_starting_together_on_a_new_database_migrate_it_once(
    postgres_url: str,
) -> None:
    stores = await asyncio.gather(*(open_store(postgres_url) for _ in range(4)))
    try:
        assert all(s.is_open for s in stores)
        assert _versions(postgres_url) == [m.version for m in MIGRATIONS]
        await stores[0].commit_transition(build.facts(build.T0, ("p", "task", "a", {})))
        assert await stores[3].load_facts() == {("p", "task", "a"): {}}
    finally:
        for store in stores:
            await store.close()
    again = await open_store(postgres_url)  # reopening runs nothing again
    await again.close()
    assert _versions(postgres_url) == [m.version for m in MIGRATIONS]


async def test_a_database_of_a_newer_gatekeeper_is_refused(postgres_url: str) -> None:
    store = await open_store(postgres_url)
    await store.close()
    with psycopg.connect(postgres_url) as db:
        db.execute(
            "INSERT INTO schema_version (version, name) VALUES (%s, 'later')",
            (SCHEMA_VERSION + 1,),
        )
    for read_only in (False, True):
        with pytest.raises(SchemaTooNew, match="newer than this gatekeeper"):
            await open_store(postgres_url, read_only=read_only)


async def test_a_database_with_another_applications_tables_is_refused_untouched(
    postgres_url: str,
) -> None:
    with psycopg.connect(postgres_url) as db:
        db.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total NUMERIC)")
    for read_only in (False, True):
        with pytest.raises(NotAGatekeeperDatabase, match="invoices") as refused:
            await open_store(postgres_url, read_only=read_only)
        assert "gk_test_" in str(refused.value)  # names the database
    assert _tables(postgres_url) == {"invoices": {"id", "total"}}


async def test_read_only_on_an_empty_database_creates_nothing(postgres_url: str) -> None:
    with pytest.raises(StoreUnavailable, match="no gatekeeper schema"):
        await open_store(postgres_url, read_only=True)
    assert _tables(postgres_url) == {}


async def test_a_read_only_store_is_a_read_only_session(postgres_url: str) -> None:
    writer = await open_store(postgres_url)
    reader = await open_store(postgres_url, read_only=True)
    try:
        with pytest.raises(StoreUnavailable, match="read-only") as refused:
            await reader.purge_idempotency_keys(build.T0)
        assert refused.value.condition == "read_only"
        # even SQL sent past the store's own check is refused by the server
        session = reader._reader  # type: ignore[attr-defined]
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            await session.execute("DELETE FROM meta")
    finally:
        await reader.close()
        await writer.close()


async def test_an_unreachable_server_is_unavailable_naming_host_and_database() -> None:
    url = "postgresql://gk@127.0.0.1:1/gatekeeper?connect_timeout=2"
    with pytest.raises(StoreUnavailable, match=r"gatekeeper on 127\.0\.0\.1:1") as refused:
        await open_store(url)
    assert "PGPASSWORD" in str(refused.value)  # what to do


async def test_connections_the_server_ended_are_opened_again(postgres_url: str) -> None:
    store = await open_store(postgres_url)
    try:
        assert await store.commit_transition(build.facts(build.T0, ("p", "task", "a", {}))) == [1]
        with pg.admin() as db:  # as a server restart or a failover ends them
            db.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid != pg_backend_pid()",
                (conninfo_to_dict(postgres_url)["dbname"],),
            )
        with pytest.raises(StoreUnavailable) as ended:
            await store.commit_transition(build.facts(build.at(1), ("p", "task", "b", {})))
        assert ended.value.condition == "unavailable"
        with pytest.raises(StoreUnavailable):
            await store.load_facts()
        # the next calls connect again; nothing of the failed write was kept
        assert await store.commit_transition(build.facts(build.at(2), ("p", "task", "c", {}))) == [
            2
        ]
        assert set(await store.load_facts()) == {("p", "task", "a"), ("p", "task", "c")}
    finally:
        await store.close()
