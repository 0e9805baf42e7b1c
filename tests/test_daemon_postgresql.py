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


async def test_daemons_serve_one_database_side_by_side_and_an_older_one_is_refused(
    project_factory: Callable[..., Project],
    receiver: Receiver,
    start_daemon: Any,
    postgres_url: str,
) -> None:
    """Two daemons start on one database and both serve it (what one decided, the other
    knows at its next decision). A gatekeeper of before, which decides alone (it holds the
    daemon lock exclusive), is never started beside them, and a daemon is refused beside
    it, naming it."""
    from gatekeeper.store.errors import DatabaseInUse
    from gatekeeper.store.postgresql import DAEMON_LOCK_KEY

    project = on_postgres(project_factory(receiver.url), postgres_url)
    project.write_rule("design.yaml", DESIGN_RULE)
    first = await start_daemon(project)
    second = await start_daemon(project)
    status, body = await second.post("/v1/facts", {"facts": [APPROVED, QA_PASSED]})
    assert (status, body["accepted"]) == (200, 2), body
    status, body = await first.post("/v1/facts", {"facts": [APPROVED, QA_PASSED]})
    assert status == 200, body
    _, rule = await first.get("/v1/rules/tower-a/design-release")
    assert rule["fired_count"] == 1  # the second's firing, known to the first
    with psycopg.connect(postgres_url, autocommit=True) as older:
        locked = older.execute(f"SELECT pg_try_advisory_lock(({DAEMON_LOCK_KEY}))")
        assert locked.fetchone()[0] is False  # not beside serving daemons
    await first.stop()
    await second.stop()

    older = psycopg.connect(
        postgres_url, autocommit=True, application_name=f"gatekeeper older:{os.getpid()}"
    )
    try:
        alone = f"SELECT pg_try_advisory_lock(({DAEMON_LOCK_KEY}))"
        for _ in range(50):  # the stopped daemons' sessions end on the server's side
            if older.execute(alone).fetchone()[0]:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the daemon lock was not freed once both daemons stopped")
        with pytest.raises(DatabaseInUse) as refused:
            await start_daemon(project)
        message = str(refused.value)
        assert f"(schema in use: gatekeeper older:{os.getpid()} from " in message, message
        assert "decides alone" in message, message
    finally:
        older.close()
    again = await start_daemon(project)
    _, rule = await again.get("/v1/rules/tower-a/design-release")
    assert rule["fired_count"] == 1


async def test_the_lock_is_shared_per_schema_and_taken_again_after_a_broken_connection(
    postgres_url: str,
) -> None:
    """Serving stores share the schema's daemon lock; a session wanting it alone (a
    migration, a copy) is refused while they hold it; another schema has its own. A writer
    whose session the server ended (its share went with it) takes its share again before
    its next write, unless a session holds the lock alone meanwhile: then the write is
    refused (DatabaseInUse), writing nothing."""
    from gatekeeper.store import open_store
    from gatekeeper.store.errors import DatabaseInUse, StoreUnavailable
    from gatekeeper.store.postgresql import DAEMON_LOCK_KEY

    from .pg import scratch_database

    here = (
        "locktype = 'advisory' AND granted"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )

    def writer_pid(store: Any) -> int:
        """The backend of ``store``'s writer session (other sessions of the test run's
        database, such as those of daemons killed by earlier tests that the server has
        not ended yet, hold advisory locks of their own schemas)."""
        return int(store._db.info.backend_pid)

    def holders(db: psycopg.Connection[Any]) -> int:
        pids = [writer_pid(s) for s in (first, second) if s._db is not None]
        [(count,)] = db.execute(
            f"SELECT COUNT(*) FROM pg_locks WHERE {here} AND mode = 'ShareLock' AND pid = ANY(%s)",
            (pids,),
        ).fetchall()
        return int(count)

    first = await open_store(postgres_url)
    second = await open_store(postgres_url)
    admin = psycopg.connect(postgres_url, autocommit=True)
    try:
        await first.hold_daemon_lock()
        await second.hold_daemon_lock()  # side by side
        assert holders(admin) == 2
        alone = f"SELECT pg_try_advisory_lock(({DAEMON_LOCK_KEY}))"
        assert admin.execute(alone).fetchone()[0] is False
        with scratch_database() as elsewhere, psycopg.connect(elsewhere) as other:
            assert other.execute(alone).fetchone()[0] is True  # another schema: its own

        assert await first.purge_idempotency_keys(NOW) == 0  # writes while it holds
        pid = writer_pid(first)
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))  # the first's writer
        await asyncio.sleep(0.2)
        with pytest.raises(StoreUnavailable):  # the write that meets the broken session
            await first.purge_idempotency_keys(NOW)
        assert await first.purge_idempotency_keys(NOW) == 0  # its share taken again
        assert holders(admin) == 2

        await second.close()
        admin.execute("SELECT pg_terminate_backend(%s)", (writer_pid(first),))
        await asyncio.sleep(0.2)
        assert admin.execute(alone).fetchone()[0] is True  # a migration holds it alone
        with pytest.raises(StoreUnavailable):
            await first.purge_idempotency_keys(NOW)
        with pytest.raises(DatabaseInUse):  # after waiting for it LOCK_TIMEOUT_MS
            await first.purge_idempotency_keys(NOW)
        admin.execute(f"SELECT pg_advisory_unlock(({DAEMON_LOCK_KEY}))")
        assert await first.purge_idempotency_keys(NOW) == 0
    finally:
        admin.close()
        await first.close()
        await second.close()
