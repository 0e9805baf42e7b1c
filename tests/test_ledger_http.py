"""The ledger through the real daemon, HTTP API and SQLite file: cancelling a release (and
what may not be cancelled), signed settlement callbacks from the bank, the escrow figures
and movements, the dead-letter and failed-settlement alerts, and the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from .conftest import SECRET, Project, Running, fact
from .test_delivery import wait_status
from .test_money import release_rule


@dataclass
class Bank:
    """A real receiver on 127.0.0.1 whose answers the test scripts, per path: a queue of
    statuses (``"hang"``: hold the request until ``gate`` is set; ``"wait"``: 503 with
    ``Retry-After: 30``, so the action waits for its retry), then 200. ``before_reply``,
    when set, is awaited with each body before it is answered (a bank that calls back
    fast)."""

    url: str = ""
    received: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    script: dict[str, list[int | str]] = field(default_factory=dict)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    before_reply: Callable[[dict[str, Any]], Awaitable[None]] | None = None

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.text()
        body = Webhook(SECRET).verify(raw, dict(request.headers))
        self.received.append((request.path, body))
        self.arrived.set()
        if self.before_reply is not None and body.get("type") == "release":
            await self.before_reply(body)
        queue = self.script.get(request.path, [])
        answer = queue.pop(0) if queue else 200
        if answer == "hang":
            await self.gate.wait()
            answer = 200
        if answer == "wait":
            return web.json_response({}, status=503, headers={"Retry-After": "30"})
        return web.json_response({}, status=int(answer))

    def bodies(self, path: str) -> list[dict[str, Any]]:
        return [body for p, body in self.received if p == path]

    async def wait_for(self, path: str, count: int, timeout_s: float = 10.0) -> None:
        async def enough() -> None:
            while len(self.bodies(path)) < count:
                self.arrived.clear()
                await self.arrived.wait()

        await asyncio.wait_for(enough(), timeout_s)


@pytest.fixture
async def bank() -> AsyncIterator[Bank]:
    found = Bank()
    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", found.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    found.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    yield found
    found.gate.set()
    await runner.cleanup()


async def _deployed(
    project_factory: Callable[..., Project], bank: Bank, start_daemon: Any, **amounts: str
) -> Running:
    """A daemon whose rules release ``amounts`` (rule n -> amount) when milestone m<n> is
    approved, alerts going to the plain JSON target ``ci``; the bank's ``Retry-After`` is
    followed up to 30 s."""
    project = project_factory(bank.url, alert_target="ci")
    text = project.config_path.read_text()
    project.config_path.write_text(text.replace("backoff_cap_s: 0.2", "backoff_cap_s: 30"))
    for name, amount in amounts.items():
        project.write_rule(f"{name}.yaml", release_rule(int(name[1:]), amount))
    gk: Running = await start_daemon(project)
    return gk


async def _fire(gk: Running, n: int) -> str:
    """Approve milestone m<n>; the release id it queued."""
    status, _ = await gk.post("/v1/facts", fact("milestone", f"m{n}", status="approved"))
    assert status == 200
    _, actions = await gk.get("/v1/actions")
    [release] = [
        a
        for a in actions["actions"]
        if a["kind"] == "release" and a["rule_id"] == f"tower-a/release-{n}"
    ]
    return str(release["action_id"])


async def _escrow(gk: Running) -> dict[str, Any]:
    _, body = await gk.get("/v1/escrows")
    [account] = body["escrows"]
    return dict(account)


async def _status_of(
    gk: Running, action_id: str, wanted: str, timeout_s: float = 10.0, *, attempts: int = 1
) -> None:
    """Wait until ``action_id`` is ``wanted`` after at least ``attempts`` recorded attempts."""
    deadline = time.monotonic() + timeout_s
    while True:
        _, action = await gk.get(f"/v1/actions/{action_id}")
        if action["status"] == wanted and action["attempts"] >= attempts:
            return
        assert time.monotonic() < deadline, action
        await asyncio.sleep(0.02)


def signed(
    body: dict[str, Any], msg_id: str, *, secret: str = SECRET
) -> tuple[bytes, dict[str, str]]:
    raw = json.dumps(body).encode()
    now = datetime.now(UTC)
    return raw, {
        "Content-Type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, now, raw.decode()),
    }


async def _settle(
    gk: Running,
    release_id: str,
    status: str,
    msg_id: str,
    *,
    target: str = "escrow-bank",
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
) -> tuple[int, dict[str, Any]]:
    body = {"release_id": release_id, "status": status, "reference": f"bank-{msg_id}"}
    if status == "failed":
        body["reason"] = "account closed"
    signed_raw, signed_headers = signed(body, msg_id)
    async with gk.session.post(
        f"{gk.url}/v1/settlements/{target}",
        data=signed_raw if raw is None else raw,
        headers=signed_headers if headers is None else headers,
    ) as response:
        return response.status, await response.json()


async def _cancel(
    gk: Running, action_id: str, reason: str | None = "wrong payee"
) -> tuple[int, Any]:
    return await gk.post(
        f"/v1/actions/{action_id}/cancel", {} if reason is None else {"reason": reason}
    )


async def test_a_cancelled_release_is_never_sent_and_frees_its_amount(
    project_factory: Callable[..., Project], bank: Bank, start_daemon: Any
) -> None:
    # limit 20000.00: r1 (12000) waits for a retry after a 503; r2 (12000) does not fit
    bank.script["/bank"] = ["wait"]
    gk = await _deployed(project_factory, bank, start_daemon, r1="12000.00", r2="12000.00")
    first = await _fire(gk, 1)
    await bank.wait_for("/bank", 1)
    await _status_of(gk, first, "pending")
    status, cancelled = await _cancel(gk, first)
    assert status == 200, cancelled
    assert cancelled["action"]["status"] == "cancelled"
    assert [(e["movement"], e["amount"], e["actor"]) for e in cancelled["entries"]] == [
        ("cancel", "12000.00", "local"),
        ("return", "12000.00", "local"),
    ]
    account = await _escrow(gk)
    assert (account["reserved"], account["returned"], account["remaining"]) == (
        "0.00",
        "12000.00",
        "20000.00",
    )
    # the running daemon's book gave the amount back at once: r2 fits now
    second = await _fire(gk, 2)
    await bank.wait_for("/bank", 2)
    await wait_status(gk, "delivered", 1)
    await asyncio.sleep(0.5)  # past every retry r1 had been due
    assert [b["release_id"] for b in bank.bodies("/bank")] == [first, second]
    _, action = await gk.get(f"/v1/actions/{first}")
    assert action["status"] == "cancelled" and action["attempts"] == 1
    _, audit = await gk.get("/v1/audit?kind=admin_act")
    [act] = audit["entries"]
    assert (act["what"], act["rule_id"], act["actor"], act["reason"], act["project"]) == (
        "cancel_action",
        first,
        "local",
        "wrong payee",
        "tower-a",
    )
    _, cancelled_list = await gk.get("/v1/actions?status=cancelled")
    assert [a["action_id"] for a in cancelled_list["actions"]] == [first]


async def test_what_cannot_be_cancelled_is_refused_and_nothing_changes(
    project_factory: Callable[..., Project], bank: Bank, start_daemon: Any
) -> None:
    gk = await _deployed(project_factory, bank, start_daemon, r1="100.00")
    release = await _fire(gk, 1)
    await wait_status(gk, "delivered", 2)
    _, actions = await gk.get("/v1/actions")
    [notify] = [a["action_id"] for a in actions["actions"] if a["kind"] == "notify"]
    before = await _escrow(gk)
    status, body = await _cancel(gk, release)
    assert status == 409 and "delivered" in body["error"]["message"]
    status, body = await _cancel(gk, notify)
    assert status == 422 and "only a release can be cancelled" in body["error"]["message"]
    status, body = await _cancel(gk, "act_nope")
    assert status == 404
    status, body = await _cancel(gk, release, reason=None)
    assert status == 400 and "reason" in body["error"]["message"]
    status, body = await _cancel(gk, release, reason="   ")
    assert status == 400
    assert await _escrow(gk) == before
    _, audit = await gk.get("/v1/audit?kind=admin_act")
    assert audit["entries"] == []


async def test_a_cancel_during_an_attempt_waits_for_its_outcome(
    project_factory: Callable[..., Project], bank: Bank, start_daemon: Any
) -> None:
    bank.script["/bank"] = ["hang"]
    gk = await _deployed(project_factory, bank, start_daemon, r1="100.00")
    release = await _fire(gk, 1)
    await bank.wait_for("/bank", 1)  # the bank has it and has not answered
    status, body = await _cancel(gk, release)
    assert status == 409
    assert "an attempt is in flight; its outcome decides" in body["error"]["message"]
    bank.gate.set()
    await _status_of(gk, release, "delivered")  # the outcome stands
    account = await _escrow(gk)
    assert (account["sent"], account["returned"]) == ("100.00", "0.00")
    status, body = await _cancel(gk, release)
    assert status == 409


async def test_a_dead_release_can_be_cancelled_and_its_dead_letter_was_alerted_once(
    project_factory: Callable[..., Project], bank: Bank, start_daemon: Any
) -> None:
    bank.script["/bank"] = [422]
    gk = await _deployed(project_factory, bank, start_daemon, r1="300.00")
    release = await _fire(gk, 1)
    await _status_of(gk, release, "dead")
    await bank.wait_for("/ci", 2)  # the rule's notify and the alert
    [alert] = [b for b in bank.bodies("/ci") if b.get("alert")]
    assert (alert["alert"], alert["release_id"], alert["action_id"]) == (
        "dead_letter",
        release,
        release,
    )
    assert alert["reason"] == "refused" and alert["error"].startswith("HTTP 422")
    assert release in alert["message"] and "300.00 USD" in alert["message"]
    assert (await _escrow(gk))["unconfirmed"] == "300.00"
    status, _ = await _cancel(gk, release, "the bank refused it; paying by hand")
    assert status == 200
    account = await _escrow(gk)
    assert (account["unconfirmed"], account["remaining"]) == ("0.00", "20000.00")
    await asyncio.sleep(0.3)
    assert len([b for b in bank.bodies("/ci") if b.get("alert")]) == 1


async def test_an_alert_that_dies_is_not_alerted_about(
    project_factory: Callable[..., Project], bank: Bank, start_daemon: Any
) -> None:
    bank.script["/bank"] = [422]
    bank.script["/ci"] = [200, 422]  # the rule's notify, then the dead-letter alert: refused
    gk = await _deployed(project_factory, bank, start_daemon, r1="300.00")
    await _fire(gk, 1)
    await bank.wait_for("/ci", 2)
    await wait_status(gk, "dead", 2)
    await asyncio.sleep(0.3)
    assert len(bank.bodies("/ci")) == 2  # no alert about the dead alert


async def test_a_signed_settlement_settles_a_sent_release(
    project_factory: Callable[..., Project], bank: Bank, start_daemon: Any
) -> None:
    bank.script["/bank"] = ["hang"]
    gk = await _deployed(project_factory, bank, start_daemon, r1="1000.00")
    release = await _fire(gk, 1)
    await bank.wait_for("/bank", 1)  # sent, not answered: not yet sent for the ledger
    status, body = await _settle(gk, release, "settled", "msg-early")
    assert status == 409 and "in flight" in body["error"]["message"]
    bank.gate.set()
    await _status_of(gk, release, "delivered")
    status, body = await _settle(gk, release, "settled", "msg-1")
    assert status == 200, body
    assert (body["status"], body["reference"], body["applied"], body["replayed"]) == (
        "settled",
        "bank-msg-1",
        True,
        False,
    )
    assert [(e["movement"], e["actor"], e["reference"]) for e in body["entries"]] == [
        ("settle", "escrow-bank", "bank-msg-1")
    ]
    account = await _escrow(gk)
    assert (account["sent"], account["settled"], account["remaining"]) == (
        "0.00",
        "1000.00",
        "19000.00",
    )
    # the same outcome again: 200, nothing new; the same message again: replayed
    status, body = await _settle(gk, release, "settled", "msg-2")
    assert (status, body["applied"], body["entries"]) == (200, False, [])
    raw, headers = signed(
        {"release_id": release, "status": "settled", "reference": "bank-msg-1"}, "msg-1"
    )
    status, body = await _settle(gk, release, "settled", "msg-1", raw=raw, headers=headers)
    assert (status, body["replayed"], body["applied"]) == (200, True, False)
    # the same webhook-id with another body; the other outcome; unknown; wrong target
    status, body = await _settle(gk, release, "failed", "msg-1")
    assert status == 422 and "webhook-id" in body["error"]["message"]
    status, body = await _settle(gk, release, "failed", "msg-3")
    assert status == 409 and "already settled" in body["error"]["message"]
    status, _ = await _settle(gk, "act_nope", "settled", "msg-4")
    assert status == 404
    status, _ = await _settle(gk, release, "settled", "msg-5", target="ci")
    assert status == 404
    status, _ = await _settle(gk, release, "settled", "msg-6", target="nowhere")
    assert status == 404
    _, entries = await gk.get("/v1/escrows/tower-a-escrow/entries")
    assert [e["movement"] for e in entries["entries"]] == ["reserve", "send", "settle"]
    _, story = await gk.get(f"/v1/releases/{release}")
    assert story["movements"] == entries["entries"]


async def test_a_settlement_without_the_targets_signature_is_refused(
    project_factory: Callable[..., Project], bank: Bank, start_daemon: Any
) -> None:
    gk = await _deployed(project_factory, bank, start_daemon, r1="1000.00")
    release = await _fire(gk, 1)
    await _status_of(gk, release, "delivered")
    body = {"release_id": release, "status": "settled", "reference": "x"}
    other = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo="
    raw, headers = signed(body, "m-1", secret=other)
    status, answer = await _settle(gk, release, "settled", "m-1", raw=raw, headers=headers)
    assert status == 401 and "does not match" in answer["error"]["message"]
    assert SECRET not in json.dumps(answer)
    raw, headers = signed(body, "m-2")
    old = datetime.now(UTC) - timedelta(minutes=10)
    headers = {
        **headers,
        "webhook-timestamp": str(int(old.timestamp())),
        "webhook-signature": Webhook(SECRET).sign("m-2", old, raw.decode()),
    }
    status, answer = await _settle(gk, release, "settled", "m-2", raw=raw, headers=headers)
    assert status == 401 and "5 minutes" in answer["error"]["message"]
    raw, headers = signed(body, "m-3")
    status, _ = await _settle(gk, release, "settled", "m-3", raw=raw + b" ", headers=headers)
    assert status == 401
    raw, headers = signed({"release_id": release, "status": "paid"}, "m-4")
    status, answer = await _settle(gk, release, "settled", "m-4", raw=raw, headers=headers)
    assert status == 400
    assert {p["path"] for p in answer["error"]["problems"]} >= {"$.status"}
    account = await _escrow(gk)
    assert (account["sent"], account["settled"]) == ("1000.00", "0.00")


async def test_a_failed_settlement_returns_the_amount_and_alerts_once(
    project_factory: Callable[..., Project], bank: Bank, start_daemon: Any
) -> None:
    # limit 20000.00: r1 (15000) sent; r2 (15000) blocked until r1's settlement fails
    gk = await _deployed(project_factory, bank, start_daemon, r1="15000.00", r2="15000.00")
    release = await _fire(gk, 1)
    await _status_of(gk, release, "delivered")
    status, body = await _settle(gk, release, "failed", "msg-f1")
    assert status == 200, body
    assert [(e["movement"], e["reason"]) for e in body["entries"]] == [
        ("fail", "account closed"),
        ("return", "settlement failed"),
    ]
    await bank.wait_for("/ci", 2)
    [alert] = [b for b in bank.bodies("/ci") if b.get("alert")]
    assert (alert["alert"], alert["release_id"], alert["reference"], alert["reason"]) == (
        "settlement_failed",
        release,
        "bank-msg-f1",
        "account closed",
    )
    status, body = await _settle(gk, release, "failed", "msg-f2")
    assert (status, body["applied"]) == (200, False)
    assert (await _escrow(gk))["remaining"] == "20000.00"
    second = await _fire(gk, 2)  # fits now: the daemon's book took the return
    await _status_of(gk, second, "delivered")
    await asyncio.sleep(0.3)
    assert len([b for b in bank.bodies("/ci") if b.get("alert")]) == 1


async def _released(
    project_factory: Callable[..., Project],
    bank: Bank,
    start_daemon: Any,
    answer: int | str,
    status: str,
    **amounts: str,
) -> tuple[Running, str]:
    """A daemon (as ``_deployed``) whose bank first answers ``answer``, and the release of
    rule r1 once it is ``status``."""
    bank.script["/bank"] = [answer]
    gk = await _deployed(project_factory, bank, start_daemon, **amounts)
    release = await _fire(gk, 1)
    await _status_of(gk, release, status)
    return gk, release


async def _figures_are(gk: Running, **expected: str) -> None:
    """Assert the escrow's figures named in ``expected`` are those."""
    account = await _escrow(gk)
    assert {name: account[name] for name in expected} == expected


