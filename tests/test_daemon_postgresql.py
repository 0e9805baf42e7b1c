"""The daemon end to end on PostgreSQL: a real server (a scratch database, ``tests/pg.py``),
the real aiohttp app on 127.0.0.1 and a real receiver; what it committed survives a
restart."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from standardwebhooks.webhooks import Webhook

from .conftest import DESIGN_RULE, SECRET, Project, Receiver, fact
from .test_backtest import backtest, record_history, write_deployment
from .test_daemon import APPROVED, QA_PASSED, settle


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
