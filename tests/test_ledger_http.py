"""The ledger through the real daemon, HTTP API and SQLite file: cancelling a release (and
what may not be cancelled), signed settlement callbacks from the bank, the escrow figures
and movements, the dead-letter and failed-settlement alerts, and the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
from collections.abc import AsyncIterator, Callable
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
    ``Retry-After: 30``, so the action waits for its retry), then 200."""

    url: str = ""
    received: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    script: dict[str, list[int | str]] = field(default_factory=dict)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.text()
        body = Webhook(SECRET).verify(raw, dict(request.headers))
        self.received.append((request.path, body))
        self.arrived.set()
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
    assert status == 409 and "has not been sent" in body["error"]["message"]
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