async def _admin_acts(gk: Running) -> list[tuple[str, str, str, str]]:
    _, audit = await gk.get("/v1/audit?kind=admin_act")
    return [(a["what"], a["rule_id"], a["actor"], a["reason"]) for a in audit["entries"]]


async def _alerts(bank: Bank, count: int) -> list[dict[str, Any]]:
    """The alerts ``ci`` got, once it got ``count`` requests (the rule's notices too)."""
    await bank.wait_for("/ci", count)
    return [b for b in bank.bodies("/ci") if b.get("alert")]


async def test_a_dead_letter_the_bank_paid_is_settled_and_delivered(
    project_factory: Callable[..., Project], bank: Bank, start_daemon: Any
) -> None:
    # refused: a dead letter, though the bank paid it
    gk, release = await _released(project_factory, bank, start_daemon, 422, "dead", r1="300.00")
    status, body = await _settle(gk, release, "settled", "msg-d1")
    assert status == 200, body
    assert [(e["movement"], e["actor"], e["reference"]) for e in body["entries"]] == [
        ("send", "escrow-bank", "bank-msg-d1"),
        ("settle", "escrow-bank", "bank-msg-d1"),
    ]
    _, action = await gk.get(f"/v1/actions/{release}")
    assert (action["status"], action["dead_reason"]) == ("delivered", None)
    await _figures_are(
        gk, reserved="0.00", unconfirmed="0.00", sent="0.00", settled="300.00", remaining="19700.00"
    )
    assert await _admin_acts(gk) == [
        (
            "dead_letter_settlement",
            release,
            "escrow-bank",
            "settled (reference bank-msg-d1); it was a dead letter: refused, HTTP 422",
        )
    ]
    status, body = await gk.post(f"/v1/actions/{release}/retry", {})
    assert status == 409  # paid: never sent again
    [alert] = await _alerts(bank, 2)  # the dead letter's only
    assert alert["alert"] == "dead_letter"


