"""A database that cannot take writes at run time (disk full, locked by another process):
writes answer 503 with ``Retry-After``, the log says so once per condition per interval,
``/healthz`` reports it, and once it clears writes succeed with memory matching the
database (nothing half applied). On a real SQLite file and a real HTTP server; disk full
comes from SQLite itself (``PRAGMA max_page_count`` on the store's own connection)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web

from .conftest import DEPLOY_RULE, Project, Running, fact


async def _on_writer(gk: Running, sql: str) -> Any:
    """Run ``sql`` on the store's own writer connection, on its thread."""
    store = gk.daemon.store

    def run() -> Any:
        return store._db.execute(sql).fetchone()

    return await store._writer.run(run)


async def post(gk: Running, body: Any) -> tuple[int, dict[str, str], Any]:
    async with gk.session.post(gk.url + "/v1/facts", json=body) as response:
        return response.status, dict(response.headers), await response.json()


async def healthz(gk: Running) -> tuple[int, dict[str, Any]]:
    return await gk.get("/healthz")


async def assert_memory_matches_the_database(gk: Running) -> None:
    daemon = gk.daemon
    assert daemon.writer.facts.snapshot() == await daemon.store.load_facts()
    assert daemon.writer.states == await daemon.store.load_rule_states()


def _store_log(caplog: pytest.LogCaptureFixture, condition: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if condition in r.getMessage()]


async def test_disk_full_answers_503_logs_once_and_recovers(
    project_factory: Callable[..., Project],
    start_daemon: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    project = project_factory()
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    gk = await start_daemon(project)
    status, _, _ = await post(gk, fact("task", "T-1", status="open"))
    assert status == 200
    (pages,) = await _on_writer(gk, "PRAGMA page_count")
    await _on_writer(gk, f"PRAGMA max_page_count={pages}")  # the disk is full
    caplog.clear()
    caplog.set_level(logging.INFO)
    big = "x" * 50_000  # needs new pages
    for n in range(6):
        status, headers, body = await post(gk, fact("task", f"T-full-{n}", blob=big))
        assert status == 503, body
        assert int(headers["Retry-After"]) > 0
        assert "disk_full" in body["error"]["message"]
    # the completed task would fire the deploy rule: it must not, half or whole
    status, _, _ = await post(gk, fact("task", "T-17", status="completed", blob=big))
    assert status == 503
    assert len(_store_log(caplog, "disk_full")) == 1, [r.getMessage() for r in caplog.records]
    assert not [r for r in caplog.records if r.exc_info], "no traceback per request"
    status, health = await healthz(gk)
    assert status == 200
    assert health["status"] == "degraded"
    assert health["store"]["condition"] == "disk_full"
    await assert_memory_matches_the_database(gk)
    assert ("tower-a", "task", "T-17") not in gk.daemon.writer.facts.snapshot()
    assert await gk.daemon.store.list_actions() == []

    await _on_writer(gk, "PRAGMA max_page_count=1073741823")  # space again
    status, _, body = await post(gk, fact("task", "T-17", status="completed", blob=big))
    assert status == 200, body
    status, health = await healthz(gk)
    assert health["status"] == "ok" and health["store"] is None
    await assert_memory_matches_the_database(gk)
    assert len(await gk.daemon.store.list_actions()) == 1  # fired once, now
    assert [r for r in caplog.records if "database writes succeed again" in r.getMessage()]


async def test_a_database_locked_by_another_process_answers_503_then_recovers(
    project_factory: Callable[..., Project],
    start_daemon: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    project = project_factory()
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    gk = await start_daemon(project)
    database = project.root / "state" / "gatekeeper.db"
    caplog.set_level(logging.INFO)
    with contextlib.closing(sqlite3.connect(database, isolation_level=None)) as other:
        other.execute("BEGIN EXCLUSIVE")
        status, headers, body = await post(gk, fact("task", "T-17", status="completed"))
        assert status == 503, body
        assert int(headers["Retry-After"]) > 0
        assert "locked" in body["error"]["message"]
        status, health = await healthz(gk)
        assert (status, health["status"], health["store"]["condition"]) == (
            200,
            "degraded",
            "locked",
        )
        status, listed = await gk.get("/v1/facts")  # reads go on (WAL)
        assert status == 200 and listed["facts"] == []
        other.execute("ROLLBACK")
    assert len(_store_log(caplog, "locked")) == 1
    assert not [r for r in caplog.records if r.exc_info]
    status, _, body = await post(gk, fact("task", "T-17", status="completed"))
    assert status == 200, body
    await assert_memory_matches_the_database(gk)
    assert len(await gk.daemon.store.list_actions()) == 1


async def test_delivery_outcomes_the_database_cannot_record_are_logged_once(
    project_factory: Callable[..., Project],
    start_daemon: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The dispatcher's writes meet the same condition: reported to the same once-per-
    interval line, no traceback, and the action is delivered (again) once it clears."""
    answer = asyncio.Event()
    arrived: list[str] = []

    async def slow_receiver(request: web.Request) -> web.Response:
        arrived.append(request.path)
        await answer.wait()
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/{tail:.*}", slow_receiver)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        project = project_factory(f"http://127.0.0.1:{port}")
        project.write_rule("deploy.yaml", DEPLOY_RULE)
        gk = await start_daemon(project)
        caplog.set_level(logging.INFO)
        status, _, _ = await post(gk, fact("task", "T-17", status="completed"))
        assert status == 200
        while not arrived:
            await asyncio.sleep(0.01)
        database = project.root / "state" / "gatekeeper.db"
        with contextlib.closing(sqlite3.connect(database, isolation_level=None)) as other:
            other.execute("BEGIN EXCLUSIVE")
            answer.set()  # the receiver answers; recording it waits, then fails: locked
            for _ in range(200):
                if (await healthz(gk))[1]["store"] is not None:
                    break
                await asyncio.sleep(0.05)
            status, health = await healthz(gk)
            assert health["store"]["condition"] == "locked"
            other.execute("ROLLBACK")
        assert len(_store_log(caplog, "locked")) == 1
        assert not [r for r in caplog.records if r.exc_info], "no traceback"
        for _ in range(400):  # held back a few seconds, then sent again and recorded
            if [a.status for a in await gk.daemon.store.list_actions()] == ["delivered"]:
                break
            await asyncio.sleep(0.05)
        assert [a.status for a in await gk.daemon.store.list_actions()] == ["delivered"]
        assert (await healthz(gk))[1]["status"] == "ok"
    finally:
        await runner.cleanup()
