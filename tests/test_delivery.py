"""Delivery from the outbox against a real receiver: retries, dead letters, isolation."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from .conftest import DEPLOY_RULE, DESIGN_RULE, Project, Receiver, fact


async def wait_status(gk: Any, status: str, count: int, timeout_s: float = 10.0) -> list[Any]:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        _, body = await gk.get(f"/v1/actions?status={status}")
        if len(body["actions"]) >= count:
            return list(body["actions"])
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"expected {count} {status} actions, got {body}")
        await asyncio.sleep(0.05)


async def test_5xx_is_retried_with_the_same_id_until_delivered(
    project_factory: Callable[..., Project], receiver: Receiver, start_daemon: Any
) -> None:
    project = project_factory(receiver.url)
    project.write_rule("design.yaml", DESIGN_RULE.split("  - notify:")[0])  # release only
    receiver.responses = [503, 500]
    gk = await start_daemon(project)
    await gk.post(
        "/v1/facts",
        {
            "facts": [
                fact("milestone", "design", status="approved"),
                fact("quality_gate", "qg1", passed=True),
            ]
        },
    )
    delivered = await wait_status(gk, "delivered", 1)
    assert delivered[0]["attempts"] == 3
    ids = {r.headers["webhook-id"] for r in receiver.received}
    keys = {r.headers["Idempotency-Key"] for r in receiver.received}
    assert len(receiver.received) == 3
    assert ids == keys == {delivered[0]["action_id"]}
    attempts = await gk.daemon.store.list_attempts(delivered[0]["action_id"])
    assert [a.status_code for a in attempts] == [503, 500, 200]


async def test_4xx_goes_straight_to_dead_letter(
    project_factory: Callable[..., Project], receiver: Receiver, start_daemon: Any
) -> None:
    project = project_factory(receiver.url)
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    receiver.responses = [422]
    gk = await start_daemon(project)
    await gk.post("/v1/facts", fact("task", "T-17", status="completed"))
    dead = await wait_status(gk, "dead", 1)
    assert dead[0]["attempts"] == 1
    assert dead[0]["last_error"].startswith("HTTP 422")
    assert len(receiver.received) == 1


async def test_unreachable_target_is_dead_after_max_attempts_and_others_still_delivered(
    project_factory: Callable[..., Project], receiver: Receiver, start_daemon: Any
) -> None:
    project = project_factory(receiver.url)
    # the bank points at a closed port; chat and ci at the receiver
    text = project.config_path.read_text().replace(
        f"url: {receiver.url}/bank", "url: http://127.0.0.1:9/bank"
    )
    project.config_path.write_text(text)
    project.write_rule("design.yaml", DESIGN_RULE)
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    gk = await start_daemon(project)
    await gk.post(
        "/v1/facts",
        {
            "facts": [
                fact("milestone", "design", status="approved"),
                fact("quality_gate", "qg1", passed=True),
                fact("task", "T-17", status="completed"),
            ]
        },
    )
    delivered = await wait_status(gk, "delivered", 2)
    assert {a["kind"] for a in delivered} == {"notify", "pipeline"}
    dead = await wait_status(gk, "dead", 1)
    assert dead[0]["kind"] == "release"
    assert dead[0]["attempts"] == 3  # max_attempts of escrow-bank in the test config
    assert "Connect" in dead[0]["last_error"] or "connect" in dead[0]["last_error"]


async def test_pending_actions_resume_after_restart(
    project_factory: Callable[..., Project], receiver: Receiver, start_daemon: Any
) -> None:
    project = project_factory(receiver.url)
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    gk = await start_daemon(project)
    # stop delivery before the fact arrives, as if the daemon died right after the commit
    await gk.daemon.dispatcher.stop(grace_s=0)
    await gk.post("/v1/facts", fact("task", "T-17", status="completed"))
    await asyncio.sleep(0.2)
    assert receiver.received == []
    await gk.stop()
    gk2 = await start_daemon(project)
    await receiver.wait_for(1)
    await wait_status(gk2, "delivered", 1)