async def test_a_dead_letter_the_bank_failed_returns_its_amount_and_alerts(
    project_factory: Callable[..., Project], bank: Bank, start_daemon: Any
) -> None:
    gk, release = await _released(project_factory, bank, start_daemon, 422, "dead", r1="300.00")
    status, body = await _settle(gk, release, "failed", "msg-d2")
    assert status == 200, body
    assert [e["movement"] for e in body["entries"]] == ["fail", "return"]  # never sent
    await _figures_are(
        gk,
        reserved="0.00",
        unconfirmed="0.00",
        sent="0.00",
        returned="300.00",
        remaining="20000.00",
    )
    assert [a[0] for a in await _admin_acts(gk)] == ["dead_letter_settlement"]
    alerts = await _alerts(bank, 3)
    assert [(a["alert"], a["release_id"]) for a in alerts] == [
        ("dead_letter", release),
        ("settlement_failed", release),
    ]


async def test_a_cancelled_release_the_bank_settled_is_taken_back_and_alerted(
    project_factory: Callable[..., Project], bank: Bank, start_daemon: Any
) -> None:
    # limit 20000.00: r1 (12000) timed out for the daemon, then was cancelled; the bank
    # had paid it. r2 (12000) fitted after the cancel, but not once the bank's settlement
    # takes the amount back.
    amounts = {"r1": "12000.00", "r2": "12000.00"}
    gk, first = await _released(project_factory, bank, start_daemon, "wait", "pending", **amounts)
    assert (await _cancel(gk, first))[0] == 200
    status, body = await _settle(gk, first, "settled", "msg-c1")
    assert status == 200, body
    assert [(e["movement"], e["amount"], e["reason"]) for e in body["entries"]] == [
        ("reclaim", "12000.00", "settled after its cancel"),
        ("send", "12000.00", "settled by the bank"),
        ("settle", "12000.00", None),
    ]
    _, action = await gk.get(f"/v1/actions/{first}")
    assert action["status"] == "cancelled"
    await _figures_are(
        gk, reserved="0.00", sent="0.00", settled="12000.00", returned="0.00", remaining="8000.00"
    )
    [alert] = await _alerts(bank, 2)  # r1's notice and the alert
    assert (alert["alert"], alert["release_id"], alert["reference"]) == (
        "settled_after_cancel",
        first,
        "bank-msg-c1",
    )
    assert "was cancelled, but escrow-bank settled it" in alert["message"]
    assert (await _admin_acts(gk))[0] == (
        "settlement_after_cancel",
        first,
        "escrow-bank",
        "settled (reference bank-msg-c1) after its cancel",
    )
    # the running daemon's book took it back: r2 no longer fits
    status, _ = await gk.post("/v1/facts", fact("milestone", "m2", status="approved"))
    assert status == 200
    _, rule = await gk.get("/v1/rules/tower-a/release-2")
    assert rule["state"] == "blocked"
    status, body = await _settle(gk, first, "failed", "msg-c2")
    assert status == 409 and "already settled" in body["error"]["message"]


