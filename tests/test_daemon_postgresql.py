"""The daemon end to end on PostgreSQL: a real server (a scratch database, ``tests/pg.py``),
the real aiohttp app on 127.0.0.1 and a real receiver; what it committed survives a
restart."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from standardwebhooks.webhooks import Webhook

from .conftest import DESIGN_RULE, SECRET, Project, Receiver, fact
from .test_backtest import backtest, record_history, write_deployment
from .test_daemon import APPROVED, QA_PASSED, settle

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def on_postgres(project: Project, url: str) -> Project:
    """``project`` with its database: setting pointing at ``url``."""
    text = project.config_path.read_text()
    assert "database: state/gatekeeper.db\n" in text, text
    project.config_path.write_text(text.replace("state/gatekeeper.db", url))
    return project


async def test_a_fact_fires_a_release_delivered_and_kept_across_a_restart(
    project_factory: Callable[..., Project],
    receiver: Receiver,
    start_daemon: Any,
    postgres_url: str,
) -> None:
    project = on_postgres(project_factory(receiver.url), postgres_url)
    project.write_rule("design.yaml", DESIGN_RULE)
    gk = await start_daemon(project)
    assert type(gk.daemon.store).__name__ == "PostgresStore"
    status, body = await gk.post("/v1/facts", {"facts": [APPROVED, QA_PASSED]})
    assert (status, body["accepted"]) == (200, 2), body
    received = await receiver.wait_for(2)
    release = next(r for r in received if r.path == "/bank")
    assert Webhook(SECRET).verify(release.raw, release.headers)["amount"] == "5000.00"
    await settle()
    _, actions = await gk.get("/v1/actions")
    assert {a["status"] for a in actions["actions"]} == {"delivered"}
    await gk.stop()

    again = await start_daemon(project)
    _, rule = await again.get("/v1/rules/tower-a/design-release")
    assert rule["fired_count"] == 1  # the rule state survived
    _, facts = await again.get("/v1/facts")
    assert len(facts["facts"]) == 2
    _, actions = await again.get("/v1/actions")
    assert [a["status"] for a in actions["actions"]] == ["delivered", "delivered"]
    # fire once holds: the condition going false and true again fires nothing
    await again.post("/v1/facts", fact("quality_gate", "qg1", passed=False))
    await again.post("/v1/facts", QA_PASSED)
    await settle()
    assert len(receiver.received) == 2
    _, escrows = await again.get("/v1/escrows")
    [account] = escrows["escrows"]
    assert (account["reserved"], account["sent"]) == ("0.00", "5000.00")


async def test_a_month_recorded_on_postgresql_is_reproduced_by_the_self_check(
    tmp_path: Path, receiver: Receiver, start_daemon: Any, postgres_url: str
) -> None:
    """The backtest's history (``gatekeeper.store.history``) read from PostgreSQL, in a
    read-only session, while the daemon still runs on it."""
    project = on_postgres(write_deployment(tmp_path / "deployment", receiver.url), postgres_url)
    gk, _ = await record_history(project, start_daemon, reload=True)
    with psycopg.connect(postgres_url) as db:
        [(total,)] = db.execute("SELECT COUNT(*) FROM decisions").fetchall()
        triggers = {t for (t,) in db.execute("SELECT DISTINCT trigger FROM decisions")}
    assert triggers == {"fact", "approval", "admin", "time", "reload"}
    code, out = await backtest(project, "--self-check", "--database", postgres_url)
    assert code == 0, out
    assert out.strip() == f"{total} of {total} decisions reproduced"
    await gk.stop()


async def test_a_second_daemon_on_the_database_is_refused_naming_the_first(
    project_factory: Callable[..., Project],
    receiver: Receiver,
    start_daemon: Any,
    postgres_url: str,
) -> None:
    """One daemon decides on a database at a time: a second one started on it is refused
    (its decisions would not see the first one's), the first goes on serving, and once it
    stops a daemon starts there again."""
    from gatekeeper.store.errors import DatabaseInUse

    project = on_postgres(project_factory(receiver.url), postgres_url)
    project.write_rule("design.yaml", DESIGN_RULE)
    first = await start_daemon(project)
    with pytest.raises(DatabaseInUse) as refused:
        await start_daemon(project)
    message = str(refused.value)
    assert "served by another gatekeeper daemon (gatekeeper " in message, message
    assert f":{os.getpid()} from " in message, message  # the holder's host:pid
    status, body = await first.post("/v1/facts", {"facts": [APPROVED, QA_PASSED]})
    assert (status, body["accepted"]) == (200, 2), body
    await first.stop()
    again = await start_daemon(project)
    _, rule = await again.get("/v1/rules/tower-a/design-release")
    assert rule["fired_count"] == 1


async def test_the_lock_is_per_schema_and_taken_again_after_a_broken_connection(
    postgres_url: str,
) -> None:
    """Two schemas of one database do not exclude each other. A writer whose session the
    server ended (its lock went with it) takes the lock again before its next write; when
    another daemon took it meanwhile, the write is refused (DatabaseInUse) and writes
    nothing, however often it is tried."""
    from gatekeeper.store import open_store
    from gatekeeper.store.errors import DatabaseInUse, StoreUnavailable

    from .pg import scratch_database

    first = await open_store(postgres_url)
    second = await open_store(postgres_url)
    try:
        await first.hold_daemon_lock()
        with pytest.raises(DatabaseInUse):
            await second.hold_daemon_lock()
        with scratch_database() as elsewhere:
            other = await open_store(elsewhere)
            try:
                await other.hold_daemon_lock()  # another schema: its own lock
            finally:
                await other.close()

        assert await first.purge_idempotency_keys(NOW) == 0  # writes while it holds
        with psycopg.connect(postgres_url, autocommit=True) as db:
            [(pid,)] = db.execute(
                "SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid()"
                " AND datname = current_database() AND backend_type = 'client backend'"
                " AND pid IN (SELECT pid FROM pg_locks WHERE locktype = 'advisory')"
            ).fetchall()
            db.execute("SELECT pg_terminate_backend(%s)", (pid,))
        await asyncio.sleep(0.2)
        await second.hold_daemon_lock()  # the first's session ended: free
        with pytest.raises(StoreUnavailable):  # the write that meets the broken session
            await first.purge_idempotency_keys(NOW)
        for _ in range(2):
            with pytest.raises(DatabaseInUse):
                await first.purge_idempotency_keys(NOW)
        assert await second.purge_idempotency_keys(NOW) == 0
    finally:
        await first.close()
        await second.close()
