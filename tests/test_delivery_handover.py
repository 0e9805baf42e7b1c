"""Delivery of committed actions handed over in memory, outcomes recorded in groups, and the
request id in delivery log lines (also after a restart)."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from gatekeeper.cli.main import JsonLogFormatter
from gatekeeper.store.records import AttemptRecord

from .conftest import DEPLOY_RULE, Project, Receiver, fact


class JsonLines(logging.Handler):
    """Keeps each record of a logger as the JSON line ``gatekeeper serve --log-format json``
    would write."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(JsonLogFormatter())
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@pytest.fixture
def delivery_log() -> Iterator[JsonLines]:
    logger = logging.getLogger("gatekeeper.delivery.dispatcher")
    handler = JsonLines()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


async def eventually(check: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def notify_rules(project: Project, numbers: range, task: str) -> None:
    """Rules ``tower-a/n<number>`` that each fire once, with one webhook notify, when fact
    ``task``/``<task>`` has ``ok``."""
    for n in numbers:
        project.write_rule(
            f"n{n}.yaml",
            f"""\
            id: tower-a/n{n}
            project: tower-a
            when: task.{task}.ok
            fire: once
            actions:
              - notify: {{target: ci, message: "n{n}"}}
            """,
        )


def outbox_rows(project: Project) -> list[tuple[str, int]]:
    db = sqlite3.connect(project.root / "state" / "gatekeeper.db")
    try:
        return db.execute("SELECT status, attempts FROM outbox ORDER BY action_id").fetchall()
    finally:
        db.close()


async def test_request_id_is_logged_for_a_delivery_after_restart(
    project_factory: Callable[..., Project],
    receiver: Receiver,
    start_daemon: Any,
    delivery_log: JsonLines,
) -> None:
    project = project_factory(receiver.url)
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    gk = await start_daemon(project)
    await gk.daemon.dispatcher.stop(grace_s=0)  # the daemon dies right after the commit
    async with gk.session.post(
        gk.url + "/v1/facts",
        json=fact("task", "T-17", status="completed"),
        headers={"X-Request-Id": "req-before-restart"},
    ) as response:
        assert response.status == 200, await response.text()
    await asyncio.sleep(0.1)
    assert receiver.received == []
    await gk.stop()

    gk2 = await start_daemon(project)  # a new process would know nothing but the database
    await receiver.wait_for(1)
    await eventually(lambda: gk2.daemon.dispatcher.delivered == 1, "the delivery")
    delivered = [line for line in delivery_log.lines if line["message"].startswith("action")]
    assert len(delivered) == 1, delivered
    assert delivered[0]["message"].startswith("action delivered")
    assert delivered[0]["request_id"] == "req-before-restart"
    assert "request req-before-restart" in delivered[0]["message"]
    assert delivered[0]["action_id"] == receiver.received[0].headers["webhook-id"]


async def test_request_id_is_logged_for_a_delivery_handed_over(
    project_factory: Callable[..., Project],
    receiver: Receiver,
    start_daemon: Any,
    delivery_log: JsonLines,
) -> None:
    project = project_factory(receiver.url)
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    gk = await start_daemon(project)
    async with gk.session.post(
        gk.url + "/v1/facts",
        json=fact("task", "T-17", status="completed"),
        headers={"X-Request-Id": "req-live"},
    ) as response:
        assert response.status == 200, await response.text()
    await eventually(lambda: gk.daemon.dispatcher.delivered == 1, "the delivery")
    (line,) = [x for x in delivery_log.lines if x["message"].startswith("action delivered")]
    assert line["request_id"] == "req-live"


async def test_committed_actions_are_delivered_without_an_outbox_query(
    project_factory: Callable[..., Project], receiver: Receiver, start_daemon: Any
) -> None:
    project = project_factory(receiver.url)
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    gk = await start_daemon(project)
    dispatcher = gk.daemon.dispatcher
    dispatcher._idle_poll_s = 60.0  # no periodic look at the outbox during the test
    await asyncio.sleep(0.2)  # the look at start is over
    store = gk.daemon.store
    queries = 0
    real_due_actions = store.due_actions

    async def counting_due_actions(*args: Any, **kwargs: Any) -> Any:
        nonlocal queries
        queries += 1
        return await real_due_actions(*args, **kwargs)

    store.due_actions = counting_due_actions
    for _ in range(5):  # each_time: every "completed" after an "open" fires
        await gk.post("/v1/facts", fact("task", "T-17", status="completed"))
        await gk.post("/v1/facts", fact("task", "T-17", status="open"))
    await receiver.wait_for(5)
    await eventually(lambda: dispatcher.delivered == 5, "5 deliveries recorded")
    assert queries == 0
    assert len({r.headers["webhook-id"] for r in receiver.received}) == 5
    assert outbox_rows(project) == [("delivered", 1)] * 5


async def _block_first_record(
    gk: Any, monkeypatch: pytest.MonkeyPatch
) -> tuple[asyncio.Event, list[int]]:
    """Make the first ``record_attempt`` wait for the returned event; note the size of each
    group recorded (1 for ``record_attempt``)."""
    store = gk.daemon.store
    release = asyncio.Event()
    groups: list[int] = []
    real_record_attempts = store.record_attempts

    async def record_attempt(record: AttemptRecord) -> None:
        groups.append(1)
        if len(groups) == 1:
            await release.wait()
        await real_record_attempts([record])

    async def record_attempts(records: list[AttemptRecord]) -> None:
        groups.append(len(records))
        await real_record_attempts(records)

    monkeypatch.setattr(store, "record_attempt", record_attempt)
    monkeypatch.setattr(store, "record_attempts", record_attempts)
    return release, groups


async def test_outcomes_arriving_together_are_recorded_in_one_transaction(
    project_factory: Callable[..., Project],
    receiver: Receiver,
    start_daemon: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    project = project_factory(receiver.url)
    notify_rules(project, range(1), "first")
    notify_rules(project, range(1, 6), "then")
    gk = await start_daemon(project)
    dispatcher = gk.daemon.dispatcher
    release, groups = await _block_first_record(gk, monkeypatch)
    await gk.post("/v1/facts", fact("task", "first", ok=True))
    await eventually(lambda: groups == [1], "the first outcome being recorded")
    await gk.post("/v1/facts", fact("task", "then", ok=True))  # 5 actions at once
    await receiver.wait_for(6)
    await eventually(lambda: len(dispatcher._outcomes) == 5, "5 outcomes waiting")
    await asyncio.sleep(0.1)
    # nothing that depends on an outcome happens before it is committed
    assert dispatcher.delivered == 0
    assert outbox_rows(project) == [("pending", 0)] * 6
    release.set()
    await eventually(lambda: dispatcher.delivered == 6, "6 deliveries recorded")
    assert groups == [1, 5]
    assert outbox_rows(project) == [("delivered", 1)] * 6
    assert len(receiver.received) == 6
    assert len({r.headers["webhook-id"] for r in receiver.received}) == 6


async def test_a_failed_group_is_recorded_one_outcome_at_a_time(
    project_factory: Callable[..., Project],
    receiver: Receiver,
    start_daemon: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    project = project_factory(receiver.url)
    notify_rules(project, range(1), "first")
    notify_rules(project, range(1, 4), "then")
    gk = await start_daemon(project)
    dispatcher = gk.daemon.dispatcher
    release, groups = await _block_first_record(gk, monkeypatch)

    async def failing_group(records: list[AttemptRecord]) -> None:
        groups.append(len(records))
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(gk.daemon.store, "record_attempts", failing_group)
    await gk.post("/v1/facts", fact("task", "first", ok=True))
    await eventually(lambda: groups == [1], "the first outcome being recorded")
    await gk.post("/v1/facts", fact("task", "then", ok=True))
    await receiver.wait_for(4)
    await eventually(lambda: len(dispatcher._outcomes) == 3, "3 outcomes waiting")
    release.set()
    await eventually(lambda: dispatcher.delivered == 4, "4 deliveries recorded")
    assert groups == [1, 3, 1, 1, 1]
    assert outbox_rows(project) == [("delivered", 1)] * 4
    assert len(receiver.received) == 4
