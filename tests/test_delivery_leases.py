"""A daemon on a PostgreSQL database claims what it sends, with a lease
(``DeliveryQueue.claim_due``): a daemon starting where no other serves releases the claims
left (no other daemon shares the daemon lock: their holder is gone) and delivers each
action once; two daemons side by side deliver each action of one outbox once; what a dead
daemon claimed beside a living one is taken over when its leases run out. Real daemons on a
real server (``tests/pg.py``), a real receiver counting what it got by ``webhook-id``."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from gatekeeper.store import open_store

from .conftest import DEPLOY_RULE, Project, Receiver, fact
from .test_daemon_postgresql import on_postgres
from .test_metrics import scrape, value

ACTIONS = 24


async def _queue_undelivered(project: Project, start_daemon: Any) -> Any:
    """Start a daemon whose dispatcher is stopped and make it queue ``ACTIONS`` pipeline
    actions (``DEPLOY_RULE`` fires each time the task becomes completed): they wait in
    the outbox, claimed by no one."""
    queuer = await start_daemon(project)
    await queuer.daemon.dispatcher.stop()
    for _ in range(ACTIONS):
        for status in ("completed", "open"):
            code, body = await queuer.post("/v1/facts", fact("task", "T-17", status=status))
            assert code == 200, body
    _, actions = await queuer.get("/v1/actions?status=pending&limit=1000")
    assert len(actions["actions"]) == ACTIONS
    return queuer


async def _delivered(receiver: Receiver, count: int) -> collections.Counter[str]:
    """The receiver's requests by ``webhook-id``, once ``count`` distinct ids arrived and a
    moment passed for any duplicate to arrive too."""
    await receiver.wait_for(count, timeout_s=30)
    await asyncio.sleep(0.5)
    return collections.Counter(r.headers["webhook-id"] for r in receiver.received)


async def _all_delivered_once(gk: Any) -> None:
    _, actions = await gk.get("/v1/actions?limit=1000")
    assert {(a["status"], a["attempts"]) for a in actions["actions"]} == {("delivered", 1)}


async def _claims(gk: Any) -> tuple[float, float]:
    _, samples = await scrape(gk.daemon)
    claims = value(samples, "gatekeeper_delivery_claims_total") or 0.0
    taken = value(samples, "gatekeeper_delivery_lease_expired_total") or 0.0
    return claims, taken


@pytest.fixture
def project(
    project_factory: Callable[..., Project], receiver: Receiver, postgres_url: str
) -> Project:
    """A deployment on the scratch PostgreSQL database whose rule queues pipelines."""
    deployment = on_postgres(project_factory(receiver.url), postgres_url)
    deployment.write_rule("deploy.yaml", DEPLOY_RULE)
    return deployment


async def test_a_daemon_taking_over_delivers_what_the_dead_one_claimed_at_once_and_once(
    project: Project, receiver: Receiver, start_daemon: Any, postgres_url: str
) -> None:
    queuer = await _queue_undelivered(project, start_daemon)
    now = queuer.daemon.clock.now()
    await queuer.stop()
    # a daemon claims every action with a long lease, then dies without sending any
    dead = await open_store(postgres_url)
    claimed = await dead.claim_due(now, 1000, daemon_id="dead-daemon", lease_s=600.0)
    assert len(claimed) == ACTIONS
    await dead.close()

    survivor = await start_daemon(project)  # alone on the database: the claims' holder is gone
    by_id = await _delivered(receiver, ACTIONS)  # long before the 600 s leases end
    assert len(by_id) == ACTIONS and set(by_id.values()) == {1}, by_id
    await _all_delivered_once(survivor)
    assert await _claims(survivor) == (ACTIONS, 0)  # claimed afresh, none taken over


async def test_two_daemons_on_one_database_deliver_each_action_once(
    project: Project, receiver: Receiver, start_daemon: Any
) -> None:
    queuer = await _queue_undelivered(project, start_daemon)
    # two daemons start together on the database: both dispatchers look at the outbox
    first, second = await asyncio.gather(start_daemon(project), start_daemon(project))
    assert first.daemon.dispatcher.daemon_id != second.daemon.dispatcher.daemon_id
    by_id = await _delivered(receiver, ACTIONS)
    assert len(by_id) == ACTIONS and set(by_id.values()) == {1}, by_id  # never twice
    await _all_delivered_once(queuer)
    (claims_1, taken_1), (claims_2, taken_2) = await _claims(first), await _claims(second)
    assert claims_1 + claims_2 == ACTIONS and taken_1 == taken_2 == 0


async def test_what_a_dead_daemon_claimed_is_delivered_by_another_after_its_lease(
    project: Project, receiver: Receiver, start_daemon: Any, postgres_url: str
) -> None:
    queuer = await _queue_undelivered(project, start_daemon)
    # a daemon claims every action with a 2 s lease, then dies without sending any
    dead = await open_store(postgres_url)
    now = queuer.daemon.clock.now()
    claimed = await dead.claim_due(now, 1000, daemon_id="dead-daemon", lease_s=2.0)
    assert len(claimed) == ACTIONS
    await dead.close()

    survivor = await start_daemon(project)
    await asyncio.sleep(1.0)
    assert receiver.received == []  # the lease still runs: nothing sent
    by_id = await _delivered(receiver, ACTIONS)
    assert len(by_id) == ACTIONS and set(by_id.values()) == {1}, by_id
    assert queuer.daemon.clock.now() - now >= timedelta(seconds=2)
    await _all_delivered_once(survivor)
    assert await _claims(survivor) == (ACTIONS, ACTIONS)  # each one taken over
