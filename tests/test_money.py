"""Money safety: the release ledger and escrow limits, idempotent ingest, group commit,
and requeueing dead letters — through the real daemon, HTTP API and SQLite file."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from standardwebhooks.webhooks import Webhook

from gatekeeper.config import Escrow
from gatekeeper.engine.ledger import EscrowBook
from gatekeeper.rules.model import ReleaseAction

from .conftest import DEPLOY_RULE, ENV, SECRET, Project, Receiver, Running, fact
from .test_delivery import wait_status


def release_rule(n: int, amount: str) -> str:
    return f"""\
    id: tower-a/release-{n}
    project: tower-a
    when: milestone["m{n}"].status == "approved"
    actions:
      - release: {{target: escrow-bank, escrow: tower-a-escrow, amount: "{amount}",
                  currency: USD, payee: builder-{n}}}
      - notify: {{target: ci, message: "released ${{amount}} to ${{payee}}"}}
    """


def test_book_refuses_over_limit_and_wrong_currency() -> None:
    book = EscrowBook({"e": Escrow("e", "USD", Decimal("100.00"))})
    ok = ReleaseAction(target="t", escrow="e", amount="60.00", currency="USD", payee="p")
    assert book.refusal(ok) is None
    book.commit("e", "60.00")
    assert book.remaining("e") == Decimal("40.00")
    refusal = book.refusal(ok)
    assert refusal is not None and "exceeds what is left" in refusal and "40.00" in refusal
    exact = ReleaseAction(target="t", escrow="e", amount="40.00", currency="USD", payee="p")
    assert book.refusal(exact) is None
    euros = ReleaseAction(target="t", escrow="e", amount="1.00", currency="EUR", payee="p")
    assert "EUR" in (book.refusal(euros) or "")
    unknown = ReleaseAction(target="t", escrow="x", amount="1.00", currency="USD", payee="p")
    assert "not configured" in (book.refusal(unknown) or "")


async def test_release_over_the_escrow_limit_is_blocked_and_alerted(
    project_factory: Callable[..., Project], receiver: Receiver, start_daemon: Any
) -> None:
    project = project_factory(receiver.url, alert_target="finance-chat")
    for n in (1, 2, 3):
        project.write_rule(f"r{n}.yaml", release_rule(n, "8000.00"))  # limit 20000.00
    gk = await start_daemon(project)
    for n in (1, 2, 3):
        status, _ = await gk.post("/v1/facts", fact("milestone", f"m{n}", status="approved"))
        assert status == 200
    # two releases (+ their notifies) and one alert for the blocked third
    received = await receiver.wait_for(5)
    await asyncio.sleep(0.3)
    assert len(receiver.received) == 5
    bank = [r for r in received if r.path == "/bank"]
    assert sorted(Webhook(SECRET).verify(r.raw, r.headers)["payee"] for r in bank) == [
        "builder-1",
        "builder-2",
    ]
    alert = next(r for r in received if r.path == "/chat")
    text = Webhook(SECRET).verify(alert.raw, alert.headers)["text"]
    assert "blocked the release of 8000.00 USD" in text
    assert "4000.00 of 20000.00" in text

    _, rule = await gk.get("/v1/rules/tower-a/release-3")
    blocked = rule["recent_decisions"][0]
    assert blocked["outcome"] == "blocked"
    assert "exceeds what is left" in blocked["reason"]
    # a release refused is not the rule's firing: it waits, blocked, and says why
    assert (rule["fired_count"], rule["state"]) == (0, "blocked")
    assert rule["blocked"] == blocked["reason"]

    await wait_status(gk, "delivered", 5)
    _, escrows = await gk.get("/v1/escrows")
    assert escrows["escrows"] == [
        {
            "escrow": "tower-a-escrow",
            "currency": "USD",
            "limit": "20000.00",
            "decimals": 2,
            "reserved": "0.00",
            "sent": "16000.00",
            "settled": "0.00",
            "returned": "0.00",
            "remaining": "4000.00",
            "released": "16000.00",
            "pending": "0.00",
            "unconfirmed": "0.00",
        }
    ]


async def test_limit_holds_across_restart_and_for_concurrent_facts(
    project_factory: Callable[..., Project], receiver: Receiver, start_daemon: Any
) -> None:
    project = project_factory(receiver.url)
    for n in range(1, 7):
        project.write_rule(f"r{n}.yaml", release_rule(n, "3000.00"))
    gk = await start_daemon(project)
    first = [gk.post("/v1/facts", fact("milestone", f"m{n}", status="approved")) for n in (1, 2, 3)]
    assert all(status == 200 for status, _ in await asyncio.gather(*first))
    await gk.stop()
    gk2 = await start_daemon(project)
    rest = [gk2.post("/v1/facts", fact("milestone", f"m{n}", status="approved")) for n in (4, 5, 6)]
    assert all(status == 200 for status, _ in await asyncio.gather(*rest))
    await wait_status(gk2, "delivered", 12)
    _, escrows = await gk2.get("/v1/escrows")
    account = escrows["escrows"][0]
    assert Decimal(account["released"]) == Decimal("18000.00")
    assert Decimal(account["released"]) <= Decimal(account["limit"])
    db = sqlite3.connect(project.root / "state" / "gatekeeper.db")
    amounts = [Decimal(a) for (a,) in db.execute("SELECT amount FROM ledger")]
    assert sum(amounts) == Decimal("18000.00")


async def test_idempotency_key_repeat_returns_first_answer_and_applies_nothing(
    project_factory: Callable[..., Project], start_daemon: Any
) -> None:
    project = project_factory()
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    gk = await start_daemon(project)
    body = fact("task", "T-1", status="started")
    headers = {"Idempotency-Key": "build-42-started"}
    url = gk.url + "/v1/facts"
    async with gk.session.post(url, json=body, headers=headers) as response:
        first = await response.json()
        assert response.status == 200
        assert "Idempotent-Replayed" not in response.headers
    async with gk.session.post(url, json=body, headers=headers) as response:
        assert response.status == 200
        assert response.headers["Idempotent-Replayed"] == "true"
        assert await response.json() == first
    other = fact("task", "T-1", status="failed")
    async with gk.session.post(url, json=other, headers=headers) as response:
        assert response.status == 422
        assert "build-42-started" in (await response.json())["error"]["message"]
    log = await gk.daemon.store.fact_log()
    assert [row.data for row in log] == [{"status": "started"}]


async def test_concurrent_repeats_of_one_key_apply_once(
    project_factory: Callable[..., Project], start_daemon: Any
) -> None:
    project = project_factory()
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    gk = await start_daemon(project)
    body = fact("task", "T-1", status="started")

    async def post() -> tuple[int, Any]:
        async with gk.session.post(
            gk.url + "/v1/facts", json=body, headers={"Idempotency-Key": "k1"}
        ) as response:
            return response.status, await response.json()

    answers = await asyncio.gather(*(post() for _ in range(20)))
    assert {status for status, _ in answers} == {200}
    assert len({tuple(a["seqs"]) for _, a in answers}) == 1
    assert len(await gk.daemon.store.fact_log()) == 1


async def test_idempotency_keys_expire_after_the_window(
    project_factory: Callable[..., Project], start_daemon: Any
) -> None:
    project = project_factory(idempotency_window_s=0)
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    gk = await start_daemon(project)
    headers = {"Idempotency-Key": "once"}
    body = fact("task", "T-1", status="started")
    async with gk.session.post(gk.url + "/v1/facts", json=body, headers=headers) as response:
        assert response.status == 200
    await asyncio.sleep(0.01)
    assert await gk.daemon.purge_idempotency_keys() == 1
    async with gk.session.post(gk.url + "/v1/facts", json=body, headers=headers) as response:
        assert "Idempotent-Replayed" not in response.headers
    assert len(await gk.daemon.store.fact_log()) == 2


async def test_bad_idempotency_key_is_400(
    project_factory: Callable[..., Project], start_daemon: Any
) -> None:
    project = project_factory()
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    gk = await start_daemon(project)
    body = fact("task", "T-1", status="started")
    async with gk.session.post(
        gk.url + "/v1/facts", json=body, headers={"Idempotency-Key": "x" * 300}
    ) as response:
        assert response.status == 400
    assert await gk.daemon.store.fact_log() == []


async def test_concurrent_posts_group_commit_and_each_time_edges_stay_exact(
    project_factory: Callable[..., Project], receiver: Receiver, start_daemon: Any
) -> None:
    project = project_factory(receiver.url)
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    gk = await start_daemon(project)
    statuses = ["completed" if i % 2 == 0 else "reopened" for i in range(60)]
    answers = []
    for chunk in range(0, 60, 10):  # ten at a time, in order within the group
        posts = [
            gk.post("/v1/facts", fact("task", "T-17", status=s))
            for s in statuses[chunk : chunk + 10]
        ]
        answers += await asyncio.gather(*posts)
    assert all(status == 200 for status, _ in answers)
    seqs = [body["seqs"][0] for _, body in answers]
    assert len(set(seqs)) == 60
    log = await gk.daemon.store.fact_log(limit=100)
    applied = [row.data["status"] for row in log]
    edges = sum(
        1
        for i, s in enumerate(applied)
        if s == "completed" and (i == 0 or applied[i - 1] != "completed")
    )
    await receiver.wait_for(edges)
    await asyncio.sleep(0.3)
    assert len(receiver.received) == edges
    _, rule = await gk.get("/v1/rules/tower-a/deploy-docs")
    assert rule["fired_count"] == edges


async def test_dead_letter_requeued_over_api_and_cli(
    project_factory: Callable[..., Project], receiver: Receiver, start_daemon: Any
) -> None:
    project = project_factory(receiver.url)
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    receiver.responses = [422, 422]
    gk: Running = await start_daemon(project)
    await gk.post("/v1/facts", fact("task", "T-17", status="completed"))
    await gk.post("/v1/facts", fact("task", "T-17", status="reopened"))
    await gk.post("/v1/facts", fact("task", "T-17", status="completed"))
    dead = await wait_status(gk, "dead", 2)
    first, second = (a["action_id"] for a in dead)

    status, body = await gk.post(f"/v1/actions/{first}/retry", {"reason": "receiver fixed"})
    assert status == 200
    assert body["status"] == "pending"
    status, _ = await gk.post("/v1/actions/act_nope/retry", {})
    assert status == 404

    command = [
        sys.executable, "-m", "gatekeeper", "actions", "retry", second,
        "--url", gk.url, "-c", str(project.config_path),
    ]  # fmt: skip
    result = await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, env={**os.environ, **ENV}
    )
    assert result.returncode == 0, result.stderr
    assert f"{second}: requeued" in result.stdout

    delivered = await wait_status(gk, "delivered", 2)
    assert {a["action_id"] for a in delivered} == {first, second}
    status, again = await gk.post(f"/v1/actions/{first}/retry", {})
    assert status == 409
    assert "delivered" in again["error"]["message"]
    status, detail = await gk.get(f"/v1/actions/{first}")
    assert [a["status_code"] for a in detail["delivery_attempts"]] == [422, 200]

    listing = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "gatekeeper", "actions", "list", "--url", gk.url,
         "-c", str(project.config_path)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert listing.returncode == 0
    assert "2 action(s)" in listing.stdout
    db = sqlite3.connect(project.root / "state" / "gatekeeper.db")
    acts = db.execute("SELECT actor, act, subject, reason FROM admin_acts ORDER BY id").fetchall()
    assert acts == [
        ("local", "retry_action", first, "receiver fixed"),
        ("local", "retry_action", second, None),
    ]


async def test_ingest_refused_once_shutdown_began(
    project_factory: Callable[..., Project], start_daemon: Any
) -> None:
    from gatekeeper.engine.model import FactInput
    from gatekeeper.runtime.daemon import ShuttingDown

    project = project_factory()
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    gk = await start_daemon(project)
    pending = asyncio.create_task(
        gk.daemon.ingest([FactInput("tower-a", "task", "T-1", {"status": "x"})])
    )
    await asyncio.sleep(0)
    await gk.stop()
    assert (await pending).seqs == [1]  # queued before the stop: committed
    try:
        await gk.daemon.ingest([FactInput("tower-a", "task", "T-2", {})])
    except ShuttingDown:
        pass
    else:
        raise AssertionError("expected ShuttingDown")