async def test_a_failure_of_a_cancelled_release_is_recorded_and_moves_nothing(
    project_factory: Callable[..., Project], bank: Bank, start_daemon: Any
) -> None:
    amounts = {"r1": "500.00"}
    gk, release = await _released(project_factory, bank, start_daemon, "wait", "pending", **amounts)
    assert (await _cancel(gk, release))[0] == 200
    before = await _escrow(gk)
    status, body = await _settle(gk, release, "failed", "msg-x1")
    assert status == 200, body
    assert (body["status"], body["reference"], body["applied"], body["entries"]) == (
        "failed",
        "bank-msg-x1",
        False,
        [],
    )
    assert await _escrow(gk) == before
    assert (await _admin_acts(gk))[0][0] == "settlement_after_cancel"
    status, body = await _settle(gk, release, "settled", "msg-x2")
    assert status == 409 and "already failed" in body["error"]["message"]
    await asyncio.sleep(0.3)
    assert await _alerts(bank, 1) == []


async def test_a_bank_that_calls_back_before_answering_is_told_to_retry(
    project_factory: Callable[..., Project], bank: Bank, start_daemon: Any
) -> None:
    answers: list[tuple[int, str | None]] = []
    retried: list[asyncio.Task[None]] = []
    gk: Running | None = None

    async def retry(release_id: str, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        assert gk is not None
        status, _ = await _settle(gk, release_id, "settled", "msg-fast")
        answers.append((status, None))

    async def call_back(body: dict[str, Any]) -> None:
        """Settle the release before answering its request, as a fast bank does; retry
        after ``Retry-After`` as a Standard Webhooks sender does."""
        assert gk is not None
        raw, headers = signed(
            {"release_id": body["release_id"], "status": "settled", "reference": "bank-fast"},
            "msg-fast",
        )
        async with gk.session.post(
            f"{gk.url}/v1/settlements/escrow-bank", data=raw, headers=headers
        ) as response:
            answers.append((response.status, response.headers.get("Retry-After")))
            if response.status == 409:
                delay = float(response.headers["Retry-After"])
                retried.append(asyncio.create_task(retry(body["release_id"], delay)))

    bank.before_reply = call_back
    gk = await _deployed(project_factory, bank, start_daemon, r1="1000.00")
    release = await _fire(gk, 1)
    await _status_of(gk, release, "delivered")
    assert answers[0] == (409, "1")
    await asyncio.wait_for(retried[0], 10)
    assert answers[1] == (200, None)
    _, entries = await gk.get("/v1/escrows/tower-a-escrow/entries")
    assert [e["movement"] for e in entries["entries"]] == ["reserve", "send", "settle"]
    assert (await _escrow(gk))["settled"] == "1000.00"


async def test_the_movements_of_an_escrow_page_and_reconcile(
    project_factory: Callable[..., Project], bank: Bank, start_daemon: Any
) -> None:
    gk = await _deployed(project_factory, bank, start_daemon, r1="100.00", r2="200.00")
    first = await _fire(gk, 1)
    await _status_of(gk, first, "delivered")
    bank.script["/bank"] = ["wait"]
    second = await _fire(gk, 2)
    await _status_of(gk, second, "pending")
    await _cancel(gk, second)
    await _settle(gk, first, "settled", "m-1")
    entries: list[dict[str, Any]] = []
    path = "/v1/escrows/tower-a-escrow/entries?limit=2"
    while True:
        status, page = await gk.get(path)
        assert status == 200 and page["escrow"] == "tower-a-escrow"
        entries += page["entries"]
        if page["next_cursor"] is None:
            break
        path = f"/v1/escrows/tower-a-escrow/entries?limit=2&cursor={page['next_cursor']}"
    assert [(e["release_id"], e["movement"]) for e in entries] == [
        (first, "reserve"),
        (first, "send"),
        (second, "reserve"),
        (second, "cancel"),
        (second, "return"),
        (first, "settle"),
    ]
    sums: dict[str, Decimal] = {}
    for e in entries:
        sums[e["movement"]] = sums.get(e["movement"], Decimal(0)) + Decimal(e["amount"])
    account = await _escrow(gk)
    assert Decimal(account["reserved"]) == sums["reserve"] - sums["send"] - sums["cancel"]
    assert Decimal(account["settled"]) == sums["settle"]
    assert Decimal(account["returned"]) == sums["return"]
    # the bank settles the cancelled release after all: reclaim, send, settle
    status, body = await _settle(gk, second, "settled", "m-2")
    assert status == 200, body
    status, page = await gk.get("/v1/escrows/tower-a-escrow/entries")
    assert [(e["release_id"], e["movement"]) for e in page["entries"][6:]] == [
        (second, "reclaim"),
        (second, "send"),
        (second, "settle"),
    ]
    account = await _escrow(gk)
    assert (account["reserved"], account["sent"], account["settled"], account["returned"]) == (
        "0.00",
        "0.00",
        "300.00",
        "0.00",
    )
    status, _ = await gk.get("/v1/escrows/nowhere/entries")
    assert status == 404
    status, _ = await gk.get("/v1/escrows/tower-a-escrow/entries?cursor=bad")
    assert status == 400


async def test_the_cli_cancels_and_lists_escrows(
    project_factory: Callable[..., Project], bank: Bank, start_daemon: Any
) -> None:
    from gatekeeper.cli.main import main

    bank.script["/bank"] = ["wait"]
    gk = await _deployed(project_factory, bank, start_daemon, r1="700.00")
    release = await _fire(gk, 1)
    await _status_of(gk, release, "pending")
    config = str(gk.daemon.config.path)

    def run(*argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([*argv, "-c", config, "--url", gk.url])
        return code, out.getvalue(), err.getvalue()

    code, out, err = await asyncio.to_thread(
        run, "actions", "cancel", release, "--reason", "duplicate invoice"
    )
    assert (code, err) == (0, ""), err
    assert f"{release}: cancelled; 700.00 USD back in tower-a-escrow" in out
    code, out, err = await asyncio.to_thread(run, "actions", "cancel", release, "--reason", "x")
    assert code == 2 and "HTTP 409" in err  # refused as bad input: nothing changed
    code, out, _ = await asyncio.to_thread(run, "escrows")
    assert code == 0
    assert "tower-a-escrow (USD): limit 20000.00, reserved 0.00, sent 0.00" in out
    assert "returned 700.00, remaining 20000.00" in out
    code, out, _ = await asyncio.to_thread(run, "escrows", "tower-a-escrow")
    assert code == 0 and "3 movements" in out
    assert "cancel " in out and "duplicate invoice" in out
    code, _, err = await asyncio.to_thread(run, "escrows", "nowhere")
    assert code == 1 and "HTTP 404" in err
